"""Rate- and concurrency-limited tasks for tests that run real worker processes.

    taskrunner worker apps.limits_app:tr

Its Redis comes from TASKRUNNER_REDIS_URL, its key namespace from TEST_NAMESPACE and its
lease timings from LIMITS_STALE_AFTER / LIMITS_HEARTBEAT (conftest's ``subprocess_env``).
Every task appends JSON events to ``{ns}:test:events``: ``{"kind": "start" | "end",
"task", "i", "key", "job", "attempt", "pid", "t"}`` (``t``: this host's clock, shared by
every process of a test). ``gated`` waits until ``{ns}:test:gate`` exists before it ends.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import anyio

from taskrunner import Task, TaskRunner, current_job

NAMESPACE = os.environ.get("TEST_NAMESPACE", "taskrunner")
STALE_AFTER = float(os.environ.get("LIMITS_STALE_AFTER", "2.0"))
HEARTBEAT = float(os.environ.get("LIMITS_HEARTBEAT", "0.3"))

HELD_LIMIT = 2
PACED_RATE = (6, 2.0)
"""``paced``: at most 6 starts in any 2 seconds."""


def events_key(namespace: str) -> str:
    return f"{namespace}:test:events"


def gate_key(namespace: str) -> str:
    return f"{namespace}:test:gate"


@dataclass(frozen=True)
class Tasks:
    held: Task[[int, float], int]
    paced: Task[[int], int]
    gated: Task[[int, str], int]
    plain: Task[[int], int]


def runner(url: str | None = None, namespace: str = NAMESPACE) -> TaskRunner:
    return TaskRunner(
        url,
        namespace=namespace,
        retry_delay=0.01,
        heartbeat_interval=HEARTBEAT,
        stale_after=STALE_AFTER,
    )


def declare(tr: TaskRunner) -> Tasks:
    """Declare the app's tasks on ``tr`` (tests declare them on their own runner too)."""

    async def paired() -> None:
        """Hold the first ``held`` run until a second one started: with workers of one
        slot each, the first two runs are then in two processes, however the jobs were
        spread (bounded wait: a test fails on the deadline, it does not hang)."""
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            raw = await tr.client.redis.lrange(events_key(tr.namespace), 0, -1)
            if (
                sum(1 for e in parse_events(raw) if e["task"] == "held" and e["kind"] == "start")
                >= 2
            ):
                return
            await anyio.sleep(0.01)

    async def record(kind: str, task: str, i: int, key: str = "") -> None:
        job = current_job()
        event = {
            "kind": kind,
            "task": task,
            "i": i,
            "key": key,
            "job": job.id,
            "attempt": job.attempt,
            "pid": os.getpid(),
            "t": time.time(),
        }
        await tr.client.redis.rpush(events_key(tr.namespace), json.dumps(event))

    @tr.task(name="held", concurrency_limit=HELD_LIMIT, max_retries=0)
    async def held(i: int, seconds: float) -> int:
        await record("start", "held", i)
        await paired()
        await anyio.sleep(seconds)
        await record("end", "held", i)
        return i

    @tr.task(name="paced", rate_limit=f"{PACED_RATE[0]}/{PACED_RATE[1]:g}s", max_retries=0)
    async def paced(i: int) -> int:
        await record("start", "paced", i)
        return i

    @tr.task(name="gated", concurrency_limit=1, limit_args=["account"], max_retries=0)
    async def gated(i: int, account: str = "main") -> int:
        await record("start", "gated", i, account)
        while not await tr.client.redis.exists(gate_key(tr.namespace)):  # noqa: ASYNC110
            await anyio.sleep(0.02)  # the gate is opened by the test process
        await record("end", "gated", i, account)
        return i

    @tr.task(name="plain", max_retries=0)
    async def plain(i: int) -> int:
        await record("start", "plain", i)
        return i

    return Tasks(held, paced, gated, plain)


tr = runner()
tasks = declare(tr)


def parse_events(raw: Sequence[str | bytes]) -> list[dict[str, Any]]:
    return [json.loads(item) for item in raw]
