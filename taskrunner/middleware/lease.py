"""Leases: heartbeats for held jobs, reclaim of stale ones, and abort.

Each running job's lease is registered here for the length of its attempt (keyed by
its fencing token, so two attempts of one job never share a registration). One loop
per worker renews every lease it holds (running jobs, and claimed jobs waiting for a
consumer) in one pipelined round trip per ``heartbeat_interval``, on the worker's own
connections; a lease that was taken over cancels its job (its outcome is then never
committed). Abort requests arrive over pub/sub; the heartbeat reply is the fallback.

Reclaim: a second loop looks for entries idle longer than ``stale_after`` (their worker
stopped heartbeating: crashed, stalled, cut off) and puts them back on their stream
(requeue.lua), where any worker takes them as new attempts. At most one worker scans a
partition per ``reclaim_interval`` (a turn taken in Redis), with a fixed batch size,
so the cost does not grow with the number of workers.

The outage guard: after an outage every lease looks stale, including those of live
workers that have not reconnected yet. So a worker reclaims only after it has itself
been connected and heartbeating without a gap for ``stale_after``, and the server it
sees has been up that long; a change of server identity (a restart, a failover: run id
or replication id) starts the wait again. A live worker therefore gets
``stale_after``, from the moment the judging worker is back, to renew its leases; one
that is back more than ``stale_after`` after the others looks dead (docs/reliability.md).

Housekeeping in the same turn: consumers that hold nothing and have been idle for
``stale_after`` are removed from the group, and dead workers from the workers set.
"""

from __future__ import annotations

import logging
from collections.abc import Coroutine, Sequence
from typing import Any, cast

import anyio
from redis.asyncio import RedisCluster
from redis.exceptions import NoScriptError, ResponseError

from taskrunner import scripts
from taskrunner.client import now_ms
from taskrunner.connection import REDIS_ERRORS, reachable, report
from taskrunner.exceptions import ConfigurationError
from taskrunner.keys import GROUP, QueueKeys
from taskrunner.logs import excerpt, job_extra
from taskrunner.middleware.base import (
    CancelReason,
    ExecuteNext,
    ExecutionContext,
    Held,
    Middleware,
    Outcome,
    WorkerPort,
)
from taskrunner.orphans import dead_letter_entry

logger = logging.getLogger("taskrunner.lease")

Entry = tuple[str, dict[str, str]]
RECLAIM_BATCH = 100
"""Entries one XAUTOCLAIM takes over (it looks at up to ten times as many)."""
RECLAIM_MAX = 10_000
"""Entries one turn requeues at most per stream (the next turn goes on)."""


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


async def ack_deleted(redis: Any, stream: str, consumer: str, start: str, end: str) -> int:
    """Acknowledge this consumer's pending ids in ``[start, end]`` whose entries no
    longer exist in the stream (Redis 6.2 leaves them pending after XAUTOCLAIM)."""
    pending = await redis.xpending_range(stream, GROUP, start, end, 1000, consumer)
    ids = [str(p["message_id"]) for p in pending]
    if not ids:
        return 0
    pipe = redis.pipeline(transaction=False)
    for entry_id in ids:
        pipe.xrange(stream, entry_id, entry_id)
    found = await pipe.execute()
    gone = [entry_id for entry_id, rows in zip(ids, found, strict=True) if not rows]
    if gone:
        await redis.xack(stream, GROUP, *gone)
    return len(gone)


class _Guard:
    """When this worker may judge other workers' leases stale (see the module)."""

    def __init__(self, stale_after: float, gap: float) -> None:
        self.stale_after = stale_after
        self.gap = gap
        self.healthy_since: float | None = None
        self.last_ok = 0.0
        self.identity: str | None = None

    def beat_ok(self) -> None:
        now = anyio.current_time()
        if self.healthy_since is None or now - self.last_ok > self.gap:
            self.healthy_since = now  # (re)connected, or the event loop was blocked
        self.last_ok = now

    def beat_failed(self) -> None:
        self.healthy_since = None

    def seen(self, identity: str) -> None:
        if self.identity is not None and identity != self.identity:
            logger.warning(
                "the redis server changed (restart or failover): not reclaiming for "
                "stale_after (%gs), so live workers can renew their leases first",
                self.stale_after,
            )
            self.healthy_since = anyio.current_time()
        self.identity = identity

    def connected_for(self) -> float:
        if self.healthy_since is None:
            return 0.0
        return anyio.current_time() - self.healthy_since


