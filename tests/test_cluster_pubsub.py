"""Sharded pub/sub on a Redis 7 cluster: one SSUBSCRIBE (or SUNSUBSCRIBE) may only name
channels of one hash slot (CROSSSLOT otherwise), while one node serves many slots. A
worker following several queues or partitions, whose events channels live on the same
node in different slots, must have every subscription confirmed at once: when the
channels went out in one SSUBSCRIBE, the node refused it, start-up waited the whole
``CONFIRM_WAIT`` and no event reached the worker. The same holds when the link
subscribes its channels again, after redis-py reconnected it by itself. The subscriber
tests also run on standalone Redis and Sentinel (plain SUBSCRIBE, any channels at once).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, cast

import anyio
import pytest
from conftest import wait_until
from redis.asyncio import RedisCluster
from topology import Topology

from taskrunner import TaskRunner
from taskrunner.connection import Connection, PoolOptions, open_connection
from taskrunner.subscriber import Subscriber, handler

MakeRunner = Callable[..., TaskRunner]
DEADLINE = 20.0
PROMPTLY = 5.0
"""Seconds within which a subscription is confirmed: well below ``CONFIRM_WAIT``."""
CHANNELS = 12
"""Channels of distinct hash tags: on 3 nodes, some node serves several of their slots."""


async def crossslot_errors(connection: Connection) -> int:
    """How many CROSSSLOT errors the deployment's servers replied so far (INFO errorstats,
    summed over the masters of a cluster)."""
    redis: Any = connection.redis
    if connection.cluster:
        cluster = cast(RedisCluster, redis)
        replies = [
            await cluster.info("errorstats", target_nodes=node) for node in cluster.get_primaries()
        ]
    else:
        replies = [await redis.info("errorstats")]
    return sum(int(reply.get("errorstat_CROSSSLOT", {}).get("count", 0)) for reply in replies)


def slots_by_node(connection: Connection, channels: list[str]) -> dict[str, set[int]]:
    """The slots of ``channels`` per cluster node that serves them."""
    cluster = cast(RedisCluster, connection.redis)
    found: dict[str, set[int]] = {}
    for channel in channels:
        node = cluster.get_node_from_key(channel)
        assert node is not None, channel
        found.setdefault(node.name, set()).add(cluster.keyslot(channel))
    return found


def assert_one_node_serves_several_slots(connection: Connection, channels: list[str]) -> None:
    """The precondition of the bug: some node serves channels of different slots."""
    if connection.sharded_pubsub:
        assert max(len(s) for s in slots_by_node(connection, channels).values()) >= 2


async def kill_pubsub_connections(connection: Connection) -> int:
    """CLIENT KILL TYPE pubsub on every node (a proxy's or NAT's drop, on purpose): on
    Redis 6.2 a cluster's pub/sub is not sharded and its one link may be on a replica."""
    redis: Any = connection.redis
    if not connection.cluster:
        return int(await redis.client_kill_filter(_type="pubsub"))
    cluster = cast(RedisCluster, redis)
    killed = 0
    for node in cluster.get_nodes():
        killed += int(await cluster.client_kill_filter(_type="pubsub", target_nodes=node))
    return killed


class Heard:
    """What each channel's handler got, and how often it was told to re-read."""

    def __init__(self, channels: list[str]) -> None:
        self.messages: dict[str, list[str]] = {c: [] for c in channels}
        self.told: dict[str, int] = dict.fromkeys(channels, 0)

    def handler_of(self, channel: str) -> Any:
        def resubscribed() -> None:
            self.told[channel] += 1

        return handler(self.messages[channel].append, resubscribed)


async def publish_until_heard(
    publisher: Connection, channels: list[str], heard: Heard, text: str
) -> None:
    """Publish ``text`` on every channel until each handler got it (a subscription
    confirmed before is heard at the first publish; the retries only bound the wait)."""

    redis: Any = publisher.redis

    async def all_heard() -> bool:
        for channel in channels:
            if text not in heard.messages[channel]:
                await redis.execute_command(publisher.publish_command, channel, text)
        return all(text in heard.messages[c] for c in channels)

    await wait_until(all_heard, DEADLINE, interval=0.2)


