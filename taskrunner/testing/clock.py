"""A frozen clock for tests of delayed jobs, retries and (later) cron schedules.

::

    async with frozen_time(tr) as clock:            # time stands still from here
        job = await remind.options(delay=3600).enqueue("ann")
        await run_until_idle(tr)                    # nothing is due yet
        await clock.advance(3600)                   # an hour passes, at once
        await run_until_idle(tr)                    # the reminder runs

While the clock is frozen, every due time taskrunner computes or compares (a delay,
``at=``, a retry's backoff, a unique-job reschedule, the scheduler's promotion of due
jobs, the timestamps of a job's info) reads the clock instead of the system time, in
this process. What Redis times by itself is not affected: lease staleness
(``stale_after``), unique-lock and result TTLs, and worker heartbeats keep real time.

How it hooks in (today): the core reads ``time.time()`` (runner, retry and unique
middleware) and ``taskrunner.client.now_ms()`` (worker, scheduler, client) for due
times; ``frozen_time`` swaps those for the clock in those modules and puts them back
on exit (``_CoreTime``). When the core takes a clock of its own (``tr.clock``, due
times on the Redis server's clock plus an offset), ``frozen_time`` sets that instead;
the API here stays the same. Only one clock can be frozen at a time in a process.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from types import ModuleType
from typing import TYPE_CHECKING, Any

from taskrunner.connection import REDIS_ERRORS

if TYPE_CHECKING:
    from taskrunner.runner import TaskRunner

_active: list[FrozenClock] = []


def current_clock() -> FrozenClock | None:
    """The frozen clock in force in this process, or None (system time)."""
    return _active[-1] if _active else None


def _seconds(value: float | timedelta) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


def _epoch(when: datetime | float) -> float:
    if isinstance(when, datetime):
        if when.tzinfo is None:
            raise ValueError("a naive datetime is ambiguous: give it a timezone (e.g. UTC)")
        return when.timestamp()
    return float(when)


class FrozenClock:
    """Time as taskrunner sees it while frozen: it moves only when told to."""

    def __init__(self, runner: TaskRunner, start: float) -> None:
        self._runner = runner
        self._now = start

    def now(self) -> float:
        """The frozen time, in epoch seconds."""
        return self._now

    def now_datetime(self) -> datetime:
        """The frozen time as an aware UTC datetime."""
        return datetime.fromtimestamp(self._now, UTC)

    async def advance(self, seconds: float | timedelta) -> None:
        """Move time forward by ``seconds``; wake the workers' schedulers so that jobs
        now due are promoted (``run_until_idle`` then runs them)."""
        step = _seconds(seconds)
        if step < 0:
            raise ValueError("time only moves forward: advance by a positive amount")
        self._now += step
        await self._wake()

    async def move_to(self, when: datetime | float) -> None:
        """Move time forward to ``when`` (an aware datetime or epoch seconds)."""
        await self.advance(_epoch(when) - self._now)

    async def _wake(self) -> None:
        """Tell every worker of the runner's queues to look at its delayed set again
        (the message producers send when they add an earlier job)."""
        try:
            client = self._runner.client
        except Exception:  # noqa: BLE001 - not connected: no worker of ours is running
            return
        pipe = client.redis.pipeline(transaction=False)
        for queue in self._runner.queues():
            pipe.publish(client.keys(queue).events, "due")
        try:
            await pipe.execute()
        except REDIS_ERRORS:  # a worker also re-reads its delayed set within max_idle_wait
            return


class _TimeModule:
    """Stands in for the ``time`` module inside a core module: ``time()`` is the clock."""

    def __init__(self, clock: FrozenClock) -> None:
        self._clock = clock

    def time(self) -> float:
        return self._clock.now()

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


class _CoreTime:
    """Where the core reads the time for due times today (see the module docstring)."""

    TIME_MODULES = (
        "taskrunner.runner",
        "taskrunner.middleware.retry",
        "taskrunner.middleware.unique",
    )
    NOW_MS_MODULES = ("taskrunner.client", "taskrunner.worker", "taskrunner.scheduler")

    def __init__(self, clock: FrozenClock) -> None:
        import importlib

        self._saved: list[tuple[ModuleType, str, Any]] = []
        frozen_ms: Callable[[], int] = lambda: int(clock.now() * 1000)  # noqa: E731
        for name in self.TIME_MODULES:
            self._swap(importlib.import_module(name), "time", _TimeModule(clock))
        for name in self.NOW_MS_MODULES:
            self._swap(importlib.import_module(name), "now_ms", frozen_ms)

    def _swap(self, module: ModuleType, attribute: str, value: Any) -> None:
        if not hasattr(module, attribute):  # the core changed: fail loudly, not silently
            raise RuntimeError(f"frozen_time: {module.__name__}.{attribute} no longer exists")
        self._saved.append((module, attribute, getattr(module, attribute)))
        setattr(module, attribute, value)

    def restore(self) -> None:
        for module, attribute, value in reversed(self._saved):
            setattr(module, attribute, value)
        self._saved.clear()


@asynccontextmanager
async def frozen_time(
    runner: TaskRunner, start: datetime | float | None = None
) -> AsyncIterator[FrozenClock]:
    """Freeze taskrunner's clock at ``start`` (default: now, truncated to the whole
    second, so that a job delayed by whole seconds falls due exactly when the clock is
    advanced by as much) for the block; yields the ``FrozenClock`` that moves it.
    Time is real again after the block."""
    if _active:
        raise RuntimeError("a clock is already frozen in this process")
    clock = FrozenClock(runner, float(int(time.time())) if start is None else _epoch(start))
    patch = _CoreTime(clock)
    _active.append(clock)
    try:
        yield clock
    finally:
        _active.remove(clock)
        patch.restore()


__all__ = ["FrozenClock", "current_clock", "frozen_time"]
