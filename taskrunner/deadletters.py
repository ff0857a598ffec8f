"""Dead letters: jobs that will not run again on their own, kept with the reason.

A job goes to its queue's dead letters (``{ns}:{queue}:dead``, a sorted set of job ids
scored by the time they died; the job hash stays, without expiry) when its stream
entry was delivered more than ``max_deliveries`` times (it keeps killing or stalling
its workers), when no task of its name is declared in the worker, when its payload
cannot be decoded or validated, or when a stream entry carries no job at all (then
the dead letter is ``entry-<stream id>``). The reason is the job's error message.

``retry_dead`` puts jobs back on their queue under the same id, with attempts reset.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import cast

from taskrunner import scripts
from taskrunner.client import Client
from taskrunner.job import JobInfo


async def dead_letters(client: Client, queues: Iterable[str]) -> list[JobInfo]:
    """Every dead-lettered job of ``queues``, oldest first within each queue."""
    found: list[JobInfo] = []
    for queue in queues:
        keys = client.keys(queue)
        ids = cast(list[str], await client.redis.zrange(keys.dead, 0, -1))
        if not ids:
            continue
        pipe = client.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(keys.job(job_id))
        states = cast(list[dict[str, str]], await pipe.execute())
        found.extend(
            JobInfo.from_hash(job_id, state)
            for job_id, state in zip(ids, states, strict=True)
            if state.get("status")
        )
    return found


async def retry_dead(
    client: Client, queues: Iterable[str], job_ids: Sequence[str] | None, *, all: bool
) -> int:
    """Put dead-lettered jobs back on their queue; returns how many were revived.

    Either name ``job_ids`` (looked up in each of ``queues``) or pass ``all=True``.
    """
    if all == bool(job_ids):
        raise ValueError("retry_dead needs either job ids or all=True (not both)")
    revived = 0
    for queue in queues:
        keys = client.keys(queue)
        ids = list(job_ids or cast(list[str], await client.redis.zrange(keys.dead, 0, -1)))
        if not ids:
            continue
        replies = await scripts.run_many(client.redis, [scripts.revive(keys, i) for i in ids])
        revived += sum(int(r) for r in replies)
    return revived
