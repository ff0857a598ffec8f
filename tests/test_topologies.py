"""Every feature on every deployment: standalone Redis, Redis Cluster (3 masters,
3 replicas) and Sentinel (a master, a replica, 3 sentinels). The same tests, run once
per topology through the ``topologies`` marker (tests/topology.py)."""

from __future__ import annotations

from collections.abc import Callable

import anyio
import pytest
from conftest import wait_until
from topology import Topology

from taskrunner import (
    JobAborted,
    JobDeadLettered,
    JobFailed,
    JobStatus,
    TaskRunner,
    current_job,
)

MakeRunner = Callable[..., TaskRunner]
DEADLINE = 60.0
ALL = pytest.mark.topologies("standalone", "cluster", "sentinel")


@ALL
async def test_jobs_delays_retries_aborts_and_dead_letters_on_each_topology(
    make_runner: MakeRunner, topology: Topology
) -> None:
    tr = make_runner(heartbeat_interval=0.2, stale_after=1.0, max_retries=1, partitions=3)
    gate = anyio.Event()

    @tr.task
    async def add(x: int, y: int) -> int:
        return x + y

    @tr.task
    async def flaky() -> int:
        if current_job().attempt == 1:
            raise ValueError("first attempt fails")
        return current_job().attempt

    @tr.task
    async def broken() -> None:
        raise RuntimeError("always")

    @tr.task
    async def wait() -> None:
        await gate.wait()

    @tr.task(queue="other", priority="high")
    async def elsewhere(n: int) -> int:
        return n

    async with tr:
        many = await tr.enqueue_many([add.call(i, i) for i in range(60)])
        later = await add.options(delay=0.3).enqueue(2, 3)
        retried = await flaky.enqueue()
        failing = await broken.enqueue()
        waiting = await wait.enqueue()
        other = await elsewhere.enqueue(7)
        ghost = tr.job("ghost")  # a job id nobody wrote
        async with tr.worker(concurrency=20, handle_signals=False):
            assert [await job.result(timeout=DEADLINE) for job in many] == [
                2 * i for i in range(60)
            ]
            assert await later.result(timeout=DEADLINE) == 5
            assert await retried.result(timeout=DEADLINE) == 2
            with pytest.raises(JobFailed):
                await failing.result(timeout=DEADLINE)
            assert await other.result(timeout=DEADLINE) == 7

            async def running() -> bool:
                return await waiting.status() == JobStatus.RUNNING

            await wait_until(running, DEADLINE)
            assert await waiting.abort() == JobStatus.RUNNING
            with pytest.raises(JobAborted):
                await waiting.result(timeout=DEADLINE)
        queue = await tr.client.resolve("default")
        assert queue.partitions == 3
        homes = {tr.client.keys("default", 0).prefix}
        for job in many:
            homes.add((await tr.client.locate("default", job.id)).prefix)
        assert len(homes) == 3  # jobs spread over every partition
        from taskrunner.exceptions import JobNotFound

        with pytest.raises(JobNotFound):
            await ghost.status()


@ALL
async def test_unique_locks_mean_one_per_key_across_partitions(
    make_runner: MakeRunner, topology: Topology
) -> None:
    tr = make_runner(partitions=4)
    ran: list[str] = []

    @tr.task(lock="until_executed")
    async def report(account: str) -> str:
        ran.append(account)
        return account

    async with tr:
        jobs = [await report.enqueue(f"acct-{n % 5}") for n in range(20)]
        assert sum(not job.deduplicated for job in jobs) == 5
        async with tr.worker(concurrency=10, handle_signals=False):
            for job in jobs:
                assert (await job.result(timeout=DEADLINE)).startswith("acct-")
    assert sorted(ran) == sorted(f"acct-{n}" for n in range(5))


@ALL
async def test_dead_letters_of_unknown_tasks_on_each_topology(
    make_runner: MakeRunner, topology: Topology
) -> None:
    producer = make_runner(partitions=2)

    @producer.task(name="ghost")
    async def ghost() -> None: ...

    consumer = make_runner(partitions=2)  # declares no "ghost"

    @consumer.task(name="known")
    async def known() -> int:
        return 1

    async with producer, consumer:
        jobs = [await ghost.enqueue() for _ in range(4)]
        async with consumer.worker(handle_signals=False):
            for job in jobs:
                with pytest.raises(JobDeadLettered, match="unknown task"):
                    await producer.job(job.id).result(timeout=DEADLINE)
        dead = await consumer.dead_letters()
        assert {info.id for info in dead} == {job.id for job in jobs}
        assert await consumer.retry_dead(all=True) == 4
