"""Failovers: a Sentinel-managed master and a Redis Cluster master are SIGKILLed while
worker processes run jobs and producers enqueue. With appendfsync always and
``wait_replicas=1``, every enqueue that returned before the kill completes; waiting
``job.result()`` calls and workers resume without a restart; no live job is taken over
because of the failover (the outage guard); resharding a partition's slot while jobs
flow strands nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import anyio
import pytest
from conftest import wait_until
from redis.crc import key_slot
from test_reliability import Spawn, count_runs, runs, spawn_workers
from topology import ClusterTopology, MakeTopology, SentinelTopology, Topology

from taskrunner import TaskRunner
from taskrunner.connection import REDIS_ERRORS
from taskrunner.exceptions import NotReplicated
from taskrunner.keys import QueueKeys

DEADLINE = 90.0
HEARTBEAT = 0.2
STALE = 1.0


@pytest.fixture
def spawn(redis_url: str, namespace: str, tmp_path: Path) -> Iterator[Spawn]:
    yield from spawn_workers(redis_url, namespace, tmp_path)


def producer(url: str, namespace: str) -> tuple[TaskRunner, Any, Any]:
    tr = TaskRunner(
        url,
        namespace=namespace,
        heartbeat_interval=HEARTBEAT,
        stale_after=STALE,
        wait_replicas=1,
        wait_timeout=2.0,
    )

    @tr.task(name="hold")
    async def hold(first: float, later: float) -> str:
        raise NotImplementedError

    @tr.task(name="add")
    async def add(x: int, y: int) -> int:
        raise NotImplementedError

    return tr, hold, add


async def enqueue_until_acknowledged(add: Any, n: int, deadline: float) -> Any:
    """Enqueue under a fixed job id until Redis acknowledges it (idempotent retries
    through the failover); the handle."""
    while True:
        try:
            return await add.options(job_id=f"add-{n}").enqueue(n, n)
        except (*REDIS_ERRORS, NotReplicated):
            if anyio.current_time() > deadline:
                raise
            await anyio.sleep(0.1)


async def run_failover(topology: Topology, key: str, spawn: Spawn, namespace: str) -> None:
    tr, hold, add = producer(topology.url, namespace)
    async with tr:
        for _ in range(2):
            spawn(url=topology.url, concurrency=8)
        long = [await hold.enqueue(4, 4) for _ in range(4)]  # running through the failover
        for job in long:
            await wait_until_run(tr, namespace, job.id)
        acknowledged: list[Any] = []
        results: dict[str, Any] = {}
        deadline = anyio.current_time() + DEADLINE

        async def wait_result(job: Any) -> None:
            results[job.id] = await job.result(timeout=DEADLINE)

        async with anyio.create_task_group() as tg:
            for job in long:
                tg.start_soon(wait_result, job)  # waiting across the failover
            for n in range(40):
                acknowledged.append(await enqueue_until_acknowledged(add, n, deadline))
            killed = topology.kill_master(key=key)
            await anyio.to_thread.run_sync(topology.wait_failover, killed)
            # The old master comes back as the new master's replica (enqueues WAIT for one).
            await anyio.to_thread.run_sync(topology.restart, killed)
            for n in range(40, 60):
                acknowledged.append(await enqueue_until_acknowledged(add, n, deadline))
            for job in acknowledged:
                tg.start_soon(wait_result, job)
        assert [results[job.id] for job in acknowledged] == [2 * n for n in range(60)]
        for job in long:
            assert results[job.id].endswith(":1")  # finished where it ran, as attempt 1
            info = await tr.job(job.id).info()
            assert (info.attempts, info.reclaims) == (1, 0)  # never taken over
            assert len(await runs(tr.client.redis, namespace, job.id)) == 1


async def wait_until_run(tr: TaskRunner, namespace: str, job_id: str) -> None:
    await wait_until(count_runs(tr.client.redis, namespace, job_id, 1), DEADLINE)


async def test_a_sentinel_failover_loses_no_acknowledged_job_and_takes_no_live_one(
    make_topology: MakeTopology, spawn: Spawn, namespace: str
) -> None:
    topology = await anyio.to_thread.run_sync(
        lambda: make_topology("sentinel", appendfsync="always")
    )
    await run_failover(topology, f"{namespace}:{{default}}:stream", spawn, namespace)


async def test_a_cluster_failover_loses_no_acknowledged_job_and_takes_no_live_one(
    make_topology: MakeTopology, spawn: Spawn, namespace: str
) -> None:
    topology = await anyio.to_thread.run_sync(
        lambda: make_topology("cluster", appendfsync="always")
    )
    # The master of partition 0 of the queue (its slot holds the running jobs too).
    await run_failover(topology, f"{namespace}:{{default}}:stream", spawn, namespace)


async def test_resharding_a_partitions_slot_while_jobs_flow_strands_nothing(
    make_topology: MakeTopology, spawn: Spawn, namespace: str
) -> None:
    topology = await anyio.to_thread.run_sync(lambda: make_topology("cluster"))
    assert isinstance(topology, ClusterTopology)
    cluster = topology.cluster
    tr, _, add = producer(topology.url, namespace)
    async with tr:
        for _ in range(2):
            spawn(url=topology.url, concurrency=8)
        slot = key_slot(f"{namespace}:{{default}}:stream".encode())
        source = cluster.slot_owner(slot)
        target = next(m for m in cluster.masters() if m is not source)
        jobs: list[Any] = []
        deadline = anyio.current_time() + DEADLINE
        async with anyio.create_task_group() as tg:

            async def produce() -> None:
                for n in range(200):
                    jobs.append(await enqueue_until_acknowledged(add, n, deadline))

            tg.start_soon(produce)
            await anyio.sleep(0.2)
            moved = await anyio.to_thread.run_sync(lambda: cluster.move_slot(slot, target))
        assert moved > 0
        assert cluster.slot_owner(slot) is target
        results = [await job.result(timeout=DEADLINE) for job in jobs]
        assert results == [2 * n for n in range(200)]


async def test_a_connection_that_finds_a_replica_where_the_master_was_asks_again(
    make_topology: MakeTopology, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a failover, a sentinel that has not caught up yet can still name the old
    master, now a replica. The enqueue's script write is refused there (``READONLY``;
    Redis 6.2 wraps it in the script's error, which redis-py does not recognise): the
    connection must be dropped and the sentinels asked again, not kept on the replica
    (every later call failed the same way). Here the pool is handed the replica's
    address for its next connection, as such a sentinel would."""
    topology = await anyio.to_thread.run_sync(lambda: make_topology("sentinel"))
    assert isinstance(topology, SentinelTopology)
    group = topology.group
    tr, _, add = producer(topology.url, namespace)
    async with tr:
        await add.enqueue(1, 1)
        pool = cast(Any, tr.client.redis).connection_pool
        ask_sentinels = pool.get_master_address
        replica = group.replicas()[0]
        asked: list[tuple[str, int]] = []

        async def stale_first() -> tuple[str, int]:
            found = ("127.0.0.1", replica.port) if not asked else await ask_sentinels()
            asked.append(found)
            return found

        monkeypatch.setattr(pool, "get_master_address", stale_first)
        await pool.disconnect()  # the next call opens a new connection
        job = await add.enqueue(2, 2)  # refused on the replica, retried on the master
        assert asked[0] == ("127.0.0.1", replica.port)
        assert len(asked) >= 2  # asked again after the replica refused the write
        with group.admin(group.master()) as client:
            status = client.hget(QueueKeys(namespace, "default").job(job.id), "status")
        assert status in ("queued", b"queued")
