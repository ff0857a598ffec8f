"""``app.v2``: the next version of the sample app, as a producer deployed before its workers.

It declares ``refund``, which the running workers (``app.tasks:tr``, ``myapp:tr``) do not
have yet, in the same namespace: docs/reliability.md enqueues it to show a dead letter
(``unknown task 'refund'``) and the commands that list, retry and remove it.
"""

from __future__ import annotations

from taskrunner import TaskRunner

tr = TaskRunner(namespace="docs-app")  # the namespace of app.tasks:tr


@tr.task
async def refund(order: str) -> str:
    return f"refunded {order}"
