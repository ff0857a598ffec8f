"""The process-wide pub/sub link: a subscription survives a dead connection (black hole,
restart, cluster failover) and its listener is told to re-read what it waits for."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
from conftest import wait_until
from topology import MakeTopology

from taskrunner.connection import PoolOptions, open_connection
from taskrunner.subscriber import Subscriber, handler

DEADLINE = 60.0


async def publish(redis: Any, command: str, channel: str, message: str) -> None:
    await redis.execute_command(command, channel, message)


async def test_a_sharded_subscription_follows_its_slot_through_a_cluster_failover(
    make_topology: MakeTopology,
) -> None:
    topology = await anyio.to_thread.run_sync(lambda: make_topology("cluster"))
    connection = await open_connection(topology.url, PoolOptions())
    publisher = await open_connection(topology.url, PoolOptions())
    subscriber = Subscriber(connection, ping_interval=1.0, ping_timeout=1.0)
    got: list[str] = []
    resubscribed = asyncio.Event()
    channel = "t:{failover}:events"
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(subscriber.run)
            await subscriber.subscribe(channel, handler(got.append, resubscribed.set))
            command = connection.publish_command
            await publish(publisher.redis, command, channel, "before")

            async def heard(text: str) -> bool:
                return text in got

            await wait_until(lambda: heard("before"), DEADLINE)
            killed = topology.kill_master(key=channel)
            late: list[str] = []
            other = "t:{failover}:late"  # subscribed while the node is down
            tg.start_soon(subscriber.subscribe, other, handler(late.append, lambda: None))
            await anyio.to_thread.run_sync(topology.wait_failover, killed)
            with anyio.fail_after(DEADLINE):
                await resubscribed.wait()  # the listener re-reads what it waits for

            async def publish_until_heard() -> bool:
                await publish(publisher.redis, command, channel, "after")
                await publish(publisher.redis, command, other, "late")
                return "after" in got and "late" in late

            await wait_until(publish_until_heard, DEADLINE, interval=0.2)
            tg.cancel_scope.cancel()
    finally:
        await connection.aclose()
        await publisher.aclose()


async def test_a_worker_stopping_while_a_listener_subscribes_stops_cleanly(redis_url: str) -> None:
    """A worker stops (its services' task group is cancelled) while a listener is still
    subscribing, as a burst worker of ``run_until_idle`` often does: the link's
    session closes its connection as it ends, while the subscribe writes on it. That
    subscribe raised AttributeError from redis-py (a write on a closed connection),
    which the stopping worker raised instead of stopping (seen on a sentinel topology
    under load). The stop lands at every step of the subscribe in turn: each one must
    end with the cancellation alone, and leave no socket open."""
    quiet = handler(lambda message: None, lambda: None)
    for steps in range(40):
        connection = await open_connection(redis_url, PoolOptions())
        subscriber = Subscriber(connection)
        try:
            async with anyio.create_task_group() as services:
                services.start_soon(subscriber.run)
                await subscriber.subscribe("t:stop:first", quiet)  # the session is up
                services.start_soon(subscriber.subscribe, f"t:stop:{steps}", quiet)
                for _ in range(steps):
                    await asyncio.sleep(0)
                services.cancel_scope.cancel()  # the worker stops
        finally:
            await connection.aclose()


async def test_a_listener_is_told_when_redis_py_reconnects_the_link_by_itself(
    redis_url: str,
) -> None:
    """A pub/sub connection the server drops (CLIENT KILL here; an idle timeout, a proxy)
    is mostly reconnected inside redis-py: the read that failed is retried on a new
    connection, and redis-py subscribes the channels again, in the same session. What
    was published in between is lost, so the listener must be told to re-read, as after
    a new session (a progress follower hung when its value was published in that gap)."""
    connection = await open_connection(redis_url, PoolOptions())
    admin = await open_connection(redis_url, PoolOptions())
    subscriber = Subscriber(connection)
    got: list[str] = []
    told: list[None] = []
    channel = "t:reconnect:events"
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(subscriber.run)
            await subscriber.subscribe(channel, handler(got.append, lambda: told.append(None)))
            before = len(told)
            assert await admin.redis.client_kill_filter(_type="pubsub") >= 1

            async def told_again() -> bool:
                return len(told) > before

            await wait_until(told_again, DEADLINE)

            async def publish_until_heard() -> bool:
                await admin.redis.publish(channel, "after")
                return "after" in got

            await wait_until(publish_until_heard, DEADLINE, interval=0.05)
            tg.cancel_scope.cancel()
    finally:
        await connection.aclose()
        await admin.aclose()
