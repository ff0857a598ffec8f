"""``python -m taskrunner``: the ``taskrunner`` command, for when its script is not on
PATH (like ``python -m celery``)."""

from taskrunner.cli import main

main()
