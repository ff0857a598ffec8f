"""The sample application the docs refer to as ``app.tasks`` (see tests/docsrun.py)."""