@pytest.mark.topologies("cluster", "standalone", "sentinel")
async def test_channels_of_several_slots_subscribed_before_the_link_is_up_are_all_confirmed(
    topology: Topology, namespace: str
) -> None:
    """Listeners subscribe before the link's session is up (a worker starting): the
    session subscribes them together, one SSUBSCRIBE per slot, so each is confirmed
    at once and hears what is published; no server replies CROSSSLOT."""
    connection = await open_connection(topology.url, PoolOptions())
    publisher = await open_connection(topology.url, PoolOptions())
    channels = [f"{namespace}:{{c{i}}}:events" for i in range(CHANNELS)]
    assert_one_node_serves_several_slots(connection, channels)
    heard = Heard(channels)
    subscriber = Subscriber(connection)
    errors = await crossslot_errors(publisher)
    try:
        async with anyio.create_task_group() as tg:
            with anyio.fail_after(PROMPTLY):
                async with anyio.create_task_group() as subscribing:
                    for channel in channels:
                        subscribing.start_soon(
                            subscriber.subscribe, channel, heard.handler_of(channel)
                        )
                    # Run after the listeners subscribed (start_soon keeps the order):
                    # the link's first session finds their channels all waiting.
                    tg.start_soon(subscriber.run)
            await publish_until_heard(publisher, channels, heard, "hello")
            assert await crossslot_errors(publisher) == errors
            tg.cancel_scope.cancel()
    finally:
        await connection.aclose()
        await publisher.aclose()


@pytest.mark.topologies("cluster", "standalone", "sentinel")
async def test_a_link_reconnected_by_redis_py_subscribes_each_slot_again(
    topology: Topology, namespace: str
) -> None:
    """Channels of several slots on one node, subscribed one by one; the server then
    drops the pub/sub connections and redis-py reconnects them and subscribes their
    channels again in the same session: again one SSUBSCRIBE per slot, so every
    listener is told to re-read and hears what is published after it."""
    connection = await open_connection(topology.url, PoolOptions())
    publisher = await open_connection(topology.url, PoolOptions())
    channels = [f"{namespace}:{{r{i}}}:events" for i in range(CHANNELS)]
    assert_one_node_serves_several_slots(connection, channels)
    heard = Heard(channels)
    subscriber = Subscriber(connection)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(subscriber.run)
            with anyio.fail_after(PROMPTLY * 2):
                for channel in channels:
                    await subscriber.subscribe(channel, heard.handler_of(channel))
            await publish_until_heard(publisher, channels, heard, "before")
            errors = await crossslot_errors(publisher)
            told = dict(heard.told)
            assert await kill_pubsub_connections(publisher) >= 1

            async def everyone_told() -> bool:
                return all(heard.told[c] > told[c] for c in channels)

            await wait_until(everyone_told, DEADLINE)
            await publish_until_heard(publisher, channels, heard, "after")
            assert await crossslot_errors(publisher) == errors
            tg.cancel_scope.cancel()
    finally:
        await connection.aclose()
        await publisher.aclose()


@pytest.mark.topologies("cluster")
async def test_a_worker_following_several_queues_and_partitions_starts_without_waiting(
    make_runner: MakeRunner, topology: Topology, caplog: pytest.LogCaptureFixture
) -> None:
    """The auditor's case: a worker of two queues of 3 partitions on a 3-node cluster
    (6 events channels, so a node serves several of their slots). Every subscription is
    confirmed (nothing is logged about refused or unconfirmed subscriptions, which a
    start-up that waited ``CONFIRM_WAIT`` logs), no CROSSSLOT error, and an event on
    each partition reaches the worker."""
    caplog.set_level(logging.INFO, logger="taskrunner")
    tr = make_runner(partitions=3)
    queues = ["alpha", "beta"]

    @tr.task(queue="alpha")
    async def first() -> None: ...

    @tr.task(queue="beta")
    async def second() -> None: ...

    got: list[tuple[str, str]] = []
    async with tr:
        connection = tr.client.connection
        redis: Any = connection.redis
        partitions = [tr.client.keys(q, p) for q in queues for p in range(3)]
        for queue in queues:
            assert (await tr.client.resolve(queue)).partitions == 3
        channels = [keys.events for keys in partitions]
        assert_one_node_serves_several_slots(connection, channels)  # when sharded (Redis 7)
        errors = await crossslot_errors(connection)
        worker = tr.worker(queues=queues, handle_signals=False)
        worker.on_event("probe", lambda queue, argument: got.append((queue, argument)))
        async with worker:  # waits for its subscriptions (at most CONFIRM_WAIT, warning then)

            async def every_partition_heard() -> bool:
                for keys in partitions:
                    if (keys.queue, keys.prefix) not in got:
                        command = connection.publish_command
                        await redis.execute_command(command, keys.events, f"probe {keys.prefix}")
                return all((k.queue, k.prefix) in got for k in partitions)

            await wait_until(every_partition_heard, DEADLINE, interval=0.2)
        assert await crossslot_errors(connection) == errors
    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [m for m in logged if "not confirmed" in m or "same slot" in m], logged
