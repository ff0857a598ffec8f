"""Queue counts and jobs finished per minute, from structures kept for them.

Counts, per partition, in one pipelined round trip for every queue: each level
stream's length and its consumer group's pending count (queued = length - pending:
commits delete their entry, so every entry left is unread or pending), the delayed
set's size, the finished-job indexes counted over the last ``result_ttl`` (ZCOUNT:
O(log n)), the dead letters and the paused key; per queue, the live workers. Summed
over the partitions. Nothing is scanned: the cost is the same with a million jobs.

Jobs finished per minute come from the same finished-job indexes (minutes.lua: a
ZCOUNT per index and minute, one script call per partition), so the commit path keeps
no counter for the chart. A job counts once, at its latest finish, while its record
lives: with a ``result_ttl`` under an hour the older minutes of the chart thin out.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, cast

from taskrunner import scripts
from taskrunner.admin import scope
from taskrunner.admin.models import MinuteCounts, QueueCounts
from taskrunner.client import Client
from taskrunner.keys import GROUP, Queue, QueueKeys

MINUTES = 60
FINISHED = ("succeeded", "failed", "aborted", "rejected", "dead")
_PER_PART = 7
"""Replies per partition besides two per level: delayed, 4 indexes, dead, paused."""


async def counts(client: Client, queues: Sequence[Queue], stale_after: float) -> list[QueueCounts]:
    """The counts of each queue (one round trip for all of them)."""
    floor = scope.now_ms(client) - client.result_ttl_ms
    parts = [scope.partitions(client, q) for q in queues]
    pipe = cast(Any, client.redis.pipeline(transaction=False))
    for q, keys_list in zip(queues, parts, strict=True):
        pipe.zcount(keys_list[0].workers, int((time.time() - stale_after) * 1000), "+inf")
        for keys in keys_list:
            _count_partition(pipe, q, keys, floor)
    replies = iter(await pipe.execute(raise_on_error=False))
    return [
        _queue_counts(q, len(keys_list), replies)
        for q, keys_list in zip(queues, parts, strict=True)
    ]


def _count_partition(pipe: Any, q: Queue, keys: QueueKeys, floor: int) -> None:
    for stream in q.streams(keys):
        pipe.xlen(stream)
        pipe.xpending(stream, GROUP)
    pipe.zcard(keys.delayed)
    for index in (keys.succeeded, keys.failed, keys.aborted, keys.rejected):
        pipe.zcount(index, floor, "+inf")
    pipe.zcard(keys.dead)
    pipe.exists(keys.paused)


def _number(reply: Any) -> int:
    if isinstance(reply, dict):  # XPENDING's summary
        reply = reply.get("pending", 0)
    try:
        return int(reply)
    except (TypeError, ValueError):  # an error reply: no stream or group yet
        return 0


def _queue_counts(q: Queue, partitions: int, replies: Any) -> QueueCounts:
    found = QueueCounts(queue=q.name, partitions=partitions, workers=_number(next(replies)))
    found.queued_by_priority = dict.fromkeys(q.levels, 0)
    for _ in range(partitions):
        for level in q.levels:
            length, pending = _number(next(replies)), _number(next(replies))
            found.queued_by_priority[level] += max(0, length - pending)
            found.running += pending
        found.scheduled += _number(next(replies))
        found.succeeded += _number(next(replies))
        found.failed += _number(next(replies))
        found.aborted += _number(next(replies))
        found.rejected += _number(next(replies))
        found.dead += _number(next(replies))
        found.paused_partitions += _number(next(replies))
    found.queued = sum(found.queued_by_priority.values())
    found.paused = found.paused_partitions > 0
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
