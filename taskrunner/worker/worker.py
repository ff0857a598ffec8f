"""The worker: composes the reader, the consumers and the committer, and runs them.

It reads (as many entries as it has free slots, from every partition of its queues),
claims each entry under a new lease, dispatches it to a pool of long-lived consumers
that run it through its task's middleware chain, and commits the outcome, coalescing
commits into pipelined round trips. It knows nothing of retries, locks, timeouts or
heartbeats: those are middleware, which see the worker only through ``WorkerPort``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import socket
from collections.abc import Awaitable, Callable, Collection, Coroutine, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

import anyio
from anyio.abc import TaskGroup, TaskStatus
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from taskrunner import scripts
from taskrunner.config import WorkerSettings
from taskrunner.connection import REDIS_ERRORS, Connection, PoolOptions, open_connection, report
from taskrunner.deadletters import trim_dead
from taskrunner.keys import Queue, QueueKeys, check_name
from taskrunner.middleware.base import CancelReason, Held, Middleware
from taskrunner.subscriber import Subscriber
from taskrunner.worker.committer import Coalescer, Committer
from taskrunner.worker.consumers import Consumers
from taskrunner.worker.listener import EventHandler, EventListener
from taskrunner.worker.reader import CLAIM_BACKOFF, Reader, ensure_groups
from taskrunner.worker.relay import Relay
from taskrunner.worker.scheduler import Scheduler
from taskrunner.worker.slots import Slots

if TYPE_CHECKING:
    from taskrunner.client import Client
    from taskrunner.middleware.lease import LeaseMiddleware
    from taskrunner.task import TaskDefinition

logger = logging.getLogger("taskrunner.worker")

COMMIT_DEADLINE = 10.0
"""Seconds a stopping worker keeps retrying outcomes Redis has not recorded yet."""
STOP_MARGIN = COMMIT_DEADLINE + 5.0
"""Seconds beyond the grace period that leaving ``async with tr.worker()`` by an error
or a cancellation waits for the stop (hand-back and outstanding outcomes included)."""
INTERNAL_CONNECTIONS = 8
"""Connections of a worker's own client (heartbeats, reads, commits), apart from the
pool that task code shares, so tasks can never starve them."""
PARTITION_REFRESH = 30.0
"""Seconds between housekeeping passes: the queues' partition counts (a change of N is
followed) and the dead-letter bounds."""
TRIM_BATCHES = 10
"""Dead-letter trim batches (100 ids each) per partition per housekeeping pass."""


class Host(Protocol):
    """What a worker needs of its TaskRunner."""

    registry: dict[str, TaskDefinition]
    middleware: list[Middleware]
    result_ttl: float
    lease: LeaseMiddleware
    max_idle_wait: float
    priority_aging: float
    dead_letter_limit: int
    dead_letter_ttl: float

    @property
    def client(self) -> Client: ...

    @property
    def pool_options(self) -> PoolOptions: ...

    def queues(self) -> list[str]: ...

    async def __aenter__(self) -> Any: ...

    async def __aexit__(self, et: Any, e: Any, tb: Any) -> Any: ...


class Worker:
    """Runs jobs from one or more queues. ``await worker.run()`` in the foreground, or
    ``async with worker:`` to run it in the background of the caller (embedded)."""

    def __init__(
        self,
        runner: Host,
        *,
        queues: Sequence[str] | None = None,
        concurrency: int = 100,
        burst: bool = False,
        grace_period: float | timedelta = 30.0,
        handle_signals: bool | None = None,
        max_deliveries: int = 5,
    ) -> None:
        checked = WorkerSettings.check(
            queues=queues,
            concurrency=concurrency,
            burst=burst,
            grace_period=grace_period,
            handle_signals=handle_signals,
            max_deliveries=max_deliveries,
        )
        self.runner = runner
        self.queue_names = [check_name("queue", q) for q in checked.queues or runner.queues()]
        self.concurrency = checked.concurrency
        self.burst = checked.burst
        self.grace_period = checked.grace_period
        self.handle_signals = checked.handle_signals
        """None (default): SIGINT/SIGTERM stop ``run()``; ``async with`` leaves them alone."""
        self.max_deliveries = checked.max_deliveries
        self._id = _new_id()
        self.queues: list[Queue] = []
        self._stopping = anyio.Event()
        self._active = False
        self._finished = False
        self._kept = (0, 0)
        self._handlers: list[tuple[str, EventHandler]] = []
        self._moved_seen = (0, 0)
        """Promotions and relays counted at the last burst look (see ``_drained``)."""
        self._drained_hooks: list[Callable[[], Awaitable[bool]]] = []
        self._services: TaskGroup | None = None
        self._background: TaskGroup | None = None
        self._serve_scope: anyio.CancelScope | None = None
        """The embedded worker's serving task (``async with``): shielded, bounded on exit."""
        self.connection: Connection
        self.slots: Slots
        self.consumers: Consumers
        self.committer: Committer
        self.reader: Reader
        self.scheduler: Scheduler
        self.relay: Relay
        self.listener: EventListener

    def __repr__(self) -> str:
        return f"Worker({self._id!r}, queues={self.queue_names!r})"

    # -- public lifecycle ---------------------------------------------------------------

    async def run(self) -> None:
        """Run until stopped (a signal, ``stop()``) or, in burst mode, until drained.
        An error is raised as itself (a lost Redis, a bad setting), not in a group.
        A worker runs once at a time; after it stopped it may run again."""
        self._begin()
        try:
            async with anyio.create_task_group() as tg:
                if self.handle_signals is not False:  # before the runner opens: a signal
                    tg.start_soon(self._signals, tg.cancel_scope)  # while it starts stops
                async with self.runner:
                    await self._serve()
                tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            _raise_sole(group)
            raise
        finally:
            self._end()

    def _begin(self) -> None:
        """Start a run: refused while one is under way; after one ended, a fresh start
        (a new id, no hooks left from the last run's middleware)."""
        if self._active:
            raise RuntimeError(f"{self!r} is already running; make another with tr.worker()")
        if self._finished:
            self._id = _new_id()
            self._moved_seen = (0, 0)
        self._active = True
        self._kept = (len(self._handlers), len(self._drained_hooks))

    def _end(self) -> None:
        """A run ended: not stopping any more, so that a ``stop()`` between two runs (as
        one before the first) stops the next one as soon as it starts."""
        handlers, hooks = self._kept  # the ones middleware added while starting this run
        del self._handlers[handlers:], self._drained_hooks[hooks:]
        self._active, self._finished = False, True
        self._stopping = anyio.Event()

    async def __aenter__(self) -> Worker:
        self._begin()
        self._serve_scope = anyio.CancelScope(shield=True)
        self._background = anyio.create_task_group()
        await self._background.__aenter__()
        try:
            if self.handle_signals:  # embedded: only when asked for explicitly
                self._background.start_soon(self._signals, self._background.cancel_scope)
            await self._background.start(self._serve_started)
        except BaseException as exc:  # close the task group, then report the real error
            try:
                await self._close_after_failed_start(exc)
            finally:
                self._end()
            raise
        return self

    async def _close_after_failed_start(self, exc: BaseException) -> None:
        assert self._background is not None
        try:
            await self._background.__aexit__(type(exc), exc, exc.__traceback__)
        except BaseExceptionGroup as group:  # the start-up error, wrapped by the task group
            _raise_sole(group)
            raise

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        try:
            return await self._stop_embedded(et)
        finally:
            self._end()

    async def _stop_embedded(self, et: type[BaseException] | None) -> bool | None:
        self.stop()
        assert self._background is not None
        if et is None:
            return await self._background.__aexit__(None, None, None)
        # Left by an error or a cancellation: the same graceful stop (running jobs get the
        # grace period, the rest go back to the queue), bounded; then the body's
        # exception goes on as it was raised, not inside a task group's.
        scope = self._serve_scope  # shielded: a cancellation around reaches the body only
        assert scope is not None
        scope.deadline = min(scope.deadline, anyio.current_time() + self.grace_period + STOP_MARGIN)
        await self._background.__aexit__(None, None, None)
        return None

    def stop(self) -> None:
        """Stop reading, let running jobs finish within the grace period, then hand
        the rest back to the queue."""
        self._stopping.set()
        with contextlib.suppress(AttributeError):  # not started yet
            self.reader.wake()
            self.slots.poke()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    # -- the port middleware see (taskrunner.middleware.base.WorkerPort) --------------

    @property
    def id(self) -> str:
        return self._id

    @property
    def redis(self) -> Redis:
        return self.connection.redis

    @property
    def env(self) -> scripts.Env:
        return self.runner.client.env

    def partitions(self) -> list[QueueKeys]:
        return [keys for q in self.queues for keys in q.parts]

    def tasks(self) -> Collection[str]:
        return self.runner.registry.keys()

    @property
    def result_ttl(self) -> float:
        return self.runner.result_ttl

    @property
    def stale_after(self) -> float:
        return self.runner.lease.stale_after

    def streams(self, keys: QueueKeys) -> list[str]:
        for q in self.queues:
            if q.name == keys.queue:
                return q.streams(keys)
        return [keys.stream]

    def spawn(self, fn: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        assert self._services is not None, "spawn() is for on_worker_start hooks"
        self._services.start_soon(fn)

    def on_event(self, kind: str, handler: EventHandler) -> None:
        self._handlers.append((kind, handler))
        with contextlib.suppress(AttributeError):  # the listener exists once serving
            self.listener.on(kind, handler)

    def on_drained(self, hook: Callable[[], Awaitable[bool]]) -> None:
        """Before a burst worker exits, ``hook()`` may bring in more work (True)."""
        self._drained_hooks.append(hook)

    def held(self) -> list[Held]:
        return list(self.consumers.waiting.values())

    def drop_held(self, token: str, reason: CancelReason) -> None:
        self.consumers.drop(token, reason)

    def run_alone(self) -> AbstractAsyncContextManager[None]:
        # Claimed jobs that wait for a consumer go back to the queue at once: if the job
        # that runs alone kills this process, they must not be caught in the crash.
        self.consumers.hand_back_waiting(CancelReason.HANDBACK)
        return self.slots.alone()

    def run_shared(self) -> AbstractAsyncContextManager[None]:
        return self.slots.shared()

    async def server_identity(self) -> str:
        return await self.connection.identity()

    async def server_uptime(self) -> float:
        return await self.connection.uptime()

    @property
    def running(self) -> dict[str, Any]:
        """Running attempts by lease token."""
        consumers = getattr(self, "consumers", None)
        return consumers.running if consumers is not None else {}

    @property
    def waiting(self) -> dict[str, Any]:
        """Claimed jobs no consumer has started yet, by lease token."""
        consumers = getattr(self, "consumers", None)
        return consumers.waiting if consumers is not None else {}

    # -- serving -------------------------------------------------------------------------

    async def _serve_started(self, *, task_status: TaskStatus[None]) -> None:
        # Shielded: when the code around `async with tr.worker()` is cancelled, its body
        # ends and __aexit__ stops the worker gracefully (a second signal cancels it)
        assert self._serve_scope is not None
        with self._serve_scope:
            async with self.runner:
                await self._serve(task_status)
        if self.handle_signals:
            assert self._background is not None
            self._background.cancel_scope.cancel()  # ends the signal watcher

    async def _serve(self, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        client = self.runner.client
        options = self.runner.pool_options
        self.connection = await open_connection(
            client.connection.target.url,
            PoolOptions(
                max_connections=INTERNAL_CONNECTIONS,
                pool_timeout=options.pool_timeout,
                socket_timeout=options.socket_timeout,
                health_check_interval=options.health_check_interval,
            ),
        )
        try:
            self.queues = [
                await client.resolve(name, refresh=True, record=True) for name in self.queue_names
            ]
            await ensure_groups(self.redis, [(q, k) for q in self.queues for k in q.parts])
            await self._warn_if_evicting()
            self._build()
            async with anyio.create_task_group() as services:
                self._services = services
                await self._start_services(services)
                await self._consume(task_status)
                await self._await_commits()
                for mw in reversed(self.runner.middleware):
                    await mw.on_worker_stop(self)
                services.cancel_scope.cancel()
            await self._leave_groups()
        finally:
            with anyio.CancelScope(shield=True):  # close it even when cancelled
                await self.connection.aclose()
        logger.info("worker %s stopped", self.id)

    def _build(self) -> None:
        client = self.runner.client
        self.slots = Slots(self.concurrency)
        self.subscriber = Subscriber(self.connection)
        coalescer = Coalescer(self.redis)
        self.committer = Committer(
            coalescer,
            lambda: client.env,
            self.runner.middleware,
            self.slots,
            result_ttl_ms=client.result_ttl_ms,
            max_payload=client.max_payload,
        )
        self.consumers = Consumers(
            port=self,
            registry=self.runner.registry,
            middleware=self.runner.middleware,
            committer=self.committer,
            release=self.slots.release,
            redis=self.redis,
            env=lambda: client.env,
            max_deliveries=self.max_deliveries,
            max_payload=client.max_payload,
        )
        self.scheduler = Scheduler(
            self.redis,
            self.partitions,
            lambda: client.env,
            lambda: client.clock,
            self.runner.max_idle_wait,
            levels=client.levels,
        )
        self.committer.on_retry = self.scheduler.wake
        self.relay = Relay(self.redis, client, self.partitions, self.runner.max_idle_wait)
        self.committer.on_follow_up = self.relay.wake
        self.reader = Reader(
            redis=self.redis,
            consumer=self.id,
            queues=lambda: self.queues,
            slots=self.slots,
            env=lambda: client.env,
            deliver=lambda items: self.consumers.deliver(
                items, self.stopping or self.slots.isolating
            ),
            max_deliveries=self.max_deliveries,
            max_payload=client.max_payload,
            idle_wait=self.runner.max_idle_wait,
            aging_ms=int(self.runner.priority_aging * 1000),
        )
        self.listener = EventListener(self.subscriber, self._resubscribed)
        self.listener.on("due", lambda queue, argument: self.scheduler.wake())
        self.listener.on_partition("ready", self.reader.wake)
        self.listener.on("resume", lambda queue, argument: self.reader.wake())
        self.listener.on("pause", lambda queue, argument: None)  # fetch.lua reads the flag
        for kind, handler in self._handlers:
            self.listener.on(kind, handler)

    def _resubscribed(self) -> None:
        """Events may have been missed while the link was down: read, promote, and tell
        the middleware (``on_event("resubscribed", ...)``: the lease middleware renews at
        once, which also catches a missed abort)."""
        self.reader.wake()
        self.scheduler.wake()
        self.relay.wake()
        self.listener.dispatch("", "resubscribed")

    async def _start_services(self, services: TaskGroup) -> None:
        services.start_soon(self.subscriber.run)
        services.start_soon(self.committer.coalescer.run)
        services.start_soon(self.scheduler.run)
        services.start_soon(self.relay.run)
        try:  # subscribed before the first read: a "ready" right after it is not missed
            await self.listener.follow(self.partitions())
        except REDIS_ERRORS as exc:
            report("subscribing to events", exc)  # followed by the housekeeping loop
        services.start_soon(self._follow_partitions)
        for mw in self.runner.middleware:
            await mw.on_worker_start(self)

    async def _consume(self, task_status: TaskStatus[None]) -> None:
        async with anyio.create_task_group() as jobs:
            for _ in range(self.concurrency):
                jobs.start_soon(self.consumers.consume)
            logger.info(
                "worker %s ready: queues %s, concurrency %d",
                self.id,
                ",".join(self.queue_names),
                self.concurrency,
            )
            task_status.started()
            await self.reader.run(lambda: self.stopping, self._drained if self.burst else None)
            self._stopping.set()  # also after a burst: nothing new is taken from here on
            await self._drain()
            for _ in range(self.concurrency):
                self.consumers.queue.put_nowait(None)  # each consumer ends after its queue

    async def _drain(self) -> None:
        # not started yet: another worker can take them now
        self.consumers.hand_back_waiting(CancelReason.SHUTDOWN)
        with anyio.move_on_after(self.grace_period):
            while self.consumers.running:  # (unrecorded outcomes: see _await_commits)
                await self.slots.changed()
        self.consumers.hand_back_waiting(CancelReason.SHUTDOWN)
        self.consumers.cancel_running(CancelReason.SHUTDOWN)

    async def _drained(self) -> bool:
        """Whether a burst worker that found nothing to read may exit: nothing runs,
        every outcome is recorded (a retry's or a chain step's writes are in Redis),
        nothing is due, nothing was promoted or relayed since the last look (by this
        call or the scheduler and relay services: the read before it may have missed
        those jobs), and no stale job could be reclaimed (the lease middleware's hook)."""
        if self.slots.busy:  # a job that runs may wait for one that is enqueued now
            with self.slots.watching() as changed:  # a job ending from here on wakes it
                await self.reader.until_woken_or(changed.wait)
            return False
        await self.committer.coalescer.drained()  # retried with backoff through an outage
        try:
            return await self._nothing_moved()
        except REDIS_ERRORS as exc:  # an outage began after the empty read: read again,
            report("a burst worker's last look", exc)  # which waits until Redis is back
            await anyio.sleep(CLAIM_BACKOFF)
            return False

    async def _nothing_moved(self) -> bool:
        if await self.scheduler.promote_due() or await self.relay.relay_all():
            return False
        moved = (self.scheduler.promoted, self.relay.handled)
        if moved != self._moved_seen:
            self._moved_seen = moved
            return False
        for hook in self._drained_hooks:
            if await _more_work(hook):
                return False
        return True

    async def _follow_partitions(self) -> None:
        """Housekeeping: subscribe to every partition's events; follow changes of the
        partition count (a worker started before N was raised reads the new partitions
        too); keep each partition's dead letters within their bounds."""
        while True:
            try:
                await self.listener.follow(self.partitions())
                await anyio.sleep(PARTITION_REFRESH)
                await self._refresh_partitions()
                await self._trim_dead_letters()
            except REDIS_ERRORS as exc:
                report("housekeeping", exc)
                await anyio.sleep(1.0)

    async def _trim_dead_letters(self) -> None:
        client = self.runner.client
        for keys in self.partitions():
            await trim_dead(
                self.redis,
                keys,
                limit=self.runner.dead_letter_limit,
                max_age=self.runner.dead_letter_ttl,
                max_batches=TRIM_BATCHES,
                clock=client.clock,
            )

    async def _refresh_partitions(self) -> None:
        client = self.runner.client
        fresh = [await client.resolve(q.name, refresh=True, record=True) for q in self.queues]
        grown = [q for q, old in zip(fresh, self.queues, strict=True) if q.read > old.read]
        if grown:
            await ensure_groups(self.redis, [(q, k) for q in grown for k in q.parts])
            logger.info("queues %s have more partitions now", ",".join(q.name for q in grown))
        self.queues = fresh
        self.reader.wake()

    async def _await_commits(self) -> None:
        """Every outcome recorded before the worker stops; if Redis stays away longer
        than ``COMMIT_DEADLINE``, give up: those jobs are requeued after stale_after."""
        with anyio.move_on_after(COMMIT_DEADLINE) as scope:
            await self.committer.coalescer.drained()
        if scope.cancelled_caught:
            lost = list(self.committer.unrecorded.values())
            logger.error(
                "worker %s: %d outcome(s) not recorded before stopping (redis unavailable "
                "for %gs); their jobs will run again after stale_after: %s",
                self.id,
                len(lost),
                COMMIT_DEADLINE,
                ", ".join(f"{item.queue}/{item.job_id}" for item in lost[:20]),
            )

    async def _leave_groups(self) -> None:
        """Remove this consumer from each stream's group when it holds nothing, so the
        groups do not collect one dead consumer per worker process ever started."""
        calls = [
            scripts.leave(stream, self.id)
            for q in self.queues
            for keys in q.parts
            for stream in q.streams(keys)
        ]
        try:
            await scripts.run_many(self.redis, calls, raise_on_error=False)
        except REDIS_ERRORS as exc:
            logger.warning("could not leave the consumer groups: %s", exc)

    async def _warn_if_evicting(self) -> None:
        try:
            policy = (await self.redis.config_get("maxmemory-policy")).get("maxmemory-policy")
        except ResponseError:  # CONFIG is disabled on some managed servers
            return
        if policy and policy != "noeviction":
            logger.warning(
                "redis maxmemory-policy is %s: the server may evict job state under memory "
                "pressure; set it to noeviction",
                policy,
            )

    async def _signals(self, scope: anyio.CancelScope) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP and self._stopping.is_set():
                    continue  # a hang-up (terminal closed, supervisor gone) never hurries
                if self._stopping.is_set():
                    logger.warning("second signal: exiting now")
                    if self._serve_scope is not None:
                        self._serve_scope.cancel()
                    scope.cancel()
                    return
                logger.info(
                    "received %s: stopping gracefully (grace period %.1fs)",
                    signal.Signals(signum).name,
                    self.grace_period,
                )
                self.stop()


async def _more_work(hook: Callable[[], Awaitable[bool]]) -> bool:
    """A drained hook's answer; one that fails (a bug in a middleware) is logged and
    brings nothing, as a failing on_commit or event handler is logged and skipped: the
    burst worker goes on. A Redis error goes to the caller (an outage: read again)."""
    try:
        return await hook()
    except REDIS_ERRORS:
        raise
    except Exception:
        logger.exception("drained hook %s failed", getattr(hook, "__qualname__", repr(hook)))
        return False


def _new_id() -> str:
    """A consumer name no other worker (nor this one's last run) has: host, pid, token."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(16)}"


def _raise_sole(group: BaseExceptionGroup[BaseException]) -> None:
    """Raise the one exception of a task group's ``group`` (through nested groups) as
    itself, with its own cause, without the group; return when there are several."""
    if len(group.exceptions) != 1:
        return
    sole = group.exceptions[0]
    if isinstance(sole, BaseExceptionGroup):
        _raise_sole(sole)
        return
    raise sole from sole.__cause__
