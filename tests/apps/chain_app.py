"""A chains-and-groups app for worker subprocesses started by the tests.

Its Redis comes from TASKRUNNER_REDIS_URL and its namespace from TEST_NAMESPACE
(``conftest.subprocess_env``). Every task counts its executions per job id in the hash
``{ns}:test:chain-runs`` (``runs_key``), so a test can tell a follow-up that ran twice.

``TEST_CHAIN_KILL=<task>``: the worker SIGKILLs itself as soon as the success of a
``<task>`` job is recorded in Redis (in ``on_commit``, the same callback that wakes
its relay, so the relay never runs): a worker that dies between a chain step's
commit and the write of its follow-up. Its fallback wait is an hour, so nothing of it
touches the outbox again before it dies.
"""

from __future__ import annotations

import os
import signal

import anyio
from redis.asyncio import Redis

from taskrunner import JobContext, Middleware, Outcome, OutcomeKind, TaskRunner, current_job

NAMESPACE = os.environ.get("TEST_NAMESPACE", "taskrunner")
KILL = os.environ.get("TEST_CHAIN_KILL", "")


class KillAfterCommit(Middleware):
    def on_commit(self, job: JobContext, outcome: Outcome) -> None:
        if job.task == KILL and outcome.kind == OutcomeKind.SUCCEEDED:
            os.kill(os.getpid(), signal.SIGKILL)


tr = TaskRunner(
    namespace=NAMESPACE,
    heartbeat_interval=0.2,
    stale_after=1.0,
    retry_delay=0.01,
    middleware=[KillAfterCommit()] if KILL else [],
)
if KILL:
    tr.max_idle_wait = 3600.0

_clients: dict[str, Redis] = {}


def runs_key(namespace: str) -> str:
    return f"{namespace}:test:chain-runs"


async def count_run() -> None:
    url = os.environ["TASKRUNNER_REDIS_URL"]
    if url not in _clients:
        _clients[url] = Redis.from_url(url, decode_responses=True)
    await _clients[url].hincrby(runs_key(NAMESPACE), current_job().id, 1)


@tr.task
async def add(x: int, y: int) -> int:
    await count_run()
    return x + y


@tr.task(queue="other")
async def double(x: int) -> int:
    await count_run()
    return 2 * x


@tr.task
async def label(total: int, unit: str) -> str:
    await count_run()
    return f"{total} {unit}"


@tr.task
async def slow_square(x: int, seconds: float) -> int:
    await count_run()
    await anyio.sleep(seconds)
    return x * x
