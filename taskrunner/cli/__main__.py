"""``python -m taskrunner.cli``: the ``taskrunner`` command (supervisors start workers so)."""

from taskrunner.cli import main

main()
