"""Redis going away under a running worker process, and what the worker checks of the
server: each test has its own redis-server (tests/redisproc.py) to stop and restart."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import wait_until
from redis.asyncio import Redis
from redisproc import RedisProcess
from test_reliability import (
    DEADLINE,
    HEARTBEAT,
    STALE,
    Spawn,
    WorkerProcess,
    count_runs,
    runs,
    spawn_workers,
)

from taskrunner import JobNotFound, JobStatus, TaskRunner, scripts
from taskrunner.keys import QueueKeys


@pytest.fixture
def spawn(redis_url: str, namespace: str, tmp_path: Path) -> Iterator[Spawn]:
    yield from spawn_workers(redis_url, namespace, tmp_path)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisProcess]:
    with RedisProcess(tmp_path / "redis") as proc:
        yield proc


@pytest.fixture
def aof_server(tmp_path: Path) -> Iterator[RedisProcess]:
    with RedisProcess(tmp_path / "redis-aof", appendonly=True) as proc:
        yield proc


@pytest.fixture
async def client(server: RedisProcess) -> AsyncIterator[Redis]:
    redis = Redis.from_url(server.url, decode_responses=True)
    yield redis
    await redis.aclose()


def producer(url: str, namespace: str) -> tuple[TaskRunner, Any, Any]:
    tr = TaskRunner(url, namespace=namespace, heartbeat_interval=HEARTBEAT, stale_after=STALE)

    @tr.task(name="gate")
    async def gate(path: str) -> str:
        raise NotImplementedError

    @tr.task(name="add")
    async def add(x: int, y: int) -> int:
        raise NotImplementedError

    return tr, gate, add


async def outage_noticed(worker: WorkerProcess, lasting: float) -> None:
    """Wait until the worker has noticed the outage (its one warning line), then let the
    outage last ``lasting`` seconds more as the worker sees it (the scenario's length)."""

    async def noticed() -> bool:
        return "redis unavailable" in worker.output()

    await wait_until(noticed, DEADLINE, interval=0.05)
    await anyio.sleep(lasting)


async def test_worker_survives_restart_with_aof_and_every_acknowledged_job_completes(
    aof_server: RedisProcess, spawn: Spawn, namespace: str, tmp_path: Path
) -> None:
    tr, gate, _ = producer(aof_server.url, namespace)
    door = tmp_path / "door"
    async with tr:
        await tr.client.redis.config_set("appendfsync", "always")
        worker = spawn(url=aof_server.url, concurrency=4)
        await worker.ready()
        jobs = [await gate.enqueue(str(door)) for _ in range(10)]  # acknowledged by Redis
        for job in jobs[:4]:
            await wait_until(count_runs(tr.client.redis, namespace, job.id, 1), DEADLINE)
        other = spawn(url=aof_server.url, concurrency=4)  # takes the next 4; 2 wait
        for job in jobs[4:8]:
            await wait_until(count_runs(tr.client.redis, namespace, job.id, 1), DEADLINE)

    aof_server.stop()
    # Down for longer than stale_after, as the worker saw it: its running jobs' entries
    # look stale once the server is back.
    await outage_noticed(worker, lasting=2 * STALE)
    aof_server.start()
    await anyio.Path(door).touch()

    after, _, _ = producer(aof_server.url, namespace)  # the test's own connections died
    async with after:
        results = [await after.job(job.id).result(timeout=DEADLINE) for job in jobs]
        # The jobs running through the outage finished where they ran, as attempt 1: no
        # worker took them over although their entries looked stale after the restart.
        assert results[:4] == [f"{worker.pid}:1"] * 4
        assert results[4:8] == [f"{other.pid}:1"] * 4
        assert {r.split(":")[1] for r in results} == {"1"}
        assert worker.alive
        assert other.alive
        for job in jobs:
            assert len(await runs(after.client.redis, namespace, job.id)) == 1
            info = await after.job(job.id).info()
            assert (info.attempts, info.reclaims) == (1, 0)  # kept, not taken over


async def test_worker_survives_restart_without_persistence_and_recreates_group_from_zero(
    server: RedisProcess, client: Redis, spawn: Spawn, namespace: str, tmp_path: Path
) -> None:
    tr, gate, _ = producer(server.url, namespace)
    async with tr:
        worker = spawn(url=server.url)
        await worker.ready()
        lost = await gate.enqueue(str(tmp_path / "never"))
        await wait_until(count_runs(client, namespace, lost.id, 1), DEADLINE)

    worker.signal(signal.SIGSTOP)  # so it cannot recreate the group before we write
    try:
        server.restart()  # every key is gone, the consumer group too
        after, _, add = producer(server.url, namespace)
        async with after:
            jobs = [await add.enqueue(n, n) for n in range(5)]
            stream = QueueKeys(namespace, "default").stream
            assert await after.client.redis.xinfo_groups(stream) == []
    finally:
        worker.signal(signal.SIGCONT)

    async with after:
        # Entries written before the group existed are read: it starts at 0, not $.
        assert [await after.job(j.id).result(timeout=DEADLINE) for j in jobs] == [0, 2, 4, 6, 8]
        await worker.logged("consumer group missing")
        await worker.logged("lease lost")  # its running job's state is gone: cancelled
        with pytest.raises(JobNotFound):
            await after.job(lost.id).status()
        assert worker.alive
        again = await add.enqueue(20, 22)
        assert await again.result(timeout=DEADLINE) == 42


async def test_worker_warns_when_maxmemory_policy_can_evict(
    server: RedisProcess, client: Redis, spawn: Spawn
) -> None:
    await client.config_set("maxmemory-policy", "allkeys-lru")
    worker = spawn(url=server.url)
    await worker.ready()
    assert "maxmemory-policy is allkeys-lru" in worker.output()

    await client.config_set("maxmemory-policy", "noeviction")
    quiet = spawn(url=server.url)
    await quiet.ready()
    assert "maxmemory-policy" not in quiet.output()


async def test_heartbeat_is_one_pipelined_round_trip_per_interval_and_idle_reads_wait(
    server: RedisProcess, client: Redis, spawn: Spawn, namespace: str, tmp_path: Path
) -> None:
    """MONITOR shows each heartbeat round: the presence ZADD and one heartbeat script per
    running job, back to back from one connection. Prefetched-but-not-started entries do
    not exist (reads are sized to free slots), so every heartbeated entry is a running
    job's. A worker with free slots and a drained queue does not poll: it reads nothing
    until a "ready" event wakes it."""
    tr, gate, _ = producer(server.url, namespace)
    async with tr:
        worker = spawn(url=server.url, concurrency=5)
        await worker.ready()
        jobs = [await gate.enqueue(str(tmp_path / "door")) for _ in range(3)]
        for job in jobs:
            await wait_until(count_runs(client, namespace, job.id, 1), DEADLINE)

        commands = await monitor(server.url, seconds=10 * HEARTBEAT)

        workers_key = QueueKeys(namespace, "default").workers
        rounds: list[list[dict[str, Any]]] = []
        for i, command in enumerate(commands):
            if command["command"].startswith(f"ZADD {workers_key}"):
                rounds.append(commands[i : i + 4])
        assert 3 <= len(rounds) <= 10 + 2  # about one round per interval, never more
        for group in rounds[:-1]:
            assert len({c["client"] for c in group}) == 1  # one connection, back to back
            shas = [c["command"].split()[1] for c in group[1:]]
            assert shas == [scripts.HEARTBEAT.sha] * 3
        fetches = [c for c in commands if scripts.FETCH.sha in c["command"]]
        assert fetches == []  # drained: it waits for a wake-up, it does not poll
        await anyio.Path(tmp_path / "door").touch()
        for job in jobs:
            assert (await job.info()).status in (JobStatus.RUNNING, JobStatus.SUCCEEDED)


async def monitor(url: str, seconds: float) -> list[dict[str, Any]]:
    """Every command clients send for ``seconds`` (MONITOR), in order."""
    seen: list[dict[str, Any]] = []
    redis = Redis.from_url(url, decode_responses=True)
    try:
        with anyio.move_on_after(seconds):
            async with redis.monitor() as mon:
                async for event in mon.listen():
                    client = f"{event.get('client_address')}:{event.get('client_port')}"
                    if client.startswith("lua"):
                        continue  # commands run inside scripts
                    seen.append({"command": str(event["command"]), "client": client})
    finally:
        await redis.aclose()
    return seen


async def test_a_waiting_result_survives_a_redis_restart(
    aof_server: RedisProcess, namespace: str
) -> None:
    tr = TaskRunner(aof_server.url, namespace=namespace)

    @tr.task
    async def double(x: int) -> int:
        return 2 * x

    async with tr:
        job = await double.enqueue(21)
        done_channel = tr.client.keys("default").done(job.id)
        results: list[int] = []

        async def wait() -> None:
            results.append(await job.result(timeout=DEADLINE))

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)

            async def subscribed() -> bool:
                counts = await tr.client.redis.pubsub_numsub(done_channel)
                return bool(counts and counts[0][1] == 1)

            await wait_until(subscribed, DEADLINE)
            await anyio.to_thread.run_sync(aof_server.restart)  # the job is in the AOF
            async with tr.worker(concurrency=2, handle_signals=False):
                await wait_until(lambda: _has(results), DEADLINE)
        assert results == [42]


async def _has(results: list[int]) -> bool:
    return bool(results)
