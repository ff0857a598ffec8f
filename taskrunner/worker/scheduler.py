"""The scheduler: moves due jobs from each partition's delayed set into their streams.

It sleeps until the earliest due time, or until woken: by a "due" message on an events
channel (a producer or another worker added an earlier job), or by this worker after
it scheduled a retry. The sleep is capped, as a fallback for a missed message. "Now"
is the server's clock (read with TIME each round, plus the runner's clock offset), and
promote.lua checks every member against the server's clock again, so a worker whose
clock runs ahead never promotes a job early. Two schedulers racing never move a job
twice, and a crash in between loses nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from typing import Any, cast

import anyio
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from taskrunner import scripts
from taskrunner.clock import Clock
from taskrunner.connection import REDIS_ERRORS, reachable, report, wrong_type
from taskrunner.keys import QueueKeys

logger = logging.getLogger("taskrunner.worker")

PROMOTE_BATCH = 500
"""Members read and moved per script call."""


async def server_ms(redis: Redis) -> int:
    """The server's clock in ms."""
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


def parse_member(member: str) -> tuple[str, str]:
    """``(level, job_id)`` of a delayed-set member ``<16 hex>:<level>:<job id>``."""
    level, _, job_id = member[17:].partition(":")
    return level, job_id


class Scheduler:
    """Promotes due jobs of some partitions; ``run()`` until cancelled."""

    def __init__(
        self,
        redis: Redis,
        partitions: Callable[[], Sequence[QueueKeys]],
        env: Callable[[], scripts.Env],
        clock: Callable[[], Clock],
        max_wait: float,
        levels: Collection[str] = (),
    ) -> None:
        self._redis = redis
        self._levels = frozenset(levels)
        """The runner's priority levels: a member naming another (hostile, or a level
        since removed) goes to its partition's default level instead of a stream that
        no worker reads."""
        self._partitions = partitions
        self._env = env
        self._clock = clock
        self._max_wait = max_wait
        self._due = anyio.Event()
        self.promoted = 0
        """Jobs promoted so far, by ``run`` or ``promote_due`` (a burst worker reads
        again after any)."""

    def wake(self) -> None:
        """Look at the delayed sets again now (something was added or may be due)."""
        self._due.set()

    async def run(self) -> None:
        while True:
            try:
                await self.promote_due()
                wait = await self._next_due_in()
                reachable()
            except REDIS_ERRORS as exc:
                report("the scheduler", exc)
                wait = 0.5
            except Exception:  # a bug or hostile data: keep scheduling
                logger.exception("scheduler: unexpected error; retrying")
                wait = 0.5
            with anyio.move_on_after(wait):
                await self._due.wait()
            self._due = anyio.Event()

    async def promote_due(self) -> int:
        """Move every job due by now into its stream; the number moved."""
        env = self._env()
        now = self._clock().shift(await server_ms(self._redis))
        moved = 0
        for keys in self._partitions():
            try:
                moved += await self._promote(env, keys, now)
            except ResponseError as exc:
                if not wrong_type(exc):
                    raise
                report(f"promoting the due jobs of {keys.prefix}", exc)  # hostile: skip it
        return moved

    async def _promote(self, env: scripts.Env, keys: QueueKeys, now: float) -> int:
        """Move the due jobs of one partition; the number moved."""
        moved = 0
        while True:
            found = await self._redis.zrangebyscore(
                keys.delayed, "-inf", now, start=0, num=PROMOTE_BATCH
            )
            members = [self._target(keys, m) for m in cast(list[str], found)]
            if not members:
                return moved
            call = scripts.promote(env, keys, [(m, j, lv) for m, j, lv in members])
            count = int(await scripts.run(self._redis, call))
            moved += count
            self.promoted += count
            if count:
                logger.debug("promoted %d due job(s) of %s", count, keys.prefix)
            if len(members) < PROMOTE_BATCH or count == 0:
                return moved

    def _target(self, keys: QueueKeys, member: str) -> tuple[str, str, str]:
        """``(member, job id, level)``: the member's level if the runner has it."""
        level, job_id = parse_member(member)
        if self._levels and level not in self._levels:
            level = keys.default_level
        return member, job_id, level

    async def _next_due_in(self) -> float:
        partitions = self._partitions()
        now = self._clock().shift(await server_ms(self._redis))
        pipe = cast(Any, self._redis.pipeline(transaction=False))
        for keys in partitions:
            pipe.zrange(keys.delayed, 0, 0, withscores=True)
        replies = await pipe.execute(raise_on_error=False)
        firsts = [float(r[0][1]) for r in replies if r and not isinstance(r, Exception)]
        if not firsts:
            return self._max_wait
        return max(0.0, min(self._max_wait, (min(firsts) - now) / 1000))
