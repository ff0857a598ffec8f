"""The ``taskrunner`` command as real subprocesses: settings and their precedence,
one-line errors, ``enqueue``, ``info``, ``--processes`` (a supervisor that restarts
crashed children and forwards signals), ``--reload``, ``--version`` and ``--help``.

(``tests/test_cli_worker.py`` covers the single worker: burst, signals, bad APP paths.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest
from conftest import subprocess_env, wait_until
from redis.asyncio import Redis

from taskrunner import TaskRunner
from taskrunner.cli.info import gather, table
from taskrunner.keys import GROUP, QueueKeys

APP = "apps.cli_app:tr"
DEADLINE = 60.0
TASKRUNNER = str(Path(sys.executable).with_name("taskrunner"))


@pytest.fixture
def env(redis_url: str, namespace: str) -> dict[str, str]:
    """The child environment, without stray ``TASKRUNNER_*`` settings of the host."""
    found = subprocess_env(redis_url, namespace)
    for key in [k for k in found if k.startswith("TASKRUNNER_")]:
        if key != "TASKRUNNER_REDIS_URL":
            del found[key]
    return found


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TASKRUNNER, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )


async def run_cli_async(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return await anyio.to_thread.run_sync(lambda: run_cli(env, *args))


class Background:
    """A long-running ``taskrunner`` process; stdout and stderr go to a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path, cwd: Path | None = None):
        self.log = log
        self._file = log.open("w")
        self.proc = subprocess.Popen(
            [TASKRUNNER, *args],
            env=env,
            stdout=self._file,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=cwd,
        )

    def output(self) -> str:
        return self.log.read_text()

    async def wait_for(self, text: str, count: int = 1, timeout: float = DEADLINE) -> None:
        async def seen() -> bool:
            if self.proc.poll() is not None and self.output().count(text) < count:
                raise AssertionError(f"exited with {self.proc.returncode}:\n{self.output()}")
            return self.output().count(text) >= count

        await wait_until(seen, timeout, interval=0.05)

    async def exit_code(self, timeout: float = DEADLINE) -> int:
        async def exited() -> bool:
            return self.proc.poll() is not None

        await wait_until(exited, timeout, interval=0.05)
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            for child in _children(self.proc.pid):
                child.kill()
            self.proc.kill()
        self.proc.wait(timeout=DEADLINE)
        self._file.close()


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@contextmanager
def background(
    tmp_path: Path, env: dict[str, str], *args: str, cwd: Path | None = None
) -> Iterator[Background]:
    proc = Background(list(args), env, tmp_path / f"bg-{time.monotonic_ns()}.log", cwd)
    try:
        yield proc
    finally:
        proc.close()


