"""An app that records each import of itself (the pid, into the file that
``IMPORTS_APP_LOG`` names): who imports the app, and how often."""

from __future__ import annotations

import os
from pathlib import Path

from taskrunner import TaskRunner

_log = os.environ.get("IMPORTS_APP_LOG")
if _log:
    with Path(_log).open("a") as imports:
        imports.write(f"{os.getpid()}\n")

tr = TaskRunner()


@tr.task
async def noop() -> None:
    return None
