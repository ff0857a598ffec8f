"""Queue counts and jobs finished per minute, from structures kept for them.

Counts: ``taskrunner.counts`` reads what every queue holds unfinished (queued,
running, scheduled), the failed jobs within ``result_ttl``, the dead letters, the
workers' heartbeats and the paused partitions, summed over the partitions; a second
pipeline, sent alongside, adds what only the admin API keeps: the succeeded, aborted
and rejected jobs within ``result_ttl`` (ZCOUNT of their indexes: O(log n)). Nothing
is scanned: the cost is the same with a million jobs.

Jobs finished per minute come from the same finished-job indexes (minutes.lua: a
ZCOUNT per index and minute, one script call per partition), so the commit path keeps
no counter for the chart. A job counts once, at its latest finish, while its record
lives: with a ``result_ttl`` under an hour the older minutes of the chart thin out.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, cast

from taskrunner import counts as core_counts
from taskrunner import scripts
from taskrunner.admin import scope
from taskrunner.admin.models import MinuteCounts, QueueCounts
from taskrunner.client import Client
from taskrunner.keys import Queue, QueueKeys

MINUTES = 60
FINISHED = ("succeeded", "failed", "aborted", "rejected", "dead")


class _Parts:
    """A queue with every partition this runner knows of (``scope.partitions``), as
    ``taskrunner.counts`` reads it."""

    def __init__(self, q: Queue, parts: list[QueueKeys]) -> None:
        self.name = q.name
        self.parts = parts
        self._q = q

    def streams(self, keys: QueueKeys) -> Sequence[str]:
        return self._q.streams(keys)


async def counts(client: Client, queues: Sequence[Queue], stale_after: float) -> list[QueueCounts]:
    """The counts of each queue: two pipelined round trips, sent together."""
    now = client.clock.now()
    parts = [_Parts(q, scope.partitions(client, q)) for q in queues]
    # both finish before either's error is raised: a round trip left running after the
    # caller has gone would reconnect on a closed pool and leak its connection
    base, extra = await asyncio.gather(
        core_counts.queue_counts(
            client.redis, parts, now=now, result_ttl=client.result_ttl_ms / 1000
        ),
        _finished(client, parts, int(now * 1000) - client.result_ttl_ms),
        return_exceptions=True,
    )
    if isinstance(base, BaseException):
        raise base
    if isinstance(extra, BaseException):
        raise extra
    live_since = time.time() - stale_after  # heartbeats are written by the workers' clocks
    found = []
    for q, core, (succeeded, aborted, rejected) in zip(parts, base, extra, strict=True):
        found.append(
            QueueCounts(
                queue=q.name,
                partitions=len(q.parts),
                queued=core.queued,
                running=core.running,
                scheduled=core.scheduled,
                succeeded=succeeded,
                failed=core.failed,
                aborted=aborted,
                rejected=rejected,
                dead=core.dead,
                paused=core.paused_partitions > 0,
                paused_partitions=core.paused_partitions,
                workers=sum(1 for _, beat in core.workers if beat >= live_since),
            )
        )
    return found


async def _finished(
    client: Client, queues: Sequence[_Parts], floor: int
) -> list[tuple[int, int, int]]:
    """Per queue: succeeded, aborted and rejected within result_ttl."""
    pipe = cast(Any, client.redis.pipeline(transaction=False))
    for q in queues:
        for keys in q.parts:
            for index in (keys.succeeded, keys.aborted, keys.rejected):
                pipe.zcount(index, floor, "+inf")
    replies = iter(await pipe.execute())
    found = []
    for q in queues:
        totals = [0, 0, 0]
        for _ in q.parts:
            for i in range(3):
                totals[i] += int(next(replies))
        found.append((totals[0], totals[1], totals[2]))
    return found


async def throughput(
    client: Client, queues: Sequence[Queue], minutes: int = MINUTES
) -> list[MinuteCounts]:
    """Jobs finished per minute over the last ``minutes`` (1 to 60) by the server's
    clock, oldest first, summed over ``queues``; minutes without any are there with
    zeros."""
    minutes = max(1, min(MINUTES, minutes))
    env = client.env
    calls = [
        scripts.minutes(env, [k.succeeded, k.failed, k.aborted, k.rejected, k.dead], minutes)
        for q in queues
        for k in scope.partitions(client, q)
    ]
    replies = await scripts.run_many(client.redis, calls)
    last = max(
        (int(r[0]) + minutes - 1 for r in replies), default=int(scope.now_ms(client) // 60000)
    )
    first = last - minutes + 1
    totals = {m: dict.fromkeys(FINISHED, 0) for m in range(first, last + 1)}
    for reply in replies:
        start = int(reply[0])
        for index, outcome in enumerate(FINISHED):
            for offset in range(minutes):
                minute = start + offset
                if minute in totals:
                    totals[minute][outcome] += int(reply[1 + index * minutes + offset])
    return [
        MinuteCounts(minute=datetime.fromtimestamp(m * 60, UTC), **totals[m])
        for m in range(first, last + 1)
    ]
