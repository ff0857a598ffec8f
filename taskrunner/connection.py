"""Redis connections for every topology: standalone, Sentinel and Cluster.

``open_connection(url, options)`` gives a ``Connection``: a command client whose pool
*waits* (up to ``pool_timeout``) for a free connection instead of failing at its size,
the server facts the scripts need (sharded pub/sub or not), the server identity the
reclaim guard watches, and subscribers for pub/sub.

Every connection packs commands with hiredis (redis-py packs asyncio commands in
Python, about 2 µs an argument) and decodes replies with ``surrogateescape``: bytes
that are not UTF-8 arrive as lone surrogates instead of raising, and go back to Redis
as the same bytes. Anything in Redis may be hostile; no reply can crash a reader.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Any, TypeVar, cast

import hiredis
from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode, ClusterPipeline
from redis.asyncio.connection import AbstractConnection, SSLConnection
from redis.asyncio.connection import Connection as RedisConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff
from redis.exceptions import (
    AskError,
    BusyLoadingError,
    ClusterDownError,
    DataError,
    MasterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from taskrunner.exceptions import ConfigurationError
from taskrunner.logs import Outage, Throttle, excerpt
from taskrunner.urls import RedisTarget, parse_url

REDIS_ERRORS = (RedisError, OSError)
"""What a Redis call can raise when the server is away, restarting, failing over or
refusing a write: service loops log these, back off and carry on."""

_UNAVAILABLE = (
    RedisConnectionError,
    RedisTimeoutError,
    BusyLoadingError,
    ReadOnlyError,
    TryAgainError,
    ClusterDownError,
    MasterDownError,
    OSError,
)
_UNAVAILABLE_REPLIES = ("LOADING", "MASTERDOWN", "READONLY", "TRYAGAIN", "CLUSTERDOWN")
_throttle = Throttle(logging.getLogger("taskrunner"))


def unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` means the server cannot be used right now (away, restarting,
    loading, failing over, a slot moving), as opposed to refusing this particular call."""
    if isinstance(exc, (*_UNAVAILABLE, AskError)):  # MovedError is an AskError
        return True
    if not isinstance(exc, ResponseError):
        return False
    text = str(exc)
    return text.startswith(_UNAVAILABLE_REPLIES) or _refused_in_script(text, _UNAVAILABLE_REPLIES)


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is Redis refusing a write because ``maxmemory`` is reached (OOM,
    also inside a script): it passes when memory frees, so the write is tried again."""
    return isinstance(exc, OutOfMemoryError) or (
        isinstance(exc, ResponseError) and "used memory > 'maxmemory'" in str(exc)
    )


def wrong_type(exc: BaseException) -> bool:
    """Whether ``exc`` is Redis refusing a key that holds another type of value than the
    command needs (WRONGTYPE): hostile data, which waiting does not mend."""
    return isinstance(exc, ResponseError) and "WRONGTYPE" in str(exc)


def _refused_in_script(text: str, codes: tuple[str, ...]) -> bool:
    """Whether a script's error is one of ``codes`` refusing a command it ran: Redis 6.2
    wraps it ("Error running script (call to f_...): @user_script:90: ... -READONLY You
    can't write ..."); Redis 7 replies with the code first."""
    return text.startswith("Error running script") and any(f" -{code} " in text for code in codes)


class _DemotedMasterAware:
    """Mixin for Sentinel-managed connections: a connection that finds a replica where
    the master was asks the sentinels again before it reconnects.

    - redis-py drops such a connection when a command gets ``READONLY``, but on Redis
      6.2 a script's write gets it wrapped in the script's error, which redis-py does
      not recognise: the connection stayed on the replica for good (every call failed).
      It is dropped here too, with the same connection error.
    - redis-py then reconnects, within the call's retries, to the address it had (the
      replica again), and asks the sentinels only for the pool's next call. Here the
      reconnect after such an error asks them first, so the retry reaches the new
      master."""

    connection_pool: Any
    host: str
    port: int
    _ask_sentinels = False

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)  # type: ignore[misc]
        except ReadOnlyError:  # a plain READONLY that redis-py does not turn into a drop
            raise
        except RedisConnectionError:  # incl. redis-py's drop after a plain READONLY
            self._ask_sentinels = self.connection_pool.is_master
            raise
        except ResponseError as exc:
            if self.connection_pool.is_master and _refused_in_script(str(exc), ("READONLY",)):
                self._ask_sentinels = True
                await cast(Any, self).disconnect()
                raise RedisConnectionError("the previous master is now a replica") from None
            raise

    async def connect_check_health(self, *args: Any, **kwargs: Any) -> Any:
        if self._ask_sentinels:
            self._ask_sentinels = False
            self.host, self.port = await self.connection_pool.get_master_address()
        return await super().connect_check_health(*args, **kwargs)  # type: ignore[misc]


