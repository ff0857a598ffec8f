"""A frozen clock for tests of delayed jobs, retries, unique locks and (later) cron.

::

    async with frozen_time(tr) as clock:            # time stands still from here
        job = await remind.options(delay=3600).enqueue("ann")
        await run_until_idle(tr)                    # nothing is due yet
        await clock.advance(3600)                   # an hour passes, at once
        await run_until_idle(tr)                    # the reminder runs

It drives the runner's own clock (``TaskRunner.clock``, taskrunner.clock), which every
script of that runner reads for "now": due times of delays, ``at=`` and retries,
the promotion of due jobs, the timestamps of a job's info, and the failed-job window.
``advance`` also wakes the workers' schedulers (a "due" message on every partition's
events channel) and ages the queues' unique locks by as much (``_LockAger``): a lock
whose TTL runs out in frozen time is gone, one held by a job a worker holds (and
heartbeats) is left alone. Lease staleness, heartbeats and result TTLs keep real time.

The clock belongs to one TaskRunner: another runner in this process, or a worker in
another process, keeps its own (freeze each runner that takes part in the test).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from taskrunner import scripts
from taskrunner.connection import REDIS_ERRORS
from taskrunner.exceptions import TaskrunnerError
from taskrunner.options import MAX_SECONDS

if TYPE_CHECKING:
    from taskrunner.client import Client
    from taskrunner.runner import TaskRunner

LOCK_SCAN = 500
"""Keys asked for per SCAN call when ageing the locks."""


def _seconds(value: float | timedelta) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


def _epoch(when: datetime | float) -> float:
    if isinstance(when, datetime):
        if when.tzinfo is None:
            raise ValueError("a naive datetime is ambiguous: give it a timezone (e.g. UTC)")
        return when.timestamp()
    return float(when)


class FrozenClock:
    """Time as one TaskRunner's scripts see it while frozen: it moves only when told to."""

    def __init__(self, runner: TaskRunner) -> None:
        self._runner = runner

    def now(self) -> float:
        """The frozen time, in epoch seconds."""
        return self._runner.clock.now()

    def now_datetime(self) -> datetime:
        """The frozen time as an aware UTC datetime."""
        return datetime.fromtimestamp(self.now(), UTC)

    async def advance(self, seconds: float | timedelta) -> None:
        """Move time forward by ``seconds``: unique locks age by as much, and the
        workers' schedulers wake, so jobs now due are promoted (``run_until_idle``
        then runs them; a running embedded worker runs them at once)."""
        step = _seconds(seconds)
        if not 0 <= step <= MAX_SECONDS:  # NaN fails it too
            raise ValueError(
                "time only moves forward, by a finite amount of at most 100 years: "
                f"advance by a positive number of seconds, got {seconds!r}"
            )
        self._runner.clock.advance(step)
        client = _client(self._runner)
        if client is None:  # not connected: no lock to age, no worker of ours to wake
            return
        try:
            await _LockAger(client).age(int(step * 1000))
        finally:
            await _wake(client, self._runner.queues())

    async def move_to(self, when: datetime | float) -> None:
        """Move time forward to ``when`` (an aware datetime or epoch seconds)."""
        await self.advance(_epoch(when) - self.now())


def _client(runner: TaskRunner) -> Client | None:
    try:
        return runner.client
    except TaskrunnerError:
        return None


async def _wake(client: Client, queues: list[str]) -> None:
    """Tell every worker of these queues to look at its delayed sets again (the
    message a producer sends when it adds an earlier job), on every partition, with
    the runner's publish command (SPUBLISH on a Redis 7 cluster)."""
    try:
        parts = [keys for name in queues for keys in (await client.resolve(name)).parts]
        pipe = cast(Any, client.redis.pipeline(transaction=False))
        for keys in parts:
            pipe.execute_command(client.env.publish, keys.events, "due")
        await pipe.execute()
    except REDIS_ERRORS:  # a worker also re-reads its delayed sets within max_idle_wait
        return


class _LockAger:
    """Shortens the TTL of every unique lock of the runner's namespace by the step the
    clock moved (a lock's TTL is on Redis's real clock: without this, a lock would
    outlive its holder's due time plus ``lock_ttl`` in frozen time). Locks whose
    holder is held by a worker are left alone: its heartbeat keeps them, in real time
    as in frozen time. Finds the locks with SCAN over the namespace, which is
    fine on a test's server and slow on a big shared one."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def _pattern(self) -> str:
        namespace = "".join(f"\\{c}" if c in "*?[]\\" else c for c in self._client.namespace)
        return f"{namespace}:{{*}}:lock:*"

    async def age(self, step_ms: int) -> None:
        if step_ms <= 0:
            return
        redis = cast(Any, self._client.redis)
        found = redis.scan_iter(match=self._pattern(), count=LOCK_SCAN, _type="string")
        locks = [str(key) async for key in found]
        if not locks:
            return
        pipe = redis.pipeline(transaction=False)
        for key in locks:
            pipe.get(key)
        holders = await pipe.execute(raise_on_error=False)
        calls = [
            scripts.age_lock(key, f"{key.rpartition(':lock:')[0]}:job:{holder}", holder, step_ms)
            for key, holder in zip(locks, holders, strict=True)
            if isinstance(holder, str)  # gone meanwhile, or not a lock after all
        ]
        await scripts.run_many(redis, calls, raise_on_error=False)


@asynccontextmanager
async def frozen_time(
    runner: TaskRunner, start: datetime | float | None = None
) -> AsyncIterator[FrozenClock]:
    """Freeze ``runner``'s clock at ``start`` (default: now, truncated to the whole
    second, so that a job delayed by whole seconds falls due exactly when the clock is
    advanced by as much) for the block; yields the ``FrozenClock`` that moves it.
    The clock is put back as it was after the block (real time, for a runner whose
    clock nobody had moved)."""
    clock = runner.clock
    if clock.frozen_ms is not None:
        raise RuntimeError("this TaskRunner's clock is already frozen")
    saved = clock.offset_ms
    clock.freeze(float(int(clock.now())) if start is None else _epoch(start))
    try:
        yield FrozenClock(runner)
    finally:
        clock.reset()
        clock.offset_ms = saved


__all__ = ["FrozenClock", "frozen_time"]