def assert_one_line_error(
    done: subprocess.CompletedProcess[str], *fragments: str, code: int = 2
) -> None:
    assert done.returncode == code, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("taskrunner: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0]


# -- version and help ------------------------------------------------------------------------


def test_version_prints_the_package_version(env: dict[str, str]) -> None:
    from taskrunner import __version__

    done = run_cli(env, "--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"taskrunner {__version__}"


@pytest.mark.parametrize("command", ["worker", "enqueue", "info"])
def test_help_of_each_command_shows_an_example(env: dict[str, str], command: str) -> None:
    done = run_cli(env, command, "--help")
    assert done.returncode == 0, done.stderr
    assert "Example:" in done.stdout
    assert f"taskrunner {command} " in done.stdout.split("Example:")[1]


def test_help_lists_every_command(env: dict[str, str]) -> None:
    done = run_cli(env, "--help")
    assert done.returncode == 0
    for command in ("worker", "enqueue", "info"):
        assert f"  {command} " in done.stdout


# -- bad arguments and settings: one line, exit 2 ----------------------------------------------


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["worker", APP, "--concurrency", "abc"], ["--concurrency", "abc"]),
        (["worker", APP, "--concurrency", "0"], ["--concurrency=0", "greater than or equal"]),
        (["worker", APP, "--grace-period", "-1"], ["--grace-period"]),
        (["worker", APP, "--log-level", "loud"], ["--log-level", "loud"]),
        (["worker", APP, "--bogus"], ["--bogus", "taskrunner worker --help"]),
        (["worker"], ["APP"]),
        (["frobnicate"], ["frobnicate"]),
        (["enqueue", APP, "add", "[1,"], ["not valid JSON"]),
        (["enqueue", APP, "add", "5"], ["array or object"]),
        (["enqueue", APP, "nosuch"], ["nosuch", "add", "greet"]),
        (["enqueue", APP, "add", "[1]", "--delay", "-1"], ["--delay"]),
        (["enqueue", APP, "add", "[1]", "--delay", "soon"], ["--delay", "soon"]),
        (["enqueue", "no_such_module_xyz:tr", "add"], ["no_such_module_xyz"]),
        (["info", "apps.cli_app:not_a_runner"], ["not a TaskRunner"]),
        (["info", "apps.cli_app"], ["module:attribute"]),
        (["info", "apps/cli_app.py:tr"], ["a module, not a file", "module path: apps.cli_app:tr"]),
        (["worker", "./apps/cli_app.py:tr"], ["a module, not a file", "path: apps.cli_app:tr"]),
        (["info", "cli_app:tr"], ["No module named 'cli_app'", "from the current directory"]),
    ],
)
def test_bad_argument_prints_one_line_and_exits_2(
    env: dict[str, str], args: list[str], fragments: list[str]
) -> None:
    assert_one_line_error(run_cli(env, *args), *fragments)


@pytest.mark.parametrize(
    ("variables", "fragments"),
    [
        ({"TASKRUNNER_CONCURENCY": "5"}, ["TASKRUNNER_CONCURENCY", "TASKRUNNER_CONCURRENCY?"]),
        ({"TASKRUNNER_NO_SUCH_THING": "1"}, ["unknown setting TASKRUNNER_NO_SUCH_THING"]),
        ({"TASKRUNNER_CONCURRENCY": "lots"}, ["TASKRUNNER_CONCURRENCY='lots'", "integer"]),
        ({"TASKRUNNER_BURST": "perhaps"}, ["TASKRUNNER_BURST", "boolean"]),
        ({"TASKRUNNER_LOG_LEVEL": "loud"}, ["TASKRUNNER_LOG_LEVEL"]),
        ({"TASKRUNNER_PROCESSES": "0"}, ["TASKRUNNER_PROCESSES"]),
    ],
)
@pytest.mark.parametrize("command", ["worker", "info"])
def test_bad_environment_setting_prints_one_line_and_exits_2(
    env: dict[str, str], variables: dict[str, str], fragments: list[str], command: str
) -> None:
    assert_one_line_error(run_cli(env | variables, command, APP), *fragments)


# -- settings precedence: flag > TASKRUNNER_* > the TaskRunner object > default ----------------


@pytest.mark.parametrize(
    ("variables", "flags", "expected"),
    [
        ({}, [], "queues default,other, concurrency 100"),
        ({"TASKRUNNER_CONCURRENCY": "3"}, [], "queues default,other, concurrency 3"),
        ({"TASKRUNNER_CONCURRENCY": "3"}, ["-c", "5"], "queues default,other, concurrency 5"),
        ({"TASKRUNNER_QUEUES": "other"}, [], "queues other, concurrency 100"),
        ({"TASKRUNNER_QUEUES": "other, default"}, ["-q", "x"], "queues x, concurrency 100"),
        ({"TASKRUNNER_QUEUES": ""}, [], "queues default,other, concurrency 100"),  # as unset
        ({"TASKRUNNER_QUEUES": " , "}, [], "queues default,other, concurrency 100"),
    ],
)
def test_worker_settings_come_from_flags_then_environment_then_defaults(
    env: dict[str, str], variables: dict[str, str], flags: list[str], expected: str
) -> None:
    # TASKRUNNER_BURST comes from the environment too: without it this would never exit.
    done = run_cli(env | variables | {"TASKRUNNER_BURST": "true"}, "worker", APP, *flags)
    assert done.returncode == 0, done.stderr
    assert f"ready: {expected}" in done.stderr


