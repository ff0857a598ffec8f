"""The Prometheus exporter: scraped over real HTTP from real worker processes (one, and
two under a supervisor), after real jobs succeed, fail, retry, are dead-lettered and
are reclaimed from a killed worker; mounted in a FastAPI app; and the queue counts."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from apps.metrics_app import STALE_AFTER, Tasks, declare
from conftest import subprocess_env, wait_until
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from taskrunner import Job, JobDeadLettered, JobFailed, TaskRunner
from taskrunner.cli.info import gather
from taskrunner.counts import queue_counts, resolve
from taskrunner.exceptions import ConfigurationError
from taskrunner.keys import Queue
from taskrunner.metrics import PrometheusMiddleware, metrics_app

MakeRunner = Callable[..., TaskRunner]
APP = "apps.metrics_app:tr"
DEADLINE = 30.0
TASKRUNNER = str(Path(sys.executable).with_name("taskrunner"))

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 when absent (a counter never incremented has no child)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def scrape_now(port: int) -> Samples | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return parse(response.read().decode())
    except (urllib.error.URLError, ConnectionError):
        return None


async def scrape(port: int) -> Samples:
    found = await anyio.to_thread.run_sync(scrape_now, port)
    assert found is not None, f"nothing serves metrics on port {port}"
    return found


async def scrape_until(
    port: int, condition: Callable[[Samples], bool], timeout: float = DEADLINE
) -> Samples:
    """Scrape until ``condition`` holds (the worker records outcomes asynchronously)."""
    latest: list[Samples] = []

    async def holds() -> bool:
        found = await anyio.to_thread.run_sync(scrape_now, port)
        if found is None:
            return False
        latest[:] = [found]
        return condition(found)

    await wait_until(holds, timeout, interval=0.05)
    return latest[0]


SERVING = re.compile(r"serving metrics on http://127\.0\.0\.1:(\d+)/metrics")
# --metrics-port 0: the OS picks a free port and the log line names it. A port picked
# free by the test beforehand could be taken by another process before the worker binds
# it (after importing the app), and the test would scrape someone else.
ANY_PORT = ("--metrics-port", "0", "--metrics-host", "127.0.0.1")


async def served_port(proc: subprocess.Popen[str], log: Path) -> int:
    """The port a worker (or supervisor) started with ``ANY_PORT`` logged it serves on."""
    found: list[int] = []

    async def logged() -> bool:
        exited = proc.poll() is not None  # before reading: its last line is in the log
        text = await anyio.to_thread.run_sync(log.read_text)
        match = SERVING.search(text)
        if match:
            found.append(int(match.group(1)))
        else:
            assert not exited, f"exited before serving metrics:\n{text}"
        return bool(match)

    await wait_until(logged, DEADLINE, interval=0.05)
    return found[0]


@pytest.fixture
async def app(make_runner: MakeRunner) -> AsyncIterator[tuple[TaskRunner, Tasks]]:
    tr = make_runner(middleware=[PrometheusMiddleware(CollectorRegistry())])
    tasks = declare(tr)
    async with tr:
        yield tr, tasks


@pytest.fixture
def env(redis_url: str, namespace: str) -> dict[str, str]:
    return subprocess_env(redis_url, namespace)


@contextmanager
def worker_process(
    env: dict[str, str], log: Path, *args: str, app: str = APP, cwd: Path | None = None
) -> Iterator[subprocess.Popen[str]]:
    with log.open("w") as out:
        proc = subprocess.Popen(
            [TASKRUNNER, "worker", app, *args],
            env=env,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=DEADLINE)


async def stop(proc: subprocess.Popen[str]) -> int:
    proc.send_signal(signal.SIGTERM)
    await wait_until(lambda: _exited(proc), DEADLINE)
    return proc.returncode


async def _exited(proc: subprocess.Popen[str]) -> bool:
    return proc.poll() is not None


async def enqueue_the_mix(tr: TaskRunner, tasks: Tasks) -> None:
    """3 successes, 1 failure for good, 1 retry then success, 1 dead letter (a task the
    worker does not know), 1 job that enqueues 2 more from inside the worker."""

    @tr.task(name="ghost")
    async def ghost() -> None: ...

    jobs = [await tasks.ok.enqueue(i) for i in range(3)]
    failing, flaky, dead = await tasks.boom.enqueue(), await tasks.flaky.enqueue(), None
    dead = await ghost.enqueue()
    fan = await tasks.fan_out.enqueue(2)
    assert [await job.result(timeout=DEADLINE) for job in jobs] == [0, 1, 2]
    with pytest.raises(JobFailed):
        await failing.result(timeout=DEADLINE)
    assert await flaky.result(timeout=DEADLINE) == 2
    with pytest.raises(JobDeadLettered):
        await dead.result(timeout=DEADLINE)
    assert await fan.result(timeout=DEADLINE) == 2


def assert_mix_counted(samples: Samples) -> None:
    def total(name: str, task: str) -> float:
        return value(samples, f"taskrunner_jobs_{name}_total", task=task, queue="default")

    assert total("started", "ok") == 5  # 3 enqueued here, 2 by fan_out in the worker
    assert total("succeeded", "ok") == 5
    assert total("enqueued", "ok") == 2  # the worker-side producer
    assert total("failed", "boom") == 1
    assert total("succeeded", "boom") == 0
    assert total("retried", "flaky") == 1
    assert total("started", "flaky") == 2
    assert total("succeeded", "flaky") == 1
    assert total("dead_lettered", "unknown") == 1  # an undeclared name is not a label
    assert total("started", "unknown") == 0
    count = value(samples, "taskrunner_job_duration_seconds_count", task="ok", queue="default")
    assert count == 5
    waits = value(samples, "taskrunner_job_queue_wait_seconds_count", task="ok", queue="default")
    assert waits == 5


def mix_recorded(samples: Samples) -> bool:
    """Every outcome of ``enqueue_the_mix`` recorded, and a read of the queue gauges
    since the dead letter and the failure (maybe not since the last jobs finished)."""
    return (
        value(samples, "taskrunner_jobs_succeeded_total", task="ok", queue="default") == 5
        and value(samples, "taskrunner_jobs_dead_lettered_total", task="unknown", queue="default")
        == 1
        and value(samples, "taskrunner_queue_depth", queue="default", status="dead") == 1
        and value(samples, "taskrunner_queue_depth", queue="default", status="failed") == 1
    )


# -- one worker process --------------------------------------------------------------------


async def test_worker_process_serves_job_counters_histograms_and_queue_gauges(
    app: tuple[TaskRunner, Tasks], env: dict[str, str], tmp_path: Path
) -> None:
    tr, tasks = app
    with worker_process(env, tmp_path / "worker.log", *ANY_PORT) as proc:
        port = await served_port(proc, tmp_path / "worker.log")
        await enqueue_the_mix(tr, tasks)
        samples = await scrape_until(port, mix_recorded)
        assert_mix_counted(samples)
        # Every job is final now, so Redis holds none queued or running (read directly:
        # the product's count, not a sample of it).
        [counts] = await queue_counts(
            tr.client.redis,
            await resolve(tr.client, ["default"]),
            now=tr.clock.now(),
            result_ttl=60,
        )
        assert (counts.queued, counts.running) == (0, 0)
        # The gauges are a sample taken every queue_interval: the one that showed the
        # dead letter and the failure may predate the last jobs (fan_out's two, queued
        # or running then), so wait for a read that shows the count above. The
        # live-worker gauge counts heartbeats: the first comes heartbeat_interval in.
        samples = await scrape_until(
            port,
            lambda s: (
                value(s, "taskrunner_queue_depth", queue="default", status="queued") == 0
                and value(s, "taskrunner_queue_depth", queue="default", status="running") == 0
                and value(s, "taskrunner_queue_workers", queue="default") == 1
            ),
        )
        assert_mix_counted(samples)
        assert value(samples, "process_cpu_seconds_total") > 0  # the default registry's
        assert await stop(proc) == 0
    log = (tmp_path / "worker.log").read_text()
    assert log.count("serving metrics on ") == 1


async def test_producer_counts_enqueues_but_not_deduplicated_ones(make_runner: MakeRunner) -> None:
    registry = CollectorRegistry()
    tr = make_runner(middleware=[PrometheusMiddleware(registry)])
    tasks = declare(tr)
    async with tr:
        await tasks.ok.options(job_id="same").enqueue(1)
        again = await tasks.ok.options(job_id="same").enqueue(1)
        await tasks.ok.enqueue_many([tasks.ok.call(i) for i in range(4)])
    assert again.deduplicated
    enqueued = registry.get_sample_value(
        "taskrunner_jobs_enqueued_total", {"task": "ok", "queue": "default"}
    )
    assert enqueued == 5


async def test_queue_gauges_sum_running_queued_and_scheduled_jobs_over_partitions_and_levels(
    make_runner: MakeRunner,
) -> None:
    registry = CollectorRegistry()
    middleware = PrometheusMiddleware(registry, queue_interval=0.05)
    tr = make_runner(middleware=[middleware], partitions=3)
    tasks = declare(tr)
    release = anyio.Event()

    @tr.task(name="hold")
    async def hold() -> None:
        await release.wait()

    def depth(status: str) -> float | None:
        labels = {"queue": "default", "status": status}
        return registry.get_sample_value("taskrunner_queue_depth", labels)

    async with tr, tr.worker(concurrency=1) as worker:
        held = await hold.enqueue()
        await wait_until(lambda: _running(tr, held.id), DEADLINE)
        for n in range(4):  # no free slot: they stay queued, on every level
            await tasks.ok.options(priority=("high", "default", "low")[n % 3]).enqueue(n)
        for n in range(3):
            await tasks.ok.options(delay=3600 + n).enqueue(n)
        await middleware.read_queues(worker)
        seen = {status: depth(status) for status in ("running", "queued", "scheduled")}
        release.set()
    assert seen == {"running": 1, "queued": 4, "scheduled": 3}


# -- two worker processes under a supervisor ---------------------------------------------------


async def test_supervisor_serves_the_sum_of_two_worker_processes(
    app: tuple[TaskRunner, Tasks],
    env: dict[str, str],
    tmp_path: Path,
    redis: Redis,
    namespace: str,
) -> None:
    tr, tasks = app
    log = tmp_path / "supervisor.log"
    with worker_process(env, log, "--processes", "2", "-c", "1", *ANY_PORT) as proc:
        port = await served_port(proc, log)
        await wait_until(lambda: _logged_twice(log, " ready: "), DEADLINE)
        directory = _metrics_directory(log)
        assert directory.is_dir()
        # Concurrency 1 each: the gate job holds one process while the other runs the
        # mix, so the scraped counts are a sum over both.
        gate = await tasks.gate.enqueue(f"{namespace}:gate")
        await wait_until(lambda: _running(tr, gate.id), DEADLINE)
        await enqueue_the_mix(tr, tasks)
        await redis.rpush(f"{namespace}:gate", "open")
        assert await gate.result(timeout=DEADLINE) == "open"
        samples = await scrape_until(
            port,
            lambda s: (
                mix_recorded(s)
                and value(s, "taskrunner_jobs_succeeded_total", task="gate", queue="default") == 1
                and value(s, "taskrunner_queue_workers", queue="default") == 2
            ),
        )
        assert_mix_counted(samples)
        runners = {(await job.info()).worker for job in (gate, *await _ok_jobs(tr))}
        assert len(runners) == 2
        assert len(list(directory.glob("counter_*.db"))) == 2  # one file per child
        assert await stop(proc) == 0
    assert not directory.exists()  # the supervisor deleted it
    text = log.read_text()
    # Only the supervisor serves: with port 0 a child that served too would not fail
    # with "Address already in use" but log a line of its own.
    assert text.count("serving metrics on ") == 1
    assert "Address already in use" not in text
    # The only traceback is the one job that failed for good, logged once.
    assert text.count("Traceback") == 1
    assert 'raise ValueError("boom")' in text


async def _ok_jobs(tr: TaskRunner) -> list[Job[Any]]:
    """Every job of the ``ok`` task, from the succeeded ones' hashes (a test namespace)."""
    pattern = f"{tr.namespace}:{{default}}:job:*"
    found = [key async for key in tr.client.redis.scan_iter(match=pattern)]
    jobs = [tr.job(key.rpartition(":")[2]) for key in found]
    return [job for job in jobs if (await job.info()).task == "ok"]


