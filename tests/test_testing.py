"""taskrunner.testing: run_until_idle, frozen_time and the pytest plugin, on real Redis
servers, with real in-process workers; the plugin also in fresh pytest processes."""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import wait_until
from redis.asyncio import Redis

from taskrunner import (
    Job,
    JobDeadLettered,
    JobFailed,
    JobStatus,
    OutcomeKind,
    Retry,
    TaskRunner,
    current_job,
)
from taskrunner.testing import Committed, TaskRunnerBinder, frozen_time, run_until_idle

MakeRunner = Callable[..., TaskRunner]
ROOT = Path(__file__).resolve().parents[1]
DEADLINE = 30.0


# -- run_until_idle --------------------------------------------------------------------------


async def test_run_until_idle_runs_every_job_and_returns_the_outcomes(
    make_runner: MakeRunner,
) -> None:
    tr = make_runner()

    @tr.task(name="double")
    async def double(x: int) -> int:
        return 2 * x

    @tr.task(name="chain")
    async def chain(x: int) -> int:
        await double.enqueue(x)  # a job enqueued by a job runs too
        return x

    async with tr:
        jobs = [await double.enqueue(1), await chain.enqueue(5)]
        done = await tr.run_until_idle()
        assert [await job.result(timeout=1) for job in jobs] == [2, 5]
    assert sorted((c.task, c.kind) for c in done) == [
        ("chain", OutcomeKind.SUCCEEDED),
        ("double", OutcomeKind.SUCCEEDED),
        ("double", OutcomeKind.SUCCEEDED),
    ]
    assert {c.id for c in done} >= {job.id for job in jobs}
    assert tr.middleware[-1].__class__.__name__ != "_Recorder"  # removed afterwards


async def test_run_until_idle_raises_the_first_failure_after_running_everything(
    make_runner: MakeRunner,
) -> None:
    tr = make_runner()

    @tr.task(name="broken", max_retries=0)
    async def broken() -> None:
        raise ValueError("no good")

    @tr.task(name="fine")
    async def fine() -> str:
        return "fine"

    async with tr:
        failing = await broken.enqueue()
        other = await fine.enqueue()
        with pytest.raises(JobFailed) as caught:
            await run_until_idle(tr, concurrency=1)
        assert caught.value.job_id == failing.id
        assert caught.value.exc_type == "ValueError"
        assert "no good" in caught.value.traceback
        assert await other.result(timeout=1) == "fine"  # it ran to idle first

        again = await broken.enqueue()
        done = await run_until_idle(tr, raise_failures=False)
    assert [(c.id, c.kind) for c in done] == [(again.id, OutcomeKind.FAILED)]
    assert done[0].error is not None
    assert done[0].error.message == "no good"


async def test_run_until_idle_raises_a_dead_letter(make_runner: MakeRunner) -> None:
    producer, worker_side = make_runner(), make_runner()

    @producer.task(name="nobody_runs_this")
    async def unknown() -> None: ...

    async with producer:
        job = await unknown.enqueue()
    with pytest.raises(JobDeadLettered) as caught:
        await worker_side.run_until_idle()
    assert caught.value.job_id == job.id
    assert "unknown task" in caught.value.reason


async def test_run_until_idle_waits_for_retries_due_soon_but_not_for_tomorrow(
    make_runner: MakeRunner,
) -> None:
    tr = make_runner(retry_delay=0.05)

    @tr.task(name="flaky", max_retries=3)
    async def flaky() -> int:
        if current_job().attempt < 3:
            raise RuntimeError("not yet")
        return current_job().attempt

    @tr.task(name="later")
    async def later() -> None: ...

    async with tr:
        retried = await flaky.enqueue()
        tomorrow = await later.options(delay=timedelta(days=1)).enqueue()
        done = await tr.run_until_idle(timeout=DEADLINE)
        assert await retried.result(timeout=1) == 3
        assert await tomorrow.status() == JobStatus.SCHEDULED
    assert [c.kind for c in done] == [OutcomeKind.RETRY, OutcomeKind.RETRY, OutcomeKind.SUCCEEDED]


