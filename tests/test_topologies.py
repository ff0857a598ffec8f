"""Every feature on every deployment: standalone Redis, Redis Cluster (3 masters,
3 replicas) and Sentinel (a master, a replica, 3 sentinels). The same tests, run once
per topology through the ``topologies`` marker (tests/topology.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

import anyio
import pytest
from conftest import wait_until
from redis.asyncio import RedisCluster
from redis.exceptions import TimeoutError as RedisTimeoutError
from topology import SentinelTopology, Topology

from taskrunner import (
    JobAborted,
    JobDeadLettered,
    JobFailed,
    JobStatus,
    TaskRunner,
    current_job,
)
from taskrunner.cli.info import gather, table
from taskrunner.connection import unavailable

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


@pytest.mark.topologies("standalone", "cluster")
async def test_info_sums_over_partitions_and_shows_each(make_runner: MakeRunner) -> None:
    tr = make_runner(partitions=3)

    @tr.task
    async def add(x: int, y: int) -> int:
        return x + y

    async with tr:
        jobs = await tr.enqueue_many([add.call(i, i) for i in range(30)])
        later = await add.options(delay=3600).enqueue(1, 1)
        homes: dict[str, int] = {}
        for job in jobs:
            prefix = (await tr.client.locate("default", job.id)).prefix
            homes[prefix] = homes.get(prefix, 0) + 1
        found = (await gather(tr, ["default"])).queues["default"]
        assert (found.queued, found.scheduled) == (30, 1)
        assert len(found.partitions) == 3
        expected = [homes.get(tr.client.keys("default", p).prefix, 0) for p in range(3)]
        assert [part["queued"] for part in found.partitions] == expected
        late_home = (await tr.client.locate("default", later.id)).prefix
        scheduled = [part["scheduled"] for part in found.partitions]
        assert scheduled == [
            int(tr.client.keys("default", p).prefix == late_home) for p in range(3)
        ]
        rows = table(await gather(tr, ["default"])).splitlines()
        assert rows[1].split()[:3] == ["default", "30", "1"]
        assert [row.split()[0] for row in rows[2:5]] == ["#0", "#1", "#2"]
        assert [int(row.split()[1]) for row in rows[2:5]] == expected


@pytest.mark.topologies("standalone", "cluster")
async def test_changing_the_partition_count_strands_nothing(make_runner: MakeRunner) -> None:
    """Jobs written over 4 partitions, then a runner configured with 2: producers use 2
    from then on, and a worker started with 2 still drains all 4."""

    async def echo(n: int) -> int:
        return n

    wide = make_runner(partitions=4)
    send_wide = wide.task(name="echo")(echo)
    async with wide:
        first = await wide.enqueue_many([send_wide.call(i) for i in range(40)])
        homes = {(await wide.client.locate("default", j.id)).prefix for j in first}
        assert len(homes) == 4

    narrow = make_runner(partitions=2)
    send_narrow = narrow.task(name="echo")(echo)
    async with narrow:
        queue = await narrow.client.resolve("default")
        assert (queue.partitions, queue.read) == (2, 4)
        second = await narrow.enqueue_many([send_narrow.call(i) for i in range(40, 60)])
        now_used = {narrow.client.keys("default", p).prefix for p in range(2)}
        for job in second:
            assert (await narrow.client.locate("default", job.id)).prefix in now_used
        async with narrow.worker(concurrency=20, handle_signals=False):
            results = [await narrow.job(j.id).result(timeout=DEADLINE) for j in first + second]
        assert results == list(range(60))
        found = (await gather(narrow, ["default"])).queues["default"]
        assert len(found.partitions) == 4  # the old partitions are still shown (empty)
        assert (found.queued, found.running) == (0, 0)


@pytest.mark.topologies("standalone", "cluster")
async def test_a_server_that_does_not_answer_fails_enqueue_many_with_a_timeout_error(
    make_runner: MakeRunner, topology: Topology
) -> None:
    """A node that stalls (CLIENT PAUSE here; a stopped process, an overloaded server)
    fails a pipelined call with redis-py's TimeoutError on every topology, which
    callers and the outage log know, not an ExceptionGroup from the cluster's per-node
    task group."""
    tr = make_runner(socket_timeout=0.3)

    @tr.task
    async def add(x: int, y: int) -> int:
        return x + y

    async with tr, topology.connect() as admin:
        await tr.enqueue_many([add.call(1, 1), add.call(2, 2)])  # resolves the queue
        pause: dict[str, Any] = {}
        if isinstance(admin, RedisCluster):
            pause["target_nodes"] = RedisCluster.PRIMARIES
        await admin.execute_command("CLIENT PAUSE", 60000, "WRITE", **pause)
        try:
            with pytest.raises(RedisTimeoutError) as caught:
                await tr.enqueue_many([add.call(3, 3), add.call(4, 4)])
            assert unavailable(caught.value)
        finally:
            await admin.execute_command("CLIENT UNPAUSE", **pause)


@pytest.mark.topologies("standalone", "cluster")
async def test_pipelines_wait_for_a_free_connection_like_commands_do(
    make_runner: MakeRunner, topology: Topology, namespace: str
) -> None:
    """``max_connections`` bounds the shared client; more callers wait (up to
    ``pool_timeout``) on every topology, pipelines too: redis-py's cluster pipeline
    raised MaxConnectionsError at a node's limit."""
    tr = make_runner(max_connections=2)
    key = f"{namespace}:{{pool}}:k"

    async with tr:
        redis = tr.client.redis

        async def piped() -> list[Any]:
            pipe = redis.pipeline(transaction=False)
            pipe.incr(key)
            pipe.get(key)
            return await pipe.execute()

        async def single() -> Any:
            return await redis.incr(key)

        calls = [piped() if i % 2 else single() for i in range(200)]
        replies = await asyncio.gather(*calls, return_exceptions=True)
        assert [r for r in replies if isinstance(r, BaseException)] == []
        assert await redis.get(key) == "200"


@pytest.mark.topologies("sentinel")
async def test_a_sentinel_password_with_a_plus_sign_authenticates(
    make_runner: MakeRunner, topology: Topology, namespace: str
) -> None:
    """``?sentinel_password=`` is taken as written: a ``+`` stays a plus sign, as in the
    master's password before ``@`` (query-string decoding made it a space: WRONGPASS)."""
    assert isinstance(topology, SentinelTopology)
    user, password = f"{namespace}-watcher", "s3+cr+t"
    rule = [user, "on", f">{password}", "+@all"]
    for sentinel in topology.group.sentinels:
        with topology.group.admin(sentinel) as admin:
            cast(Any, admin).execute_command("ACL", "SETUSER", *rule)
    try:
        query = f"sentinel_username={user}&sentinel_password={password}"
        url = topology.url + ("&" if "?" in topology.url else "?") + query
        tr = TaskRunner(url, namespace=namespace)
        async with tr:
            assert tr.client.connection.target.sentinel_password == password
            assert await tr.client.connection.redis.ping()
    finally:
        for sentinel in topology.group.sentinels:
            with topology.group.admin(sentinel) as admin:
                cast(Any, admin).execute_command("ACL", "DELUSER", user)
