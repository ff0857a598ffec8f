"""The app of the ACL test (tests/test_acl.py): its tasks touch Redis only through
taskrunner, so a worker runs under the ACL user docs/deployment.md documents and
nothing else.

Its Redis comes from TASKRUNNER_REDIS_URL; the namespace is the default one
(``taskrunner``), which the documented key and channel patterns name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import anyio

from taskrunner import Task, TaskRunner, current_job

HEARTBEAT = 0.2
STALE = 1.0


def runner(url: str | None = None) -> TaskRunner:
    return TaskRunner(
        url or os.environ.get("TASKRUNNER_REDIS_URL"),
        heartbeat_interval=HEARTBEAT,
        stale_after=STALE,
        max_retries=1,
        retry_delay=0.01,
        partitions=2,
    )


@dataclass(frozen=True)
class Tasks:
    add: Task[[int, int], int]
    hold: Task[[], int]
    """Hangs on its first attempt (its worker is killed there); returns the attempt."""


def declare(tr: TaskRunner) -> Tasks:
    @tr.task(name="add")
    async def add(x: int, y: int) -> int:
        return x + y

    @tr.task(name="hold")
    async def hold() -> int:
        if current_job().attempt == 1:
            await anyio.sleep(3600)
        return current_job().attempt

    return Tasks(add, hold)


tr = runner()
tasks = declare(tr)