async def test_run_until_idle_waits_for_a_job_another_worker_is_running(
    make_runner: MakeRunner,
) -> None:
    tr = make_runner()
    release = anyio.Event()

    @tr.task(name="held")
    async def held() -> str:
        await release.wait()
        return "released"

    async with tr, tr.worker(concurrency=1):  # e.g. the worker of the app under test
        job = await held.enqueue()
        await wait_until(lambda: _has_status(tr, job.id, "running"), DEADLINE)
        done: list[Committed] = []

        async def run() -> None:
            done.extend(await tr.run_until_idle(timeout=DEADLINE))

        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await wait_until(lambda: _watching(tr), DEADLINE)
            release.set()
    # It returned only after the other worker recorded the job it was running.
    assert [(c.id, c.kind) for c in done] == [(job.id, OutcomeKind.SUCCEEDED)]


async def test_run_until_idle_times_out_saying_what_is_left(make_runner: MakeRunner) -> None:
    tr = make_runner()
    release = anyio.Event()

    @tr.task(name="stuck")
    async def stuck() -> None:
        await release.wait()

    async with tr, tr.worker(concurrency=1):
        job = await stuck.enqueue()
        await wait_until(lambda: _has_status(tr, job.id, "running"), DEADLINE)
        with pytest.raises(TimeoutError, match=r"not idle after 0.2s: queue default: 1 running"):
            await tr.run_until_idle(timeout=0.2)
        release.set()
        await job.result(timeout=DEADLINE)


async def test_run_until_idle_with_no_time_on_idle_queues_returns_nothing(
    make_runner: MakeRunner,
) -> None:
    # timeout=0 on queues with nothing to do raised "not idle after 0s: the queues
    # emptied as the time ran out"
    tr = make_runner()

    @tr.task
    async def later() -> None:
        pass

    async with tr:
        assert await tr.run_until_idle(timeout=0) == []
        await later.options(delay=3600).enqueue()  # due after the deadline: left scheduled
        assert await tr.run_until_idle(timeout=0) == []


async def test_run_until_idle_hands_back_the_job_it_runs_when_the_time_runs_out(
    make_runner: MakeRunner,
) -> None:
    """Its own worker's job, cancelled at the deadline, goes back to the queue at once
    (it stayed running under a lease nobody renewed, until a reclaim: stale_after, 30 s
    by default), so the next run_until_idle takes it."""
    tr = make_runner()
    release = anyio.Event()
    cancelled: list[str] = []

    @tr.task(name="stuck")
    async def stuck() -> str:
        try:
            await release.wait()
        except anyio.get_cancelled_exc_class():
            cancelled.append(current_job().id)
            raise
        return "done"

    async with tr:
        job = await stuck.enqueue()
        # (3 s: the job must have started by then, also on a loaded machine)
        with pytest.raises(TimeoutError, match=r"not idle after 3s: queue default: 1 running"):
            await tr.run_until_idle(timeout=3)
        assert cancelled == [job.id]
        info = await job.info()
        assert (info.status, info.attempts) == (JobStatus.QUEUED, 0)  # not counted
        release.set()
        done = await tr.run_until_idle(timeout=DEADLINE)
        assert [c.id for c in done] == [job.id]
        assert await job.result() == "done"


async def _has_status(tr: TaskRunner, job_id: str, status: str) -> bool:
    return await tr.job(job_id).status() == status


async def _retry_of(job: Job[Any], attempt: int) -> bool:
    """Whether ``job`` waits for the retry after attempt ``attempt``."""
    info = await job.info()
    return (info.status, info.attempts) == (JobStatus.SCHEDULED, attempt)


async def _watching(tr: TaskRunner) -> bool:
    return any(type(mw).__name__ == "_Recorder" for mw in tr.middleware)


# -- frozen_time -----------------------------------------------------------------------------


