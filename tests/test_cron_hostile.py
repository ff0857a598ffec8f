"""Cron with hostile data in Redis, on real Redis with in-process workers: a far-future
or out-of-range ``last`` in a schedule's state hash (read by the service at start-up,
and by tick.lua while a worker runs), and garbage ``cron`` events on the events
channel. Each is treated as documented in docs/scheduling.md: a hostile ``last`` as if
the schedule's state were lost, a garbage event as if it were never sent.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from conftest import wait_until
from redis.asyncio import Redis

from taskrunner import JobNotFound, TaskRunner, Worker
from taskrunner.testing import frozen_time

MakeRunner = Callable[..., TaskRunner]
T0 = datetime(2026, 1, 5, 10, 0, 30, tzinfo=UTC)
"""30 seconds past 10:00 UTC: the 10:00 tick of a new schedule is within max_drift."""
TOMORROW = str(int(T0.timestamp()) * 1000 + 86_400_000)
HOSTILE_LAST = [
    pytest.param("99999999999999999", id="past-year-9999"),
    pytest.param("99999999999999", id="year-5138"),
    pytest.param(TOMORROW, id="a-day-ahead"),
]


def tick_s(minute: int) -> int:
    """The tick at 10:<minute> on T0's day, in epoch seconds."""
    return int(T0.replace(minute=minute, second=0).timestamp())


def job_id(minute: int) -> str:
    """The id of the job of the schedule "minutely" at 10:<minute>."""
    return f"cron:minutely:{tick_s(minute)}"


def declare(tr: TaskRunner) -> None:
    @tr.cron("0 * * * * *", name="minutely")
    async def minutely() -> None: ...


async def written(tr: TaskRunner, minute: int) -> None:
    """Until the job of the tick at 10:<minute> exists."""

    async def exists() -> bool:
        try:
            await tr.job(job_id(minute)).status()
        except JobNotFound:
            return False
        return True

    await wait_until(exists)


def problems(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Log records at ERROR or above (a traceback, a crash)."""
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def cron_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "taskrunner.cron" and r.levelno == logging.WARNING
    ]


# -- a hostile `last` in the state hash ---------------------------------------------------------


@pytest.mark.parametrize("last", HOSTILE_LAST)
async def test_a_far_future_last_at_start_up_is_read_as_a_lost_state_with_one_warning(
    make_runner: MakeRunner, redis: Redis, last: str, caplog: pytest.LogCaptureFixture
) -> None:
    tr = make_runner()
    declare(tr)
    caplog.set_level(logging.WARNING)
    async with frozen_time(tr, start=T0), tr:
        key = (await tr.crontab.location(tr.crontab.get("minutely"))).cron("minutely")
        await redis.hset(key, "last", last)
        [info] = await tr.crontab.list()
        assert info.next_run == T0.replace(minute=1, second=0)
        done = await tr.run_until_idle()  # as if new: its latest tick (10:00) runs
    assert [c.id for c in done] == [job_id(0)]
    assert await redis.hget(key, "last") == str(tick_s(0) * 1000)
    assert len(cron_warnings(caplog)) <= 1
    assert problems(caplog) == []


@pytest.mark.parametrize("last", [*HOSTILE_LAST, pytest.param("1e3", id="not-digits")])
async def test_resume_overwrites_a_hostile_last_with_the_latest_tick(
    make_runner: MakeRunner, redis: Redis, last: str
) -> None:
    tr = make_runner()
    declare(tr)
    async with frozen_time(tr, start=T0) as clock, tr:
        key = (await tr.crontab.location(tr.crontab.get("minutely"))).cron("minutely")
        await tr.crontab.pause("minutely")
        await redis.hset(key, "last", last)
        await tr.crontab.resume("minutely")
        assert await redis.hgetall(key) == {"last": str(tick_s(0) * 1000)}
        assert await tr.run_until_idle() == []  # 10:00 fell while paused
        await clock.advance(30)
        assert [c.id for c in await tr.run_until_idle()] == [job_id(1)]


@pytest.mark.parametrize("last", HOSTILE_LAST)
async def test_a_far_future_last_written_while_a_worker_runs_does_not_stop_the_schedule(
    make_runner: MakeRunner, redis: Redis, last: str, caplog: pytest.LogCaptureFixture
) -> None:
    tr = make_runner()
    declare(tr)
    caplog.set_level(logging.WARNING)
    async with frozen_time(tr, start=T0) as clock, tr, tr.worker(handle_signals=False):
        await written(tr, 0)
        key = (await tr.crontab.location(tr.crontab.get("minutely"))).cron("minutely")
        await redis.hset(key, "last", last)  # the service's own view is still 10:00
        await clock.advance(30)  # tick.lua reads the hostile value as no tick handled
        await written(tr, 1)
        await clock.advance(60)
        await written(tr, 2)
    assert problems(caplog) == []


# -- garbage `cron` events ----------------------------------------------------------------------


async def dispatched(redis: Redis, channel: str, probes: list[str]) -> None:
    """Until the worker dispatched a probe published now: every message published on
    the channel before it was dispatched before it (one subscription, in order)."""
    token = uuid.uuid4().hex

    async def seen() -> bool:
        if token not in probes:
            await redis.publish(channel, f"probe {token}")
        return token in probes

    await wait_until(seen)


def probed(worker: Worker, probes: list[str]) -> Worker:
    worker.on_event("probe", lambda queue, argument: probes.append(argument))
    return worker


@pytest.mark.parametrize(
    "tick",
    [
        pytest.param("99999999999999", id="year-5138"),
        pytest.param("99999999999999999", id="past-year-9999"),
        pytest.param(TOMORROW, id="a-day-ahead"),
        pytest.param("²", id="a-digit-int-refuses"),
    ],
)
async def test_a_garbage_cron_event_is_ignored_by_every_subscribed_worker(
    make_runner: MakeRunner, redis: Redis, tick: str, caplog: pytest.LogCaptureFixture
) -> None:
    tr = make_runner()
    declare(tr)
    probes: list[str] = []
    caplog.set_level(logging.WARNING)
    worker = probed(tr.worker(handle_signals=False), probes)
    async with frozen_time(tr, start=T0) as clock, tr, worker:
        await written(tr, 0)
        keys = await tr.crontab.location(tr.crontab.get("minutely"))
        await dispatched(redis, keys.events, probes)  # subscribed
        await redis.publish(keys.events, f"cron minutely {tick} someone")
        await dispatched(redis, keys.events, probes)  # the garbage was dispatched
        assert problems(caplog) == []
        await clock.advance(30)
        await written(tr, 1)
        await clock.advance(60)
        await written(tr, 2)
        assert await redis.hget(keys.cron("minutely"), "last") == str(tick_s(2) * 1000)
    assert problems(caplog) == []


@pytest.mark.parametrize("paused", ["0", "", "yes", "\xff"])
async def test_resume_of_a_schedule_whose_paused_field_is_not_1_skips_no_tick(
    make_runner: MakeRunner, redis: Redis, paused: str
) -> None:
    tr = make_runner()
    declare(tr)
    async with frozen_time(tr, start=T0), tr:
        key = (await tr.crontab.location(tr.crontab.get("minutely"))).cron("minutely")
        await redis.hset(key, "paused", paused)  # not paused, for tick.lua and list()
        assert [i.paused for i in await tr.crontab.list()] == [False]
        await tr.crontab.resume("minutely")  # not paused: left alone (10:00 still due)
        assert await redis.hget(key, "last") is None
        assert [c.id for c in await tr.run_until_idle()] == [job_id(0)]