async def test_redis_url_comes_from_the_taskrunner_object_when_the_environment_has_none(
    env: dict[str, str], redis_url: str, redis: Redis, namespace: str
) -> None:
    without = {k: v for k, v in env.items() if k != "TASKRUNNER_REDIS_URL"}
    without["CLI_APP_URL"] = redis_url
    done = await run_cli_async(
        without, "enqueue", "apps.cli_app:explicit", "explicit_add", "[1, 2]"
    )
    assert done.returncode == 0, done.stderr
    job_key = QueueKeys(namespace, "default").job(done.stdout.strip())
    assert await redis.hget(job_key, "task") == "explicit_add"


def test_environment_redis_url_overrides_the_taskrunner_object(
    env: dict[str, str], redis_url: str, unreachable_port: int
) -> None:
    unreachable = f"redis://127.0.0.1:{unreachable_port}/0"
    overridden = env | {"CLI_APP_URL": redis_url, "TASKRUNNER_REDIS_URL": unreachable}
    done = run_cli(overridden, "info", "apps.cli_app:explicit")
    assert done.returncode == 1
    assert "overrides the url given to TaskRunner()" in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("taskrunner: error: cannot reach redis")
    assert "Traceback" not in done.stderr


# -- enqueue --------------------------------------------------------------------------------


async def test_enqueue_prints_the_job_id_of_a_queued_job(
    env: dict[str, str], redis: Redis, namespace: str
) -> None:
    done = await run_cli_async(env, "enqueue", APP, "add", "[1, 2]")
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip()
    keys = QueueKeys(namespace, "default")
    assert await redis.hget(keys.job(job_id), "status") == "queued"
    assert await redis.hget(keys.job(job_id), "args") == '{"x":1,"y":2}'
    assert await redis.xlen(keys.stream) == 1


async def test_enqueue_of_an_existing_job_id_says_nothing_new_was_written(
    env: dict[str, str], redis: Redis, namespace: str
) -> None:
    first = await run_cli_async(env, "enqueue", APP, "add", "[1, 2]", "--job-id", "once")
    assert first.returncode == 0, first.stderr
    assert "already exists" not in first.stderr
    again = await run_cli_async(env, "enqueue", APP, "add", "[5, 5]", "--job-id", "once")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "once"
    assert "job once already exists; nothing new was written" in again.stderr
    keys = QueueKeys(namespace, "default")
    assert await redis.hget(keys.job("once"), "args") == '{"x":1,"y":2}'


async def test_enqueue_with_delay_schedules_the_job(
    env: dict[str, str], redis: Redis, namespace: str
) -> None:
    done = await run_cli_async(env, "enqueue", APP, "add", '{"x": 1, "y": 2}', "--delay", "3600")
    assert done.returncode == 0, done.stderr
    keys = QueueKeys(namespace, "default")
    assert await redis.hget(keys.job(done.stdout.strip()), "status") == "scheduled"
    assert await redis.zcard(keys.delayed) == 1
    assert await redis.xlen(keys.stream) == 0


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        ('["one", 2]', ["add", "x", "valid integer", "'one'"]),
        ('{"x": 1}', ["add", "missing", "'y'"]),
        ('{"x": 1, "y": 2, "z": 3}', ["add", "z"]),
        ("[1, 2, 3]", ["add", "too many"]),
    ],
)
async def test_enqueue_with_invalid_arguments_prints_one_line_and_writes_nothing(
    env: dict[str, str], redis: Redis, namespace: str, args: str, fragments: list[str]
) -> None:
    assert_one_line_error(await run_cli_async(env, "enqueue", APP, "add", args), *fragments)
    assert await redis.keys(f"{namespace}:*") == []


