"""Leases: heartbeats for running jobs, XAUTOCLAIM reclaim of stale ones, and abort.

Each running job's lease is registered here for the length of its attempt (keyed by
its fencing token, so two attempts of one job never share a registration). One loop
per worker renews every registered lease in one pipelined round trip per
``heartbeat_interval``, on the worker's command connection pool (blocking reads have
their own connection and never delay it); a lease that was taken over cancels its job
(its outcome is then never committed). A second loop reclaims entries idle for
``stale_after`` from workers that stopped heartbeating (crashed, stalled,
partitioned) and feeds them to this worker as new attempts. Abort requests arrive
over pub/sub; the heartbeat reply is the fallback that catches a missed message.

Right after a Redis restart every entry's idle time includes the downtime, so no
entry is reclaimed until the server has been up for ``stale_after``: live workers
get that long to renew their leases first.
"""

from __future__ import annotations

import logging
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any, cast

import anyio
from redis.exceptions import NoScriptError, ResponseError

from taskrunner import scripts
from taskrunner.client import now_ms
from taskrunner.connection import REDIS_ERRORS
from taskrunner.exceptions import ConfigurationError
from taskrunner.keys import GROUP, QueueKeys
from taskrunner.middleware.base import (
    CancelReason,
    ExecuteNext,
    ExecutionContext,
    Middleware,
    Outcome,
)

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from taskrunner.worker import Claimed, Worker

logger = logging.getLogger("taskrunner.lease")


Entry = tuple[str, dict[str, str]]


def parse_autoclaim(reply: Sequence[Any]) -> tuple[str, list[Entry], int]:
    """Split an XAUTOCLAIM reply (as redis-py parses it) into the next cursor, the
    claimed entries, and how many claimed ids were deleted from the stream.

    Redis 7 replies ``[cursor, entries, deleted_ids]`` and has already dropped the
    deleted ids from the pending list; Redis 6.2 replies ``[cursor, entries]`` with a
    nil (``(None, None)``) in place of each deleted entry, which stays pending under the
    claiming consumer until acknowledged (see ``ack_deleted``).
    """
    cursor = str(reply[0])
    entries: list[Entry] = []
    nils = 0
    for entry_id, fields in reply[1] or ():
        if entry_id is None or fields is None:
            nils += 1
        else:
            entries.append((str(entry_id), fields))
    return cursor, entries, nils


async def ack_deleted(redis: Redis, keys: QueueKeys, consumer: str, start: str, end: str) -> int:
    """Acknowledge this consumer's pending ids in ``[start, end]`` whose entries no
    longer exist in the stream (Redis 6.2 leaves them pending after XAUTOCLAIM)."""
    pending = await redis.xpending_range(keys.stream, GROUP, start, end, 1000, consumer)
    ids = [str(p["message_id"]) for p in pending]
    if not ids:
        return 0
    pipe = redis.pipeline(transaction=False)
    for entry_id in ids:
        pipe.xrange(keys.stream, entry_id, entry_id)
    found = await pipe.execute()
    gone = [entry_id for entry_id, rows in zip(ids, found, strict=True) if not rows]
    if gone:
        await redis.xack(keys.stream, GROUP, *gone)
    return len(gone)


