"""Pub/sub for a whole process: one connection (one per node of a cluster with sharded
pub/sub) shared by every listener, with a watchdog that notices a dead connection.

Listeners subscribe a channel with a handler; ``subscribe`` returns once the server
confirmed the subscription, so a message published after it is never missed while the
connection lives. A connection can die silently (a NAT or load balancer dropping an idle
flow): every ``ping_interval`` of silence the link sends a PING and, if nothing at all
comes back within ``ping_timeout``, drops the connection and opens a new one. So a dead
connection is noticed within ``ping_interval + ping_timeout`` (10 s by default). After
every (re)subscription each handler's ``resubscribed()`` runs: messages published while
the link was down are lost, so listeners re-read the state they wait for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, cast

import anyio

from taskrunner.connection import REDIS_ERRORS, Connection, reachable, report

if TYPE_CHECKING:
    from redis.asyncio import Redis, RedisCluster
    from redis.asyncio.client import PubSub

logger = logging.getLogger("taskrunner.pubsub")

PING_INTERVAL = 5.0
PING_TIMEOUT = 5.0
_TICK = 1.0
_BACKOFF = 0.5


class Handler(Protocol):
    def message(self, data: str) -> None:
        """A message on the channel (any text: hostile bytes arrive as surrogates)."""

    def resubscribed(self) -> None:
        """The link was re-established: messages may have been missed."""


class SlotMoved(Exception):
    """A sharded channel's slot moved to another node: the link re-homes it."""


class _Callbacks:
    """A Handler from two plain callbacks."""

    def __init__(self, message: Callable[[str], None], resubscribed: Callable[[], None]) -> None:
        self.message = message
        self.resubscribed = resubscribed


def handler(message: Callable[[str], None], resubscribed: Callable[[], None]) -> Handler:
    return _Callbacks(message, resubscribed)