async def test_enqueue_wait_prints_the_result_as_json(env: dict[str, str], tmp_path: Path) -> None:
    with background(tmp_path, env, "worker", APP) as worker:
        await worker.wait_for(" ready: ")
        done = await run_cli_async(env, "enqueue", APP, "add", "[1, 2]", "--wait")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == 3
        person = '{"person": {"name": "ada", "age": "36"}, "punctuation": "?"}'
        done = await run_cli_async(env, "enqueue", APP, "greet", person, "--wait")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {"text": "hello ada?", "adult": True}
        worker.proc.send_signal(signal.SIGTERM)
        assert await worker.exit_code() == 0


async def test_enqueue_wait_for_a_failing_job_prints_its_error_and_exits_1(
    env: dict[str, str], tmp_path: Path
) -> None:
    with background(tmp_path, env, "worker", APP) as worker:
        await worker.wait_for(" ready: ")
        done = await run_cli_async(env, "enqueue", APP, "fail", '["boom"]', "--wait")
        assert_one_line_error(done, "failed", "ValueError: boom", code=1)


async def test_enqueue_wait_gives_up_after_timeout_and_the_job_stays(
    env: dict[str, str], redis: Redis, namespace: str
) -> None:
    done = await run_cli_async(env, "enqueue", APP, "add", "[1, 2]", "--wait", "--timeout", "0.2")
    assert_one_line_error(done, "did not finish within 0.2s", code=1)
    keys = QueueKeys(namespace, "default")
    assert await redis.xlen(keys.stream) == 1


# -- info -----------------------------------------------------------------------------------


async def info_json(env: dict[str, str]) -> dict[str, Any]:
    done = await run_cli_async(env, "info", APP, "--json")
    assert done.returncode == 0, done.stderr
    found: dict[str, Any] = json.loads(done.stdout)
    return found


async def test_info_counts_every_state_and_lists_live_workers(
    env: dict[str, str], redis: Redis, namespace: str, tmp_path: Path
) -> None:
    keys = QueueKeys(namespace, "default")
    # One failed job and one dead-lettered one (an entry without a job), by a burst worker.
    assert (await run_cli_async(env, "enqueue", APP, "fail", '["boom"]')).returncode == 0
    await redis.xadd(keys.stream, {"job": "no-such-job"})
    assert (await run_cli_async(env, "worker", APP, "--burst")).returncode == 0
    # Two queued and one scheduled on "default"; one running on "other".
    for args in (["add", "[1, 2]"], ["add", "[3, 4]"], ["add", "[5, 6]", "--delay", "3600"]):
        assert (await run_cli_async(env, "enqueue", APP, *args)).returncode == 0
    marker = tmp_path / "started"
    sleepy = json.dumps([3600, str(marker)])
    done = await run_cli_async(env, "enqueue", APP, "sleepy", sleepy, "--queue", "other")
    assert done.returncode == 0, done.stderr

    async def worker_listed() -> bool:
        return bool((await info_json(env))["queues"]["other"]["workers"])

    with background(tmp_path, env, "worker", APP, "-q", "other", "--grace-period", "0.2") as w:
        await wait_until(lambda: anyio.Path(marker).exists(), DEADLINE)
        await wait_until(worker_listed, DEADLINE, interval=0.2)
        found = await info_json(env)
        assert found["namespace"] == namespace
        default, other = found["queues"]["default"], found["queues"]["other"]
        counts = {k: default[k] for k in ("queued", "scheduled", "running", "failed", "dead")}
        assert counts == {"queued": 2, "scheduled": 1, "running": 0, "failed": 1, "dead": 1}
        assert (other["queued"], other["running"], other["scheduled"]) == (0, 1, 0)
        assert default["workers"] == []
        [listed] = other["workers"]
        assert listed["id"].split(":")[1] == str(w.proc.pid)
        assert 0 <= listed["age"] <= 30  # live: at most stale_after old
        assert abs(listed["last_heartbeat"] - time.time()) <= 30

        table = await run_cli_async(env, "info", APP)
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert lines[0].split() == [
            "QUEUE", "QUEUED", "SCHEDULED", "RUNNING", "FAILED", "DEAD", "WORKERS"
        ]  # fmt: skip
        assert lines[1].split() == ["default", "2", "1", "0", "1", "1", "0"]
        assert lines[2].split() == ["other", "0", "0", "1", "0", "0", "1"]
        assert any(line.startswith(listed["id"]) and "ago" in line for line in lines)

        w.proc.send_signal(signal.SIGTERM)
        assert await w.exit_code() == 0
    # The running job was handed back and the worker deregistered.
    other = (await info_json(env))["queues"]["other"]
    assert (other["queued"], other["running"], other["workers"]) == (1, 0, [])
    assert (await redis.xpending(QueueKeys(namespace, "other").stream, GROUP))["pending"] == 0