def report(where: str, exc: BaseException) -> None:
    """Log a failed call of a service loop: an outage once (``Outage``), anything else
    at most once a minute per place."""
    if unavailable(exc):
        Outage.shared().failed(where, exc)
    else:
        _throttle.warning(where, "redis refused a call in %s: %s", where, excerpt(str(exc)))


def reachable() -> None:
    """A service loop's call succeeded (ends a logged outage)."""
    Outage.shared().ok()


ENCODING_ERRORS = "surrogateescape"

T = TypeVar("T")


class _HiredisPacking:
    """Mixin: pack commands with ``hiredis.pack_command``; strings holding bytes that
    were not UTF-8 (lone surrogates from ``surrogateescape``) go out as those bytes.
    And send them without a task per command (``send_packed_command``)."""

    socket_timeout: float | None
    is_connected: bool
    _writer: asyncio.StreamWriter | None

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        """redis-py's send, without its ``asyncio.wait_for`` around every write when a
        socket timeout is set (that makes a task per command, and the command goes out
        one turn of the event loop later), for a connected connection. The write is
        handed to the transport at once; only if the transport could not pass it all
        to the kernel does the send wait for it to drain, within the socket timeout,
        as redis-py's does. A connection the peer reset while it sat in the pool fails
        as a ConnectionError (redis-py lets uvloop's RuntimeError for a closed
        transport through, which no caller expects: it took a worker down on a network
        reset)."""
        writer = self._writer
        if writer is None or not self.is_connected:  # redis-py's send connects first
            await cast(Any, super()).send_packed_command(command, check_health)
            return
        if check_health:
            await cast(Any, self).check_health()
        try:
            if _hand_over(writer, command):
                async with asyncio.timeout(self.socket_timeout or None):
                    await writer.drain()
        except TimeoutError:
            await cast(Any, self).disconnect(nowait=True)
            raise RedisTimeoutError("Timeout writing to socket") from None
        except (OSError, RuntimeError) as exc:
            # uvloop raises RuntimeError for a write on a transport that closed under it
            lost = isinstance(exc, OSError) or writer.transport.is_closing()
            await cast(Any, self).disconnect(nowait=True)
            if not lost:
                raise
            raise RedisConnectionError(f"Error while writing to socket: {exc}") from exc
        except BaseException:
            await cast(Any, self).disconnect(nowait=True)
            raise

    def pack_command(self, *args: Any) -> list[bytes]:
        first = args[0]
        if isinstance(first, str) and " " in first:  # e.g. "CONFIG GET" is two words
            args = (*first.split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except UnicodeEncodeError:
            raw: Any = tuple(
                a.encode("utf-8", ENCODING_ERRORS) if isinstance(a, str) else a for a in args
            )
            return [hiredis.pack_command(raw)]
        except TypeError as exc:
            raise DataError(str(exc)) from exc


def _hand_over(writer: asyncio.StreamWriter, command: bytes | str | Iterable[bytes]) -> bool:
    """Give ``command`` to the transport; whether the send must wait for it to drain
    (the kernel did not take it all). ConnectionResetError when the peer reset the
    connection while it sat idle in the pool."""
    transport = writer.transport
    if transport.is_closing():
        raise ConnectionResetError("the connection was closed")
    if isinstance(command, str):
        command = command.encode()
    writer.writelines([command] if isinstance(command, bytes) else command)
    return bool(transport.get_write_buffer_size()) or transport.is_closing()


_mixed_classes: dict[tuple[type[Any], type[Any]], type[Any]] = {}


def _mixed(mixin: type[Any], base: type[Any]) -> type[Any]:
    """``base`` with ``mixin`` in front (one class per pair, made once)."""
    found = _mixed_classes.get((mixin, base))
    if found is None:
        found = type(f"{mixin.__name__.strip('_')}{base.__name__}", (mixin, base), {})
        _mixed_classes[mixin, base] = found
    return found


def fast(base: type[AbstractConnection]) -> type[AbstractConnection]:
    """``base`` with hiredis packing."""
    return cast(type[AbstractConnection], _mixed(_HiredisPacking, base))


class _QuickCheckout:
    """A blocking pool's checkout without its condition lock when a connection is free.

    redis-py's ``BlockingConnectionPool`` takes an ``asyncio.Condition`` and an
    ``async_timeout`` on every checkout and again on every release, and reports each
    to its event dispatcher and metrics recorder: about 16 µs of the client's time per
    command, against 1.5 µs here. When a connection is free nobody can be waiting for
    one, so it is taken directly (and checked as redis-py checks it: connected, nothing
    unread). Otherwise the pool's own checkout runs, and the callers it makes wait are
    counted, so that a release hands the connection over through the pool's own
    release (which wakes them) while anyone waits. Skipped on release, with nobody
    waiting: the re-authentication event of streaming credential providers (taskrunner
    authenticates with the URL's user and password only) and redis-py's optional
    connection-count metrics. Pools of a redis-py without these internals, or in
    maintenance mode, use the pool's own checkout throughout."""

    _waiting = 0

    def _quick(self) -> bool:
        return (
            isinstance(getattr(self, "_available_connections", None), list)
            and isinstance(getattr(self, "_in_use_connections", None), set)
            and not getattr(self, "_in_maintenance", False)
            and hasattr(self, "ensure_connection")
        )

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        pool = cast(Any, self)
        if self._quick() and pool._available_connections and not args and not kwargs:
            connection = pool._available_connections.pop()
            pool._in_use_connections.add(connection)
            try:
                await pool.ensure_connection(connection)
            except BaseException:
                await self.release(connection)
                raise
            return connection
        self._waiting += 1
        try:
            return await cast(Any, super()).get_connection(*args, **kwargs)
        finally:
            self._waiting -= 1

    async def release(self, connection: Any) -> None:
        pool = cast(Any, self)
        reconnect = getattr(connection, "should_reconnect", None)
        if (
            self._waiting
            or not self._quick()
            or connection not in pool._in_use_connections
            or (reconnect is not None and reconnect())
        ):
            await cast(Any, super()).release(connection)
            return
        pool._in_use_connections.remove(connection)
        pool._available_connections.append(connection)


class _BlockingPool(_QuickCheckout, BlockingConnectionPool):
    """A pool that waits for a free connection, with the quick checkout."""


class _BlockingSentinelPool(_QuickCheckout, SentinelConnectionPool, BlockingConnectionPool):
    """A Sentinel-managed pool that waits for a free connection (redis-py's raises)."""


@dataclass(frozen=True, slots=True)
class PoolOptions:
    """How connections are made and shared (``TaskRunner``'s settings)."""

    max_connections: int = 100
    """Connections a client may open (per node on a cluster); more callers wait."""
    pool_timeout: float = 20.0
    """Seconds a caller waits for a free connection before ``ConnectionError``."""
    socket_timeout: float = 10.0
    health_check_interval: float = 15.0


class Connection:
    """One client of one Redis deployment, and what taskrunner needs to know of it."""

    def __init__(
        self, target: RedisTarget, redis: Redis, options: PoolOptions, cluster: bool
    ) -> None:
        self.target = target
        self.redis = redis
        self.options = options
        self.cluster = cluster
        self.version: tuple[int, ...] = (0,)
        self.extra: list[Redis] = []
        """Other clients this connection opened and closes (a Sentinel's clients)."""

    def __repr__(self) -> str:
        return f"Connection({self.target.redacted()!r})"

    @property
    def sharded_pubsub(self) -> bool:
        """Whether events go through sharded pub/sub (SPUBLISH/SSUBSCRIBE): on a
        cluster of Redis 7 or newer. Elsewhere plain PUBLISH is as cheap."""
        return self.cluster and self.version >= (7,)

    @property
    def publish_command(self) -> str:
        return "SPUBLISH" if self.sharded_pubsub else "PUBLISH"

    async def start(self) -> None:
        """Check the server answers and learn its version."""
        info = await self._info_any("server")
        text = str(info.get("redis_version", "0"))
        self.version = tuple(int(p) for p in text.split(".") if p.isdigit()) or (0,)

    async def identity(self) -> str:
        """Who answers: the run id and replication id of every primary. A restart or a
        failover changes it."""
        infos = await self._info_all()
        parts = sorted(f"{i.get('run_id', '')}/{i.get('master_replid', '')}" for i in infos)
        return ",".join(parts)

    async def uptime(self) -> float:
        """The shortest uptime among the primaries, in seconds."""
        infos = await self._info_all()
        return min(float(i.get("uptime_in_seconds", 0)) for i in infos) if infos else 0.0

    async def _info_any(self, section: str) -> dict[str, Any]:
        if self.cluster:
            cluster = cast(RedisCluster, self.redis)
            node = cluster.get_random_node()
            found: dict[str, Any] = await cluster.info(section, target_nodes=node)
            return found
        info: dict[str, Any] = await self.redis.info(section)
        return info

    async def _info_all(self) -> list[dict[str, Any]]:
        if not self.cluster:
            info: dict[str, Any] = await self.redis.info("server")
            info.update(await self.redis.info("replication"))
            return [info]
        cluster = cast(RedisCluster, self.redis)
        found: list[dict[str, Any]] = []
        for node in cluster.get_primaries():
            node_info: dict[str, Any] = await cluster.info("server", target_nodes=node)
            node_info.update(await cluster.info("replication", target_nodes=node))
            found.append(node_info)
        return found

    def node_client(self, node: ClusterNode) -> Redis:
        """A plain client of one cluster node, for pub/sub there. Without redis-py's
        health checks: on a connection that only has sharded subscriptions they would
        read replies in the caller's task and steal the reader's confirmations (the
        subscriber's own PING watchdog checks the link instead)."""
        return _standalone(
            self.target,
            replace(self.options, health_check_interval=0),
            host=node.host,
            port=int(node.port),
            max_connections=4,
        )

    async def aclose(self) -> None:
        for client in [self.redis, *self.extra]:
            with contextlib.suppress(*REDIS_ERRORS):
                await client.aclose()


async def open_connection(url: str, options: PoolOptions) -> Connection:
    """Connect to the deployment ``url`` names (see taskrunner.urls for the forms)."""
    target = parse_url(url)
    if target.topology == "cluster":
        redis: Redis = cast(Redis, _cluster(target, options))
    elif target.topology == "sentinel":
        redis, sentinels = _sentinel(target, options)
    else:
        redis = _standalone(target, options)
    connection = Connection(target, redis, options, cluster=target.topology == "cluster")
    if target.topology == "sentinel":
        connection.extra = sentinels
    try:
        if target.topology == "cluster":
            await cast(RedisCluster, redis).initialize()
        await connection.start()
    except BaseException:
        await connection.aclose()
        raise
    return connection


def _retry() -> Retry:
    """A pooled connection that a restart or a failover closed fails once: a call
    retries it on a new connection (twice, 50-200 ms apart). Every script is safe to
    repeat after a lost reply: enqueue and commit are idempotent; claim and requeue
    check who holds the entry, and a claim repeated with its own token answers the
    same; a repeated take.lua returns the job it claimed. Entries a lost read
    delivered are requeued by the stale-entry reclaim (docs/reliability.md)."""
    return Retry(ExponentialBackoff(cap=0.2, base=0.05), 2)


def _common(target: RedisTarget, options: PoolOptions) -> dict[str, Any]:
    found: dict[str, Any] = {
        "username": target.username,
        "password": target.password,
        "socket_timeout": options.socket_timeout,
        "socket_connect_timeout": options.socket_timeout,
        "socket_keepalive": True,
        "decode_responses": True,
        "encoding_errors": ENCODING_ERRORS,
        "retry": _retry(),
        "retry_on_error": [RedisConnectionError],
    }
    return found


def _standalone(
    target: RedisTarget,
    options: PoolOptions,
    *,
    host: str | None = None,
    port: int | None = None,
    max_connections: int | None = None,
) -> Redis:
    kwargs = _common(target, options)
    kwargs["health_check_interval"] = options.health_check_interval
    if target.unix_path and host is None:
        from redis.asyncio.connection import UnixDomainSocketConnection

        kwargs["path"] = target.unix_path
        kwargs.pop("socket_keepalive")  # a TCP option: unix-socket connections refuse it
        connection_class: type[AbstractConnection] = UnixDomainSocketConnection
    else:
        node_host, node_port = target.nodes[0] if target.nodes else ("127.0.0.1", 6379)
        kwargs["host"] = host or node_host
        kwargs["port"] = port or node_port
        connection_class = SSLConnection if target.tls else RedisConnection
        if target.tls:
            kwargs.update(target.ssl_options)
    kwargs["db"] = target.db
    pool = _BlockingPool(
        max_connections=max_connections or options.max_connections,
        timeout=options.pool_timeout,
        connection_class=fast(connection_class),
        **kwargs,
    )
    return Redis.from_pool(pool)


def _sentinel(target: RedisTarget, options: PoolOptions) -> tuple[Redis, list[Redis]]:
    """The master's client, and the clients of the sentinels (to close with it)."""
    common = _common(target, options)
    node_kwargs = {k: v for k, v in common.items() if k not in ("username", "password")}
    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": options.socket_timeout,
        "socket_connect_timeout": options.socket_timeout,
        "username": target.sentinel_username,
        "password": target.sentinel_password,
    }
    if target.tls:
        sentinel_kwargs["ssl"] = True
        sentinel_kwargs.update(target.ssl_options)
        node_kwargs["ssl"] = True
        node_kwargs.update(target.ssl_options)
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        list(target.nodes), sentinel_kwargs=sentinel_kwargs, min_other_sentinels=0
    )
    from redis.asyncio.sentinel import SentinelManagedConnection, SentinelManagedSSLConnection

    managed = SentinelManagedSSLConnection if target.tls else SentinelManagedConnection
    base = _mixed(_DemotedMasterAware, managed)
    node_kwargs.pop("ssl", None)
    master = cast(
        Redis,
        sentinel.master_for(
            target.master_name or "",
            redis_class=Redis,
            connection_pool_class=_BlockingSentinelPool,
            connection_class=fast(base),
            max_connections=options.max_connections,
            timeout=options.pool_timeout,
            db=target.db,
            username=target.username,
            password=target.password,
            health_check_interval=options.health_check_interval,
            **node_kwargs,
        ),
    )
    return master, list(sentinel.sentinels)