class _WorkerLeases:
    """The leases, loops and guard of one worker."""

    def __init__(self, stale_after: float, heartbeat_interval: float) -> None:
        self.leases: dict[str, ExecutionContext] = {}
        self.guard = _Guard(stale_after, 2 * heartbeat_interval)
        self.scopes = [anyio.CancelScope(), anyio.CancelScope()]
        self.last_beat = 0.0
        self.reclaiming = anyio.Lock()
        """Held by a reclaim round, so a burst worker's last look waits for one in
        flight (XAUTOCLAIM done, requeue not yet) instead of missing its jobs."""
        self.requeued = 0
        self.requeued_seen = 0
        """Entries requeued by this worker, and how many its burst look has seen."""


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
        """How often a partition is scanned for stale entries: the recovery bound after
        a crash is ``stale_after + reclaim_interval``."""
        self._workers: dict[WorkerPort, _WorkerLeases] = {}

    def state(self, worker: WorkerPort) -> _WorkerLeases:
        return self._workers[worker]

    async def execute(self, ctx: ExecutionContext, call_next: ExecuteNext) -> Outcome:
        leases = self._workers[ctx.worker].leases
        leases[ctx.lease] = ctx
        try:
            return await call_next(ctx)
        finally:
            leases.pop(ctx.lease, None)

    async def on_worker_start(self, worker: WorkerPort) -> None:
        state = self._workers[worker] = _WorkerLeases(self.stale_after, self.heartbeat_interval)
        beats, reclaims = state.scopes
        worker.on_event("abort", lambda queue, job_id: self._abort(worker, queue, job_id))
        # An abort published while the worker's pub/sub link was down is lost: renew at
        # once after a resubscription (a heartbeat reply flags a requested abort).
        worker.on_event(
            "resubscribed", lambda queue, _: worker.spawn(lambda: self._beat_now(worker))
        )
        worker.spawn(lambda: self._in(beats, self._heartbeats(worker)))
        worker.spawn(lambda: self._in(reclaims, self._reclaims(worker)))
        on_drained = getattr(worker, "on_drained", None)
        if on_drained is not None:
            on_drained(lambda: self.reclaim_before_exit(worker))
        try:
            await self.beat(worker)  # register at once; the guard starts counting
        except REDIS_ERRORS as exc:
            report("heartbeats", exc)

    @staticmethod
    async def _in(scope: anyio.CancelScope, loop: Coroutine[Any, Any, None]) -> None:
        with scope:
            await loop

    async def on_worker_stop(self, worker: WorkerPort) -> None:
        # Stop the loops first, so no heartbeat re-registers the worker after this.
        state = self._workers.pop(worker, None)
        for scope in state.scopes if state else ():
            scope.cancel()
        try:
            pipe = worker.redis.pipeline(transaction=False)
            for keys in _homes(worker.partitions()):
                pipe.zrem(keys.workers, worker.id)
            await pipe.execute()
        except REDIS_ERRORS as exc:
            logger.warning("could not deregister worker %s: %s", worker.id, exc)

    def _abort(self, worker: WorkerPort, queue: str, job_id: str) -> None:
        for item in worker.held():
            if item.keys.queue == queue and item.job_id == job_id:
                worker.drop_held(item.token, CancelReason.ABORTED)
        state = self._workers.get(worker)
        for ctx in list(state.leases.values()) if state else ():
            if ctx.job.queue == queue and ctx.job.id == job_id:
                logger.info(
                    "job %s %s attempt %d: abort requested; cancelling",
                    ctx.job.id,
                    ctx.job.task,
                    ctx.job.attempt,
                    extra=job_extra(ctx.job),
                )
                ctx.cancel(CancelReason.ABORTED)

    # -- heartbeats ----------------------------------------------------------------------

    async def _heartbeats(self, worker: WorkerPort) -> None:
        state = self._workers.get(worker)
        if state is None:  # the worker stopped before this loop began
            return
        while True:
            await anyio.sleep(self.heartbeat_interval)
            try:
                await self.beat(worker)
                reachable()
            except REDIS_ERRORS as exc:
                state.guard.beat_failed()
                report("heartbeats", exc)

    async def _beat_now(self, worker: WorkerPort) -> None:
        if worker not in self._workers:
            return
        try:
            await self.beat(worker)
        except REDIS_ERRORS as exc:
            report("heartbeats", exc)

    async def beat(self, worker: WorkerPort) -> None:
        """Renew the lease of every job this worker holds (running, or claimed and
        waiting for a consumer) and its presence: one pipelined round trip. Nothing once
        the worker stopped (a loop whose sleep ended as its scope was cancelled gets
        here before it sees the cancellation)."""
        state = self._workers.get(worker)
        if state is None:
            return
        leases = list(state.leases.values())
        held = list(worker.held())
        calls = [_beat_call(worker, ctx) for ctx in leases]
        calls += [_held_call(worker, item) for item in held]
        replies = await _renew(worker, _homes(worker.partitions()), calls)
        if replies and all(isinstance(r, Exception) for r in replies):
            raise replies[0]
        for ctx, reply in zip(leases, replies[: len(leases)], strict=True):
            if state.leases.get(ctx.lease) is ctx:  # a job that ended meanwhile committed:
                _handle_beat(ctx, reply)  # its spent lease is no loss
                if reply == 0:  # lost: not renewed (nor reported) again while it stops
                    state.leases.pop(ctx.lease, None)
        for item, reply in zip(held, replies[len(leases) :], strict=True):
            if reply == 0:
                worker.drop_held(item.token, CancelReason.LOST_LEASE)
            elif reply == 2:
                worker.drop_held(item.token, CancelReason.ABORTED)
        state.guard.beat_ok()
        state.last_beat = anyio.current_time()

    # -- reclaim -------------------------------------------------------------------------

    async def _reclaims(self, worker: WorkerPort) -> None:
        while True:
            await anyio.sleep(self.reclaim_interval)
            try:
                await self.reclaim_all(worker)
            except REDIS_ERRORS as exc:
                report("reclaim", exc)
            except Exception:  # hostile data or a bug: keep the loop alive
                logger.exception("reclaim: unexpected error; retrying next interval")

    async def may_reclaim(self, worker: WorkerPort) -> bool:
        """The outage guard (see the module docstring); False once the worker stopped."""
        state = self._workers.get(worker)
        if state is None:
            return False
        if anyio.current_time() - state.last_beat > self.heartbeat_interval:
            await self.beat(worker)  # the heartbeat loop is late (a blocked event loop)
        try:
            state.guard.seen(await worker.server_identity())
            uptime = await worker.server_uptime()
        except ResponseError:  # INFO disabled on some managed servers
            uptime = self.stale_after
        connected = state.guard.connected_for()
        if connected < self.stale_after or uptime < self.stale_after:
            logger.debug(
                "not reclaiming yet: connected without a gap for %.0fs, server up %.0fs "
                "(both must reach stale_after=%gs)",
                connected,
                uptime,
                self.stale_after,
            )
            return False
        return True

    async def reclaim_all(self, worker: WorkerPort) -> int:
        """One reclaim round over every partition whose turn this worker gets."""
        state = self._workers.get(worker)
        if state is None:
            return 0
        async with state.reclaiming:
            return await self._reclaim_turns(worker)

    async def _reclaim_turns(self, worker: WorkerPort) -> int:
        if not await self.may_reclaim(worker):
            return 0
        period = max(1, int(self.reclaim_interval * 1000))
        turns = [scripts.turn(keys, period, worker.id) for keys in worker.partitions()]
        replies = await scripts.run_many(worker.redis, turns, raise_on_error=False)
        taken = 0
        for keys, reply in zip(worker.partitions(), replies, strict=True):
            if reply == 1:
                taken += await self.reclaim(worker, keys)
                await self._prune(worker, keys)
        return taken

    async def reclaim(self, worker: WorkerPort, keys: QueueKeys) -> int:
        """Requeue this partition's entries idle longer than ``stale_after``. Follows
        each stream's XAUTOCLAIM cursor in batches; handles Redis 7's deleted ids and
        Redis 6.2's nil entries (both are entries deleted from the stream)."""
        taken = 0
        for stream in worker.streams(keys):
            taken += await self._reclaim_stream(worker, keys, stream)
        state = self._workers.get(worker)
        if state is not None:
            state.requeued += taken
        return taken

    async def _reclaim_stream(self, worker: WorkerPort, keys: QueueKeys, stream: str) -> int:
        cursor, taken = "0-0", 0
        while taken < RECLAIM_MAX:
            start = cursor
            asked = anyio.current_time()
            try:
                reply = await worker.redis.xautoclaim(
                    stream,
                    GROUP,
                    worker.id,
                    min_idle_time=int(self.stale_after * 1000),
                    start_id=cursor,
                    count=RECLAIM_BATCH,
                )
            except ResponseError as exc:
                if "NOGROUP" in str(exc):  # lost in a restart: the reader recreates it
                    return taken
                raise
            cursor, entries, nils = parse_autoclaim(reply)
            if nils:
                end = "+" if cursor == "0-0" else cursor
                await ack_deleted(worker.redis, stream, worker.id, start, end)
            if entries and not self._guard_held(worker, asked):
                logger.info(
                    "reclaim of %s stopped: the connection had a gap while XAUTOCLAIM "
                    "was on its way; %d entries stay in this worker's name until a later "
                    "round",
                    stream,
                    len(entries),
                )
                return taken
            if entries:
                taken += await self._requeue(worker, keys, stream, entries)
            if cursor == "0-0":
                break
        return taken

    def _guard_held(self, worker: WorkerPort, asked: float) -> bool:
        """Whether the outage guard, checked before a round, still held for a call sent
        at ``asked``: no gap in this worker's connection since. A call stuck in an
        outage and sent again by redis-py once the connection is back would otherwise
        judge leases by the guard of before the outage, when every live worker's
        entries have gone idle, this worker's own running jobs among them."""
        state = self._workers.get(worker)
        if state is None:
            return False
        since = state.guard.healthy_since
        took = anyio.current_time() - asked
        return since is not None and since <= asked and took <= state.guard.gap

    async def _requeue(
        self, worker: WorkerPort, keys: QueueKeys, stream: str, entries: list[Entry]
    ) -> int:
        env = worker.env
        calls = [
            scripts.requeue(env, keys, stream, worker.id, entry_id, _job_id(entry_id, fields))
            for entry_id, fields in entries
        ]
        replies = await scripts.run_many(worker.redis, calls, raise_on_error=False)
        requeued = []
        for (entry_id, fields), reply in zip(entries, replies, strict=True):
            if reply == 1:
                requeued.append(_job_id(entry_id, fields))
            elif reply == -1:
                await dead_letter_entry(
                    worker.redis,
                    env,
                    keys,
                    stream,
                    entry_id,
                    fields,
                    "has no job",
                    fields.get("job"),
                )
            elif isinstance(reply, Exception):
                logger.error("could not requeue stale entry %s (%s)", entry_id, reply)
        if requeued:
            logger.warning(
                "requeued %d stale job(s) of queue %s (their worker stopped heartbeating): %s",
                len(requeued),
                keys.queue,
                excerpt(",".join(requeued), 500),
            )
        return len(requeued)

    async def _prune(self, worker: WorkerPort, keys: QueueKeys) -> None:
        """Remove consumers that hold nothing and have been idle for stale_after, and
        workers whose last heartbeat is older than that."""
        idle_ms = int(self.stale_after * 1000)
        calls = []
        for stream in worker.streams(keys):
            try:
                consumers = await worker.redis.xinfo_consumers(stream, GROUP)
            except ResponseError:
                continue
            calls += [
                scripts.leave(stream, str(c["name"]))
                for c in consumers
                if int(c.get("pending", 0)) == 0
                and int(c.get("idle", 0)) > idle_ms
                and c["name"] != worker.id
            ]
        if calls:
            removed = sum(
                1
                for r in await scripts.run_many(worker.redis, calls, raise_on_error=False)
                if r == 1
            )
            logger.debug("pruned %d idle consumer(s) of %s", removed, keys.prefix)
        if keys.partition == 0:
            await worker.redis.zremrangebyscore(keys.workers, "-inf", now_ms() - 2 * idle_ms)

    async def reclaim_before_exit(self, worker: WorkerPort) -> bool:
        """For a burst worker about to exit: True (read again) if its reclaim loop
        requeued something since the last look, or if some entry is stale: then wait
        until this worker may reclaim (the outage guard) and requeue it."""
        state = self._workers.get(worker)
        if state is None:
            return False
        async with state.reclaiming:  # a round in flight finishes first
            if state.requeued != state.requeued_seen:
                state.requeued_seen = state.requeued
                return True
            taken = await self._reclaim_stale(worker, state)
            state.requeued_seen = state.requeued
            return taken > 0

    async def _reclaim_stale(self, worker: WorkerPort, state: _WorkerLeases) -> int:
        if not await self._any_stale(worker):
            return 0
        for _ in range(3):  # the guard opens stale_after after the worker connected
            if await self.may_reclaim(worker):
                break
            await anyio.sleep(max(0.1, self.stale_after - state.guard.connected_for()))
        else:
            return 0
        taken = 0
        for keys in worker.partitions():
            taken += await self.reclaim(worker, keys)
        return taken

    async def _any_stale(self, worker: WorkerPort) -> bool:
        idle_ms = int(self.stale_after * 1000)
        pipe = cast(Any, worker.redis.pipeline(transaction=False))
        streams = [s for keys in worker.partitions() for s in worker.streams(keys)]
        for stream in streams:
            pipe.xpending_range(stream, GROUP, "-", "+", 1, idle=idle_ms)
        replies = await pipe.execute(raise_on_error=False)
        return any(isinstance(r, list) and r for r in replies)