async def test_delayed_job_runs_only_when_the_frozen_clock_reaches_it(
    make_runner: MakeRunner,
) -> None:
    tr = make_runner()

    @tr.task(name="remind")
    async def remind(who: str) -> str:
        return f"reminded {who}"

    async with tr, frozen_time(tr) as clock:
        start = clock.now()
        soon = await remind.options(delay=60).enqueue("ann")
        at = await remind.options(at=clock.now_datetime() + timedelta(hours=2)).enqueue("bob")
        assert await tr.run_until_idle() == []  # frozen: nothing is due, nothing waited for
        assert await soon.status() == JobStatus.SCHEDULED
        await clock.advance(59.999)
        assert await tr.run_until_idle() == []
        await clock.advance(0.001)
        await tr.run_until_idle()
        assert await soon.result(timeout=1) == "reminded ann"
        assert await at.status() == JobStatus.SCHEDULED
        await clock.move_to(datetime.fromtimestamp(start, UTC) + timedelta(hours=2))
        await tr.run_until_idle()
        assert await at.result(timeout=1) == "reminded bob"
        info = await at.info()
    assert info.due_at == datetime.fromtimestamp(start + 7200, UTC)  # the job's own times
    assert info.finished_at == datetime.fromtimestamp(start + 7200, UTC)  # are frozen too


async def test_retries_wait_for_the_frozen_clock(make_runner: MakeRunner) -> None:
    tr = make_runner(retry_delay=10.0)

    @tr.task(name="flaky", max_retries=2)
    async def flaky() -> int:
        if current_job().attempt == 1:
            raise RuntimeError("first attempt fails")
        return current_job().attempt

    async with tr, frozen_time(tr) as clock:
        job = await flaky.enqueue()
        first = await tr.run_until_idle()
        assert [c.kind for c in first] == [OutcomeKind.RETRY]
        assert await job.status() == JobStatus.SCHEDULED
        await clock.advance(10)  # the first backoff is at most retry_delay
        await tr.run_until_idle()
        assert await job.result(timeout=1) == 2


async def test_advancing_wakes_a_running_workers_scheduler(make_runner: MakeRunner) -> None:
    tr = make_runner(partitions=3)

    @tr.task(name="tick")
    async def tick(n: int) -> int:
        return n

    async with tr, frozen_time(tr) as clock:
        jobs = [await tick.options(delay=3600).enqueue(n) for n in range(6)]
        assert len({(await job.info()).due_at for job in jobs}) == 1  # frozen: one due time
        assert await tr.run_until_idle() == []  # an hour early: nothing is promoted
        async with tr.worker(concurrency=2):
            await clock.advance(3601)  # wakes the worker's scheduler on every partition
            assert [await job.result(timeout=DEADLINE) for job in jobs] == list(range(6))


async def test_a_long_retry_backoff_runs_when_the_clock_is_advanced_past_it(
    make_runner: MakeRunner,
) -> None:
    tr = make_runner(retry_delay=200.0)

    @tr.task(name="flaky", max_retries=2)
    async def flaky() -> int:
        if current_job().attempt == 1:
            raise Retry(delay=timedelta(hours=2))  # a backoff of its own
        if current_job().attempt == 2:
            raise RuntimeError("the second attempt fails too")  # the runner's backoff
        return current_job().attempt

    async with tr, frozen_time(tr) as clock, tr.worker(concurrency=1):
        job = await flaky.enqueue()
        # Attempt 2: 200 s x 2, capped at max_delay (300 s), from its upper half (jitter).
        # The delay is sent relative to the commit: a ms or so is spent before it.
        for attempt, low, high in ((1, 7199.9, 7200), (2, 149.9, 300)):
            await wait_until(functools.partial(_retry_of, job, attempt), DEADLINE)
            info = await job.info()
            assert info.due_at is not None
            backoff = info.due_at.timestamp() - clock.now()
            assert low <= backoff <= high
            await clock.advance(backoff - 1)
            assert await job.status() == JobStatus.SCHEDULED
            await clock.advance(1)
        assert await job.result(timeout=DEADLINE) == 3


async def test_unique_lock_ttls_follow_the_frozen_clock(make_runner: MakeRunner) -> None:
    tr = make_runner(lock_ttl=600)
    start = datetime(2020, 1, 1, tzinfo=UTC)  # years behind the server's own clock

    @tr.task(name="report", lock="until_executed")
    async def report(n: int) -> int:
        return n

    @tr.task(name="ping", lock="until_executing", queue="unserved")
    async def ping(n: int) -> int:
        return n

    async with tr, frozen_time(tr, start=start) as clock:
        # The TTL is the frozen clock's: (due - now) + lock_ttl = 1 h + 10 min.
        later = await report.options(at=start + timedelta(hours=1)).enqueue(1)
        key = tr.unique.lock_key(report, (1,))
        ttl = await tr.client.redis.pttl(key)
        assert 4190_000 < ttl <= 4200_000

        # A lock whose holder never runs expires lock_ttl later, in frozen time.
        first = await ping.enqueue(1)
        await clock.advance(599)
        assert (await ping.enqueue(1)).id == first.id  # still held: deduplicated
        await clock.advance(2)
        second = await ping.enqueue(1)
        assert not second.deduplicated
        assert second.id != first.id

        # The until_executed lock has aged too, by the same 601 s.
        assert 3590_000 < await tr.client.redis.pttl(key) <= 3599_000
        await clock.advance(3600)
        await tr.run_until_idle(queues=["default"])
        assert await later.result(timeout=1) == 1
        assert await tr.client.redis.exists(key) == 0  # released by its final commit


