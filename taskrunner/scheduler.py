"""The scheduler: moves due jobs from each queue's delayed set into its stream.

It sleeps until the earliest due time, or until woken: by a "due" message on a
queue's events channel (a producer or another worker added an earlier job), or by
this worker after it scheduled a retry. The sleep is capped, as a fallback for a
missed message. Promotion itself is promote.lua: two schedulers racing never move
a job twice, and a crash in between loses nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import cast

import anyio
from redis.asyncio import Redis

from taskrunner import scripts
from taskrunner.client import now_ms
from taskrunner.connection import REDIS_ERRORS
from taskrunner.keys import QueueKeys

logger = logging.getLogger("taskrunner.worker")

PROMOTE_BATCH = 500
"""Members read and moved per round trip."""


class Scheduler:
    """Promotes due jobs of some queues; ``run()`` until cancelled."""

    def __init__(self, redis: Redis, keys: Sequence[QueueKeys], max_wait: float) -> None:
        self._redis = redis
        self._keys = list(keys)
        self._max_wait = max_wait
        self._due = anyio.Event()

    def wake(self) -> None:
        """Look at the delayed sets again now (something was added or may be due)."""
        self._due.set()

    async def run(self) -> None:
        while True:
            try:
                await self.promote_due()
                wait = await self._next_due_in()
            except REDIS_ERRORS as exc:
                logger.warning("redis unavailable in the scheduler (%s); retrying", exc)
                wait = 0.5
            with anyio.move_on_after(wait):
                await self._due.wait()
            self._due = anyio.Event()

    async def promote_due(self) -> int:
        """Move every job due by now into its stream; the number moved."""
        now = now_ms()
        moved = 0
        for keys in self._keys:
            while True:
                found = await self._redis.zrangebyscore(
                    keys.delayed, "-inf", now, start=0, num=PROMOTE_BATCH
                )
                members = cast(list[str], found)
                if not members:
                    break
                moved += int(await scripts.run(self._redis, scripts.promote(keys, members)))
                if len(members) < PROMOTE_BATCH:
                    break
        return moved

    async def _next_due_in(self) -> float:
        pipe = self._redis.pipeline(transaction=False)
        for keys in self._keys:
            pipe.zrange(keys.delayed, 0, 0, withscores=True)
        firsts = [float(r[0][1]) for r in await pipe.execute() if r]
        if not firsts:
            return self._max_wait
        return max(0.0, min(self._max_wait, (min(firsts) - now_ms()) / 1000))
