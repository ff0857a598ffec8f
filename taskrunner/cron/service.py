"""The cron service: fires the ticks of the schedules of the queues a worker reads.

``CronMiddleware`` (built into every TaskRunner) starts one ``CronService`` per worker
whose queues have schedules (``on_worker_start`` + ``worker.spawn``); a worker without
any costs nothing. Any number of workers run the same schedules, and each tick still
enqueues exactly one job: tick.lua handles a tick once (compare-and-set of the
schedule's ``last`` tick) and writes its job under the tick's id in the same step.

Redis work per tick is one script call, not one per worker: the worker that handled
the previous tick (the *owner*) fires at the tick; every other worker waits
``HANDOVER`` seconds more and fires only if it has not heard that the tick was handled
(tick.lua publishes ``cron <name> <tick> <worker>`` on the partition's events
channel). When the owner is gone, the others fire once (one of them wins and becomes
the owner): ticks run at most ``HANDOVER`` late, never twice.

Time is the scripts' clock (the server's TIME plus the runner's clock offset, or the
frozen instant of taskrunner.testing). Between calls the service estimates it from
this process's clock and the server's last TIME, sleeps until the next due tick (at
most ``MAX_SLEEP``), and wakes early when the runner's clock changes (``tr.clock``,
``frozen_time``) or a ``due`` event arrives (``FrozenClock.advance`` sends one). While
the clock is frozen every worker fires at the tick (no handover: a test has one).

A tick more than the schedule's ``max_drift`` late (every worker was down, or
paused by the debugger) is skipped, not replayed: the worker that fires the next tick
logs one WARNING naming the skipped span.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

import anyio

from taskrunner import scripts
from taskrunner.connection import REDIS_ERRORS, reachable, report
from taskrunner.cron.schedule import plausible_tick
from taskrunner.exceptions import LockConflictError
from taskrunner.job import Job
from taskrunner.logs import excerpt
from taskrunner.middleware.base import (
    EnqueueContext,
    Middleware,
    WorkerPort,
    build_enqueue_chain,
    enqueue_layers,
)
from taskrunner.worker.scheduler import server_ms

if TYPE_CHECKING:
    from taskrunner.cron.schedule import CronSchedule
    from taskrunner.cron.tab import CronTab
    from taskrunner.keys import QueueKeys

logger = logging.getLogger("taskrunner.cron")

HANDOVER = 0.5
"""Seconds a worker that did not handle the previous tick waits before firing one."""
MAX_SLEEP = 30.0
"""The longest the service sleeps without looking at the time again (a fallback)."""
ERROR_WAIT = 1.0
"""Seconds before trying again after Redis was unreachable."""
CATCH_UP = 100
"""Ticks fired per schedule in one round before the others get their turn."""


def _local_ms() -> int:
    return int(time.time() * 1000)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


class _Entry:
    """One schedule as one worker follows it."""

    __slots__ = ("keys", "last", "layers", "next", "owner", "schedule")

    def __init__(self, schedule: CronSchedule) -> None:
        self.schedule = schedule
        self.keys: QueueKeys | None = None
        self.layers: list[Middleware] = []
        self.last = 0
        self.next: int | None = None
        self.owner = False

    def handled(self, tick: int, *, owner: bool) -> None:
        """``tick`` (or a later one) was handled, by this worker if ``owner``."""
        if tick >= self.last:
            self.last = tick
            self.owner = owner
        self.next = self.schedule.expression.after(self.last)


class CronService:
    """Fires the due ticks of some schedules for one worker; ``run()`` until cancelled."""

    def __init__(self, tab: CronTab, worker: WorkerPort, schedules: Sequence[CronSchedule]):
        self._tab = tab
        self._runner = tab.runner
        self._worker = worker
        self._entries = {s.name: _Entry(s) for s in schedules}
        self._skew_ms = 0
        self._loaded = False
        self._wake = anyio.Event()

    # -- events --------------------------------------------------------------------------

    def wake(self) -> None:
        """Look at the time again now (the runner's clock changed)."""
        self._wake.set()

    def on_due(self, queue: str, argument: str) -> None:
        self._wake.set()

    def on_fired(self, queue: str, argument: str) -> None:
        """A ``cron <name> <tick> <worker>`` event: that worker handled that tick. A
        garbage one (a tick that is no whole number, or in the future by more than
        ``FUTURE_SLACK``) is ignored: it must not make the schedule wait for it."""
        parts = argument.split(" ")
        if len(parts) != 3:
            return
        name, text, worker = parts
        entry = self._entries.get(name)
        if entry is None or entry.schedule.queue != queue or not self._loaded:
            return
        tick = plausible_tick(text, self._now())
        if tick is None:
            logger.debug("cron %s: ignored a garbage event: %s", name, excerpt(argument))
            return
        entry.handled(tick, owner=worker == self._worker.id)

    # -- the loop ------------------------------------------------------------------------

    async def start(self) -> None:
        """Read the schedules' state before the worker is ready (if Redis answers: else
        the loop does it), so that a test's first advance of a frozen clock finds it."""
        try:
            await self._load()
        except REDIS_ERRORS as exc:
            report("the cron service", exc)

    async def run(self) -> None:
        stop = self._runner.clock.listen(self.wake)
        try:
            while True:
                wait = await self._round_safely(eager=False)
                with anyio.move_on_after(wait):
                    await self._wake.wait()
                self._wake = anyio.Event()
        finally:
            stop()

    async def fire_due(self) -> bool:
        """Fire every due tick now (a burst worker about to exit); True if a job was
        written."""
        fired = 0
        try:
            fired = (await self._round(eager=True))[1]
        except REDIS_ERRORS as exc:
            report("the cron service", exc)
        return fired > 0

    async def _round_safely(self, *, eager: bool) -> float:
        try:
            wait = (await self._round(eager=eager))[0]
        except REDIS_ERRORS as exc:
            report("the cron service", exc)
            return ERROR_WAIT
        except Exception:  # a bug or hostile data: keep the schedules going
            logger.exception("cron service: unexpected error; retrying")
            return ERROR_WAIT
        reachable()
        return wait

    async def _round(self, *, eager: bool) -> tuple[float, int]:
        """Fire what is due; (seconds until the next tick is due, jobs written)."""
        if not self._loaded:
            await self._load()
        fired = 0
        for entry in list(self._entries.values()):
            fired += await self._catch_up(entry, eager)
        return self._next_wait(), fired

    def _now(self) -> int:
        return self._runner.clock.shift(_local_ms() + self._skew_ms)

    def _handover_ms(self, entry: _Entry, eager: bool) -> int:
        if eager or entry.owner or self._runner.clock.frozen_ms is not None:
            return 0
        return int(HANDOVER * 1000)

    def _next_wait(self) -> float:
        dues = [e.next + self._handover_ms(e, False) for e in self._entries.values() if e.next]
        if not dues:
            return MAX_SLEEP
        return min(MAX_SLEEP, max(0.0, (min(dues) - self._now()) / 1000))

    async def _load(self) -> None:
        """Where each schedule's state is, and its last tick. A schedule seen for the
        first time (or whose ``last`` is unreadable) starts with its latest tick if
        that is at most ``max_drift`` old (``_start``), else with its next one."""
        redis = self._worker.redis
        server = await server_ms(redis)
        self._skew_ms = server - _local_ms()
        now = self._runner.clock.shift(server)
        entries = list(self._entries.values())
        pipe = cast(Any, redis.pipeline(transaction=False))
        for entry in entries:
            entry.keys = await self._tab.location(entry.schedule)
            entry.layers = enqueue_layers(self._runner.middleware, entry.schedule.task)
            key = entry.keys.cron(entry.schedule.name)
            pipe.hsetnx(key, "last", str(_start(entry.schedule, now)))
            pipe.hget(key, "last")
        replies = await pipe.execute()
        for entry, last in zip(entries, replies[1::2], strict=True):
            entry.handled(_last(entry.schedule, last, now), owner=False)
        self._loaded = True

    async def _catch_up(self, entry: _Entry, eager: bool) -> int:
        fired = 0
        for _ in range(CATCH_UP):
            now = self._now()
            if entry.next is None or entry.next + self._handover_ms(entry, eager) > now:
                break
            outcome = await self._fire(entry, now)
            if outcome is None:
                break
            fired += outcome
        return fired

    async def _fire(self, entry: _Entry, now: int) -> int | None:
        """Handle the entry's next tick; jobs written (0 or 1), None if not due yet."""
        schedule = entry.schedule
        tick = entry.next
        assert tick is not None
        if tick < now - schedule.max_drift_ms:  # too late: skip to the first one in time
            tick = entry.next = schedule.expression.at_or_after(now - schedule.max_drift_ms)
            if tick is None or tick > now:
                return 0
        reply, job = await self._send(entry, tick)
        if reply is None:
            entry.handled(tick, owner=False)
            return 0
        verdict, value = str(reply[0]), int(reply[1])
        self._skew_ms = int(reply[2]) - _local_ms()
        if verdict == "early":
            return None
        if verdict == "late":
            return 0  # the next turn skips it (the time estimate is the server's now)
        if verdict == "done":
            entry.handled(value, owner=False)
            return 0
        _log_skipped(schedule, value, tick)
        entry.handled(tick, owner=True)
        return _written(schedule, tick, verdict, reply, job)

    async def _send(self, entry: _Entry, tick: int) -> tuple[list[Any] | None, Job[Any] | None]:
        """Run the tick through the task's enqueue middleware; the innermost layer is
        tick.lua. Returns its reply (None if a middleware wrote nothing) and the job."""
        schedule = entry.schedule
        assert entry.keys is not None
        client = self._runner.client
        ctx = EnqueueContext(
            task=schedule.task,
            args=schedule.args,
            kwargs=dict(schedule.kwargs),
            payload=schedule.payload,
            job_id=schedule.job_id(tick),
            queue=schedule.queue,
            due=None,
            now=self._runner.clock.now(),
            priority=schedule.priority,
            job_id_given=True,
            partition=entry.keys.partition,
        )
        replies: list[list[Any]] = []

        async def write(ctx: EnqueueContext) -> Job[Any]:
            keys = client.cached(ctx.queue).part(ctx.partition or 0)
            call = scripts.tick(
                self._worker.env,
                keys.cron(schedule.name),
                keys.events,
                schedule.name,
                tick,
                schedule.max_drift_ms,
                self._worker.id,
                client.write_call(ctx),
            )
            reply = cast(list[Any], await scripts.run(self._worker.redis, call))
            replies.append(reply)
            if reply[0] == "fired":
                return client.job_from_reply(ctx, reply[3:])
            return Job(client, ctx.job_id, ctx.queue, ctx.task.codec.result, deduplicated=True)

        job: Job[Any] | None = None
        try:
            job = await build_enqueue_chain(entry.layers, write)(ctx)
        except LockConflictError as exc:  # on_conflict="raise": the tick is handled
            if not replies:
                raise
            logger.warning("cron %s: tick %s not enqueued: %s", schedule.name, _iso(tick), exc)
        if not replies:
            logger.warning(
                "cron %s: tick %s: an enqueue middleware wrote nothing", schedule.name, _iso(tick)
            )
            return None, None
        return replies[0], job


def _start(schedule: CronSchedule, now: int) -> int:
    """The ``last`` of a schedule never seen: just before its latest tick if that is at
    most ``max_drift`` old (it runs: one tick, not the whole window), else now."""
    latest = schedule.expression.at_or_before(now)
    if latest is not None and now - latest <= schedule.max_drift_ms:
        return latest - 1
    return now - 1


def _last(schedule: CronSchedule, value: object, now: int) -> int:
    """The state's ``last`` as read at start-up; one that cannot be a handled tick (not
    a whole number, or later than now + ``FUTURE_SLACK``) is read as a lost state, with
    one WARNING (tick.lua reads it the same way, and overwrites it at the next tick)."""
    tick = plausible_tick(value, now)
    if tick is not None:
        return tick
    if value is not None:
        logger.warning(
            "cron %s: the state's last tick %s is not a handled tick (hostile or from a "
            "clock far ahead): starting as if the schedule's state were lost",
            schedule.name,
            excerpt(value),
        )
    return _start(schedule, now)


def _log_skipped(schedule: CronSchedule, previous: int, tick: int) -> None:
    """One WARNING for the ticks between the last handled one and ``tick``: they were
    more than ``max_drift`` late when a worker could have fired them."""
    if previous <= 0:
        return
    first = schedule.expression.after(previous)
    if first is None or first >= tick:
        return
    logger.warning(
        "cron %s: skipped the ticks from %s to before %s: more than max_drift=%gs late "
        "(no worker ran them in time)",
        schedule.name,
        _iso(first),
        _iso(tick),
        schedule.max_drift,
    )


def _written(
    schedule: CronSchedule, tick: int, verdict: str, reply: list[Any], job: Job[Any] | None
) -> int:
    if verdict == "paused":
        logger.debug("cron %s: tick %s skipped (paused)", schedule.name, _iso(tick))
        return 0
    code = int(reply[3]) if len(reply) > 3 else -1
    if code == 1:
        logger.debug(
            "cron %s: tick %s enqueued job %s", schedule.name, _iso(tick), schedule.job_id(tick)
        )
        return 1
    if code == 2 and job is not None:
        logger.info(
            "cron %s: tick %s not enqueued: job %s still holds the task's lock",
            schedule.name,
            _iso(tick),
            job.id,
        )
    return 0


class CronMiddleware(Middleware):
    """Starts a ``CronService`` in every worker that reads a queue with schedules."""

    def __init__(self, tab: CronTab) -> None:
        self._tab = tab

    async def on_worker_start(self, worker: WorkerPort) -> None:
        if not len(self._tab):
            return
        queues = {keys.queue for keys in worker.partitions()}
        mine = [s for s in self._tab if s.queue in queues]
        if not mine:
            return
        service = CronService(self._tab, worker, mine)
        await service.start()
        worker.on_event("cron", service.on_fired)
        worker.on_event("due", service.on_due)
        on_drained = getattr(worker, "on_drained", None)
        if on_drained is not None:  # a burst worker fires what is due before it exits
            on_drained(service.fire_due)
        worker.spawn(service.run)
        logger.info(
            "worker %s runs the cron schedules %s", worker.id, ", ".join(s.name for s in mine)
        )
