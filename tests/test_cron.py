"""Cron schedules on real Redis with in-process workers: declaration, frozen time,
pause and resume, max_drift, lock-following overlap, hostile state, topologies, CLI.

(Real worker processes, SIGKILL and restarts: tests/test_cron_processes.py.)
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest
from conftest import subprocess_env, wait_until
from redis.asyncio import Redis
from topology import Topology

from taskrunner import (
    ConfigurationError,
    CronSchedule,
    JobNotFound,
    JobStatus,
    ScheduleNotFound,
    Task,
    TaskRunner,
    current_job,
)
from taskrunner.cron import CronExpression
from taskrunner.middleware.unique import LockKind
from taskrunner.testing import frozen_time

MakeRunner = Callable[..., TaskRunner]
TASKRUNNER = str(Path(sys.executable).with_name("taskrunner"))
T0 = datetime(2026, 1, 5, 10, 0, 30, tzinfo=UTC)
"""A Monday, 30 seconds past 10:00 UTC (11:00 in Paris, winter time)."""


def at(hour: int, minute: int, second: int = 0) -> int:
    """Epoch seconds of that time on T0's day (UTC)."""
    return int(T0.replace(hour=hour, minute=minute, second=second).timestamp())


async def status(tr: TaskRunner, job_id: str) -> JobStatus | None:
    try:
        return await tr.job(job_id).status()
    except JobNotFound:
        return None


async def cron_jobs(redis: Redis, namespace: str, name: str) -> list[str]:
    """Ids of the jobs written for schedule ``name`` (every partition of "default")."""
    found = [key async for key in redis.scan_iter(match=f"{namespace}:*:job:cron:{name}:*")]
    return sorted(key.rpartition(":job:")[2] for key in found)


# -- declaration -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "why"),
    [
        ("61 * * * *", "bad minute"),
        ("* * *", "wrong number of fields"),
        ("0 0 30 2 *", "bad day-of-month"),
        ("*/0 * * * *", "bad minute"),
        ("* * * * * * *", "wrong number of fields"),
        ("0 25 * * *", "bad hour"),
        ("", "wrong number of fields"),
    ],
)
def test_a_bad_cron_expression_is_refused_at_declaration_in_one_sentence(
    expression: str, why: str
) -> None:
    tr = TaskRunner("redis://localhost:1/0")
    with pytest.raises(ConfigurationError) as caught:

        @tr.cron(expression)
        async def job() -> None: ...

    message = str(caught.value)
    assert message.startswith("cron schedule ")
    assert f"invalid cron expression {expression!r}: {why};" in message
    assert "\n" not in message
    assert "6 with a leading seconds field" in message
    assert len(tr.crontab) == 0
    assert tr.registry == {}  # the function was not left declared as a task


def test_bad_settings_of_a_schedule_are_refused_in_one_sentence() -> None:
    tr = TaskRunner("redis://localhost:1/0")

    @tr.task
    async def report(kind: str, days: int = 1) -> None: ...

    cases: list[tuple[Callable[[], object], str]] = [
        (lambda: tr.cron("* * * * *", report.call("a"), tz="Mars/Base"), "unknown time zone"),
        (lambda: tr.cron("* * * * *", report.call("a"), max_drift=0.5), "at least 1 second"),
        # infinity was taken, then every worker's cron service crashed as it started
        (lambda: tr.cron("* * * * *", report.call("a"), max_drift=math.inf), "at most"),
        (lambda: tr.cron("* * * * *", report.call("a"), max_drift=math.nan), "at most"),
        (lambda: tr.cron("* * * * *", report.call(3)), "kind: input should be a valid string"),  # type: ignore[arg-type]
        # a setting's words ("a number of seconds or a timedelta") are not an argument's
        (
            lambda: tr.cron("* * * * *", report.call("a", "x")),  # type: ignore[arg-type]
            "days: input should be a valid integer",
        ),
        (lambda: tr.cron("* * * * *", report.call("a"), name="a b"), "invalid cron schedule"),
        (lambda: tr.cron("* * * * *", report.options(delay=5).call("a")), "delay cannot be set"),
        (lambda: tr.cron("* * * * *", report.options(priority="top").call("a")), "priority"),
        # the task instead of a call of it: was an AttributeError about 'delay'
        (
            lambda: tr.cron("* * * * *", report),  # type: ignore[call-overload]
            "report': tr.cron(expression, call) takes a call such as task.call(",
        ),
        (lambda: tr.cron("* * * * *", report.call), "got <bound method"),  # type: ignore[call-overload]
    ]
    for declare, expected in cases:
        with pytest.raises(ConfigurationError) as caught:
            declare()
        assert expected in str(caught.value), str(caught.value)
        assert "\n" not in str(caught.value)
    tr.cron("* * * * *", report.call("a"))
    with pytest.raises(ConfigurationError, match="already declared"):
        tr.cron("0 * * * *", report.call("b"))
    with pytest.raises(ConfigurationError, match="missing a required argument: 'x'"):

        @tr.cron("* * * * *")  # type: ignore[arg-type]
        async def needs(x: int) -> None: ...


