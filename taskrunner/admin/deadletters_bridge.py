"""Deleting dead letters, until ``taskrunner.deadletters`` offers it.

The dead letters module is being made paginated, with delete and purge, by its owner
(per key group, like these two: ``delete_dead(redis, keys, ids)`` and
``purge_dead(redis, keys)``); the admin API calls only these, so switching to that
module's versions is a change of imports in ``taskrunner.admin.api``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from redis.asyncio import Redis

from taskrunner import scripts
from taskrunner.keys import QueueKeys

BATCH = 100
"""Dead letters deleted per script call."""


async def delete_dead(redis: Redis, keys: QueueKeys, job_ids: Sequence[str]) -> int:
    """Delete these dead letters of one partition and their jobs, ``BATCH`` per script
    call; how many were dead letters there."""
    deleted = 0
    for start in range(0, len(job_ids), BATCH):
        chunk = job_ids[start : start + BATCH]
        deleted += int(await scripts.run(redis, scripts.forget(keys, chunk)))
    return deleted


async def purge_dead(redis: Redis, keys: QueueKeys) -> int:
    """Delete every dead letter of one partition, ``BATCH`` per script call (a million
    of them never hold the server in one call); how many were deleted. Dead letters
    that arrive meanwhile are left alone."""
    last = cast(list[tuple[str, float]], await redis.zrange(keys.dead, -1, -1, withscores=True))
    if not last:
        return 0
    bound = last[0][1]
    deleted = 0
    while True:
        ids = cast(
            list[str], await redis.zrangebyscore(keys.dead, "-inf", bound, start=0, num=BATCH)
        )
        done = await delete_dead(redis, keys, ids) if ids else 0
        if done == 0:
            return deleted
        deleted += done
