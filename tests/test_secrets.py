"""Secrets stay secret: a Redis password never shows in CLI output, logs, exceptions,
reprs or job info.

A real redis-server runs with ``requirepass``. Every command of the ``taskrunner`` group
(discovered from the click group, so commands added later are covered too) runs as a
real process with the password in ``TASKRUNNER_REDIS_URL``: with the right password,
with a wrong one, and against an unreachable port; a worker runs beside them with debug
logging. All their stdout and stderr, and every key the runs left in Redis, are
searched for the password.
"""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
import redis
from conftest import subprocess_env
from redisproc import RedisProcess

from taskrunner import TaskRunner
from taskrunner.cli import main

APP = "apps.cli_app:tr"
TASKRUNNER = str(Path(sys.executable).with_name("taskrunner"))
PASSWORD = f"pw-{secrets.token_hex(8)}"
WRONG = f"wrong-{secrets.token_hex(8)}"
RUN_FOR = 20.0
"""Seconds a command may run before it is stopped (SIGTERM) and its output read."""

KNOWN: dict[str, list[list[str]]] = {
    "worker": [["--burst"], ["--burst", "--processes", "2"]],
    "enqueue": [["add", "[1, 2]"], ["add", "[1, 2]", "--wait", "--timeout", "15"]],
    "info": [[], ["--json"]],
    "dead-letters": [[], ["--json"]],
    "retry-dead": [["--all"], ["no-such-job"]],
    "delete-dead": [["no-such-job"]],
    "purge-dead": [["--all"]],
}
"""Arguments after APP for the commands known today; any other command of the group
gets arguments made up from its parameters (``synthesize``)."""


@dataclass
class Run:
    argv: list[str]
    code: int
    output: str
    stopped: bool = False
    """Still running after RUN_FOR seconds: stopped with SIGTERM (``code`` is after that)."""


def synthesize(command: click.Command) -> list[list[str]]:
    """One invocation of a command nobody listed: APP for an ``app`` argument, a dummy
    value for every other argument."""
    argv: list[str] = []
    for param in command.params:
        if isinstance(param, click.Argument):
            argv.append(APP if param.name == "app" else "x")
    return [argv[1:] if argv[:1] == [APP] else argv]


def invocations() -> list[list[str]]:
    """Every command of the group, with the arguments to run it (APP first)."""
    found: list[list[str]] = []
    for name, command in sorted(main.commands.items()):
        takes_app = any(p.name == "app" for p in command.params)
        for args in KNOWN.get(name) or synthesize(command):
            found.append([name, APP, *args] if takes_app else [name, *args])
    return found


def run(argv: list[str], env: dict[str, str], log: Path) -> Run:
    """Run ``taskrunner ARGV``; stop it (SIGTERM, then SIGKILL) after RUN_FOR seconds."""
    with log.open("w") as out:
        proc = subprocess.Popen([TASKRUNNER, *argv], env=env, stdout=out, stderr=out)
        stopped = False
        try:
            proc.wait(timeout=RUN_FOR)
        except subprocess.TimeoutExpired:
            stopped = True
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=RUN_FOR)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return Run(argv, proc.returncode, log.read_text(errors="replace"), stopped)


def run_all(env: dict[str, str], tmp_path: Path, tag: str) -> list[Run]:
    argvs = invocations()
    logs = [tmp_path / f"{tag}-{i}.log" for i in range(len(argvs))]
    with ThreadPoolExecutor(max_workers=3) as pool:
        return list(pool.map(lambda a: run(a[0], env, a[1]), zip(argvs, logs, strict=True)))


def assert_no_secret(runs: list[Run], *secret: str) -> None:
    for done in runs:
        for text in secret:
            assert text not in done.output, f"{done.argv} printed a password:\n{done.output}"


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    with RedisProcess(tmp_path_factory.mktemp("locked"), password=PASSWORD) as server:
        yield server


def cli_env(url: str, namespace: str) -> dict[str, str]:
    env = subprocess_env(url, namespace)
    for key in [k for k in env if k.startswith("TASKRUNNER_") and k != "TASKRUNNER_REDIS_URL"]:
        del env[key]
    env["TASKRUNNER_LOG_LEVEL"] = "debug"
    return env


def test_every_command_is_invoked() -> None:
    ran = {argv[0] for argv in invocations()}
    assert ran == set(main.commands)
    assert {"worker", "enqueue", "info", "dead-letters", "retry-dead"} <= ran


