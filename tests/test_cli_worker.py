"""``taskrunner worker`` as a real subprocess: burst drains, signals, errors, races."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import pytest
from apps.core_app import Tasks, declare, runs_key
from conftest import subprocess_env, wait_until
from redis.asyncio import Redis

from taskrunner import JobStatus, TaskRunner
from taskrunner.keys import GROUP, QueueKeys

MakeRunner = Callable[..., TaskRunner]
APP = "apps.core_app:tr"
DEADLINE = 30.0
TASKRUNNER = str(Path(sys.executable).with_name("taskrunner"))


@pytest.fixture
async def app(make_runner: MakeRunner) -> AsyncIterator[tuple[TaskRunner, Tasks]]:
    tr = make_runner()
    tasks = declare(tr)
    async with tr:
        yield tr, tasks


@pytest.fixture
def env(redis_url: str, namespace: str) -> dict[str, str]:
    return subprocess_env(redis_url, namespace)


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TASKRUNNER, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=DEADLINE * 2,
        check=False,
    )


async def run_cli_async(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return await anyio.to_thread.run_sync(lambda: run_cli(env, *args))


@contextmanager
def worker_process(
    env: dict[str, str], tmp_path: Path, *args: str
) -> Iterator[subprocess.Popen[str]]:
    log = (tmp_path / f"worker-{time.monotonic_ns()}.log").open("w")
    proc = subprocess.Popen(
        [TASKRUNNER, "worker", APP, *args], env=env, stdout=log, stderr=subprocess.STDOUT, text=True
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=DEADLINE)
        log.close()


def _logged(tmp_path: Path, text: str) -> bool:
    return any(text in log.read_text() for log in tmp_path.glob("worker-*.log"))


async def logged(tmp_path: Path, text: str) -> bool:
    return await anyio.to_thread.run_sync(_logged, tmp_path, text)


async def all_ready(tmp_path: Path, count: int) -> bool:
    """Whether ``count`` worker logs say their worker is ready (it reads and waits)."""

    def ready() -> int:
        return sum(" ready: queues " in log.read_text() for log in tmp_path.glob("worker-*.log"))

    return await anyio.to_thread.run_sync(ready) >= count


async def exited(proc: subprocess.Popen[str]) -> bool:
    return proc.poll() is not None


def started_line(job_id: str, task: str = "sleepy", attempt: int = 1) -> str:
    """The worker's INFO line when a consumer starts the task (status "running" is set
    earlier, when the job is claimed)."""
    return f"job {job_id} {task} attempt {attempt} started"


# -- burst -------------------------------------------------------------------------------


async def test_burst_worker_subprocess_drains_jobs_and_exits_zero(
    app: tuple[TaskRunner, Tasks], env: dict[str, str]
) -> None:
    _, tasks = app
    jobs = await tasks.add.enqueue_many([tasks.add.call(i, i) for i in range(30)])
    where = await tasks.pid.enqueue()
    other = await tasks.elsewhere.enqueue(5)

    done = await run_cli_async(env, "worker", APP, "--burst", "--queue", "default", "-c", "8")

    assert done.returncode == 0, done.stderr
    assert [await job.result(timeout=1) for job in jobs] == [2 * i for i in range(30)]
    assert await where.result(timeout=1) != os.getpid()  # it ran in the subprocess
    assert await other.status() == JobStatus.QUEUED  # --queue default leaves "other" alone
    first = jobs[0]
    assert f"job {first.id} add attempt 1 started" in done.stderr
    assert f"job {first.id} add attempt 1 succeeded in " in done.stderr

    everything = await run_cli_async(env, "worker", APP, "--burst")
    assert everything.returncode == 0, everything.stderr
    assert await other.result(timeout=1) == 5


async def test_a_comma_in_queue_separates_queues_as_in_taskrunner_queues(
    app: tuple[TaskRunner, Tasks], env: dict[str, str]
) -> None:
    # Celery's -Q a,b habit: not a queue named "a,b" that no job is ever sent to.
    _, tasks = app
    here, there = await tasks.add.enqueue(1, 2), await tasks.elsewhere.enqueue(5)
    done = await run_cli_async(env, "worker", APP, "--burst", "-q", "default,other")
    assert done.returncode == 0, done.stderr
    assert (await here.result(timeout=1), await there.result(timeout=1)) == (3, 5)
    empty = await run_cli_async(env, "worker", APP, "--burst", "-q", "default,")
    assert empty.returncode == 2
    assert "invalid queue name ''" in empty.stderr


async def test_a_queue_no_task_uses_is_consumed_with_a_warning_naming_the_apps_queues(
    app: tuple[TaskRunner, Tasks], env: dict[str, str]
) -> None:
    # a typo (-q emials) waited on a queue nobody sends to, without a word
    _, tasks = app
    job = await tasks.add.options(queue="adhoc").enqueue(2, 2)
    done = await run_cli_async(env, "worker", APP, "--burst", "-q", "adhoc,default")
    assert done.returncode == 0, done.stderr
    assert await job.result(timeout=1) == 4  # consumed all the same
    warned = [line for line in done.stderr.splitlines() if "no task of this app uses" in line]
    assert len(warned) == 1, done.stderr
    assert "queue 'adhoc' (its queues: default, other); consuming it anyway" in warned[0]


async def test_burst_worker_with_nothing_to_do_exits_zero(env: dict[str, str]) -> None:
    done = await run_cli_async(env, "worker", APP, "--burst", "--log-level", "warning")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr


# -- errors: one line, no traceback, non-zero ------------------------------------------------


def assert_one_line_error(done: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize(
    ("app_path", "fragments"),
    [
        ("no_such_module_xyz:tr", ("no_such_module_xyz",)),
        ("apps.core_app:missing", ("missing",)),
        ("apps.core_app:not_a_runner", ("not a TaskRunner",)),
        ("apps.core_app", ("module:attribute",)),
    ],
)
def test_bad_app_path_prints_one_line(
    env: dict[str, str], app_path: str, fragments: tuple[str, ...]
) -> None:
    assert_one_line_error(run_cli(env, "worker", app_path, "--burst"), *fragments)


def test_unreachable_redis_prints_one_line(env: dict[str, str], unreachable_port: int) -> None:
    env = dict(env, TASKRUNNER_REDIS_URL=f"redis://127.0.0.1:{unreachable_port}/0")
    assert_one_line_error(run_cli(env, "worker", APP, "--burst"), "redis")


# -- signals --------------------------------------------------------------------------------


async def test_sigterm_hands_back_a_running_job_and_exits_zero(
    app: tuple[TaskRunner, Tasks],
    env: dict[str, str],
    tmp_path: Path,
    redis: Redis,
    namespace: str,
) -> None:
    _, tasks = app
    job = await tasks.sleepy.enqueue(3600)
    keys = QueueKeys(namespace, "default")
    with worker_process(env, tmp_path, "--grace-period", "0.5") as proc:
        # Started, not just claimed: a claimed job not started yet is handed back at
        # once, without waiting out the grace period this test is about.
        await wait_until(lambda: logged(tmp_path, started_line(job.id)), DEADLINE)
        proc.send_signal(signal.SIGTERM)
        await wait_until(lambda: exited(proc), DEADLINE)
        assert proc.returncode == 0
    info = await job.info()
    assert info.status == JobStatus.QUEUED
    assert info.attempts == 0
    assert (await redis.xpending(keys.stream, GROUP))["pending"] == 0
    assert await redis.xlen(keys.stream) == 1


async def test_second_sigterm_exits_at_once_without_acknowledging(
    app: tuple[TaskRunner, Tasks],
    env: dict[str, str],
    tmp_path: Path,
    redis: Redis,
    namespace: str,
) -> None:
    _, tasks = app
    job = await tasks.sleepy.enqueue(3600)
    keys = QueueKeys(namespace, "default")
    with worker_process(env, tmp_path, "--grace-period", "3600") as proc:
        # Started, not just claimed: the first SIGTERM hands a job it has not started
        # back at once (queued), where a started one runs on in the grace period.
        await wait_until(lambda: logged(tmp_path, started_line(job.id)), DEADLINE)
        proc.send_signal(signal.SIGTERM)
        # Two SIGTERMs sent back to back can merge into one pending signal in the
        # kernel: send the second only once the worker has taken the first.
        await wait_until(lambda: logged(tmp_path, "stopping gracefully"), DEADLINE)
        assert await job.status() == JobStatus.RUNNING
        assert proc.poll() is None  # still inside its (hour-long) grace period
        proc.send_signal(signal.SIGTERM)
        await wait_until(lambda: exited(proc), DEADLINE)
    # Not final, so not acknowledged: the entry stays pending for a reclaim.
    assert await job.status() == JobStatus.RUNNING
    assert (await redis.xpending(keys.stream, GROUP))["pending"] == 1


async def test_a_hang_up_stops_gracefully_and_never_counts_as_a_second_signal(
    app: tuple[TaskRunner, Tasks], env: dict[str, str], tmp_path: Path
) -> None:
    """SIGHUP (a closed terminal; the supervisor or reloader gone, which a worker
    tells itself with SIGHUP) is a graceful stop, and during one it changes nothing:
    the running job finishes and is recorded (SIGHUP killed the worker outright; a
    reloader dying during a stop made the worker exit at once, its job left running)."""
    _, tasks = app
    job = await tasks.sleepy.enqueue(1.5)
    with worker_process(env, tmp_path, "--grace-period", "3600") as proc:
        await wait_until(lambda: logged(tmp_path, started_line(job.id)), DEADLINE)
        proc.send_signal(signal.SIGHUP)
        await wait_until(lambda: logged(tmp_path, "stopping gracefully"), DEADLINE)
        proc.send_signal(signal.SIGHUP)  # during the stop: nothing more
        await wait_until(lambda: exited(proc), DEADLINE)
        assert proc.returncode == 0
    assert await job.status() == JobStatus.SUCCEEDED


# -- two processes racing ----------------------------------------------------------------------


async def test_two_worker_processes_run_each_delayed_job_exactly_once(
    app: tuple[TaskRunner, Tasks],
    env: dict[str, str],
    tmp_path: Path,
    redis: Redis,
    namespace: str,
) -> None:
    _, tasks = app
    with (
        worker_process(env, tmp_path, "-c", "20") as one,
        worker_process(env, tmp_path, "-c", "20") as two,
    ):
        # both workers waiting before the jobs fall due: they race for every one (a worker
        # slow to start under load used to leave the race, and the deadline, to the other)
        await wait_until(lambda: all_ready(tmp_path, 2), DEADLINE)
        due = time.time() + 0.5
        calls = [
            tasks.record.options(delay=due - time.time() + (i % 10) * 0.01).call(i)
            for i in range(300)
        ]
        jobs = await tasks.record.enqueue_many(calls)
        results = [await job.result(timeout=DEADLINE) for job in jobs]
        one.send_signal(signal.SIGTERM)
        two.send_signal(signal.SIGTERM)
        await wait_until(lambda: exited(one), DEADLINE)
        await wait_until(lambda: exited(two), DEADLINE)
        assert (one.returncode, two.returncode) == (0, 0)
    assert results == list(range(300))
    runs = await redis.hgetall(runs_key(namespace))
    assert set(runs) == {job.id for job in jobs}
    assert set(runs.values()) == {"1"}


def test_the_processes_supervisor_imports_nothing_of_the_app(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    """docs/workers.md: N processes are N imports of the app, none in the supervisor
    (it imported the app too: its import-time work and memory, once more)."""
    log = tmp_path / "imports.log"
    env = {**subprocess_env(redis_url, namespace), "IMPORTS_APP_LOG": str(log)}
    done = subprocess.run(
        [TASKRUNNER, "worker", "apps.imports_app:tr", "--processes", "2", "--burst"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    pids = log.read_text().split()
    assert len(pids) == 2, pids