async def _renew(
    worker: WorkerPort, homes: list[QueueKeys], calls: list[scripts.ScriptCall]
) -> list[Any]:
    """The worker's presence (ZADD per queue) and every heartbeat script: one pipelined
    round trip on one server; on a cluster, one pipeline per node, concurrently."""
    now = now_ms()
    if isinstance(worker.redis, RedisCluster):
        presence = worker.redis.pipeline(transaction=False)
        for keys in homes:
            presence.zadd(keys.workers, {worker.id: now})
        replies = await scripts.run_many(worker.redis, calls, raise_on_error=False)
        await presence.execute()
        return replies
    pipe = cast(Any, worker.redis.pipeline(transaction=False))
    for keys in homes:
        pipe.zadd(keys.workers, {worker.id: now})
    for call in calls:
        pipe.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
    replies = (await pipe.execute(raise_on_error=False))[len(homes) :]
    if any(isinstance(r, NoScriptError) for r in replies):
        await scripts.load_all(worker.redis)  # a restarted server: renew at once
        replies = await scripts.run_many(worker.redis, calls, raise_on_error=False)
    return list(replies)


def _homes(partitions: Sequence[QueueKeys]) -> list[QueueKeys]:
    """One partition per queue (the workers set is per queue)."""
    return [keys for keys in partitions if keys.partition == 0]


