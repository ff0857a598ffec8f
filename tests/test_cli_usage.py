"""Small CLI surprises, fixed: ``enqueue --timeout`` without ``--wait``, a bad ``-q``
name (refused before any Redis is started), and a job sent to a queue nobody serves."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
from redis.asyncio import Redis
from test_cli import APP, assert_one_line_error, background, env, run_cli, run_cli_async

from taskrunner.keys import QueueKeys

__all__ = ["env"]  # the fixture, shared with test_cli

WARNING = "taskrunner: warning: no task is declared on queue"


async def test_python_dash_m_taskrunner_is_the_command(env: dict[str, str]) -> None:
    async def python_m(*args: str) -> subprocess.CompletedProcess[str]:
        return await anyio.to_thread.run_sync(
            lambda: subprocess.run(
                [sys.executable, "-m", "taskrunner", *args],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        )

    sent = await python_m("enqueue", APP, "add", "[1, 2]")
    assert sent.returncode == 0, sent.stderr
    job_id = sent.stdout.strip()
    drained = await python_m("worker", APP, "--burst")
    assert drained.returncode == 0, drained.stderr
    assert f"job {job_id} add attempt 1 succeeded" in drained.stderr


def test_enqueue_timeout_without_wait_is_a_usage_error(env: dict[str, str]) -> None:
    done = run_cli(env, "enqueue", APP, "add", "[1, 2]", "--timeout", "3")
    assert_one_line_error(done, "--timeout only applies with --wait")
    assert done.stdout == ""


@pytest.mark.parametrize("command", ["worker", "enqueue", "info"])
def test_a_bad_queue_name_exits_2_before_starting_redis(
    env: dict[str, str], tmp_path: Path, command: str
) -> None:
    del env["TASKRUNNER_REDIS_URL"]  # would start the embedded server in tmp_path
    args = [command, APP] + (["add", "[1, 2]"] if command == "enqueue" else [])
    started = time.monotonic()
    done = run_cli_in(tmp_path, env, *args, "-q", "bad{q}")
    assert_one_line_error(done, "invalid queue name 'bad{q}'")
    assert not (tmp_path / ".taskrunner").exists()
    assert time.monotonic() - started < 30  # no server start, no connection attempt


def test_a_bad_queue_name_from_the_environment_exits_2(env: dict[str, str]) -> None:
    done = run_cli(env | {"TASKRUNNER_QUEUES": "default,a b"}, "worker", APP, "--burst")
    assert_one_line_error(done, "invalid queue name 'a b'")


def run_cli_in(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).with_name("taskrunner")), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_enqueue_to_an_unserved_queue_warns_and_still_sends(env: dict[str, str]) -> None:
    done = run_cli(env, "enqueue", APP, "add", "[1, 2]", "-q", "nobody-here")
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.split()) == 1  # the job id
    assert WARNING in done.stderr
    assert "-q nobody-here" in done.stderr


def test_enqueue_to_a_declared_queue_does_not_warn(env: dict[str, str]) -> None:
    done = run_cli(env, "enqueue", APP, "add", "[1, 2]")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


async def test_enqueue_to_a_queue_a_live_worker_consumes_does_not_warn(
    env: dict[str, str], tmp_path: Path, redis_url: str, namespace: str
) -> None:
    with background(tmp_path, env, "worker", APP, "-q", "extra") as worker:
        await worker.wait_for(" ready: ")
        done = await run_cli_async(env, "enqueue", APP, "add", "[1, 2]", "-q", "extra", "--wait")
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "3"
        assert WARNING not in done.stderr
    # The worker is gone (its heartbeat ages past stale_after or it deregistered): warn.
    async with Redis.from_url(redis_url) as redis:
        await redis.delete(QueueKeys(namespace, "extra").workers)
    done = await run_cli_async(env, "enqueue", APP, "add", "[1, 2]", "-q", "extra")
    assert WARNING in done.stderr