class _WaitingCluster(RedisCluster):
    """A cluster client whose callers (commands and pipelines) wait for a free
    connection, as a blocking pool's do: redis-py's cluster client raises
    MaxConnectionsError at a node's limit. It also keeps a plain client per node
    (``node_redis``) for what redis-py's cluster pipeline refuses: pipelined EVALSHA
    (taskrunner.scripts routes script calls by slot)."""

    _gate: asyncio.Semaphore
    _gate_timeout: float
    _node_factory: Callable[[ClusterNode], Redis]
    _node_clients: dict[str, Redis]

    def node_redis(self, node: ClusterNode) -> Redis:
        """A plain client of ``node`` (made once)."""
        found = self._node_clients.get(node.name)
        if found is None:
            found = self._node_clients[node.name] = self._node_factory(node)
        return found

    async def aclose(self) -> None:
        clients, self._node_clients = list(self._node_clients.values()), {}
        for client in clients:
            with contextlib.suppress(*REDIS_ERRORS):
                await client.aclose()
        await super().aclose()

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        return await _gated(
            self, lambda: super(_WaitingCluster, self).execute_command(*args, **kwargs)
        )

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> Any:
        if shard_hint:  # refused by redis-py's
            return super().pipeline(transaction, shard_hint)
        return _WaitingPipeline(self, transaction)  # type: ignore[abstract] # redis-py's typing


