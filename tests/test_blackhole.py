"""Connections that die without a close (a NAT or a load balancer forgetting an idle
flow), and network cuts longer than stale_after without a Redis restart, through a TCP
proxy on loopback (tests/tcpproxy.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import anyio
import pytest
import uvloop
from apps.core_app import declare
from conftest import StartWorker, wait_until
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from tcpproxy import MakeProxy
from test_reliability import Spawn, count_runs, runs, spawn_workers

from taskrunner import JobAborted, JobStatus, TaskRunner
from taskrunner.connection import PoolOptions, open_connection

CORE_APP = "apps.core_app:tr"

MakeRunner = Callable[..., TaskRunner]
DEADLINE = 60.0


def through(proxy_port: int) -> str:
    return f"redis://127.0.0.1:{proxy_port}/0"


def proxied(redis_url: str, make_proxy: MakeProxy) -> Any:
    parts = urlsplit(redis_url)
    return make_proxy(parts.hostname or "127.0.0.1", parts.port or 6379)


async def subscribed(redis: Redis, channel: str, n: int = 1) -> bool:
    counts = dict(await redis.pubsub_numsub(channel))
    return int(counts.get(channel, 0)) >= n


async def test_result_notices_a_silently_dropped_connection_and_returns(
    make_runner: MakeRunner, redis_url: str, redis: Redis, namespace: str, make_proxy: MakeProxy
) -> None:
    proxy = proxied(redis_url, make_proxy)
    producer = TaskRunner(through(proxy.port), namespace=namespace)
    runner = make_runner()  # the worker's side talks to Redis directly
    gate = anyio.Event()

    @runner.task(name="gated")
    async def gated() -> str:
        await gate.wait()
        return "done"

    @producer.task(name="gated")
    async def gated_there() -> str:
        raise NotImplementedError

    async with producer, runner, runner.worker(handle_signals=False):
        job = await gated_there.enqueue()
        results: list[str] = []

        async def wait_for_it() -> None:
            # The case: a dead link made result(timeout=40) time out.
            results.append(await job.result(timeout=40))

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait_for_it)
            channel = (await producer.client.locate("default", job.id)).done(job.id)
            await wait_until(lambda: subscribed(redis, channel), DEADLINE)
            proxy.drop_open()  # the producer's connections go silent, no close
            gate.set()  # the job succeeds; its done message is lost on the dead link
        # Noticed within 10 s (the link's PING watchdog, and the read timeout of its
        # connection), re-subscribed on a new connection, the status re-read: the
        # result, measured about 10.5 s after the cut.
    assert results == ["done"]


async def test_a_worker_catches_an_abort_sent_while_its_link_was_silently_dead(
    redis_url: str, redis: Redis, namespace: str, make_proxy: MakeProxy
) -> None:
    proxy = proxied(redis_url, make_proxy)
    # Heartbeats a minute apart: a heartbeat cannot be what catches the abort here.
    worker_side = TaskRunner(
        through(proxy.port), namespace=namespace, heartbeat_interval=60, stale_after=120
    )
    producer = TaskRunner(redis_url, namespace=namespace)

    @worker_side.task(name="forever")
    async def forever() -> None:
        await anyio.sleep_forever()

    @producer.task(name="forever")
    async def forever_there() -> None:
        raise NotImplementedError

    async with producer, worker_side, worker_side.worker(handle_signals=False):
        job = await forever_there.enqueue()

        async def running() -> bool:
            return await job.status() == JobStatus.RUNNING

        await wait_until(running, DEADLINE)
        events = worker_side.client.keys("default").events
        await wait_until(lambda: subscribed(redis, events), DEADLINE)
        proxy.drop_open()  # the worker's connections go silent, no close
        assert await job.abort() == JobStatus.RUNNING  # the message is lost
        with pytest.raises(JobAborted):
            await job.result(timeout=DEADLINE)


@pytest.fixture
def spawn(redis_url: str, namespace: str, tmp_path: Path) -> Iterator[Spawn]:
    yield from spawn_workers(redis_url, namespace, tmp_path)


async def test_a_network_cut_longer_than_stale_after_takes_no_live_job(
    redis_url: str, redis: Redis, namespace: str, make_proxy: MakeProxy, spawn: Spawn
) -> None:
    """Two workers, each behind its own proxy, are cut off from Redis (Redis itself
    stays up) for more than twice stale_after. Worker B gets back first; worker A half a
    stale_after later. Every entry of A's running jobs looks stale to B by then; but a
    worker reclaims only after it has itself been connected and heartbeating for
    stale_after, so A renews its leases first: every job runs once, where it started."""
    stale = 2.0
    near_a, near_b = proxied(redis_url, make_proxy), proxied(redis_url, make_proxy)
    producer = TaskRunner(redis_url, namespace=namespace)

    @producer.task(name="hold")
    async def hold(first: float, later: float) -> str:
        raise NotImplementedError

    async with producer:
        a = spawn(url=through(near_a.port), concurrency=6, stale=stale)
        await a.ready()
        jobs = [await hold.enqueue(12, 0) for _ in range(6)]  # attempt 1: 12 s, on A
        for job in jobs:
            await wait_until(count_runs(redis, namespace, job.id, 1), DEADLINE)
        b = spawn(url=through(near_b.port), concurrency=6, stale=stale)
        await b.ready()
        for proxy in (near_a, near_b):
            proxy.blackhole()  # both cut off; Redis up
        await anyio.sleep(2.5 * stale)  # the outage (the scenario's length)
        for proxy in (near_b, near_a):
            proxy.cut()  # calls stuck on the dead connections fail at once
            proxy.resume()
            await anyio.sleep(stale / 2)  # A comes back half a stale_after after B
        results = [await job.result(timeout=DEADLINE) for job in jobs]
        assert all(result == f"{a.pid}:1" for result in results), results
        for job in jobs:
            assert len(await runs(redis, namespace, job.id)) == 1
            assert (await job.info()).reclaims == 0
        assert a.alive
        assert b.alive


async def test_a_burst_worker_waits_out_an_outage_that_begins_after_its_last_empty_read(
    redis_url: str, namespace: str, make_proxy: MakeProxy
) -> None:
    """Redis goes away between the burst worker's empty read and its last look (due
    jobs, outboxes, stale entries): a call of that look fails, and the worker does not
    die of it; it reads again, and runs what was enqueued meanwhile before it exits."""
    proxy = proxied(redis_url, make_proxy)
    tr = TaskRunner(through(proxy.port), namespace=namespace)
    producer = TaskRunner(redis_url, namespace=namespace)

    @tr.task(name="echo")
    async def echo(n: int) -> int:
        return n

    @producer.task(name="echo")
    async def echo_there(n: int) -> int:
        raise NotImplementedError

    looks = 0
    jobs = []

    async def last_look() -> bool:  # a hook of the last look, as the lease middleware's
        nonlocal looks
        looks += 1
        if looks == 1:
            jobs.append(await echo_there.enqueue(7))  # for the read after the outage
            proxy.refuse()
            proxy.cut()
            try:
                await tr.client.redis.ping()  # fails: the look's call during the outage
            finally:
                proxy.accept()  # back for the next read
        return False

    async with producer, tr:
        worker = tr.worker(concurrency=1, burst=True, handle_signals=False)
        worker.on_drained(last_look)
        with anyio.fail_after(DEADLINE):
            await worker.run()
        assert looks == 2
        assert await jobs[0].result(timeout=DEADLINE) == 7


@contextlib.asynccontextmanager
async def client_through(proxy: Any, options: PoolOptions) -> AsyncIterator[Redis]:
    """taskrunner's client of the test's Redis through ``proxy`` (closed at the end)."""
    connection = await open_connection(through(proxy.port), options)
    try:
        yield connection.redis
    finally:
        await connection.aclose()


@contextlib.asynccontextmanager
async def taken_from_pool(redis: Redis) -> AsyncIterator[Any]:
    """One connection of ``redis``'s pool, given back at the end."""
    pool = cast(Any, redis).connection_pool
    conn = await pool.get_connection()
    try:
        yield conn
    finally:
        await pool.release(conn)