def _metrics_directory(log: Path) -> Path:
    found = re.search(r"metrics of the worker processes in (\S+)", log.read_text())
    assert found, log.read_text()
    return Path(found.group(1))


async def _logged_twice(log: Path, text: str) -> bool:
    content = await anyio.to_thread.run_sync(log.read_text)
    return content.count(text) >= 2


# -- with --reload ---------------------------------------------------------------------------


async def test_reloaded_worker_serves_its_metrics(
    app: tuple[TaskRunner, Tasks], env: dict[str, str], tmp_path: Path
) -> None:
    # The reloader serves nothing itself: its worker child must (it once left that to a
    # supervisor that --reload without --processes does not have, and nothing served).
    _, tasks = app
    watched = tmp_path / "project"
    watched.mkdir()
    log = tmp_path / "reload.log"
    with worker_process(env, log, "--reload", *ANY_PORT, cwd=watched) as proc:
        port = await served_port(proc, log)
        job = await tasks.ok.enqueue(7)
        assert await job.result(timeout=DEADLINE) == 7
        await scrape_until(
            port,
            lambda s: value(s, "taskrunner_jobs_succeeded_total", task="ok", queue="default") == 1,
        )
        assert await stop(proc) == 0
    assert log.read_text().count("serving metrics on ") == 1


