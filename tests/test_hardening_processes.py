"""Production hardening with real worker processes: a job that kills its worker takes
no innocent job with it, a burst run reclaims what a dead worker left, dead consumers
are pruned, one reclaim scan per partition per period whatever the number of workers,
and a stopping worker's unrecorded outcomes are re-run, as the docs state."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import subprocess_env, wait_until
from redis.asyncio import Redis
from redisproc import RedisProcess
from test_reliability import (
    DEADLINE,
    HEARTBEAT,
    STALE,
    Spawn,
    WorkerProcess,
    count_runs,
    has_status,
    runs,
    spawn_workers,
)

from taskrunner import JobDeadLettered, JobStatus, TaskRunner
from taskrunner.keys import GROUP, QueueKeys
from taskrunner.middleware.isolation import SUSPECT_AFTER
from taskrunner.worker.worker import COMMIT_DEADLINE

MakeRunner = Callable[..., TaskRunner]
APP = "apps.reliability_app:tr"


@pytest.fixture
def spawn(redis_url: str, namespace: str, tmp_path: Path) -> Iterator[Spawn]:
    yield from spawn_workers(redis_url, namespace, tmp_path)


class Command:
    """A ``taskrunner`` command in its own process group, its output in a file."""

    def __init__(self, env: dict[str, str], log: Path, *args: str) -> None:
        self.log = log
        self._file = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "taskrunner.cli", *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def exited(self, timeout: float = DEADLINE) -> int:
        async def done() -> bool:
            return self.proc.poll() is not None

        await wait_until(done, timeout, interval=0.05)
        return self.proc.returncode

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=DEADLINE)
        self._file.close()
        print(f"--- {self.proc.args!r} (exit {self.proc.returncode}) ---\n{self.output()}")


@pytest.fixture
def command(redis_url: str, namespace: str, tmp_path: Path) -> Iterator[Callable[..., Command]]:
    started: list[Command] = []

    def start(*args: str, **settings: Any) -> Command:
        env = subprocess_env(settings.pop("url", redis_url), namespace)
        env["TEST_HEARTBEAT"] = str(HEARTBEAT)
        env["TEST_STALE"] = str(STALE)
        for name, value in settings.items():
            env[name] = str(value)
        found = Command(env, tmp_path / f"command-{len(started)}.log", *args)
        started.append(found)
        return found

    yield start
    for found in started:
        found.close()


def producer(make_runner: MakeRunner) -> tuple[TaskRunner, Any, Any]:
    tr = make_runner(heartbeat_interval=HEARTBEAT, stale_after=STALE)

    @tr.task(name="hold")
    async def hold(first: float, later: float) -> str:
        raise NotImplementedError

    @tr.task(name="suicide")
    async def suicide() -> int:
        raise NotImplementedError

    return tr, hold, suicide


async def test_a_job_that_kills_its_worker_takes_no_innocent_job_to_the_dead_letters(
    make_runner: MakeRunner, command: Callable[..., Command], redis: Redis, namespace: str
) -> None:
    # Every default (max_deliveries 5, concurrency 100) on two supervised processes: the
    # poison job kills whichever process runs it; the 20 ordinary jobs beside it are
    # requeued with it, run again, and complete. Only the poison job is dead-lettered.
    tr, hold, suicide = producer(make_runner)
    async with tr:
        await redis.set(f"{namespace}:test:kill", 1)  # suicide kills its process, always
        poison = await suicide.enqueue()
        ordinary = await tr.enqueue_many([hold.call(0.5, 0.5) for _ in range(20)])
        supervisor = command("worker", APP, "--processes", "2")
        with pytest.raises(JobDeadLettered, match="ran alone 5 times"):
            await poison.result(timeout=180)
        results = [await job.result(timeout=DEADLINE) for job in ordinary]
        infos = [await job.info() for job in ordinary]
        poisoned = await poison.info()
        dead = await tr.dead_letters()
    assert all(result.endswith((":1", ":2", ":3")) for result in results), results
    assert {info.status for info in infos} == {JobStatus.SUCCEEDED}
    assert max(info.crashes for info in infos) == 0  # never charged with a death
    assert max(info.reclaims for info in infos) <= SUSPECT_AFTER
    assert (poisoned.crashes, poisoned.reclaims) == (5, SUSPECT_AFTER + 5)
    assert len(await runs(redis, namespace, poison.id)) == SUSPECT_AFTER + 5
    assert "runs alone" in supervisor.output()
    assert [info.id for info in dead] == [poison.id]


async def test_a_burst_run_reclaims_what_a_dead_worker_left_before_it_exits(
    make_runner: MakeRunner,
    spawn: Spawn,
    command: Callable[..., Command],
    redis: Redis,
    namespace: str,
) -> None:
    tr, hold, _ = producer(make_runner)
    async with tr:
        job = await hold.enqueue(3600, 0)  # attempt 1 would take an hour
        dead = spawn()
        await wait_until(count_runs(redis, namespace, job.id, 1), DEADLINE)
        dead.kill()  # leaves the job running under a consumer that is gone
        assert await job.status() == JobStatus.RUNNING
        keys = QueueKeys(namespace, "default")

        async def stale() -> bool:  # no heartbeat for stale_after: the job is stale
            found = await redis.xpending_range(keys.stream, GROUP, "-", "+", 1)
            return bool(found) and int(found[0]["time_since_delivered"]) > STALE * 1000

        await wait_until(stale, DEADLINE)
        burst = command("worker", APP, "--burst")
        assert await burst.exited(timeout=60) == 0, burst.output()
        assert (await job.result(timeout=1)).endswith(":2")
        assert (await job.info()).reclaims == 1


async def test_consumers_and_workers_of_killed_processes_are_pruned(
    make_runner: MakeRunner, spawn: Spawn, redis: Redis, namespace: str
) -> None:
    tr, hold, _ = producer(make_runner)
    keys = QueueKeys(namespace, "default")

    async def consumers() -> set[str]:
        found = await redis.xinfo_consumers(keys.stream, GROUP)
        return {str(c["name"]) for c in found}

    async with tr:
        killed = [spawn(concurrency=2) for _ in range(4)]
        for worker in killed:
            await worker.ready()
        jobs = await tr.enqueue_many([hold.call(3600, 0) for _ in range(8)])
        for job in jobs:
            await wait_until(count_runs(redis, namespace, job.id, 1), DEADLINE)
        assert len(await consumers()) == 4  # each holds two of them
        for worker in killed:
            worker.kill()
        live = spawn(concurrency=10)
        results = [await job.result(timeout=DEADLINE) for job in jobs]
        assert all(result.endswith(":2") for result in results)

        async def pruned() -> bool:
            names = await consumers()
            members = {str(m) for m in await redis.zrange(keys.workers, 0, -1)}
            return bool(names) and all(n.startswith(live.consumer_prefix) for n in names | members)

        await wait_until(pruned, DEADLINE)
        assert live.alive


async def test_one_reclaim_scan_per_partition_per_period_whatever_the_worker_count(
    tmp_path: Path, namespace: str
) -> None:
    with RedisProcess(tmp_path / "redis") as server:
        env = subprocess_env(server.url, namespace)
        env["TEST_HEARTBEAT"] = str(HEARTBEAT)
        env["TEST_STALE"] = str(STALE)
        workers = [WorkerProcess(env, tmp_path / f"w{i}.log") for i in range(3)]
        redis = Redis.from_url(server.url, decode_responses=True)
        try:
            for worker in workers:
                await worker.ready()
            await anyio.sleep(2 * STALE)  # the outage guard opens after stale_after
            await redis.config_resetstat()
            window = 10 * STALE
            await anyio.sleep(window)
            stats = await redis.info("commandstats")
        finally:
            for worker in workers:
                worker.close()
            await redis.aclose()
    xautoclaim = stats.get("cmdstat_xautoclaim", {}).get("calls", 0)
    turns = stats.get("cmdstat_evalsha", {}).get("calls", 0)
    periods = window / (STALE / 2)
    levels = 3
    # One scan of each level's stream per period for the partition, however many
    # workers ask for a turn (three workers would be three scans each without it).
    assert 0 < xautoclaim <= levels * (periods + 2)
    assert turns > 0


async def test_a_stopping_worker_gives_up_unrecorded_outcomes_after_the_deadline(
    tmp_path: Path, namespace: str, spawn: Spawn
) -> None:
    """The documented statement: a stopping worker retries outcomes Redis has not
    recorded for COMMIT_DEADLINE seconds, then exits; those jobs run again after
    stale_after on another worker."""
    with RedisProcess(tmp_path / "redis", appendonly=True) as server:
        tr = TaskRunner(
            server.url, namespace=namespace, heartbeat_interval=HEARTBEAT, stale_after=STALE
        )

        @tr.task(name="gate")
        async def gate(path: str) -> str:
            raise NotImplementedError

        door = tmp_path / "door"
        async with tr:
            await tr.client.redis.config_set("appendfsync", "always")
            job = await gate.enqueue(str(door))
            worker = spawn(url=server.url)
            await wait_until(count_runs(tr.client.redis, namespace, job.id, 1), DEADLINE)
        server.stop()
        door.touch()  # the job finishes while Redis is away: its commit cannot land
        await worker.logged("redis unavailable")
        worker.signal(signal.SIGTERM)
        began = anyio.current_time()
        await worker.exited(timeout=COMMIT_DEADLINE + DEADLINE)
        took = anyio.current_time() - began
        assert "not recorded before stopping" in worker.output()
        assert job.id in worker.output()
        assert took >= COMMIT_DEADLINE - 1  # it kept trying for the deadline
        server.start()
        after = TaskRunner(
            server.url, namespace=namespace, heartbeat_interval=HEARTBEAT, stale_after=STALE
        )
        async with after:
            assert await after.job(job.id).status() == JobStatus.RUNNING
            spawn(url=server.url)
            result = await after.job(job.id).result(timeout=DEADLINE)
            assert result.endswith(":2")  # ran again, as attempt 2
            assert await has_status(after, job.id, JobStatus.SUCCEEDED)()