def _job_id(entry_id: str, fields: dict[str, str]) -> str:
    return fields.get("job") or f"entry-{entry_id}"


def _held_call(worker: WorkerPort, item: Held) -> scripts.ScriptCall:
    # lock TTL 0: locks are renewed once the job runs (the unique layer sets the TTL)
    return scripts.heartbeat(
        item.keys, item.stream, item.job_id, worker.id, item.entry_id, item.token, 0, []
    )


def _beat_call(worker: WorkerPort, ctx: ExecutionContext) -> scripts.ScriptCall:
    return scripts.heartbeat(
        ctx.keys,
        ctx.stream,
        ctx.job.id,
        worker.id,
        ctx.entry_id,
        ctx.lease,
        ctx.lock_ttl_ms,
        ctx.locks,
    )


def _handle_beat(ctx: ExecutionContext, reply: Any) -> None:
    if reply == 0:
        logger.warning(
            "job %s %s attempt %d: lease lost (reclaimed by another worker, or the "
            "job is gone); cancelling this copy",
            ctx.job.id,
            ctx.job.task,
            ctx.job.attempt,
            extra=job_extra(ctx.job),
        )
        ctx.cancel(CancelReason.LOST_LEASE)
    elif reply == 2:
        logger.info(
            "job %s %s attempt %d: abort flag seen by the heartbeat; cancelling",
            ctx.job.id,
            ctx.job.task,
            ctx.job.attempt,
            extra=job_extra(ctx.job),
        )
        ctx.cancel(CancelReason.ABORTED)
    elif isinstance(reply, Exception):
        logger.warning(
            "job %s %s attempt %d: heartbeat failed: %s",
            ctx.job.id,
            ctx.job.task,
            ctx.job.attempt,
            reply,
            extra=job_extra(ctx.job),
        )
