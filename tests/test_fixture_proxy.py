"""The misbehaving TCP proxy (tests/tcpproxy.py) in front of a real redis-server:
forward, black-hole, stall, cut and refuse, from sync and async code, leaving no
thread or socket behind."""

from __future__ import annotations

import socket
import threading

import psutil
import pytest
import redis
import redis.asyncio
from conftest import wait_until
from polling import poll_until
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError, TimeoutError
from redis.retry import Retry
from redisproc import RedisProcess
from tcpproxy import MakeProxy, TcpProxy

NO_RETRY = Retry(NoBackoff(), 0)
ASYNC_NO_RETRY = AsyncRetry(NoBackoff(), 0)


def sync_client(proxy: TcpProxy, timeout: float = 0.5) -> redis.Redis:
    return redis.Redis(
        port=proxy.port, socket_timeout=timeout, retry=NO_RETRY, decode_responses=True
    )


def open_sockets_to(port: int) -> int:
    """This process's TCP connections with ``port`` at either end."""
    me = psutil.Process()
    return sum(
        1
        for c in me.net_connections(kind="tcp")
        if (c.laddr and c.laddr.port == port) or (c.raddr and c.raddr.port == port)
    )


def test_forwards_both_ways(redis_server: RedisProcess, make_proxy: MakeProxy) -> None:
    proxy = make_proxy("127.0.0.1", redis_server.port)
    client = sync_client(proxy)
    try:
        assert client.set("proxy:k", "v") is True
        assert client.get("proxy:k") == "v"
        assert proxy.open_connections == 1
        assert proxy.stats.forwarded_bytes > 0
    finally:
        client.close()


def test_blackhole_keeps_the_connection_open_but_no_reply_comes(
    redis_server: RedisProcess, make_proxy: MakeProxy
) -> None:
    proxy = make_proxy("127.0.0.1", redis_server.port)
    client = sync_client(proxy)
    try:
        assert client.ping() is True
        proxy.blackhole()
        with pytest.raises(TimeoutError):
            client.ping()
        assert proxy.stats.dropped_bytes > 0
    finally:
        client.close()
    proxy.resume()
    fresh = sync_client(proxy)
    try:
        assert fresh.ping() is True
    finally:
        fresh.close()


def test_blackholed_bytes_are_lost_and_the_connection_stays_open(
    redis_server: RedisProcess, make_proxy: MakeProxy
) -> None:
    proxy = make_proxy("127.0.0.1", redis_server.port)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=0.3) as sock:
        sock.sendall(b"PING\r\n")
        assert sock.recv(64) == b"+PONG\r\n"
        proxy.blackhole()
        sock.sendall(b"ECHO lost\r\n")
        with pytest.raises(socket.timeout):
            sock.recv(64)  # silence, not EOF: the connection is open
        assert proxy.open_connections == 1
        proxy.resume()
        sock.sendall(b"ECHO found\r\n")
        assert sock.recv(64) == b"$5\r\nfound\r\n"  # the black-holed ECHO never ran


def test_stall_holds_bytes_until_resume(redis_server: RedisProcess, make_proxy: MakeProxy) -> None:
    proxy = make_proxy("127.0.0.1", redis_server.port)
    client = sync_client(proxy, timeout=0.3)
    direct = redis.Redis(port=redis_server.port, decode_responses=True)
    try:
        assert client.ping() is True
        proxy.stall()
        with pytest.raises(TimeoutError):
            client.set("proxy:stalled", "1")
        assert direct.get("proxy:stalled") is None
        proxy.resume()  # the held SET reaches the server now
        poll_until(lambda: direct.get("proxy:stalled") == "1", 10, "the stalled SET arrives")
    finally:
        client.close()
        direct.close()


def test_cut_resets_open_connections_and_new_ones_work(
    redis_server: RedisProcess, make_proxy: MakeProxy
) -> None:
    proxy = make_proxy("127.0.0.1", redis_server.port)
    client = sync_client(proxy)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(b"PING\r\n")
        assert sock.recv(64) == b"+PONG\r\n"
        assert client.ping() is True
        assert proxy.open_connections == 2
        proxy.cut()
        with pytest.raises(ConnectionResetError):
            sock.recv(64)  # RST, not a clean FIN
    try:
        assert client.ping() is True  # the pool notices and reconnects through the proxy
        assert proxy.stats.accepted == 3
        assert proxy.open_connections == 1
    finally:
        client.close()


def test_refuse_resets_new_connections_and_keeps_old_ones(
    redis_server: RedisProcess, make_proxy: MakeProxy
) -> None:
    proxy = make_proxy("127.0.0.1", redis_server.port)
    old = sync_client(proxy)
    new = sync_client(proxy)
    try:
        assert old.ping() is True
        proxy.refuse()
        with pytest.raises(ConnectionError):
            new.ping()
        assert old.ping() is True
        assert proxy.stats.refused >= 1
        proxy.accept()
        assert new.ping() is True
    finally:
        old.close()
        new.close()


async def test_async_clients_see_the_same_faults(
    redis_server: RedisProcess, make_proxy: MakeProxy
) -> None:
    proxy = make_proxy("127.0.0.1", redis_server.port)
    client = redis.asyncio.Redis(port=proxy.port, socket_timeout=0.3, retry=ASYNC_NO_RETRY)
    try:
        assert await client.ping() is True
        proxy.blackhole()
        with pytest.raises(TimeoutError):
            await client.ping()
        proxy.resume()
        proxy.cut()

        async def reconnected() -> bool:
            try:
                return bool(await client.ping())
            except (ConnectionError, TimeoutError):
                return False

        await wait_until(reconnected, 10)
    finally:
        await client.aclose()


def test_close_leaves_no_thread_and_no_socket(redis_server: RedisProcess) -> None:
    threads_before = set(threading.enumerate())
    proxy = TcpProxy("127.0.0.1", redis_server.port).start()
    port = proxy.port
    clients = [sync_client(proxy) for _ in range(3)]
    for client in clients:
        assert client.ping() is True
    proxy.blackhole()
    proxy.close()
    for client in clients:
        client.close()
    assert set(threading.enumerate()) == threads_before
    assert open_sockets_to(port) == 0
    proxy.close()  # idempotent
    with pytest.raises(RuntimeError):
        proxy.blackhole()
