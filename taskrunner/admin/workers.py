"""Workers: who is alive, when each last beat, and which jobs each holds.

A worker's heartbeat writes its id into each of its queues' ``workers`` set, scored by
the time (ms). The entries a worker holds are its pending entries in the consumer
group of every level stream of every partition: XPENDING's summary per stream gives
how many each consumer holds, then XPENDING per consumer (bounded) lists them, each
mapped to its job by the entry's ``job`` field. A consumer that holds entries but left
the workers set (it stopped beating long ago; a reclaim will take them) is listed too,
as gone. At most ``MAX_WORKERS`` per queue: the most recent heartbeats first, then
gone consumers while there is room; the jobs of them all are read in three round trips.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

from redis.asyncio import Redis

from taskrunner.admin import scope
from taskrunner.admin.listing import states, to_info
from taskrunner.admin.models import RunningJob, WorkerDetail
from taskrunner.client import Client
from taskrunner.job import safe_text
from taskrunner.keys import GROUP, Queue, QueueKeys

MAX_WORKERS = 200
RUNNING_SHOWN = 20
"""Jobs listed per worker (``holding`` counts them all)."""


@dataclass(slots=True)
class _Seen:
    """What the first round trip found: heartbeats, and who holds what where."""

    beats: dict[str, tuple[float, list[str]]] = field(default_factory=dict)
    holding: dict[str, dict[tuple[str, str], tuple[QueueKeys, int]]] = field(default_factory=dict)
    """consumer -> {(queue, stream): (partition, entries held)}"""


async def workers(
    client: Client, queues: Sequence[Queue], stale_after: float
) -> list[WorkerDetail]:
    """Every worker of ``queues``, most recent heartbeat first (gone ones last)."""
    seen = await _survey(client.redis, [(q, scope.partitions(client, q)) for q in queues])
    now = time.time()
    found = {
        worker_id: _detail(worker_id, score, sorted(set(names)), now, stale_after)
        for worker_id, (score, names) in seen.beats.items()
    }
    room = MAX_WORKERS * len(queues) - len(found)  # gone consumers: as many as fit
    shown: dict[str, dict[tuple[str, str], tuple[QueueKeys, int]]] = {}
    for worker_id, held in seen.holding.items():
        detail = found.get(worker_id)
        if detail is None:
            if room <= 0:
                continue
            room -= 1
            detail = found[worker_id] = _gone(worker_id, sorted({q for q, _ in held}))
        detail.holding = sum(n for _, n in held.values())
        shown[worker_id] = held
    for worker_id, jobs in (await _running(client.redis, shown)).items():
        found[worker_id].running = jobs
    return sorted(found.values(), key=lambda w: (w.age is None, w.age or 0.0))


async def _survey(redis: Redis, queues: list[tuple[Queue, list[QueueKeys]]]) -> _Seen:
    """Heartbeats and XPENDING summaries of every stream: one round trip."""
    pipe = cast(Any, redis.pipeline(transaction=False))
    plan: list[tuple[Queue, QueueKeys | None, str]] = []
    for q, parts in queues:
        pipe.zrevrange(parts[0].workers, 0, MAX_WORKERS - 1, withscores=True)
        plan.append((q, None, ""))
        for keys in parts:
            for stream in q.streams(keys):
                pipe.xpending(stream, GROUP)
                plan.append((q, keys, stream))
    seen = _Seen()
    for (q, part, stream), reply in zip(
        plan, await pipe.execute(raise_on_error=False), strict=True
    ):
        if part is None:
            for worker_id, score in reply if isinstance(reply, list) else []:
                last, names = seen.beats.get(worker_id, (0.0, []))
                seen.beats[worker_id] = (max(last, float(score)), [*names, q.name])
            continue
        for consumer, count in _consumers(reply).items():
            seen.holding.setdefault(consumer, {})[(q.name, stream)] = (part, count)
    return seen


def _consumers(summary: Any) -> dict[str, int]:
    if not isinstance(summary, dict):
        return {}
    found = {}
    for c in summary.get("consumers") or []:
        count = int(c.get("pending", 0))
        if count:
            found[str(c["name"])] = count
    return found


def _detail(
    worker_id: str, score: float, queues: list[str], now: float, stale_after: float
) -> WorkerDetail:
    seen = _heartbeat(score)
    if seen is None:  # a score no clock gives: shown as a stale worker without a time
        return _gone(worker_id, queues)
    age = max(0.0, now - seen.timestamp())
    return WorkerDetail(
        id=_shown(worker_id),
        queues=queues,
        last_heartbeat=seen,
        age=round(age, 3),
        stale=age > stale_after,
        holding=0,
        running=[],
    )


def _heartbeat(score: float) -> datetime | None:
    """The time of a heartbeat score (ms); None when it is no time at all (infinite,
    or beyond what a datetime holds)."""
    try:
        return datetime.fromtimestamp(score / 1000, UTC)
    except (ValueError, OverflowError, OSError):
        return None


def _shown(worker_id: str) -> str:
    """A worker id as text that can be shown (valid UTF-8, at most 200 characters)."""
    return safe_text(worker_id, 200)


def _gone(worker_id: str, queues: list[str]) -> WorkerDetail:
    return WorkerDetail(
        id=_shown(worker_id),
        queues=queues,
        last_heartbeat=None,
        age=None,
        stale=True,
        holding=0,
        running=[],
    )


async def _running(
    redis: Redis, shown: dict[str, dict[tuple[str, str], tuple[QueueKeys, int]]]
) -> dict[str, list[RunningJob]]:
    """Up to ``RUNNING_SHOWN`` of the jobs each worker holds (three round trips for
    them all, however many workers)."""
    where = [
        (w, stream, keys) for w, held in shown.items() for (_, stream), (keys, _) in held.items()
    ]
    pipe = cast(Any, redis.pipeline(transaction=False))
    for worker_id, stream, _ in where:
        pipe.xpending_range(stream, GROUP, "-", "+", RUNNING_SHOWN, consumername=worker_id)
    entries: dict[str, list[tuple[str, QueueKeys, str]]] = {}
    for (worker_id, stream, keys), pending in zip(
        where, await pipe.execute(raise_on_error=False), strict=True
    ):
        mine = entries.setdefault(worker_id, [])
        for p in pending if isinstance(pending, list) else []:
            if len(mine) < RUNNING_SHOWN:
                mine.append((stream, keys, str(p["message_id"])))
    flat = [(w, stream, keys, entry) for w, mine in entries.items() for stream, keys, entry in mine]
    pipe = redis.pipeline(transaction=False)
    for _, stream, _, entry_id in flat:
        pipe.xrange(stream, entry_id, entry_id)
    rows = await pipe.execute()
    jobs = [
        (worker_id, keys, r[0][1].get("job", ""))
        for (worker_id, _, keys, _), r in zip(flat, rows, strict=True)
        if r and r[0][1].get("job")
    ]
    found: dict[str, list[RunningJob]] = {}
    states_of = await states(redis, [(keys, job_id) for _, keys, job_id in jobs])
    for (worker_id, keys, job_id), state in zip(jobs, states_of, strict=True):
        info = to_info(job_id, state)
        if info is not None:
            found.setdefault(worker_id, []).append(
                RunningJob(
                    id=info.id,
                    queue=keys.queue,
                    task=info.task,
                    status=info.status,
                    attempts=info.attempts,
                    priority=info.priority,
                    started_at=info.started_at,
                    progress=info.progress,
                )
            )
    return found
