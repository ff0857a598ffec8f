"""Bad Redis URLs and endpoints in the CLI: one line on stderr, no traceback, and the
documented exit code: 2 when the URL is wrong (malformed, or turned down by the server:
credentials, database index, not Redis at all), 1 when Redis cannot be reached.

Every case runs the real ``taskrunner`` command against real endpoints: the session's
redis-server, one with ``requirepass``, a TCP listener that answers like an HTTP
server, and a port nothing listens on.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import subprocess_env
from redis.exceptions import ConnectionError as RedisConnectionError
from redisproc import RedisProcess

from taskrunner.cli._common import run_async

APP = "apps.cli_app:tr"
TASKRUNNER = str(Path(sys.executable).with_name("taskrunner"))
DEADLINE = 60.0
PASSWORD = "correct-horse"
COMMANDS = [
    ["worker", APP, "--burst"],
    ["worker", APP],
    ["enqueue", APP, "add", "[1, 2]"],
    ["info", APP],
    ["dead-letters", APP],
    ["retry-dead", APP, "--all"],
]


def run_cli(
    env: dict[str, str], *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TASKRUNNER, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
        cwd=cwd,
    )


def assert_one_line(done: subprocess.CompletedProcess[str], code: int, *fragments: str) -> None:
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("taskrunner: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def env_with(url: str, namespace: str) -> dict[str, str]:
    env = subprocess_env(url, namespace)
    for key in [k for k in env if k.startswith("TASKRUNNER_") and k != "TASKRUNNER_REDIS_URL"]:
        del env[key]
    env["TASKRUNNER_LOG_LEVEL"] = "error"  # only the error line on stderr
    return env


@pytest.fixture(scope="module")
def http_port() -> Iterator[int]:
    """A TCP listener on loopback that answers every connection like an HTTP server."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.2)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(2)
                try:
                    conn.recv(1024)
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    done.set()
    thread.join(timeout=5)
    server.close()


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    with RedisProcess(tmp_path_factory.mktemp("locked"), password=PASSWORD) as server:
        yield server


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:1] + c[2:]))
@pytest.mark.parametrize(
    ("url", "fragments"),
    [
        ("http://127.0.0.1:6379/0", ["invalid Redis URL 'http://127.0.0.1:6379/0'", "scheme"]),
        ("notaurl", ["invalid Redis URL 'notaurl'", "must start with one of redis://"]),
        ("redis://127.0.0.1:99999/0", ["the port 99999 is not from 1 to 65535"]),
        ("redis://127.0.0.1:6379/x", ["non-negative integer"]),
        ("redis+cluster://127.0.0.1:7000/2", ["takes no database"]),
        ("redis://:hunter2@127.0.0.1:6379/0?foo=1", ["'redis://:***@127.0.0.1:6379/0?foo=1'"]),
    ],
)
def test_malformed_url_exits_2_with_one_line(
    namespace: str, command: list[str], url: str, fragments: list[str]
) -> None:
    done = run_cli(env_with(url, namespace), *command)
    assert_one_line(done, 2, "TASKRUNNER_REDIS_URL: invalid Redis URL", *fragments)
    assert "hunter2" not in done.stderr


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:1] + c[2:]))
def test_database_index_out_of_range_exits_2(
    redis_server: RedisProcess, namespace: str, command: list[str]
) -> None:
    url = f"redis://127.0.0.1:{redis_server.port}/99"
    done = run_cli(env_with(url, namespace), *command)
    assert_one_line(done, 2, f"redis at {url} has no such database", "DB index is out of range")


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:1] + c[2:]))
def test_an_endpoint_that_is_not_redis_exits_2(
    http_port: int, namespace: str, command: list[str]
) -> None:
    url = f"redis://127.0.0.1:{http_port}/0"
    done = run_cli(env_with(url, namespace), *command)
    assert_one_line(done, 2, f"redis at {url} does not speak the Redis protocol", "Protocol error")


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:1] + c[2:]))
def test_wrong_or_missing_password_exits_2(
    locked: RedisProcess, namespace: str, command: list[str]
) -> None:
    wrong = locked.url.replace(PASSWORD, "nope")
    done = run_cli(env_with(wrong, namespace), *command)
    assert_one_line(done, 2, "redis at redis://:***@127.0.0.1", "refused the credentials")
    done = run_cli(env_with(locked.url_without_password, namespace), *command)
    assert_one_line(done, 2, f"redis at {locked.url_without_password} refused the credentials")


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:1] + c[2:]))
def test_unreachable_server_exits_1(
    namespace: str, command: list[str], unreachable_port: int
) -> None:
    url = f"redis://127.0.0.1:{unreachable_port}/0"
    done = run_cli(env_with(url, namespace), *command)
    assert_one_line(done, 1, f"cannot reach redis at {url}", "Connect")