class _WaitingPipeline(ClusterPipeline):
    """A cluster pipeline whose ``execute`` waits for a free connection as the cluster
    client's commands do (redis-py's raises MaxConnectionsError at a node's limit). It
    holds one permit: it uses at most one connection per node at a time."""

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> Any:
        cluster = cast(_WaitingCluster, self.cluster_client)
        return await _gated(
            cluster,
            lambda: super(_WaitingPipeline, self).execute(raise_on_error, allow_redirections),
        )


_HOLDING: ContextVar[bool] = ContextVar("taskrunner_gate_held", default=False)
"""Whether this task holds a permit of the gate: a pipeline re-sends a redirected
command through the cluster client once its own connections are back, under its permit."""


async def _gated(cluster: _WaitingCluster, call: Callable[[], Awaitable[T]]) -> T:
    if _HOLDING.get():
        return await call()
    try:
        await asyncio.wait_for(cluster._gate.acquire(), cluster._gate_timeout)
    except TimeoutError:
        from redis.exceptions import ConnectionError as RedisConnectionError

        raise RedisConnectionError(
            f"no free connection within {cluster._gate_timeout:g}s (max_connections)"
        ) from None
    holding = _HOLDING.set(True)
    try:
        return await call()
    finally:
        _HOLDING.reset(holding)
        cluster._gate.release()


def _cluster(target: RedisTarget, options: PoolOptions) -> RedisCluster:
    from redis.asyncio.cluster import ClusterNode as Node

    if target.db:
        raise ConfigurationError("a Redis Cluster has only database 0")
    kwargs = _common(target, options)
    if target.tls:
        kwargs["ssl"] = True
        kwargs.update(target.ssl_options)
    cluster = _WaitingCluster(
        startup_nodes=[Node(host, port) for host, port in target.nodes],
        max_connections=options.max_connections,
        **kwargs,
    )
    base = cluster.connection_kwargs.get("connection_class", RedisConnection)
    cluster.connection_kwargs["connection_class"] = fast(base)
    cluster._gate = asyncio.Semaphore(options.max_connections)
    cluster._gate_timeout = options.pool_timeout
    cluster._node_clients = {}
    cluster._node_factory = lambda node: _standalone(
        target, options, host=node.host, port=int(node.port)
    )
    return cluster
