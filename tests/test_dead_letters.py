"""Poison jobs and dead letters: real worker processes, entries written by hand, the
Python API and the ``dead-letters`` / ``retry-dead`` commands in real subprocesses."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from conftest import subprocess_env, wait_until
from redis.asyncio import Redis
from test_reliability import (
    DEADLINE,
    HEARTBEAT,
    STALE,
    Spawn,
    WorkerProcess,
    pending,
    runs,
    spawn_workers,
)

from taskrunner import JobDeadLettered, JobStatus, TaskRunner
from taskrunner.keys import QueueKeys
from taskrunner.middleware.isolation import SUSPECT_AFTER

MakeRunner = Callable[..., TaskRunner]
APP = "apps.reliability_app:tr"


def cli(redis_url: str, namespace: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from taskrunner.cli import main; main()", *args],
        env=subprocess_env(redis_url, namespace),
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )


@pytest.fixture
def spawn(redis_url: str, namespace: str, tmp_path: Path) -> Iterator[Spawn]:
    yield from spawn_workers(redis_url, namespace, tmp_path)


def producer(make_runner: MakeRunner) -> TaskRunner:
    return make_runner(heartbeat_interval=HEARTBEAT, stale_after=STALE)


async def test_entry_that_keeps_killing_its_worker_is_dead_lettered_after_max_deliveries(
    make_runner: MakeRunner, spawn: Spawn, redis: Redis, namespace: str, redis_url: str
) -> None:
    max_deliveries = 3
    tr = producer(make_runner)

    @tr.task(name="suicide")
    async def suicide() -> int:
        raise NotImplementedError

    async with tr:
        await redis.set(f"{namespace}:test:kill", 1)
        job = await suicide.enqueue()

        async def dead() -> bool:
            return await job.status() == JobStatus.DEAD

        # Two deaths make it a suspect (it then runs alone); each death while alone is
        # charged to it; the third charge dead-letters it.
        for _ in range(SUSPECT_AFTER + max_deliveries + 2):  # restart workers as they die
            worker = spawn(max_deliveries=max_deliveries)
            await wait_until(functools.partial(_died_or_dead, worker, dead), DEADLINE)
            if await dead():
                break
        assert await dead()
        assert worker.alive  # the worker that dead-lettered it keeps running
        assert len(await runs(redis, namespace, job.id)) == SUSPECT_AFTER + max_deliveries
        with pytest.raises(JobDeadLettered, match=r"ran alone 3 times \(max_deliveries=3\)"):
            await job.result(timeout=DEADLINE)
        assert await pending(redis, namespace) == []
        [info] = await tr.dead_letters()
        assert info.id == job.id
        assert info.error is not None
        assert "ran alone 3 times" in info.error.message
        assert (info.crashes, info.reclaims) == (max_deliveries, SUSPECT_AFTER + max_deliveries)

        # Fixed: retry it from the command line; the running worker completes it.
        await redis.delete(f"{namespace}:test:kill")
        done = cli(redis_url, namespace, "retry-dead", APP, job.id)
        assert done.returncode == 0, done.stderr
        assert "revived 1 job(s)" in done.stdout
        assert await job.result(timeout=DEADLINE) == worker.pid
        assert (await job.info()).attempts == 1
        assert await tr.dead_letters() == []


async def _died_or_dead(worker: WorkerProcess, dead: Callable[[], Awaitable[bool]]) -> bool:
    return not worker.alive or await dead()


async def test_garbage_entries_and_bad_jobs_go_to_dead_letters_and_the_worker_goes_on(
    make_runner: MakeRunner, spawn: Spawn, redis: Redis, namespace: str
) -> None:
    tr = producer(make_runner)

    @tr.task(name="ghost")
    async def ghost() -> None:  # the worker's app declares no such task
        raise NotImplementedError

    old = producer(make_runner)  # an older producer: its `add` took strings

    @old.task(name="add")
    async def add_text(x: str, y: str) -> str:
        raise NotImplementedError

    @tr.task(name="add")
    async def add(x: int, y: int) -> int:
        raise NotImplementedError

    keys = QueueKeys(namespace, "default")
    async with tr, old:
        no_job = str(await redis.xadd(keys.stream, {"junk": "1"}))
        unknown_job = str(await redis.xadd(keys.stream, {"job": "no-such-job"}))
        unknown_task = await ghost.enqueue()
        undecodable = await add_text.enqueue("a", "b")
        twice = await add.enqueue(2, 2)
        await redis.xadd(keys.stream, {"job": twice.id})  # a second entry for one job
        worker = spawn()
        after = await add.enqueue(1, 2)
        assert await after.result(timeout=DEADLINE) == 3
        assert await twice.result(timeout=DEADLINE) == 4

        await wait_until(lambda: _dead_count(tr, 4), DEADLINE)
        reasons = {info.id: info.error.message for info in await tr.dead_letters() if info.error}
        assert reasons.keys() == {
            f"entry-{no_job}",
            "no-such-job",  # named after the job its entry names
            unknown_task.id,
            undecodable.id,
        }
        assert "has no job" in reasons[f"entry-{no_job}"]
        assert unknown_job in reasons["no-such-job"]
        assert reasons[unknown_task.id] == "unknown task 'ghost'"
        assert reasons[undecodable.id].startswith("undecodable arguments")
        with pytest.raises(JobDeadLettered, match="unknown task"):
            await unknown_task.result(timeout=DEADLINE)
        assert len(await runs(redis, namespace, twice.id)) == 1  # the duplicate never ran
        assert await pending(redis, namespace) == []
        assert await redis.xlen(keys.stream) == 0
        assert worker.alive


async def _dead_count(tr: TaskRunner, n: int) -> bool:
    return len(await tr.dead_letters()) >= n


async def test_dead_letters_api_and_commands(
    make_runner: MakeRunner, spawn: Spawn, redis: Redis, namespace: str, redis_url: str
) -> None:
    tr = producer(make_runner)

    @tr.task(name="ghost")
    async def ghost(n: int) -> None:
        raise NotImplementedError

    @tr.task(name="add")
    async def add(x: int, y: int) -> int:
        raise NotImplementedError

    async with tr:
        jobs = [await ghost.enqueue(n) for n in range(3)]
        worker = spawn()
        await wait_until(lambda: _dead_count(tr, 3), DEADLINE)

        listed = cli(redis_url, namespace, "dead-letters", APP, "--json")
        assert listed.returncode == 0, listed.stderr
        rows = json.loads(listed.stdout)
        assert {row["id"] for row in rows} == {job.id for job in jobs}
        assert {row["reason"] for row in rows} == {"unknown task 'ghost'"}
        assert {row["status"] for row in rows} == {"dead"}
        plain = cli(redis_url, namespace, "dead-letters", APP, "--queue", "default")
        assert plain.returncode == 0, plain.stderr
        assert len(plain.stdout.splitlines()) == 3
        assert jobs[0].id in plain.stdout

        # Usage errors: neither ids nor --all, or ids that are not dead letters.
        assert cli(redis_url, namespace, "retry-dead", APP).returncode == 2
        missing = cli(redis_url, namespace, "retry-dead", APP, "no-such-job")
        assert missing.returncode == 1
        assert "not in the dead letters" in missing.stderr
        with pytest.raises(ValueError, match="either job ids or all=True"):
            await tr.retry_dead()

        # One by the Python API, the rest by the command: each is delivered again (and,
        # its task still unknown, dead again: a fresh delivery each time).
        before = await jobs[0].info()
        assert await tr.retry_dead([jobs[0].id]) == 1
        await wait_until(lambda: _dead_count(tr, 3), DEADLINE)
        again = await jobs[0].info()
        assert again.status == JobStatus.DEAD
        assert again.finished_at is not None
        assert before.finished_at is not None
        assert again.finished_at > before.finished_at
        revived = cli(redis_url, namespace, "retry-dead", APP, "--all")
        assert revived.returncode == 0, revived.stderr
        assert "revived 3 job(s)" in revived.stdout
        await wait_until(lambda: _dead_count(tr, 3), DEADLINE)
        assert [len(await runs(redis, namespace, j.id)) for j in jobs] == [0, 0, 0]
        assert await tr.dead_letters(queue="other") == []
        after = await add.enqueue(20, 22)
        assert await after.result(timeout=DEADLINE) == 42
        assert worker.alive


async def test_retry_dead_leaves_a_job_that_is_no_longer_dead_alone(
    make_runner: MakeRunner, redis: Redis, namespace: str
) -> None:
    """A dead-letter member whose job is queued again under its id (the dead job's
    hash expired, the id was enqueued anew) is stale: retrying it drops the member and
    adds no second entry for the live job."""
    tr = make_runner()

    @tr.task(name="noop")
    async def noop() -> None:
        return None

    keys = QueueKeys(namespace, "default")
    async with tr:
        job = await noop.options(job_id="again").enqueue()
        await redis.zadd(keys.dead, {job.id: 1})
        assert await redis.xlen(keys.stream) == 1
        assert await tr.retry_dead([job.id]) == 0
        assert await redis.zcard(keys.dead) == 0
        assert await redis.hget(keys.job(job.id), "status") == "queued"
        assert await redis.xlen(keys.stream) == 1
        await redis.zadd(keys.dead, {job.id: 1})
        assert await tr.retry_dead(all=True) == 0
        assert await redis.xlen(keys.stream) == 1
