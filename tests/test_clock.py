"""Time comes from Redis: due times and lock TTLs are decided by the server's clock
inside the scripts (producers send delays), so a worker or a producer whose clock runs
minutes ahead cannot promote a job early or shorten a lock."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis
from test_reliability import Spawn, spawn_workers

from taskrunner import JobStatus, TaskRunner

MakeRunner = Callable[..., TaskRunner]
DEADLINE = 30.0
AHEAD = 600.0  # ten minutes


@pytest.fixture
def spawn(redis_url: str, namespace: str, tmp_path: Path) -> Iterator[Spawn]:
    yield from spawn_workers(redis_url, namespace, tmp_path)


async def test_a_worker_whose_clock_runs_ahead_promotes_no_job_early(
    make_runner: MakeRunner, spawn: Spawn, redis: Redis
) -> None:
    tr = make_runner()

    @tr.task(name="add")
    async def add(x: int, y: int) -> int:
        raise NotImplementedError

    async with tr:
        ahead = spawn(clock_shift=AHEAD)  # its time.time() is ten minutes ahead
        await ahead.ready()
        sent = time.time()
        job = await add.options(delay=2.0).enqueue(1, 2)
        assert await job.status() == JobStatus.SCHEDULED
        assert await job.result(timeout=DEADLINE) == 3
        info = await job.info()
    assert info.due_at is not None
    assert info.started_at is not None
    assert info.started_at >= info.due_at  # by the server's clock, never early
    assert info.started_at.timestamp() >= sent + 2.0 - 0.05  # and not by its own
    assert info.started_at.timestamp() < sent + AHEAD / 2  # nor ten minutes late


async def test_a_producer_whose_clock_runs_ahead_schedules_by_the_servers_clock(
    make_runner: MakeRunner, spawn: Spawn, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    tr = make_runner(lock_ttl=30.0)

    @tr.task(name="add", lock="until_executing")
    async def add(x: int, y: int) -> int:
        raise NotImplementedError

    real = time.time
    async with tr:
        server_now = float((await redis.time())[0])
        monkeypatch.setattr(time, "time", lambda: real() + AHEAD)  # this process ahead
        job = await add.options(delay=60.0).enqueue(1, 2)
        monkeypatch.setattr(time, "time", real)
        info = await job.info()
        lock = tr.unique.lock_key(add, (1, 2))
        ttl_ms = await redis.pttl(lock)
    assert info.due_at is not None
    due = info.due_at.timestamp()
    assert server_now + 59 <= due <= server_now + 61 + 5  # the delay from the server's now
    assert 60_000 + 25_000 < ttl_ms <= 60_000 + 30_000  # delay + lock_ttl, not shortened
    assert info.status == JobStatus.SCHEDULED
