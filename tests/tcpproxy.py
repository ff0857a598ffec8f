"""A TCP proxy on loopback that can misbehave like a network, for fault tests.

    with TcpProxy("127.0.0.1", server.port) as proxy:
        url = f"redis://127.0.0.1:{proxy.port}/0"
        proxy.blackhole()   # connections stay open, every byte in both directions is dropped
        proxy.stall()       # connections stay open, bytes wait (delivered on resume)
        proxy.resume()      # forward again (bytes dropped while black-holed stay lost)
        proxy.cut()         # reset (RST) every open connection; new ones are welcome
        proxy.drop_open()   # like a NAT that forgot its flows: the open connections go
                            # silent forever (no RST), new ones are forwarded
        proxy.refuse()      # reset each new connection at once; proxy.accept() undoes it

The proxy runs its own asyncio loop in a daemon thread, so sync and async tests use the
same blocking methods (each returns within milliseconds). ``close()`` resets every
connection, closes the listener and joins the thread.

Note: the proxy's own kernel ACKs what the client sends, so a black hole here is seen
by the client only at the application level (a reply that never comes); TCP keepalive
alone does not detect it, as it would not through a NAT that still answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, TypeVar

import pytest

Mode = Literal["forward", "blackhole", "stall"]
T = TypeVar("T")
_CHUNK = 65536
_CALL_TIMEOUT = 10.0
_SHUTDOWN_ROUNDS = 25
_ACCEPT_BATCH = 100
_SHUTDOWN_ROUND_WAIT = 0.2


@dataclass
class ProxyStats:
    accepted: int = 0
    refused: int = 0
    open: int = 0
    forwarded_bytes: int = 0
    dropped_bytes: int = 0


@dataclass(eq=False)
class _Link:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    dropped: bool = False
    """Silenced for good (``drop_open``): every byte both ways is discarded."""


class TcpProxy:
    """Forward 127.0.0.1:``port`` to ``target_host``:``target_port``."""

    def __init__(self, target_host: str, target_port: int, listen_port: int = 0) -> None:
        self.target = (target_host, target_port)
        self._listen_port = listen_port
        self._mode: Mode = "forward"
        self._refusing = False
        self.stats = ProxyStats()
        self._links: set[_Link] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._listener: socket.socket | None = None
        self._accepted: set[socket.socket] = set()
        self._serving: set[asyncio.Task[None]] = set()
        """Accepted sockets no stream owns yet (closed by the shutdown if still here)."""
        self._flowing: asyncio.Event | None = None
        self._port: int | None = None
        self._closing = False

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the proxy is not started")
        return self._port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def open_connections(self) -> int:
        return self.stats.open

    def start(self) -> TcpProxy:
        if self._thread is not None:
            raise RuntimeError("the proxy is already started")
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(
            target=loop.run_forever, name=f"tcpproxy->{self.target[1]}", daemon=True
        )
        self._thread.start()
        self._call(self._listen())
        return self

    def close(self) -> None:
        """Reset every connection, stop listening, stop the loop and join its thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            self._call(self._shutdown())
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=_CALL_TIMEOUT)
            loop.close()
            self._loop = self._thread = None

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- faults ------------------------------------------------------------------------

    def blackhole(self) -> None:
        """Keep every connection open but drop all bytes both ways (also on new ones)."""
        self._call(self._set_mode("blackhole"))

    def stall(self) -> None:
        """Keep every connection open but stop reading: bytes wait until ``resume()``."""
        self._call(self._set_mode("stall"))

    def resume(self) -> None:
        """Forward again."""
        self._call(self._set_mode("forward"))

    def cut(self) -> None:
        """Reset (RST) every open connection on both sides."""
        self._call(self._reset_all())

    def drop_open(self) -> None:
        """Silence every open connection for good, without closing it (a NAT or load
        balancer that dropped idle flows); new connections are forwarded."""
        self._call(self._drop_open())

    def refuse(self) -> None:
        """Reset every new connection as soon as it is accepted (open ones go on)."""
        self._refusing = True

    def accept(self) -> None:
        """Take new connections again after ``refuse()``."""
        self._refusing = False

    # -- the loop side -----------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop is None:
            coro.close()
            raise RuntimeError("the proxy is not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(_CALL_TIMEOUT)

    async def _listen(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        listener = socket.create_server(("127.0.0.1", self._listen_port))
        listener.setblocking(False)
        self._listener = listener
        self._port = listener.getsockname()[1]
        asyncio.get_running_loop().add_reader(listener, self._accept, listener)

    def _accept(self, listener: socket.socket) -> None:
        """Accept what is waiting and hand each connection to ``_serve``: the proxy owns
        every socket it accepted until a stream does, so a shutdown leaves none open."""
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            conn.setblocking(False)
            self._accepted.add(conn)
            task = asyncio.get_running_loop().create_task(self._serve(conn))
            self._serving.add(task)  # a reference, so the task is not collected early
            task.add_done_callback(self._serving.discard)

    async def _serve(self, conn: socket.socket) -> None:
        if self._closing:
            self._accepted.discard(conn)
            _close_socket(conn)
            return
        try:
            reader, writer = await asyncio.open_connection(sock=conn)
        except OSError:
            self._accepted.discard(conn)
            _close_socket(conn)
            return
        self._accepted.discard(conn)  # the stream owns it now
        await self._handle(reader, writer)

    async def _set_mode(self, mode: Mode) -> None:
        assert self._flowing is not None
        self._mode = mode
        if mode == "stall":
            self._flowing.clear()
        else:
            self._flowing.set()

    async def _drop_open(self) -> None:
        for link in self._links:
            link.dropped = True

    async def _shutdown(self) -> None:
        self._closing = True
        if self._listener is not None:
            asyncio.get_running_loop().remove_reader(self._listener)
            self._listener.close()
        # Nothing is accepted from here on, but connections accepted before may still be
        # on their way (opening their stream or their upstream): go round until no task
        # is left. A handler that sees _closing resets its sockets and returns;
        # _reset_all ends the links registered in between.
        for _ in range(_SHUTDOWN_ROUNDS):
            await self._reset_all()
            await asyncio.sleep(0)
            pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            if not pending:
                break
            await asyncio.wait(pending, timeout=_SHUTDOWN_ROUND_WAIT)
        else:
            pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for conn in list(self._accepted):
            _close_socket(conn)
        self._accepted.clear()

    async def _reset_all(self) -> None:
        links, self._links = list(self._links), set()
        for link in links:
            _reset(link.client)
            _reset(link.upstream)
            for task in link.tasks:
                task.cancel()
        for link in links:
            await asyncio.gather(*link.tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closing:
            _reset(writer)
            return
        if self._refusing:
            self.stats.refused += 1
            _reset(writer)
            return
        self.stats.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            _reset(writer)
            return
        except asyncio.CancelledError:  # the proxy closes while this one connects
            _reset(writer)
            raise
        if self._closing:  # the proxy began closing while this one connected
            _reset(writer)
            _reset(up_writer)
            return
        link = _Link(writer, up_writer)
        self._links.add(link)
        self.stats.open += 1
        try:
            link.tasks = [
                asyncio.create_task(self._pump(reader, up_writer, link)),
                asyncio.create_task(self._pump(up_reader, writer, link)),
            ]
            await asyncio.wait(link.tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.stats.open -= 1
            self._links.discard(link)
            for task in link.tasks:
                task.cancel()
            await asyncio.gather(*link.tasks, return_exceptions=True)
            for side in (writer, up_writer):
                side.close()
            for side in (writer, up_writer):
                with contextlib.suppress(OSError):
                    await side.wait_closed()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link
    ) -> None:
        """Copy one direction until EOF or an error, obeying the mode per chunk."""
        assert self._flowing is not None
        with contextlib.suppress(OSError):
            while True:
                await self._flowing.wait()
                data = await reader.read(_CHUNK)
                if not data:
                    return
                await self._flowing.wait()
                if self._mode == "blackhole" or link.dropped:
                    self.stats.dropped_bytes += len(data)
                    continue
                writer.write(data)
                await writer.drain()
                self.stats.forwarded_bytes += len(data)


def _close_socket(conn: socket.socket) -> None:
    """Close an accepted socket with a RST (no stream owns it)."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with SO_LINGER 0 so the peer gets a RST, not a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


MakeProxy = Callable[[str, int], TcpProxy]


@pytest.fixture
def make_proxy() -> Iterator[MakeProxy]:
    """``make_proxy(host, port)`` starts a TcpProxy; every one is closed after the test."""
    proxies: list[TcpProxy] = []

    def make(host: str, port: int) -> TcpProxy:
        proxy = TcpProxy(host, port).start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()