async def test_a_write_the_server_does_not_take_in_time_fails_and_drops_the_connection(
    redis_url: str, make_proxy: MakeProxy
) -> None:
    """A command written into a connection whose peer stopped reading times out after
    ``socket_timeout`` (taskrunner's connections hand a write to the transport at once
    and wait for it only when it cannot all go out), and the connection is dropped; a
    call once the peer reads again goes out on a new one."""
    proxy = proxied(redis_url, make_proxy)
    async with client_through(proxy, PoolOptions(socket_timeout=0.5)) as redis:
        assert await redis.set("blackhole:small", "x")
        async with taken_from_pool(redis) as conn:
            proxy.stall()
            big = "x" * (64 << 20)  # more than the socket buffers and the proxy hold
            with pytest.raises(RedisTimeoutError, match="Timeout writing to socket"):
                await conn.send_packed_command(conn.pack_command("SET", "blackhole:big", big))
            assert not conn.is_connected
        proxy.resume()
        assert await redis.get("blackhole:small") == "x"
        assert await redis.exists("blackhole:big") == 0


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_pooled_connection_the_peer_reset_fails_as_a_connection_error(
    redis_url: str, make_proxy: MakeProxy, loop: str
) -> None:
    """A connection reset (RST) while it sits in the pool fails its next write as a
    ConnectionError, which every caller handles (uvloop raises RuntimeError for a
    write on a closed transport, and that took a CLI worker down), and is dropped; the
    next call goes out on a new connection."""
    proxy = proxied(redis_url, make_proxy)

    async def scenario() -> None:
        async with client_through(proxy, PoolOptions()) as redis:
            assert await redis.set("reset:key", "x")
            async with taken_from_pool(redis) as conn:
                proxy.cut()

                async def closed() -> bool:
                    return bool(conn._writer.transport.is_closing())

                await wait_until(closed)  # the loop closed the transport on the RST
                with pytest.raises(RedisConnectionError):
                    await conn.send_packed_command(conn.pack_command("GET", "reset:key"))
                assert not conn.is_connected
            assert await redis.get("reset:key") == "x"

    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(scenario())


async def test_a_cli_worker_rides_out_a_reset_of_its_idle_connections(
    cli_workers: StartWorker, redis_url: str, namespace: str, make_proxy: MakeProxy
) -> None:
    """A worker process (the CLI runs on uvloop) whose connections are all reset while
    it waits for work keeps running and takes the next job."""
    proxy = proxied(redis_url, make_proxy)
    producer = TaskRunner(redis_url, namespace=namespace)
    tasks = declare(producer)
    worker = cli_workers(CORE_APP, env={"TASKRUNNER_REDIS_URL": through(proxy.port)})
    async with producer:
        first = await tasks.add.enqueue(1, 2)
        assert await first.result(timeout=DEADLINE) == 3
        proxy.cut()  # every open connection: the pool's idle ones, the listener's
        second = await tasks.add.enqueue(3, 4)
        assert await second.result(timeout=DEADLINE) == 7
    assert worker.alive, worker.output()