def test_a_bad_url_in_the_apps_own_taskrunner_exits_2(namespace: str, tmp_path: Path) -> None:
    (tmp_path / "badurl_app.py").write_text(
        "from taskrunner import TaskRunner\ntr = TaskRunner('http://:s3cret@localhost:6379')\n"
    )
    env = env_with("redis://127.0.0.1:1/0", namespace)
    del env["TASKRUNNER_REDIS_URL"]
    for command in (["worker", "badurl_app:tr"], ["info", "badurl_app:tr"]):
        done = run_cli(env, *command, cwd=tmp_path)
        assert_one_line(done, 2, "cannot load badurl_app:tr", "'http://:***@localhost:6379'")
        assert "s3cret" not in done.stderr


def test_a_bad_runner_setting_in_the_app_exits_2(namespace: str, tmp_path: Path) -> None:
    (tmp_path / "badttl_app.py").write_text(
        "from taskrunner import TaskRunner\ntr = TaskRunner(result_ttl=0)\n"
    )
    done = run_cli(env_with("redis://127.0.0.1:1/0", namespace), "info", "badttl_app:tr",
                   cwd=tmp_path)  # fmt: skip
    assert_one_line(done, 2, "invalid TaskRunner setting result_ttl=0: it must be more than 0")


def test_several_lost_connections_at_once_are_one_line_and_a_bug_beside_them_is_not(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Two tasks of a worker that lose Redis together fail as a group: still one line
    and exit code 1 (as one lost connection); a group with anything else in it (a bug)
    keeps its traceback."""

    async def lost_twice() -> None:
        raise ExceptionGroup(
            "tasks",
            [RedisConnectionError("reset by peer"), ExceptionGroup("inner", [OSError("gone")])],
        )

    with pytest.raises(SystemExit) as exited:
        run_async(lost_twice)
    assert exited.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("taskrunner: error: cannot reach redis")
    assert "reset by peer" in lines[0]

    async def lost_and_a_bug() -> None:
        raise ExceptionGroup("tasks", [RedisConnectionError("reset"), ValueError("bug")])

    with pytest.raises(ExceptionGroup):
        run_async(lost_and_a_bug)


@pytest.mark.parametrize("password", ["pw'quote-tail", 'pw"dq-tail', "pw`tick<tail>", "pw@at-tail"])
def test_a_password_with_quotes_or_brackets_is_hidden_whole(
    namespace: str, password: str, unreachable_port: int
) -> None:
    url = f"redis://app:{password}@127.0.0.1:{unreachable_port}/0"
    done = run_cli(env_with(url, namespace), "info", APP)
    assert_one_line(done, 1, "cannot reach redis at redis://app:***@127.0.0.1")
    assert "tail" not in done.stderr


@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        ("raise RuntimeError('boom on import')\n", "raised RuntimeError: boom on import"),
        ("def broken(:\n", "raised SyntaxError"),
        ("from taskrunner import TaskRunner\ntr = TaskRunner(middleware=[object()])\n", "raised"),
    ],
)
def test_an_app_that_fails_on_import_exits_2_with_one_line(
    namespace: str, tmp_path: Path, source: str, fragment: str
) -> None:
    (tmp_path / "failing_app.py").write_text(source)
    for command in (["worker", "failing_app:tr"], ["info", "failing_app:tr"]):
        done = run_cli(env_with("redis://127.0.0.1:1/0", namespace), *command, cwd=tmp_path)
        assert_one_line(done, 2, "cannot load failing_app:tr: importing failing_app", fragment)


def test_what_an_app_logs_on_import_is_redacted_in_every_command(
    redis_server: RedisProcess, namespace: str, tmp_path: Path
) -> None:
    (tmp_path / "logging_app.py").write_text(
        "import logging\nfrom taskrunner import TaskRunner\n"
        "logging.getLogger('myapp').warning('using %s', 'redis://app:ImportSecret@h:1/0')\n"
        "tr = TaskRunner()\n"
    )
    env = env_with(redis_server.url, namespace)
    del env["TASKRUNNER_LOG_LEVEL"]
    for command in (["info", "logging_app:tr"], ["dead-letters", "logging_app:tr"]):
        done = run_cli(env, *command, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert "using redis://app:***@h:1/0" in done.stderr
        assert "ImportSecret" not in done.stderr


def test_an_unreachable_cluster_exits_1_with_one_line(
    namespace: str, unreachable_port: int
) -> None:
    url = f"redis+cluster://:clusterpw@127.0.0.1:{unreachable_port}"
    done = run_cli(env_with(url, namespace), "info", APP)
    assert_one_line(done, 1, "cannot reach redis at redis+cluster://:***@127.0.0.1")
    assert "clusterpw" not in done.stderr


def test_sentinels_that_know_no_master_exit_1_with_one_short_line(
    namespace: str, unreachable_port: int, redis_server: RedisProcess
) -> None:
    """Unreachable sentinels, or a server that is up but follows no such master: one
    line naming the master, not a repr of every sentinel's connection."""
    for host in (f"127.0.0.1:{unreachable_port}", f"127.0.0.1:{unreachable_port},127.0.0.1:1"):
        url = f"redis+sentinel://:sentinelpw@{host}/mymaster"
        done = run_cli(env_with(url, namespace), "info", APP)
        assert_one_line(done, 1, "cannot reach redis at redis+sentinel://:***@", "'mymaster'")
        assert "sentinelpw" not in done.stderr
        assert len(done.stderr) < 400, done.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["enqueue", APP, "add", "[1, 2]", "--delay", "nan"],
        ["enqueue", APP, "add", "[1, 2]", "--delay", "inf"],
        ["enqueue", APP, "add", "[1, 2]", "--wait", "--timeout", "nan"],
        ["enqueue", APP, "add", "[1, 2]", "--wait", "--timeout", "-1"],
        ["purge-dead", APP, "--older-than", "nan"],
        ["purge-dead", APP, "--older-than", "inf"],
        ["worker", APP, "--burst", "--grace-period", "inf"],
        ["worker", APP, "--burst", "--grace-period", "1e300"],
        ["worker", APP, "--burst", "-p", "2", "--grace-period", "inf"],  # no restart loop
    ],
    ids=lambda a: " ".join(a[-2:]),
)
def test_a_number_of_seconds_that_is_not_finite_is_a_usage_error(
    redis_server: RedisProcess, namespace: str, args: list[str]
) -> None:
    done = run_cli(env_with(redis_server.url, namespace), *args)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert (
        "not a finite number of seconds" in done.stderr
        or ">=0" in done.stderr
        or "finite number" in done.stderr
        or "less than or equal to 3153600000" in done.stderr
    ), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_an_empty_job_id_is_a_usage_error(redis_server: RedisProcess, namespace: str) -> None:
    done = run_cli(env_with(redis_server.url, namespace), "enqueue", APP, "add", "[1, 2]",
                   "--job-id", "")  # fmt: skip
    assert_one_line(done, 2, "job_id must be a non-empty string")
