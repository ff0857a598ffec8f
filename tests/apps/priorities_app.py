"""Tasks of three priority levels for tests that run real worker processes.

    taskrunner worker apps.priorities_app:tr

Its Redis comes from TASKRUNNER_REDIS_URL, its key namespace from TEST_NAMESPACE, its
lease timings from PRIO_STALE_AFTER / PRIO_HEARTBEAT, ``priority_aging`` from
PRIO_AGING and the queue's partitions from PRIO_PARTITIONS (unset: the default).

``work(name, gated, pause)`` appends ``{"name", "job", "attempt", "level", "ms"}``
(``ms``: the server's clock) to ``{ns}:test:starts`` when its body starts, then, if
``gated``, waits until ``{ns}:test:open:{name}`` exists (the test opens it), then
sleeps ``pause`` seconds. ``work`` is "low" by default; tests pick the level per call.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import anyio

from taskrunner import Task, TaskRunner, current_job

NAMESPACE = os.environ.get("TEST_NAMESPACE", "taskrunner")
STALE_AFTER = float(os.environ.get("PRIO_STALE_AFTER", "2.0"))
HEARTBEAT = float(os.environ.get("PRIO_HEARTBEAT", "0.3"))
AGING = float(os.environ.get("PRIO_AGING", "60"))
PARTITIONS = int(os.environ["PRIO_PARTITIONS"]) if os.environ.get("PRIO_PARTITIONS") else None


def starts_key(namespace: str) -> str:
    return f"{namespace}:test:starts"


def gate_key(namespace: str, name: str) -> str:
    return f"{namespace}:test:open:{name}"


def runner(
    url: str | None = None, namespace: str = NAMESPACE, partitions: int | None = PARTITIONS
) -> TaskRunner:
    return TaskRunner(
        url,
        namespace=namespace,
        heartbeat_interval=HEARTBEAT,
        stale_after=STALE_AFTER,
        priority_aging=AGING,
        partitions=partitions,
    )


def declare(tr: TaskRunner) -> Task[[str, bool, float], str]:
    """Declare ``work`` on ``tr`` (tests declare it on their own runner too)."""

    @tr.task(name="work", priority="low", max_retries=0)
    async def work(name: str, gated: bool = False, pause: float = 0.0) -> str:
        redis = tr.client.redis
        job = current_job()
        seconds, micros = await redis.time()
        event = {
            "name": name,
            "job": job.id,
            "attempt": job.attempt,
            "level": job.priority,
            "ms": int(seconds) * 1000 + int(micros) // 1000,
        }
        await redis.rpush(starts_key(tr.namespace), json.dumps(event))
        while gated and not await redis.exists(gate_key(tr.namespace, name)):  # noqa: ASYNC110
            await anyio.sleep(0.02)  # the gate is opened by the test process
        await anyio.sleep(pause)
        return name

    return work


tr = runner()
work = declare(tr)


def parse_starts(raw: Sequence[str | bytes]) -> list[dict[str, Any]]:
    return [json.loads(item) for item in raw]