async def test_info_on_an_empty_namespace_shows_zeros(env: dict[str, str]) -> None:
    found = await info_json(env)
    assert set(found["queues"]) == {"default", "other"}
    zeros = dict.fromkeys(("queued", "scheduled", "running", "failed", "dead"), 0)
    for queue in found["queues"].values():
        assert queue == {
            "queued": 0,
            "scheduled": 0,
            "running": 0,
            "failed": 0,
            "dead": 0,
            "partitions": [zeros],
            "paused": False,
            "paused_partitions": 0,
            "workers": [],
            "stale_workers": [],
        }
    done = await run_cli_async(env, "info", APP, "-q", "default")
    assert done.returncode == 0
    assert "no live workers" in done.stdout
    assert "other" not in done.stdout


async def test_info_shows_a_paused_queue_until_it_is_resumed(env: dict[str, str]) -> None:
    # a paused queue looked like a stuck one: jobs queued, a live worker, no word of why
    assert (await run_cli_async(env, "queue", "pause", APP, "other")).returncode == 0
    paused = await info_json(env)
    table = await run_cli_async(env, "info", APP)
    assert (await run_cli_async(env, "queue", "resume", APP, "other")).returncode == 0
    resumed = await info_json(env)
    assert (paused["queues"]["other"]["paused"], paused["queues"]["default"]["paused"]) == (
        True,
        False,
    )
    assert paused["queues"]["other"]["paused_partitions"] == 1
    rows = {line.split()[0]: line for line in table.stdout.splitlines()[1:3]}
    assert rows["other"].split()[:2] == ["other", "(paused)"]
    assert "paused" not in rows["default"]
    assert resumed["queues"]["other"]["paused"] is False


async def test_info_shows_a_queue_paused_in_some_partitions_only(
    make_runner: Callable[..., TaskRunner], redis: Redis
) -> None:
    tr = make_runner(partitions=2)
    async with tr:
        await tr.pause("default")
        await redis.delete(tr.client.keys("default", 1).paused)  # an interrupted pause
        found = await gather(tr, ["default"])
    assert (found.queues["default"].paused, found.queues["default"].paused_partitions) == (True, 1)
    assert table(found).splitlines()[1].split()[:3] == ["default", "(paused", "1/2)"]


# -- --processes: a supervisor ---------------------------------------------------------------


async def test_supervisor_restarts_a_killed_child_and_forwards_sigterm(
    env: dict[str, str], tmp_path: Path, redis: Redis, namespace: str
) -> None:
    with background(tmp_path, env, "worker", APP, "--processes", "2") as sup:
        await sup.wait_for(" ready: ", count=2)
        children = _children(sup.proc.pid)
        assert len(children) == 2
        assert all(c.cmdline()[-1] == "--supervised" for c in children)

        children[0].kill()
        await sup.wait_for("exited with SIGKILL; restarting it")
        await sup.wait_for(" ready: ", count=3)
        now = {c.pid for c in _children(sup.proc.pid)}
        assert len(now) == 2
        assert children[0].pid not in now
        assert children[1].pid in now

        # The restarted pool works: a job runs, and a long one is running at SIGTERM.
        done = await run_cli_async(env, "enqueue", APP, "add", "[2, 3]", "--wait")
        assert json.loads(done.stdout) == 5
        marker = tmp_path / "started"
        sleepy = json.dumps([0.5, str(marker)])
        done = await run_cli_async(env, "enqueue", APP, "sleepy", sleepy)
        job_key = QueueKeys(namespace, "default").job(done.stdout.strip())
        await wait_until(lambda: anyio.Path(marker).exists(), DEADLINE)
        survivors = _children(sup.proc.pid)
        sup.proc.send_signal(signal.SIGTERM)
        assert await sup.exit_code() == 0, sup.output()
        assert "received SIGTERM: stopping 2 worker process(es)" in sup.output()
        assert sup.output().count("received SIGTERM: stopping gracefully") == 2
        assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in survivors)
    # The job running at SIGTERM finished within the grace period.
    assert await redis.hget(job_key, "status") == "succeeded"


