"""Leases: heartbeats for running jobs, XAUTOCLAIM reclaim of stale ones, and abort.

Each running job's lease is registered here for the length of its attempt. One
loop per worker renews every registered lease in one pipelined round trip per
``heartbeat_interval``; a lease that was taken over cancels its job (its outcome
is then never committed). A second loop reclaims entries idle for ``stale_after``
from workers that stopped heartbeating (crashed, stalled, partitioned) and feeds
them to this worker as new attempts. Abort requests arrive over pub/sub; the
heartbeat reply is the fallback that catches a missed message.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, cast

import anyio
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from taskrunner import scripts
from taskrunner.client import now_ms
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
    from taskrunner.worker import Worker

logger = logging.getLogger("taskrunner.lease")

REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)


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
        self._leases: dict[Worker, dict[str, ExecutionContext]] = {}

    async def execute(self, ctx: ExecutionContext, call_next: ExecuteNext) -> Outcome:
        leases = self._leases[ctx.worker]
        leases[ctx.job.id] = ctx
        try:
            return await call_next(ctx)
        finally:
            leases.pop(ctx.job.id, None)

    async def on_worker_start(self, worker: Worker) -> None:
        self._leases[worker] = {}
        worker.on_event("abort", lambda queue, job_id: self._abort(worker, job_id))
        worker.spawn(lambda: self._heartbeats(worker))
        worker.spawn(lambda: self._reclaims(worker))

    async def on_worker_stop(self, worker: Worker) -> None:
        self._leases.pop(worker, None)
        try:
            pipe = worker.redis.pipeline(transaction=False)
            for keys in worker.keys.values():
                pipe.zrem(keys.workers, worker.id)
            await pipe.execute()
        except REDIS_ERRORS as exc:
            logger.warning("could not deregister worker %s: %s", worker.id, exc)

    def _abort(self, worker: Worker, job_id: str) -> None:
        ctx = self._leases.get(worker, {}).get(job_id)
        if ctx is not None:
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
        """Renew every running job's lease and this worker's presence: one round trip."""
        leases = list(self._leases.get(worker, {}).values())
        pipe = cast(Any, worker.redis.pipeline(transaction=False))
        now = now_ms()
        for keys in worker.keys.values():
            pipe.zadd(keys.workers, {worker.id: now})
        for ctx in leases:
            call = scripts.heartbeat(
                worker.keys[ctx.job.queue],
                ctx.job.id,
                worker.id,
                ctx.entry_id,
                ctx.lease,
                ctx.lock_ttl_ms,
                ctx.locks,
            )
            pipe.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
        replies = (await pipe.execute(raise_on_error=False))[len(worker.keys) :]
        if any(isinstance(r, NoScriptError) for r in replies):
            await scripts.load_all(worker.redis)
            return  # renewed at the next beat, well before stale_after
        for ctx, reply in zip(leases, replies, strict=True):
            self._handle_beat(ctx, reply)

    @staticmethod
    def _handle_beat(ctx: ExecutionContext, reply: Any) -> None:
        if reply == 0:
            logger.warning(
                "job %s %s attempt %d: lease lost (reclaimed by another worker); "
                "cancelling this copy",
                ctx.job.id,
                ctx.job.task,
                ctx.job.attempt,
            )
            ctx.cancel(CancelReason.LOST_LEASE)
        elif reply == 2:
            ctx.cancel(CancelReason.ABORTED)
        elif isinstance(reply, Exception):
            logger.warning("heartbeat of job %s failed: %s", ctx.job.id, reply)

    # -- reclaim -------------------------------------------------------------------------

    async def _reclaims(self, worker: Worker) -> None:
        while True:
            await anyio.sleep(self.stale_after / 2)
            try:
                for keys in worker.keys.values():
                    await self.reclaim(worker, keys)
            except REDIS_ERRORS as exc:
                logger.warning("reclaim failed (%s); retrying next interval", exc)

    async def reclaim(self, worker: Worker, keys: QueueKeys) -> int:
        """Take over entries idle longer than ``stale_after``, up to the free slots.
        Follows the XAUTOCLAIM cursor until 0-0; handles Redis 7's deleted-ids element
        and Redis 6.2's nil entries (both are entries deleted from the stream)."""
        cursor, taken = "0-0", 0
        while worker.free_slots > 0 and not worker.stopping:
            reply = await worker.redis.xautoclaim(
                keys.stream,
                GROUP,
                worker.id,
                min_idle_time=int(self.stale_after * 1000),
                start_id=cursor,
                count=worker.free_slots,
            )
            cursor = reply[0]
            entries = [(i, f) for i, f in reply[1] if i is not None and f is not None]
            if entries:
                logger.warning("reclaiming %d stale job(s) from queue %s", len(entries), keys.queue)
                await worker.submit(keys, entries)
                taken += len(entries)
            if cursor == "0-0":
                break
        return taken