def test_no_command_or_worker_prints_the_password(
    locked: RedisProcess, namespace: str, tmp_path: Path
) -> None:
    env = cli_env(locked.url, namespace)
    assert PASSWORD in env["TASKRUNNER_REDIS_URL"]
    worker_log = tmp_path / "worker.log"
    with worker_log.open("w") as out:
        worker = subprocess.Popen([TASKRUNNER, "worker", APP], env=env, stdout=out, stderr=out)
        try:
            runs = run_all(env, tmp_path, "good")
            # A job whose error message holds the URL: the stored error hides it.
            failing = run(["enqueue", APP, "fail", json.dumps([locked.url]), "--wait"], env,
                          tmp_path / "fail.log")  # fmt: skip
            # TASKRUNNER_REDIS_URL differs from the app's own URL: both are logged.
            other = env | {
                "CLI_APP_URL": locked.url.replace("127.0.0.1", "localhost"),
                "TASKRUNNER_REDIS_URL": locked.url,
            }
            override = run(["info", "apps.cli_app:explicit"], other, tmp_path / "override.log")
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=60)
    worker_run = Run(["worker", APP], worker.returncode, worker_log.read_text())

    assert worker_run.code == 0, worker_run.output
    assert " ready: " in worker_run.output
    by_name = {tuple(r.argv): r for r in runs}
    assert by_name[("info", APP, "--json")].code == 0, by_name[("info", APP, "--json")].output
    waited = by_name[("enqueue", APP, "add", "[1, 2]", "--wait", "--timeout", "15")]
    assert waited.code == 0, waited.output
    assert waited.output.splitlines()[-1] == "3"
    assert failing.code == 1
    assert "redis://:***@127.0.0.1" in failing.output
    assert "overrides the url given to TaskRunner()" in override.output
    assert override.output.count(":***@") >= 2
    assert_no_secret([*runs, failing, override, worker_run], PASSWORD)

    # Nothing the runs stored (job info: errors, tracebacks; dead letters) holds it but
    # the failing job's own arguments, which are the caller's data.
    client = redis.Redis.from_url(locked.url)
    try:
        keys = client.keys(f"{namespace}:*")
        assert keys
        for key in keys:
            kind = client.type(key)
            if kind == b"hash":
                stored = {k: v for k, v in client.hgetall(key).items() if k != b"args"}
                assert PASSWORD.encode() not in repr(stored).encode(), key
            else:
                assert PASSWORD.encode() not in (client.dump(key) or b""), key
    finally:
        client.close()


def test_a_wrong_password_is_never_printed(
    locked: RedisProcess, namespace: str, tmp_path: Path
) -> None:
    url = locked.url.replace(PASSWORD, WRONG)
    runs = run_all(cli_env(url, namespace), tmp_path, "wrong")
    assert_no_secret(runs, WRONG, PASSWORD)
    refused = [r for r in runs if "refused the credentials" in r.output]
    assert {r.argv[0] for r in refused} >= {"worker", "enqueue", "info", "dead-letters"}
    for done in refused:
        assert done.code == 2, done.output
        assert not done.stopped
        assert "redis at redis://:***@127.0.0.1" in done.output
        assert "Traceback" not in done.output


def test_an_unreachable_server_with_a_password_is_never_printed(
    namespace: str, tmp_path: Path, unreachable_port: int
) -> None:
    url = f"redis://user:{PASSWORD}@127.0.0.1:{unreachable_port}/0"
    runs = run_all(cli_env(url, namespace), tmp_path, "away")
    assert_no_secret(runs, PASSWORD)
    away = [r for r in runs if "cannot reach redis at redis://user:***@127.0.0.1" in r.output]
    assert {r.argv[0] for r in away} >= {"worker", "enqueue", "info", "dead-letters"}
    for done in away:
        assert done.code == 1, done.output
        assert "Traceback" not in done.output
        # Only a supervisor keeps going (it restarts its workers: Redis may come back).
        assert done.stopped == ("--processes" in done.argv), done.output


async def test_exceptions_and_reprs_in_python_hide_the_password(locked: RedisProcess) -> None:
    wrong = locked.url.replace(PASSWORD, WRONG)
    tr = TaskRunner(wrong)
    assert WRONG not in repr(tr)
    with pytest.raises(redis.AuthenticationError) as caught:
        async with tr:
            pass
    assert WRONG not in str(caught.value)
    assert WRONG not in repr(caught.value)
    with pytest.raises(ValueError, match=r"redis://:\*\*\*@") as bad:
        TaskRunner(f"redis://:{WRONG}@127.0.0.1:notaport/0")
    assert WRONG not in str(bad.value)


def test_a_password_in_a_jobs_arguments_or_result_is_not_shown(
    redis_url: str, namespace: str
) -> None:
    """A URL with a password in a job's arguments, result or error: `job`, `jobs`,
    `dead-letters`, `enqueue --wait` and the dashboard's job page show it as ***."""
    secret = f"argpw{secrets.token_hex(6)}"
    url = f"postgresql://app:{secret}@db:5432/app"
    env = subprocess_env(redis_url, namespace)

    def cli(*args: str) -> str:
        done = subprocess.run(
            [TASKRUNNER, *args], env=env, capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, done.stderr
        return done.stdout + done.stderr

    person = json.dumps([{"name": url, "age": 30}])
    job_id = cli("enqueue", APP, "greet", person).strip()
    cli("worker", APP, "--burst")
    waited = cli("enqueue", APP, "greet", person, "--job-id", job_id, "--wait")  # its result
    shown = [
        waited,
        cli("job", APP, job_id),
        cli("job", APP, job_id, "--json"),
        cli("jobs", APP, "--status", "succeeded", "--json"),
    ]
    for text in shown:
        assert secret not in text
    for text in shown[:3]:  # the listing shows no arguments or result
        assert "postgresql://app:***@db:5432/app" in text
    assert json.loads(shown[2])["args"]["person"]["name"] == "postgresql://app:***@db:5432/app"