def test_the_three_forms_declare_a_task_and_a_schedule() -> None:
    tr = TaskRunner("redis://localhost:1/0")

    @tr.cron("*/5 * * * *", tz="Europe/Paris")
    async def cleanup() -> int:
        return 1

    @tr.cron("0 * * * * *", name="minutely")
    @tr.task(name="poll", lock="until_executed")
    async def poll() -> None: ...

    @tr.task
    async def report(kind: str, days: int = 1) -> str:
        return kind

    daily = tr.cron("0 8 * * 1-5", report.options(queue="reports").call("daily", days=2))
    assert isinstance(cleanup, Task)
    assert cleanup.name in tr.registry
    assert isinstance(poll, Task)
    assert poll.name == "poll"
    assert isinstance(daily, CronSchedule)
    assert [s.name for s in tr.crontab] == [cleanup.name, "minutely", report.name]
    assert tr.crontab.get("minutely").task is poll.definition
    assert daily.queue == "reports"
    assert daily.payload == '{"kind":"daily","days":2}'
    assert daily.job_id(1_767_607_200_000) == f"cron:{report.name}:1767607200"
    assert "reports" in tr.queues()
    with pytest.raises(ScheduleNotFound, match="schedules: "):
        tr.crontab.get("nope")


def test_expressions_have_seconds_aliases_and_time_zones() -> None:
    def after(text: str, tz: str, when: datetime) -> datetime:
        found = CronExpression(text, tz).after(int(when.timestamp() * 1000))
        assert found is not None
        return datetime.fromtimestamp(found / 1000, UTC)

    winter = datetime(2026, 1, 5, 6, 0, tzinfo=UTC)
    summer = datetime(2026, 7, 6, 5, 0, tzinfo=UTC)
    assert after("0 9 * * *", "Europe/Paris", winter) == winter.replace(hour=8)
    assert after("0 9 * * *", "Europe/Paris", summer) == summer.replace(hour=7)
    assert after("*/15 * * * * *", "UTC", winter) == winter.replace(second=15)
    assert after("@hourly", "UTC", winter) == winter.replace(hour=7)
    assert after("@daily", "UTC", winter) == winter.replace(day=6, hour=0)
    spring = datetime(2026, 3, 29, 0, 0, tzinfo=UTC)  # Paris skips 02:00-03:00 that night
    assert after("30 2 * * *", "Europe/Paris", spring) == spring.replace(hour=1)  # 03:00 CEST
    assert CronExpression("* * * * * *").seconds
    assert not CronExpression("* * * * *").seconds


# -- frozen time -----------------------------------------------------------------------------


async def test_frozen_time_runs_each_tick_of_a_schedule_once(
    make_runner: MakeRunner, redis: Redis, namespace: str
) -> None:
    tr = make_runner()

    @tr.cron("0 * * * *", tz="Europe/Paris", name="hourly")
    async def hourly() -> str:
        return current_job().id

    async with frozen_time(tr, start=T0) as clock, tr:
        done = await tr.run_until_idle()  # 10:00 is 30 s late: within max_drift (60 s)
        assert [(c.id, c.kind) for c in done] == [(f"cron:hourly:{at(10, 0)}", "succeeded")]
        await clock.advance(timedelta(minutes=59, seconds=30))  # 11:00 UTC
        done = await tr.run_until_idle()
        assert [(c.id, c.kind) for c in done] == [(f"cron:hourly:{at(11, 0)}", "succeeded")]
        assert await tr.run_until_idle() == []  # the same tick never runs again
        await clock.advance(3600)
        done = await tr.run_until_idle()
        assert [c.id for c in done] == [f"cron:hourly:{at(12, 0)}"]
        assert await tr.job(done[0].id).result() == done[0].id
        [info] = await tr.crontab.list()
        assert info.last_run == datetime.fromtimestamp(at(12, 0), UTC)
        assert info.next_run == datetime.fromtimestamp(at(13, 0), UTC)
        assert info.last_job == f"cron:hourly:{at(12, 0)}"
        assert not info.paused
    assert await cron_jobs(redis, namespace, "hourly") == [
        f"cron:hourly:{at(10, 0)}",
        f"cron:hourly:{at(11, 0)}",
        f"cron:hourly:{at(12, 0)}",
    ]