class _Link:
    """One pub/sub connection and its channels."""

    def __init__(
        self, owner: Subscriber, name: str, client: Redis, sharded: bool, owned: bool
    ) -> None:
        self.owner = owner
        self.name = name
        self.client = client
        self.sharded = sharded
        self.owned = owned
        """The link made ``client`` (a cluster node's) and closes it when it ends."""
        self.channels: dict[str, set[Handler]] = {}
        self.pubsub: PubSub | None = None
        self.confirmed: set[str] = set()
        self._resubscribing: set[str] = set()
        self._leaving: dict[str, int] = {}
        """Sharded channels this session unsubscribed, by replies still to come: such a
        reply is no sign that the slot moved, even if the channel is wanted again."""
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._sending = anyio.Lock()
        """Held by a listener's (un)subscribe on the session's connection, and by the
        session to close it: redis-py cannot write on a connection that another task is
        closing (it raises AttributeError, and leaks the socket)."""

    async def add(self, channel: str, h: Handler) -> None:
        first = channel not in self.channels
        self.channels.setdefault(channel, set()).add(h)
        if channel in self.confirmed:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(channel, []).append(future)
        if first:
            await self._subscribe_now(channel)
        await future

    def adopt(
        self, channel: str, handlers: set[Handler], waiters: list[asyncio.Future[None]]
    ) -> None:
        """Take over a channel from a link whose node no longer serves its slot; its
        handlers are told (``resubscribed``) once the subscription is confirmed here."""
        first = channel not in self.channels
        self.channels.setdefault(channel, set()).update(handlers)
        self._waiters.setdefault(channel, []).extend(waiters)
        self._resubscribing.add(channel)
        if first:
            self.owner.spawn(lambda: self._subscribe_now(channel))

    async def _subscribe_now(self, channel: str) -> None:
        async with self._sending:
            pubsub = self.pubsub
            if pubsub is None:
                return  # the next session subscribes it
            try:
                await self._subscribe(pubsub, [channel])
            except Exception as exc:  # noqa: BLE001 - the next session subscribes it
                if not isinstance(exc, REDIS_ERRORS):  # a bug of ours or of redis-py
                    logger.warning("subscribing %s failed: %r; reconnecting", channel, exc)
                # Drop the connection: a new session subscribes everything.
                connection = pubsub.connection
                if connection is not None:
                    with contextlib.suppress(Exception):
                        await connection.disconnect()

    def release(self, channel: str) -> tuple[set[Handler], list[asyncio.Future[None]]]:
        """Give a channel up (to another link): its handlers and waiters."""
        handlers = self.channels.pop(channel, set())
        self.confirmed.discard(channel)
        self._resubscribing.discard(channel)
        return handlers, self._waiters.pop(channel, [])

    def remove(self, channel: str, h: Handler) -> None:
        found = self.channels.get(channel)
        if found is None:
            return
        found.discard(h)
        if found:
            return
        del self.channels[channel]
        self.confirmed.discard(channel)
        self._waiters.pop(channel, None)  # only waits given up (cancelled) are left
        pubsub = self.pubsub
        if pubsub is not None:
            self.owner.spawn(lambda: self._unsubscribe(pubsub, channel))

    async def _subscribe(self, pubsub: PubSub, channels: list[str]) -> None:
        if not self.sharded:
            await pubsub.subscribe(*channels)
            return
        # One SSUBSCRIBE per hash slot: a node serves many slots, but refuses (CROSSSLOT)
        # an SSUBSCRIBE whose channels are not all of one slot.
        for group in self.owner.by_slot(channels):
            await pubsub.ssubscribe(*group)

    async def _unsubscribe(self, pubsub: PubSub, channel: str) -> None:
        async with self._sending:
            if pubsub is not self.pubsub:
                return  # that session ended: the next one does not subscribe it
            if channel in self.channels:
                return  # wanted again since (its adder subscribed it): keep it
            with contextlib.suppress(*REDIS_ERRORS):
                if not self.sharded:
                    await pubsub.unsubscribe(channel)
                    return
                self._leaving[channel] = self._leaving.get(channel, 0) + 1
                try:
                    await pubsub.sunsubscribe(channel)
                except BaseException:  # not sent, or its reply will not come on this link
                    self._left(channel)
                    raise

    async def run(self) -> None:
        try:
            while True:
                try:
                    await self._session()
                except Exception as exc:  # noqa: BLE001 - a link never dies of one failure
                    report("pub/sub", exc)
                await anyio.sleep(_BACKOFF)
                if self.owner.connection.cluster and not await self.owner.rehome(self):
                    return  # every channel moved to other nodes' links
        finally:
            if self.owned:
                with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await self.client.aclose()

    async def _session(self) -> None:
        pubsub = self.client.pubsub()
        self.confirmed = set()
        self._leaving = {}
        self._resubscribing = set(self.channels)
        connection: Any = None
        try:
            # Connected first (concurrent commands on a PubSub that has no connection
            # yet would each take one of their own), then published: a channel added
            # from now on is subscribed by its adder, one added before is in the list
            # below (a channel sent twice is harmless).
            await pubsub.connect()  # type: ignore[no-untyped-call]
            connection = pubsub.connection
            if connection is not None:  # told when redis-py reconnects it by itself
                connection.register_connect_callback(self._reconnected)
                if self.sharded:  # redis-py's own would send one SSUBSCRIBE of all slots
                    connection.deregister_connect_callback(pubsub.on_connect)
                    connection.register_connect_callback(self._resubscribe_by_slot)
            self.pubsub = pubsub
            if self.channels:
                await self._subscribe(pubsub, list(self.channels))
            else:
                await pubsub.ping()  # connect, so that silence can be measured
            await self._listen(pubsub)
        finally:
            self.pubsub = None
            if connection is not None:  # it goes back to the client's pool
                connection.deregister_connect_callback(self._resubscribe_by_slot)
                connection.deregister_connect_callback(self._reconnected)
            with anyio.CancelScope(shield=True):
                async with self._sending:  # a listener's subscribe in flight ends first
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _reconnected(self, connection: Any) -> None:
        """redis-py reconnected this session's connection by itself (it retries a read
        that failed on a dropped connection) and subscribes its channels again: the
        messages published in between are lost, so each handler is told once the
        server confirms its channel, as after a new session."""
        self.confirmed = set()
        self._leaving = {}
        self._resubscribing = set(self.channels)

    async def _resubscribe_by_slot(self, connection: Any) -> None:
        """In place of redis-py's resubscription of a reconnected sharded session (it
        names every channel in one SSUBSCRIBE): the wanted channels, one SSUBSCRIBE per
        slot. Called by redis-py inside the session's read, before it reads again."""
        pubsub = self.pubsub
        if pubsub is None or pubsub.connection is not connection:
            return  # that session ended: the next one subscribes everything
        pubsub.pending_unsubscribe_shard_channels.clear()
        await self._subscribe(pubsub, list(self.channels))

    async def _listen(self, pubsub: PubSub) -> None:
        heard = time.monotonic()
        pinged: float | None = None
        while True:
            message = await pubsub.get_message(timeout=_TICK)
            now = time.monotonic()
            if message is not None:
                heard, pinged = now, None
                reachable()
                self._handle(message)
                continue
            if pinged is not None and now - pinged > self.owner.ping_timeout:
                raise TimeoutError(
                    f"no reply to PING within {self.owner.ping_timeout:g}s (connection dead)"
                )
            if pinged is None and now - heard > self.owner.ping_interval:
                await pubsub.ping()
                pinged = now

    def _handle(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        channel = message.get("channel")
        if kind in ("subscribe", "ssubscribe") and isinstance(channel, str):
            self._confirmed(channel)
        elif kind == "sunsubscribe" and isinstance(channel, str) and self._left(channel):
            pass  # the reply to our own SUNSUBSCRIBE
        elif kind == "sunsubscribe" and channel in self.channels:
            # The server dropped a wanted channel: its slot moved (a reshard, a failover).
            raise SlotMoved(f"the slot of {channel!r} moved")
        elif kind in ("message", "smessage") and isinstance(channel, str):
            data = message.get("data")
            for h in list(self.channels.get(channel, ())):
                self.owner.call(h.message, data if isinstance(data, str) else str(data))

    def _left(self, channel: str) -> bool:
        count = self._leaving.get(channel, 0)
        if count <= 1:
            self._leaving.pop(channel, None)
        else:
            self._leaving[channel] = count - 1
        return count > 0

    def _confirmed(self, channel: str) -> None:
        self.confirmed.add(channel)
        for future in self._waiters.pop(channel, []):
            if not future.done():
                future.set_result(None)
        if channel in self._resubscribing:  # subscribed again by a new session
            self._resubscribing.discard(channel)
            for h in list(self.channels.get(channel, ())):
                self.owner.call(h.resubscribed)


class Subscriber:
    """Process-wide pub/sub over one Redis deployment; ``run()`` it in a task group."""

    def __init__(
        self,
        connection: Connection,
        *,
        ping_interval: float = PING_INTERVAL,
        ping_timeout: float = PING_TIMEOUT,
    ) -> None:
        self.connection = connection
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self._links: dict[str, _Link] = {}
        self._tg: anyio.abc.TaskGroup | None = None

    async def run(self) -> None:
        """Keep every link alive until cancelled."""
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                for link in self._links.values():
                    tg.start_soon(link.run)
                await anyio.sleep_forever()
        finally:
            self._tg = None

    def spawn(self, fn: Callable[[], Any]) -> None:
        if self._tg is not None:
            self._tg.start_soon(fn)

    def call(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            logger.exception("a pub/sub handler failed; the message is dropped")

    async def subscribe(self, channel: str, h: Handler) -> None:
        """Subscribe ``h`` to ``channel``; returns once the server confirmed it. A
        caller that stops waiting (cancelled, timed out) stays subscribed until it calls
        ``unsubscribe``: a worker's event listener keeps asking for a subscription that
        is slow to be confirmed; a one-off wait gives it up in its ``finally``."""
        await self._link(channel).add(channel, h)

    async def rehome(self, link: _Link) -> bool:
        """After ``link`` failed on a cluster: refresh the slot map, move its channels to
        the links of the nodes that now serve them (a non-sharded link moves to a live
        node). False when nothing is left for ``link`` to do."""
        cluster = cast("RedisCluster", self.connection.redis)
        with contextlib.suppress(*REDIS_ERRORS):
            await cluster.nodes_manager.initialize()
        if not link.sharded:
            node = cluster.get_random_node()
            if node.name != link.name:
                old, link.client, link.name = (
                    link.client,
                    self.connection.node_client(node),
                    node.name,
                )
                with contextlib.suppress(Exception):
                    await old.aclose()
            return True
        for channel in list(link.channels):
            name = self._link_name(channel)
            if name and name != link.name:
                handlers, waiters = link.release(channel)
                self._link(channel).adopt(channel, handlers, waiters)
        if link.channels or self._links.get(link.name) is not link:
            return bool(link.channels)
        del self._links[link.name]
        return False

    def by_slot(self, channels: list[str]) -> list[list[str]]:
        """``channels`` of a sharded link grouped by hash slot, in first-seen order."""
        cluster = cast("RedisCluster", self.connection.redis)
        groups: dict[int, list[str]] = {}
        for channel in channels:
            groups.setdefault(cluster.keyslot(channel), []).append(channel)
        return list(groups.values())

    def unsubscribe(self, channel: str, h: Handler) -> None:
        link = self._links.get(self._link_name(channel))
        if link is not None:
            link.remove(channel, h)

    def _link_name(self, channel: str) -> str:
        if not self.connection.sharded_pubsub:
            return ""
        cluster = cast("RedisCluster", self.connection.redis)
        node = cluster.get_node_from_key(channel)
        return node.name if node is not None else ""

    def _link(self, channel: str) -> _Link:
        name = self._link_name(channel)
        link = self._links.get(name)
        if link is None:
            link = self._links[name] = self._new_link(channel)
            if self._tg is not None:
                self._tg.start_soon(link.run)
        return link

    def _new_link(self, channel: str) -> _Link:
        if not self.connection.cluster:
            return _Link(self, "", self.connection.redis, sharded=False, owned=False)
        cluster = cast("RedisCluster", self.connection.redis)
        node = cluster.get_node_from_key(channel) if self.connection.sharded_pubsub else None
        if node is None:
            node = cluster.get_random_node()
        client = self.connection.node_client(node)
        name = node.name if self.connection.sharded_pubsub else ""
        return _Link(self, name, client, self.connection.sharded_pubsub, owned=True)