# -- reclaim ---------------------------------------------------------------------------------


async def test_reclaimed_job_is_counted_by_the_worker_that_took_it_over(
    app: tuple[TaskRunner, Tasks], env: dict[str, str], tmp_path: Path
) -> None:
    tr, tasks = app
    job = await tasks.hang_once.enqueue()
    with worker_process(env, tmp_path / "first.log") as first:
        await wait_until(lambda: _running(tr, job.id), DEADLINE)
        first.kill()  # SIGKILL: its lease goes stale after STALE_AFTER
        first.wait(timeout=DEADLINE)
    with worker_process(env, tmp_path / "second.log", *ANY_PORT) as second:
        port = await served_port(second, tmp_path / "second.log")
        assert await job.result(timeout=DEADLINE + STALE_AFTER) == 2
        samples = await scrape_until(
            port,
            lambda s: (
                value(s, "taskrunner_jobs_succeeded_total", task="hang_once", queue="default") == 1
            ),
        )
        labels = {"task": "hang_once", "queue": "default"}
        assert value(samples, "taskrunner_jobs_reclaimed_total", **labels) == 1
        assert value(samples, "taskrunner_jobs_started_total", **labels) == 1
        assert await stop(second) == 0


async def _running(tr: TaskRunner, job_id: str) -> bool:
    return await tr.job(job_id).status() == "running"


