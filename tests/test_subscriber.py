"""The process-wide pub/sub link: a subscription survives a dead connection (black hole,
restart, cluster failover) and its listener is told to re-read what it waits for."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from conftest import wait_until
from redis.asyncio import Redis
from topology import MakeTopology

from taskrunner import JobStatus, TaskRunner
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


@pytest.mark.parametrize("kind", ["standalone", "cluster"])
async def test_a_channel_given_up_and_wanted_again_at_once_stays_subscribed(
    make_topology: MakeTopology, redis_url: str, kind: str
) -> None:
    """A wait that timed out gives its channel up (the UNSUBSCRIBE is sent by a task of
    its own) and a new wait on the same job takes it again at once: the late UNSUBSCRIBE
    must not drop the channel the new wait was confirmed on (it did: the second
    ``result()`` then waited for its re-read, up to 10 s, and a progress follower
    missed most values). On a cluster with sharded pub/sub, the reply to that
    SUNSUBSCRIBE must not read as the slot moving either (no resubscription)."""
    if kind == "cluster":
        url = (await anyio.to_thread.run_sync(lambda: make_topology("cluster"))).url
    else:
        url = redis_url
    connection = await open_connection(url, PoolOptions())
    admin = await open_connection(url, PoolOptions())
    subscriber = Subscriber(connection)
    told: list[str] = []
    quiet = handler(lambda message: None, lambda: told.append("sync"))
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(subscriber.run)
            await subscriber.subscribe("t:{again}:up", handler(lambda m: None, lambda: None))
            for round_ in range(20):
                channel = f"t:{{again}}:{round_}"
                got: list[str] = []
                first = handler(lambda message: None, lambda: told.append("first"))
                await subscriber.subscribe(channel, first)
                subscriber.unsubscribe(channel, first)
                for _ in range(round_ % 4):  # the give-up's task runs before, or after
                    await asyncio.sleep(0)
                await subscriber.subscribe(channel, handler(got.append, lambda: told.append("x")))
                # a later subscription on the same link (same slot) is sent after whatever
                # the give-up sent, and confirmed after the server handled it
                await subscriber.subscribe(f"t:{{again}}:sync:{round_}", quiet)
                await publish(admin.redis, connection.publish_command, channel, "done")

                async def heard(got: list[str] = got) -> bool:
                    return got == ["done"]

                await wait_until(heard, DEADLINE, interval=0.01)
            tg.cancel_scope.cancel()
    finally:
        await connection.aclose()
        await admin.aclose()
    assert told == []  # no session was restarted


async def test_a_result_wait_cancelled_while_it_subscribes_leaves_nothing_subscribed(
    make_runner: Callable[..., TaskRunner], redis: Redis
) -> None:
    """A ``result()`` whose caller is cancelled (a timeout, a request gone) at any step
    of its subscribe: the handler it registered and the channel go with it (they stayed
    for the process's life: a slow leak of subscriptions in a web app with short
    timeouts)."""
    tr = make_runner()

    @tr.task
    async def never_run() -> None: ...

    quiet = handler(lambda message: None, lambda: None)
    async with tr:
        job = await never_run.enqueue()  # no worker: it stays queued
        subscriber = tr.client.subscriber()
        await subscriber.subscribe("t:wait:up", quiet)  # the link is up
        channel = tr.client.keys("default").done(job.id)
        cut: list[int] = []
        for steps in range(12):
            waiting = asyncio.ensure_future(job.result())
            for _ in range(steps):
                await asyncio.sleep(0)
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiting
            cut.append(steps)
            await subscriber.subscribe(f"t:wait:sync:{steps}", quiet)  # after its give-up
            links = subscriber._links.values()
            assert all(channel not in link.channels for link in links), steps
            numsub = dict(await redis.pubsub_numsub(channel))
            assert numsub[channel] == 0, f"{steps} steps: the channel stayed subscribed"
        assert await job.status() == JobStatus.QUEUED


async def test_a_subscription_given_up_waiting_for_stays_asked_for(
    redis_url: str,
) -> None:
    """A worker's event listener stops waiting for a confirmation that is slow (a
    failover, a paused server) but keeps the subscription asked for: once the server
    confirms it, its messages arrive (a cleanup of given-up waits once unsubscribed it
    for the worker's life)."""
    connection = await open_connection(redis_url, PoolOptions())
    admin = await open_connection(redis_url, PoolOptions())
    subscriber = Subscriber(connection)
    quiet = handler(lambda message: None, lambda: None)
    got: list[str] = []
    channel = "t:slow:events"
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(subscriber.run)
            await subscriber.subscribe("t:slow:up", quiet)  # the session is up
            await admin.redis.client_pause(1500)  # every command of every client waits
            with anyio.move_on_after(0.3) as waited:
                await subscriber.subscribe(channel, handler(got.append, lambda: None))
            assert waited.cancelled_caught  # the server answers nothing while paused

            async def publish_until_heard() -> bool:
                await admin.redis.publish(channel, "ready")
                return "ready" in got

            await wait_until(publish_until_heard, DEADLINE, interval=0.05)
            tg.cancel_scope.cancel()
    finally:
        await connection.aclose()
        await admin.aclose()
