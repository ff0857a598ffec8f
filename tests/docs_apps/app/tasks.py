"""``app.tasks``: the tasks module of the sample application in the docs' examples.

The docs run ``taskrunner worker app.tasks:tr`` and ``from app.tasks import add, tr``
against it (tests/docsrun.py puts it in the directory each page runs in). Its own
namespace keeps its jobs apart from the runners that a page's Python blocks declare.
"""

from __future__ import annotations

from taskrunner import TaskRunner

tr = TaskRunner(namespace="docs-app", heartbeat_interval=0.5, stale_after=5)


@tr.task
async def add(x: int, y: int) -> int:
    return x + y


@tr.task(queue="emails", max_retries=5)
async def send_email(to: str, subject: str) -> str:
    return f"sent {subject!r} to {to}"