# -- the CLI's errors ------------------------------------------------------------------------


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TASKRUNNER, *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_metrics_port_out_of_range_is_a_one_line_usage_error(env: dict[str, str]) -> None:
    done = run_cli(env, "worker", APP, "--burst", "--metrics-port", "70000")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("taskrunner: error: invalid --metrics-port=70000")


@pytest.mark.parametrize("processes", ["1", "2"])
def test_metrics_port_in_use_is_a_one_line_error(env: dict[str, str], processes: str) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        done = run_cli(
            env, "worker", APP, "--burst", "-p", processes, "--metrics-port", port,
            "--metrics-host", "127.0.0.1",
        )  # fmt: skip
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"taskrunner: error: cannot serve metrics on 127.0.0.1:{port}")


# -- in-process: FastAPI mount, a runner without the middleware ------------------------------


async def test_metrics_app_mounts_in_fastapi(make_runner: MakeRunner) -> None:
    registry = CollectorRegistry()
    tr = make_runner(middleware=[PrometheusMiddleware(registry)])
    tasks = declare(tr)
    web = FastAPI()
    web.mount("/metrics", metrics_app(tr))
    async with tr, tr.worker(concurrency=4):
        await tasks.ok.enqueue(7)
        with pytest.raises(JobFailed):
            await (await tasks.boom.enqueue()).result(timeout=DEADLINE)
        transport = httpx.ASGITransport(app=web)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:

            async def failed_recorded() -> bool:
                response = await client.get("/metrics/")
                samples = parse(response.text)
                name = "taskrunner_jobs_failed_total"
                return value(samples, name, task="boom", queue="default") == 1

            await wait_until(failed_recorded, DEADLINE)
            response = await client.get("/metrics/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = parse(response.text)
    assert value(samples, "taskrunner_jobs_enqueued_total", task="ok", queue="default") == 1
    assert value(samples, "taskrunner_jobs_enqueued_total", task="boom", queue="default") == 1


def test_metrics_app_needs_the_middleware(make_runner: MakeRunner) -> None:
    with pytest.raises(ConfigurationError, match="PrometheusMiddleware"):
        metrics_app(make_runner())


def test_two_runners_share_one_registry() -> None:
    registry = CollectorRegistry()
    first, second = PrometheusMiddleware(registry), PrometheusMiddleware(registry)
    assert first.registry is second.registry


# -- the queue counts ------------------------------------------------------------------------


async def test_queue_counts_sum_every_partition_and_priority_level(
    make_runner: MakeRunner, redis: Redis
) -> None:
    tr = make_runner(partitions=3)
    tasks = declare(tr)
    producer = make_runner(partitions=3)
    release = anyio.Event()

    @producer.task(name="ghost")
    async def ghost() -> None: ...

    @tr.task(name="hold")
    async def hold() -> None:
        await release.wait()

    async with tr, producer:
        for _ in range(4):
            await tasks.boom.enqueue()
        for _ in range(2):
            await ghost.enqueue()  # the worker does not know it: dead-lettered
        await tr.run_until_idle(raise_failures=False)
        async with tr.worker(concurrency=1):
            held = await hold.enqueue()
            await wait_until(lambda: _running(tr, held.id), DEADLINE)
            for i in range(2):
                await tasks.ok.options(priority="high").enqueue(i)  # no free slot: queued
            for i in range(3):
                await tasks.ok.enqueue(i)
            await tasks.ok.options(priority="low").enqueue(9)
            await tasks.ok.options(delay=7200).enqueue(2)
            await tasks.ok.options(delay=3600, priority="high").enqueue(1)
            queues = await resolve(tr.client, ["default", "never-used"])
            now = tr.clock.now()
            default, unused = await queue_counts(tr.client.redis, queues, now=now, result_ttl=60)
            where = await _entries_by_stream(redis, queues[0])
            shown = (await gather(tr, ["default"])).queues["default"]  # taskrunner info
            release.set()
    assert default.by_status() == {
        "queued": 6, "scheduled": 2, "running": 1, "failed": 4, "dead": 2,
    }  # fmt: skip
    assert shown.model_dump(include=set(default.by_status())) == default.by_status()
    assert len(shown.workers) == 1
    assert len({stream for stream in where if ":stream:high" in stream}) >= 1
    assert len({stream.split("}")[0] for stream in where}) >= 2  # several partitions
    assert default.next_due is not None
    assert now + 3590 < default.next_due < now + 3610
    assert [w for w, _ in default.workers]  # the worker's heartbeat is on record
    assert unused.by_status() == dict.fromkeys(unused.by_status(), 0)
    assert (unused.next_due, unused.workers) == (None, [])


async def _entries_by_stream(redis: Redis, queue: Queue) -> list[str]:
    """The level streams of every partition that hold an entry."""
    found = []
    for keys in queue.parts:
        for stream in queue.streams(keys):
            if await redis.xlen(stream):
                found.append(stream)
    return found


async def test_a_job_handed_back_at_shutdown_counts_only_its_start(
    make_runner: MakeRunner,
) -> None:
    registry = CollectorRegistry()
    tr = make_runner(middleware=[PrometheusMiddleware(registry)])
    started = anyio.Event()

    @tr.task(name="hold")
    async def hold() -> None:
        started.set()
        await anyio.sleep(3600)

    async with tr:
        async with tr.worker(concurrency=1, grace_period=0):
            job = await hold.enqueue()
            # Started, not just claimed ("running" is set at claim): a claimed job no
            # consumer has started is handed back unrun, and no start is counted.
            with anyio.fail_after(DEADLINE):
                await started.wait()
        assert await job.status() == "queued"  # handed back for another worker
    labels = {"task": "hold", "queue": "default"}
    counted = {
        name: registry.get_sample_value(f"taskrunner_jobs_{name}_total", labels)
        for name in ("started", "succeeded", "failed", "retried", "aborted", "reclaimed")
    }
    assert counted == {
        "started": 1, "succeeded": 0, "failed": 0, "retried": 0, "aborted": 0, "reclaimed": 0,
    }  # fmt: skip
    duration = registry.get_sample_value("taskrunner_job_duration_seconds_count", labels)
    assert duration == 1  # the cancelled attempt is timed too