async def test_a_lock_held_by_a_running_job_is_left_to_its_heartbeat(
    make_runner: MakeRunner,
) -> None:
    tr = make_runner(lock_ttl=60)
    release = anyio.Event()

    @tr.task(name="sync", lock="while_executing")
    async def sync(n: int) -> int:
        await release.wait()
        return n

    async with tr, frozen_time(tr) as clock, tr.worker(concurrency=1):
        job = await sync.enqueue(1)
        await wait_until(lambda: _has_status(tr, job.id, "running"), DEADLINE)
        key = tr.unique.lock_key(sync, (1,))
        await wait_until(lambda: _holds(tr, key, job.id), DEADLINE)
        await clock.advance(3600)  # far past lock_ttl: the job still runs and holds it
        assert await tr.client.redis.get(key) == job.id
        release.set()
        assert await job.result(timeout=DEADLINE) == 1


async def _holds(tr: TaskRunner, key: str, job_id: str) -> bool:
    return bool(await tr.client.redis.get(key) == job_id)


async def test_frozen_time_restores_the_clock_and_freezes_one_runner(
    make_runner: MakeRunner,
) -> None:
    tr, other = make_runner(), make_runner()
    tr.clock.advance(30)  # an offset set before the block survives it
    async with frozen_time(tr, start=datetime(2030, 1, 1, tzinfo=UTC)) as clock:
        assert tr.clock.now() == clock.now() == datetime(2030, 1, 1, tzinfo=UTC).timestamp()
        assert clock.now_datetime() == datetime(2030, 1, 1, tzinfo=UTC)
        assert abs(other.clock.now() - time.time()) < 5  # another runner keeps its own
        with pytest.raises(RuntimeError, match="already frozen"):
            async with frozen_time(tr):
                pass
        async with frozen_time(other, start=0) as other_clock:  # two runners at once
            assert other_clock.now() == 0
        with pytest.raises(ValueError, match="forward"):
            await clock.advance(-1)
        for amount in (math.nan, math.inf, 1e20):
            with pytest.raises(ValueError, match="finite amount"):
                await clock.advance(amount)
        with pytest.raises(ValueError, match="naive"):
            await clock.move_to(datetime(2031, 1, 1))  # naive: refused
        await clock.advance(timedelta(days=1))  # not connected: nothing to wake
        assert clock.now_datetime() == datetime(2030, 1, 2, tzinfo=UTC)
        await clock.advance(1.005)  # to the millisecond: 1.005 * 1000 is 1004.99...
        assert tr.clock.frozen_ms == datetime(2030, 1, 2, 0, 0, 1, 5000, UTC).timestamp() * 1000
    assert tr.clock.frozen_ms is None
    assert tr.clock.offset_ms == 30_000
    assert (other.clock.frozen_ms, other.clock.offset_ms) == (None, 0)


# -- the plugin's fixtures, in this process ---------------------------------------------------


