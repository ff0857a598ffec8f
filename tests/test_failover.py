"""Failovers: a Sentinel-managed master and a Redis Cluster master are SIGKILLed while
worker processes run jobs and producers enqueue. With appendfsync always and
``wait_replicas=1``, every enqueue that returned before the kill completes; waiting
``job.result()`` calls and workers resume without a restart; no live job is taken over
because of the failover (the outage guard); resharding a partition's slot while jobs
flow strands nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import wait_until
from redis.crc import key_slot
from test_reliability import Spawn, count_runs, runs, spawn_workers
from topology import ClusterTopology, MakeTopology, Topology

from taskrunner import TaskRunner
from taskrunner.connection import REDIS_ERRORS
from taskrunner.exceptions import NotReplicated

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
