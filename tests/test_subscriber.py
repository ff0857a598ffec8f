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
