"""A taskrunner app with the Prometheus middleware, for worker subprocesses of the
metrics tests (Redis from TASKRUNNER_REDIS_URL, namespace from TEST_NAMESPACE).

Its tasks succeed, fail for good, fail once and then succeed (a retry), enqueue
another job from inside a worker, or hang on their first attempt until a reclaim
takes them over.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import anyio
from redis.asyncio import Redis

from taskrunner import Task, TaskRunner, current_job
from taskrunner.metrics import PrometheusMiddleware

NAMESPACE = os.environ.get("TEST_NAMESPACE", "taskrunner")
STALE_AFTER = 1.0

tr = TaskRunner(
    namespace=NAMESPACE,
    retry_delay=0.01,
    heartbeat_interval=0.2,
    stale_after=STALE_AFTER,
    middleware=[PrometheusMiddleware(queue_interval=0.1)],
)


@dataclass(frozen=True)
class Tasks:
    ok: Task[[int], int]
    boom: Task[[], None]
    flaky: Task[[], int]
    fan_out: Task[[int], int]
    hang_once: Task[[], int]
    gate: Task[[str], str]


def declare(runner: TaskRunner) -> Tasks:
    """Declare the app's tasks on ``runner`` (tests declare them on their own runner)."""

    @runner.task(name="ok")
    async def ok(n: int) -> int:
        return n

    @runner.task(name="boom", max_retries=0)
    async def boom() -> None:
        raise ValueError("boom")

    @runner.task(name="flaky", max_retries=2)
    async def flaky() -> int:
        if current_job().attempt == 1:
            raise RuntimeError("first attempt fails")
        return current_job().attempt

    @runner.task(name="fan_out")
    async def fan_out(n: int) -> int:
        await ok.enqueue_many([ok.call(i) for i in range(n)])
        return n

    @runner.task(name="hang_once", max_retries=0)
    async def hang_once() -> int:
        if not current_job().reclaimed:
            await anyio.sleep(3600)  # until its worker is killed
        return current_job().attempt

    @runner.task(name="gate")
    async def gate(key: str) -> str:
        """Wait until the test pushes a value onto the list ``key``; return it."""
        url = os.environ["TASKRUNNER_REDIS_URL"]
        async with Redis.from_url(url, decode_responses=True) as client:
            found = await client.blpop([key], timeout=0)
        assert found is not None  # no timeout: it returns only with a value
        return str(found[1])

    return Tasks(ok, boom, flaky, fan_out, hang_once, gate)


tasks = declare(tr)