async def test_advancing_the_clock_wakes_a_running_worker(make_runner: MakeRunner) -> None:
    tr = make_runner()

    @tr.cron("*/10 * * * * *", name="ten")
    async def ten() -> None: ...

    async with frozen_time(tr, start=T0), tr, tr.worker(handle_signals=False):
        job_id = f"cron:ten:{at(10, 0, 40)}"
        tr.clock.advance(10)  # the plain clock: no event is sent, the service listens

        async def done() -> bool:
            return await status(tr, job_id) == JobStatus.SUCCEEDED

        await wait_until(done)


# -- pause, resume, trigger --------------------------------------------------------------------


async def test_paused_ticks_are_skipped_and_resume_starts_at_the_next_tick(
    make_runner: MakeRunner, redis: Redis, namespace: str
) -> None:
    tr = make_runner()

    @tr.cron("0 * * * * *", name="minutely", max_drift=10)
    async def minutely() -> None: ...

    async with frozen_time(tr, start=T0) as clock, tr:
        assert await tr.run_until_idle() == []  # 10:00 is 30 s late: over max_drift
        await tr.crontab.pause("minutely")
        assert (await tr.crontab.info("minutely")).paused
        await clock.advance(90)  # 10:01 and 10:02 fall while paused
        assert await tr.run_until_idle() == []
        await tr.crontab.resume("minutely")
        assert await tr.run_until_idle() == []  # not replayed
        await clock.advance(60)
        done = await tr.run_until_idle()
        assert [c.id for c in done] == [f"cron:minutely:{at(10, 3)}"]
        manual = await tr.crontab.trigger("minutely")
        assert manual.id.startswith("cron:minutely:manual:")
        assert [c.id for c in await tr.run_until_idle()] == [manual.id]
    assert await cron_jobs(redis, namespace, "minutely") == sorted(
        [f"cron:minutely:{at(10, 3)}", manual.id]
    )


async def test_resume_does_not_replay_the_ticks_that_fell_while_paused_without_a_worker(
    make_runner: MakeRunner, redis: Redis, namespace: str
) -> None:
    tr = make_runner()

    @tr.cron("0 * * * * *", name="minutely", max_drift=3600)
    async def minutely() -> None: ...

    async with frozen_time(tr, start=T0) as clock, tr:
        assert [c.id for c in await tr.run_until_idle()] == [f"cron:minutely:{at(10, 0)}"]
        await tr.crontab.pause("minutely")
        await clock.advance(120)  # 10:01 and 10:02 fall while paused, and no worker runs
        await tr.crontab.resume("minutely")
        assert await tr.run_until_idle() == []  # within max_drift, but paused: not replayed
        await tr.crontab.resume("minutely")  # not paused: changes nothing
        await clock.advance(60)
        assert [c.id for c in await tr.run_until_idle()] == [f"cron:minutely:{at(10, 3)}"]
        await clock.advance(120)  # 10:04 and 10:05: missed by the workers, not paused
        await tr.crontab.resume("minutely")  # so a resume does not skip them
        done = await tr.run_until_idle()
        assert sorted(c.id for c in done) == [f"cron:minutely:{at(10, m)}" for m in (4, 5)]
    assert len(await cron_jobs(redis, namespace, "minutely")) == 4


