"""The process-wide pub/sub link: a subscription survives a dead connection (black hole,
restart, cluster failover) and its listener is told to re-read what it waits for."""

from __future__ import annotations

import asyncio
import contextlib
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


async def test_a_channel_given_up_and_wanted_again_at_once_stays_subscribed(
    redis_url: str,
) -> None:
    """A wait that timed out gives its channel up (the UNSUBSCRIBE is sent by a task of
    its own) and a new wait on the same job takes it again at once: the late UNSUBSCRIBE
    must not drop the channel the new wait was confirmed on (it did: the second
    ``result()`` then waited for its re-read, up to 10 s, and a progress follower
    missed most values)."""
    connection = await open_connection(redis_url, PoolOptions())
    admin = await open_connection(redis_url, PoolOptions())
    subscriber = Subscriber(connection)
    quiet = handler(lambda message: None, lambda: None)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(subscriber.run)
            for round_ in range(20):
                channel = f"t:again:{round_}"
                got: list[str] = []
                first = handler(lambda message: None, lambda: None)
                await subscriber.subscribe(channel, first)
                subscriber.unsubscribe(channel, first)
                for _ in range(round_ % 4):  # the give-up's task runs before, or after
                    await asyncio.sleep(0)
                await subscriber.subscribe(channel, handler(got.append, lambda: None))
                # a later subscription on the same link is sent after whatever the
                # give-up sent, and confirmed after the server handled it
                await subscriber.subscribe(f"t:again:sync:{round_}", quiet)
                numsub = dict(await admin.redis.pubsub_numsub(channel))
                assert numsub[channel] == 1, f"round {round_}: the channel was dropped"
                await admin.redis.publish(channel, "done")

                async def heard(got: list[str] = got) -> bool:
                    return got == ["done"]

                await wait_until(heard, DEADLINE, interval=0.01)
            tg.cancel_scope.cancel()
    finally:
        await connection.aclose()
        await admin.aclose()


async def test_a_subscribe_cancelled_while_it_waits_leaves_no_handler_or_channel(
    redis_url: str,
) -> None:
    """A ``result(timeout=...)`` whose timeout lands while it subscribes: the handler
    it registered and the channel must go with it (they stayed for the process's
    life: a slow leak of subscriptions in a web app with short timeouts)."""
    connection = await open_connection(redis_url, PoolOptions())
    admin = await open_connection(redis_url, PoolOptions())
    subscriber = Subscriber(connection)
    quiet = handler(lambda message: None, lambda: None)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(subscriber.run)
            await subscriber.subscribe("t:cancel:up", quiet)  # the session is up
            cut: list[int] = []
            for steps in range(12):
                channel = f"t:cancel:{steps}"
                waiting = asyncio.ensure_future(subscriber.subscribe(channel, quiet))
                for _ in range(steps):
                    await asyncio.sleep(0)
                waiting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiting
                if waiting.cancelled():
                    cut.append(steps)
                else:  # it was confirmed first: its caller gives it up as usual
                    subscriber.unsubscribe(channel, quiet)
                await subscriber.subscribe(f"t:cancel:sync:{steps}", quiet)
                assert all(channel not in link.channels for link in subscriber._links.values()), (
                    steps
                )
                numsub = dict(await admin.redis.pubsub_numsub(channel))
                assert numsub[channel] == 0, f"{steps} steps: the channel stayed subscribed"
            assert len([steps for steps in cut if steps > 0]) >= 3  # cut while under way
            tg.cancel_scope.cancel()
    finally:
        await connection.aclose()
        await admin.aclose()
