"""A taskrunner app for worker subprocesses started by the tests (through the CLI).

Its Redis comes from TASKRUNNER_REDIS_URL and its key namespace from TEST_NAMESPACE
(see ``conftest.subprocess_env``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import anyio
from redis.asyncio import Redis

from taskrunner import Task, TaskRunner, current_job

NAMESPACE = os.environ.get("TEST_NAMESPACE", "taskrunner")

tr = TaskRunner(namespace=NAMESPACE, retry_delay=0.01, heartbeat_interval=0.5, stale_after=30.0)

_clients: dict[str, Redis] = {}


def runs_key(namespace: str) -> str:
    """Hash of job id -> executions, written by ``record``."""
    return f"{namespace}:test-runs"


@dataclass(frozen=True)
class Tasks:
    add: Task[[int, int], int]
    pid: Task[[], int]
    elsewhere: Task[[int], int]
    sleepy: Task[[float], float]
    record: Task[[int], int]


def declare(runner: TaskRunner) -> Tasks:
    """Declare the app's tasks on ``runner`` (tests declare them on their own runner too)."""

    @runner.task(name="add")
    async def add(x: int, y: int) -> int:
        return x + y

    @runner.task(name="pid")
    async def pid() -> int:
        return os.getpid()

    @runner.task(name="elsewhere", queue="other")
    async def elsewhere(x: int) -> int:
        return x

    @runner.task(name="sleepy", max_retries=0)
    async def sleepy(seconds: float) -> float:
        await anyio.sleep(seconds)
        return seconds

    @runner.task(name="record")
    async def record(n: int) -> int:
        """Count this execution in Redis, so a test can prove each job ran once."""
        url = os.environ["TASKRUNNER_REDIS_URL"]
        if url not in _clients:
            _clients[url] = Redis.from_url(url, decode_responses=True)
        await _clients[url].hincrby(runs_key(runner.namespace), current_job().id, 1)
        return n

    return Tasks(add, pid, elsewhere, sleepy, record)


tasks = declare(tr)


not_a_runner = "just a string"