async def test_max_drift_skips_older_ticks_after_a_restart_and_logs_them_once(
    make_runner: MakeRunner, redis: Redis, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    tr = make_runner()

    @tr.cron("0 * * * * *", name="minutely", max_drift=150)
    async def minutely() -> None: ...

    caplog.set_level(logging.WARNING, logger="taskrunner.cron")
    async with frozen_time(tr, start=T0) as clock:
        first = await tr.run_until_idle()  # a first worker at 10:00:30, then none ran
        await clock.advance(600)  # 10:10:30: the ticks 10:01 .. 10:10 were missed
        done = await tr.run_until_idle()
    # A new schedule starts with its latest tick (30 s old: within max_drift), only.
    assert [c.id for c in first] == [f"cron:minutely:{at(10, 0)}"]
    assert sorted(c.id for c in done) == [f"cron:minutely:{at(10, m)}" for m in (8, 9, 10)]
    warnings = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert warnings == [
        "cron minutely: skipped the ticks from 2026-01-05T10:01:00+00:00 to before "
        "2026-01-05T10:08:00+00:00: more than max_drift=150s late (no worker ran them in time)"
    ]
    assert len(await cron_jobs(redis, namespace, "minutely")) == 4


# -- a tick whose previous run still runs ------------------------------------------------------


@pytest.mark.parametrize("lock", [None, "until_executed"])
async def test_a_tick_whose_previous_run_still_runs_follows_the_task_lock(
    make_runner: MakeRunner, redis: Redis, namespace: str, lock: LockKind | None
) -> None:
    tr = make_runner()
    release = anyio.Event()
    running: set[str] = set()
    overlapped: list[int] = []

    @tr.cron("0 * * * * *", name="slow", max_drift=10)  # 10:00 is too late at 10:00:30
    @tr.task(name="slow", lock=lock)
    async def slow() -> None:
        running.add(current_job().id)
        overlapped.append(len(running))
        await release.wait()
        running.discard(current_job().id)

    state = tr.crontab.get("slow")

    async def wait_handled(tick: int) -> None:
        """Until the tick is handled and, without a lock, its job runs."""

        async def handled() -> bool:
            last = await redis.hget(f"{namespace}:{{default}}:cron:slow", "last")
            started = lock is not None or state.job_id(tick * 1000) in running
            return last is not None and int(last) >= tick * 1000 and started

        await wait_until(handled)

    async with frozen_time(tr, start=T0) as clock, tr, tr.worker(handle_signals=False):
        await clock.advance(30)
        await wait_handled(at(10, 1))
        for minute in (2, 3):
            await clock.advance(60)
            await wait_handled(at(10, minute))
        release.set()

        async def finished(job_id: str) -> None:
            async def succeeded() -> bool:
                return await status(tr, job_id) == JobStatus.SUCCEEDED

            await wait_until(succeeded)

        await finished(state.job_id(at(10, 1) * 1000))  # its lock is released
        await clock.advance(60)
        await finished(state.job_id(at(10, 4) * 1000))
    jobs = await cron_jobs(redis, namespace, "slow")
    if lock is None:  # overlapping runs are allowed
        assert jobs == [f"cron:slow:{at(10, m)}" for m in (1, 2, 3, 4)]
        assert max(overlapped) == 3
    else:  # 10:02 and 10:03 met the lock of 10:01's job: not enqueued
        assert jobs == [f"cron:slow:{at(10, 1)}", f"cron:slow:{at(10, 4)}"]
        assert max(overlapped) == 1


# -- hostile state -----------------------------------------------------------------------------


async def test_a_hostile_state_hash_neither_stops_the_schedule_nor_the_listing(
    make_runner: MakeRunner, redis: Redis, namespace: str
) -> None:
    tr = make_runner()

    @tr.cron("0 * * * * *", name="minutely")
    async def minutely() -> None: ...

    key = f"{namespace}:{{default}}:cron:minutely"
    await redis.hset(key, mapping={"last": "inf", "fired": b"x\xff", "paused": "maybe"})
    async with frozen_time(tr, start=T0) as clock, tr:
        [info] = await tr.crontab.list()
        assert (info.paused, info.last_run, info.last_job) == (False, None, None)
        await clock.advance(30)  # 10:01; an unreadable state is as if never seen:
        done = await tr.run_until_idle()  # the latest tick runs
        assert [c.id for c in done] == [f"cron:minutely:{at(10, 1)}"]


# -- on every topology -------------------------------------------------------------------------


@pytest.mark.topologies("standalone", "cluster", "sentinel")
async def test_two_workers_on_each_topology_run_each_tick_once(
    make_runner: MakeRunner, topology: Topology
) -> None:
    runs: dict[str, int] = {}

    def declare() -> TaskRunner:
        tr = make_runner(partitions=3)

        @tr.cron("* * * * * *", name="every-second")
        async def tick() -> None:
            job_id = current_job().id
            runs[job_id] = runs.get(job_id, 0) + 1

        return tr

    first, second = declare(), declare()

    async def enough() -> bool:
        return len(runs) >= 4

    async with first, second, first.worker(handle_signals=False):
        async with second.worker(handle_signals=False):
            await wait_until(enough, timeout=30)
        await first.crontab.pause("every-second")  # no tick is enqueued from here on
        info = await first.crontab.info("every-second")
        assert info.last_job is not None
        schedule = first.crontab.get("every-second")
        last = int(info.last_job.rpartition(":")[2])
        written = [schedule.job_id(t * 1000) for t in range(min(tick_of(runs)), last + 1)]

        async def all_ran() -> bool:  # the first worker runs what the second left
            return all([await status(first, j) == JobStatus.SUCCEEDED for j in written])

        await wait_until(all_ran, timeout=30)
    assert runs == dict.fromkeys(written, 1)  # every tick once, none twice, no gap


def tick_of(job_ids: dict[str, int]) -> list[int]:
    return [int(job.rpartition(":")[2]) for job in job_ids]


@pytest.mark.topologies("standalone", "cluster", "sentinel")
async def test_a_locked_task_keeps_its_state_job_and_lock_in_one_slot(
    make_runner: MakeRunner, topology: Topology
) -> None:
    tr = make_runner(partitions=3)

    @tr.cron("* * * * * *", name="locked", max_drift=1)
    @tr.task(name="locked", queue="locked", lock="until_executed")
    async def locked() -> str:
        return current_job().id

    async with frozen_time(tr, start=T0) as clock, tr:
        done = await tr.run_until_idle()  # 10:00:30 is the latest tick: it runs
        for _ in range(2):
            await clock.advance(1)
            done += await tr.run_until_idle()
        keys = await tr.crontab.location(tr.crontab.get("locked"))
        assert keys.partition == tr.unique.partition_for(locked.definition, "{}", 3)
        assert (await tr.client.locate("locked", done[-1].id)) == keys
    assert [c.id for c in done] == [f"cron:locked:{at(10, 0, s)}" for s in (30, 31, 32)]
    assert {c.kind for c in done} == {"succeeded"}


# -- the CLI -----------------------------------------------------------------------------------


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TASKRUNNER, *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


async def test_the_cli_lists_pauses_and_resumes_schedules(
    redis_url: str, namespace: str, redis: Redis
) -> None:
    env = subprocess_env(redis_url, namespace)
    app = "apps.cron_app:tr"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(env, *args)

    listed = await anyio.to_thread.run_sync(cli, "cron", "list", app)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["CRON", "SCHEDULE", "TZ", "NEXT", "RUN", "LAST", "RUN", "STATE"]
    assert any(line.startswith("every-second  * * * * * *") for line in lines)
    assert any("nightly" in line and "Europe/Paris" in line for line in lines)

    paused = await anyio.to_thread.run_sync(cli, "cron", "pause", app, "nightly")
    assert (paused.returncode, paused.stdout) == (0, "paused nightly\n")
    state = await redis.hgetall(f"{namespace}:{{default}}:cron:nightly")
    assert state == {"paused": "1"}
    shown = await anyio.to_thread.run_sync(cli, "cron", "list", app, "--json")
    by_name = {i["name"]: i for i in json.loads(shown.stdout)}
    assert by_name["nightly"]["paused"] is True
    assert by_name["nightly"]["next_run"][10:19] == "T03:00:00"  # in Europe/Paris
    assert by_name["every-second"]["paused"] is False
    info = await anyio.to_thread.run_sync(cli, "info", app)
    assert info.returncode == 0, info.stderr
    assert "NEXT RUN" in info.stdout
    assert any("nightly" in line and "paused" in line for line in info.stdout.splitlines())

    resumed = await anyio.to_thread.run_sync(cli, "cron", "resume", app, "nightly")
    assert (resumed.returncode, resumed.stdout) == (0, "resumed nightly\n")
    state = await redis.hgetall(f"{namespace}:{{default}}:cron:nightly")
    assert list(state) == ["last"]  # the ticks that fell while it was paused count as handled

    for args in (("cron", "pause", app, "nope"), ("cron", "resume", app, "a b")):
        bad = await anyio.to_thread.run_sync(cli, *args)
        assert bad.returncode == 2
        assert bad.stderr.startswith("taskrunner: error: apps.cron_app:tr has no cron schedule")
        assert bad.stderr.count("\n") == 1
        assert "every-second, nightly" in bad.stderr
    usage = await anyio.to_thread.run_sync(cli, "cron", "pause", app)
    assert usage.returncode == 2
    assert usage.stderr.count("\n") == 1
    assert usage.stderr.startswith("taskrunner: error: Missing argument 'NAME'")