class LeaseMiddleware(Middleware):
    """Heartbeats, reclaim and abort for every job a worker runs."""

    def __init__(self, heartbeat_interval: float = 5.0, stale_after: float = 30.0) -> None:
        if heartbeat_interval <= 0:
            raise ConfigurationError("heartbeat_interval must be positive")
        if stale_after < 2 * heartbeat_interval:
            raise ConfigurationError(
                f"stale_after ({stale_after:g}s) must be at least twice heartbeat_interval "
                f"({heartbeat_interval:g}s), or live jobs would be reclaimed"
            )
        self.heartbeat_interval = heartbeat_interval
        self.stale_after = stale_after
        self.reclaim_interval = stale_after / 2
        """How often each worker looks for stale entries: the recovery bound after a
        crash is ``stale_after + reclaim_interval``."""
        self._leases: dict[Worker, dict[str, ExecutionContext]] = {}
        self._last_beat: dict[Worker, float] = {}
        self._loops: dict[Worker, list[anyio.CancelScope]] = {}

    async def execute(self, ctx: ExecutionContext, call_next: ExecuteNext) -> Outcome:
        leases = self._leases[ctx.worker]
        leases[ctx.lease] = ctx
        try:
            return await call_next(ctx)
        finally:
            leases.pop(ctx.lease, None)

    async def on_worker_start(self, worker: Worker) -> None:
        self._leases[worker] = {}
        beats, reclaims = anyio.CancelScope(), anyio.CancelScope()
        self._loops[worker] = [beats, reclaims]
        worker.on_event("abort", lambda queue, job_id: self._abort(worker, job_id))
        worker.spawn(lambda: self._in(beats, self._heartbeats(worker)))
        worker.spawn(lambda: self._in(reclaims, self._reclaims(worker)))

    @staticmethod
    async def _in(scope: anyio.CancelScope, loop: Coroutine[Any, Any, None]) -> None:
        with scope:
            await loop

    async def on_worker_stop(self, worker: Worker) -> None:
        # Stop the loops first, so no heartbeat re-registers the worker after this.
        for scope in self._loops.pop(worker, []):
            scope.cancel()
        self._leases.pop(worker, None)
        self._last_beat.pop(worker, None)
        try:
            pipe = worker.redis.pipeline(transaction=False)
            for keys in worker.keys.values():
                pipe.zrem(keys.workers, worker.id)
            await pipe.execute()
        except REDIS_ERRORS as exc:
            logger.warning("could not deregister worker %s: %s", worker.id, exc)

    def _abort(self, worker: Worker, job_id: str) -> None:
        for item in worker.waiting.values():
            if item.job_id == job_id:
                item.cancelled = CancelReason.ABORTED
        for ctx in list(self._leases.get(worker, {}).values()):
            if ctx.job.id == job_id:
                logger.info(
                    "job %s %s attempt %d: abort requested; cancelling",
                    job_id,
                    ctx.job.task,
                    ctx.job.attempt,
                )
                ctx.cancel(CancelReason.ABORTED)

    # -- heartbeats ----------------------------------------------------------------------

    async def _heartbeats(self, worker: Worker) -> None:
        while True:
            await anyio.sleep(self.heartbeat_interval)
            try:
                await self.beat(worker)
            except REDIS_ERRORS as exc:
                logger.warning("heartbeat failed (%s); retrying next interval", exc)

    async def beat(self, worker: Worker) -> None:
        """Renew the lease of every job this worker holds (running, or claimed and
        waiting for a consumer) and its presence: one pipelined round trip."""
        leases = list(self._leases.get(worker, {}).values())
        waiting = list(worker.waiting.values())
        calls = [self._beat_call(worker, ctx) for ctx in leases]
        calls += [self._waiting_call(worker, item) for item in waiting]
        pipe = cast(Any, worker.redis.pipeline(transaction=False))
        now = now_ms()
        for keys in worker.keys.values():
            pipe.zadd(keys.workers, {worker.id: now})
        for call in calls:
            pipe.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
        replies = (await pipe.execute(raise_on_error=False))[len(worker.keys) :]
        if any(isinstance(r, NoScriptError) for r in replies):
            await scripts.load_all(worker.redis)  # a restarted server: renew at once
            replies = await scripts.run_many(worker.redis, calls, raise_on_error=False)
        for ctx, reply in zip(leases, replies[: len(leases)], strict=True):
            self._handle_beat(ctx, reply)
        for item, reply in zip(waiting, replies[len(leases) :], strict=True):
            if reply == 0:
                item.cancelled = CancelReason.LOST_LEASE
            elif reply == 2:
                item.cancelled = CancelReason.ABORTED
        self._last_beat[worker] = anyio.current_time()

    @staticmethod
    def _waiting_call(worker: Worker, item: Claimed) -> scripts.ScriptCall:
        # lock TTL 0: locks are renewed once the job runs (the unique layer sets the TTL)
        keys = worker.keys[item.keys.queue]
        return scripts.heartbeat(keys, item.job_id, worker.id, item.entry_id, item.token, 0, [])

    @staticmethod
    def _beat_call(worker: Worker, ctx: ExecutionContext) -> scripts.ScriptCall:
        return scripts.heartbeat(
            worker.keys[ctx.job.queue],
            ctx.job.id,
            worker.id,
            ctx.entry_id,
            ctx.lease,
            ctx.lock_ttl_ms,
            ctx.locks,
        )

    @staticmethod
    def _handle_beat(ctx: ExecutionContext, reply: Any) -> None:
        if reply == 0:
            logger.warning(
                "job %s %s attempt %d: lease lost (reclaimed by another worker, or the "
                "job is gone); cancelling this copy",
                ctx.job.id,
                ctx.job.task,
                ctx.job.attempt,
            )
            ctx.cancel(CancelReason.LOST_LEASE)
        elif reply == 2:
            logger.info(
                "job %s %s attempt %d: abort flag seen by the heartbeat; cancelling",
                ctx.job.id,
                ctx.job.task,
                ctx.job.attempt,
            )
            ctx.cancel(CancelReason.ABORTED)
        elif isinstance(reply, Exception):
            logger.warning("heartbeat of job %s failed: %s", ctx.job.id, reply)

    # -- reclaim -------------------------------------------------------------------------

    async def _reclaims(self, worker: Worker) -> None:
        while True:
            await anyio.sleep(self.reclaim_interval)
            try:
                await self.reclaim_all(worker)
            except REDIS_ERRORS as exc:  # NOGROUP after a restart: the reader recreates it
                logger.warning("reclaim failed (%s); retrying next interval", exc)

    async def reclaim_all(self, worker: Worker) -> int:
        """One reclaim round over every queue. Renews this worker's own leases first when
        the heartbeat loop is late, so a worker whose event loop was blocked never takes
        its own live jobs over."""
        if not await self._server_up_long_enough(worker):
            return 0
        if anyio.current_time() - self._last_beat.get(worker, 0.0) > self.heartbeat_interval:
            await self.beat(worker)  # the heartbeat loop is late (a blocked event loop)
        taken = 0
        for keys in worker.keys.values():
            taken += await self.reclaim(worker, keys)
        return taken

    async def _server_up_long_enough(self, worker: Worker) -> bool:
        try:
            info = await worker.redis.info("server")
        except ResponseError:  # INFO disabled on some managed servers
            return True
        uptime = float(info.get("uptime_in_seconds", self.stale_after))
        if uptime < self.stale_after:
            logger.info(
                "redis has been up %.0fs (< stale_after): not reclaiming yet, so live "
                "workers can renew their leases first",
                uptime,
            )
            return False
        return True

    async def reclaim(self, worker: Worker, keys: QueueKeys) -> int:
        """Take over entries idle longer than ``stale_after``, up to the free slots.
        Follows the XAUTOCLAIM cursor until 0-0; handles Redis 7's deleted-ids element
        and Redis 6.2's nil entries (both are entries deleted from the stream)."""
        cursor, taken = "0-0", 0
        while worker.free_slots > 0 and not worker.stopping:
            start = cursor
            reply = await worker.redis.xautoclaim(
                keys.stream,
                GROUP,
                worker.id,
                min_idle_time=int(self.stale_after * 1000),
                start_id=cursor,
                count=worker.free_slots,
            )
            cursor, entries, nils = parse_autoclaim(reply)
            if nils:
                end = "+" if cursor == "0-0" else cursor
                await ack_deleted(worker.redis, keys, worker.id, start, end)
            if entries:
                logger.warning(
                    "reclaiming %d stale job(s) from queue %s: %s",
                    len(entries),
                    keys.queue,
                    ",".join(fields.get("job", entry_id) for entry_id, fields in entries),
                )
                await worker.submit(keys, entries)
                taken += len(entries)
            if cursor == "0-0":
                break
        return taken