async def test_taskrunner_redis_url_is_a_private_server_of_this_run(
    taskrunner_redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    assert taskrunner_redis_url.startswith("unix://")
    async with Redis.from_url(taskrunner_redis_url, decode_responses=True) as client:
        directory = str((await client.config_get("dir"))["dir"])
    assert Path(directory).is_relative_to(tmp_path_factory.getbasetemp())


async def test_bind_taskrunner_points_the_app_at_the_test_server_and_restores_it(
    taskrunner_redis_url: str, taskrunner_namespace: str
) -> None:
    app = TaskRunner("redis://example.invalid:6379/0", namespace="prod")

    @app.task(name="ping")
    async def ping() -> str:
        return "pong"

    binder = TaskRunnerBinder(taskrunner_redis_url, taskrunner_namespace)
    assert binder(app) is app
    assert binder(app) is app  # binding twice is harmless
    assert (app.url, app.namespace) == (taskrunner_redis_url, taskrunner_namespace)
    async with app:
        with pytest.raises(RuntimeError, match="already connected"):
            TaskRunnerBinder(taskrunner_redis_url, "other")(app)
        job = await ping.enqueue()
        await app.run_until_idle()
        assert await job.result(timeout=1) == "pong"
        keys = [str(key) for key in await app.client.redis.keys("*")]
    assert keys
    assert all(key.startswith(f"{taskrunner_namespace}:") for key in keys)
    binder.restore()
    assert (app.url, app.namespace) == ("redis://example.invalid:6379/0", "prod")


# -- the plugin in fresh pytest processes -----------------------------------------------------


def run_pytest(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    environ.update(PYTHONPATH=str(ROOT), **env)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def write_project(tmp_path: Path, ini: str, test: str) -> None:
    (tmp_path / "pytest.ini").write_text(f"[pytest]\nasyncio_mode = auto\n{ini}")
    (tmp_path / "test_app.py").write_text(test)


APP_TEST = """
from examples import signup

async def test_the_app_fixture_is_bound(taskrunner):
    assert taskrunner is signup.tr
    assert taskrunner.namespace.startswith("test-")
    async with taskrunner:
        job = await signup.send_email.enqueue("dee@example.com", "hi")
        await taskrunner.run_until_idle()
        assert await job.result() == 1
"""


def test_plugin_loads_from_pytest_plugins_in_conftest_with_autoload_off(tmp_path: Path) -> None:
    write_project(tmp_path, "taskrunner_app = examples.signup:tr\n", APP_TEST)
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["taskrunner.testing"]\n')
    done = run_pytest(
        tmp_path, "-p", "pytest_asyncio.plugin", "test_app.py", PYTEST_DISABLE_PLUGIN_AUTOLOAD="1"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout


def test_plugin_is_not_loaded_twice_by_the_entry_point_and_pytest_plugins(tmp_path: Path) -> None:
    write_project(tmp_path, "taskrunner_app = examples.signup:tr\n", APP_TEST)
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["taskrunner.testing"]\n')
    done = run_pytest(tmp_path, "test_app.py")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout


def test_plugin_named_by_its_module_beside_the_entry_point_loads_once(tmp_path: Path) -> None:
    # -p taskrunner.testing.plugin next to the autoloaded entry point: "option names
    # {'--taskrunner-redis-url'} already added", and no test ran
    write_project(tmp_path, "taskrunner_app = examples.signup:tr\n", APP_TEST)
    done = run_pytest(tmp_path, "-p", "taskrunner.testing.plugin", "test_app.py")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout


def test_taskrunner_fixture_binds_the_configured_app(tmp_path: Path) -> None:
    write_project(tmp_path, "taskrunner_app = examples.signup:tr\n", APP_TEST)
    done = run_pytest(tmp_path, "test_app.py")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout


def test_taskrunner_fixture_without_an_app_is_a_usage_error(tmp_path: Path) -> None:
    write_project(tmp_path, "", APP_TEST)
    done = run_pytest(tmp_path, "test_app.py")
    assert done.returncode != 0
    assert "taskrunner_app = module:attribute" in done.stdout + done.stderr


async def test_run_until_idle_runs_a_job_that_a_running_job_enqueues_and_waits_for(
    make_runner: MakeRunner,
) -> None:
    """A burst worker with free slots keeps reading while a job runs: the job a running
    parent enqueues and awaits starts at once (it started only when the parent's wait
    timed out, and the parent failed)."""
    tr = make_runner()

    @tr.task(name="child")
    async def child(x: int) -> int:
        return x * 2

    @tr.task(name="parent", max_retries=0)
    async def parent(x: int) -> int:
        job = await child.enqueue(x)
        return await job.result(timeout=20) + 1

    async with tr:
        job = await parent.enqueue(21)
        with anyio.fail_after(DEADLINE):
            done = await tr.run_until_idle(timeout=DEADLINE)
        assert await job.result() == 43
        assert sorted(c.task for c in done) == ["child", "parent"]