async def test_supervised_children_stop_when_the_supervisor_is_killed(
    env: dict[str, str], tmp_path: Path
) -> None:
    with background(tmp_path, env, "worker", APP, "--processes", "2") as sup:
        await sup.wait_for(" ready: ", count=2)
        children = _children(sup.proc.pid)
        sup.proc.kill()
        await sup.wait_for("the supervisor is gone; stopping", count=2)

        async def all_gone() -> bool:
            return not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)

        await wait_until(all_gone, DEADLINE)


# -- --reload --------------------------------------------------------------------------------

RELOADABLE = """
from taskrunner import TaskRunner
import os

tr = TaskRunner(namespace=os.environ["TEST_NAMESPACE"])


@tr.task
async def version() -> int:
    return {version}
"""


async def test_reload_restarts_the_worker_when_code_changes(
    env: dict[str, str], tmp_path: Path
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    module = project / "reloadable.py"
    module.write_text(RELOADABLE.format(version=1))
    child_env = env | {"PYTHONPATH": os.pathsep.join([str(project), env["PYTHONPATH"]])}

    async def result() -> Any:
        done = await anyio.to_thread.run_sync(
            lambda: subprocess.run(
                [TASKRUNNER, "enqueue", "reloadable:tr", "version", "--wait", "--timeout", "30"],
                env=child_env,
                cwd=project,
                capture_output=True,
                text=True,
                timeout=DEADLINE,
                check=False,
            )
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    with background(tmp_path, child_env, "worker", "reloadable:tr", "--reload", cwd=project) as w:
        await w.wait_for(" ready: ")
        assert await result() == 1
        module.write_text(RELOADABLE.format(version=2))
        await w.wait_for("detected changes in reloadable.py")
        await w.wait_for(" ready: ", count=2)
        assert await result() == 2
        assert w.output().count(" stopped") == 1  # the first worker stopped gracefully
        w.proc.send_signal(signal.SIGTERM)
        await w.exit_code()
        assert w.output().count(" stopped") == 2


async def test_info_lists_a_worker_without_recent_heartbeats_as_stale(
    env: dict[str, str], redis: Redis, namespace: str
) -> None:
    keys = QueueKeys(namespace, "default")
    an_hour_ago = int((time.time() - 3600) * 1000)
    await redis.zadd(keys.workers, {"crashed-host:123:abc": an_hour_ago})
    default = (await info_json(env))["queues"]["default"]
    assert default["workers"] == []
    [stale] = default["stale_workers"]
    assert stale["id"] == "crashed-host:123:abc"
    assert stale["last_heartbeat"] == an_hour_ago / 1000
    done = await run_cli_async(env, "info", APP)
    assert any(
        line.startswith("crashed-host:123:abc") and line.endswith("(stale)")
        for line in done.stdout.splitlines()
    )


@pytest.mark.parametrize("value", ["", ","])
def test_info_reads_an_empty_taskrunner_queues_as_unset_like_the_worker(
    env: dict[str, str], value: str
) -> None:
    done = run_cli(env | {"TASKRUNNER_QUEUES": value}, "info", APP, "--json")
    assert done.returncode == 0, done.stderr
    assert sorted(json.loads(done.stdout)["queues"]) == ["default", "other"]
