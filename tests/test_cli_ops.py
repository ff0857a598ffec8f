"""``taskrunner job``, ``jobs``, ``abort``, ``retry`` and ``queue pause|resume`` as real
subprocesses, with real worker processes (``taskrunner worker --burst``)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import subprocess_env
from redis.asyncio import Redis

from taskrunner import TaskRunner
from taskrunner.keys import QueueKeys

APP = "apps.cli_app:tr"
DEADLINE = 60.0
TASKRUNNER = str(Path(sys.executable).with_name("taskrunner"))


@pytest.fixture
def env(redis_url: str, namespace: str) -> dict[str, str]:
    found = subprocess_env(redis_url, namespace)
    for key in [k for k in found if k.startswith("TASKRUNNER_") and k != "TASKRUNNER_REDIS_URL"]:
        del found[key]
    return found


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TASKRUNNER, *args], env=env, capture_output=True, text=True, timeout=DEADLINE, check=False
    )


def enqueue(env: dict[str, str], task: str, args: str) -> str:
    done = cli(env, "enqueue", APP, task, args)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def burst(env: dict[str, str]) -> None:
    done = cli(env, "worker", APP, "--burst", "--queue", "default")
    assert done.returncode == 0, done.stderr


def test_job_shows_the_error_and_traceback_and_retry_runs_it_again(env: dict[str, str]) -> None:
    failing = enqueue(env, "fail", '["boom"]')
    burst(env)
    text = cli(env, "job", APP, failing)
    assert text.returncode == 0, text.stderr
    assert "status      failed" in text.stdout
    assert "priority    default" in text.stdout
    assert "queue       default (partition 0)" in text.stdout
    assert 'arguments   {"message": "boom"}' in text.stdout
    assert "ValueError: boom" in text.stdout
    assert "Traceback (most recent call last)" in text.stdout
    as_json = json.loads(cli(env, "job", APP, failing, "--json").stdout)
    assert as_json["status"] == "failed"
    assert as_json["error"]["type"] == "ValueError"
    assert as_json["args"] == {"message": "boom"}
    assert as_json["run_time"] >= 0
    listed = json.loads(cli(env, "jobs", APP, "--status", "failed", "--json").stdout)
    assert [j["id"] for j in listed["jobs"]] == [failing]
    assert listed["cursor"] is None
    retried = cli(env, "retry", APP, failing)
    assert retried.returncode == 0, retried.stderr
    assert retried.stdout.strip() == f"job {failing}: queued again"
    assert json.loads(cli(env, "job", APP, failing, "--json").stdout)["status"] == "queued"
    burst(env)  # fails again (the task always raises): retried by hand once
    again = json.loads(cli(env, "job", APP, failing, "--json").stdout)
    assert (again["status"], again["reruns"]) == ("failed", 1)


def test_retry_and_abort_of_a_succeeded_job_and_a_missing_one_fail_in_one_line(
    env: dict[str, str],
) -> None:
    done = enqueue(env, "add", "[1, 2]")
    burst(env)
    refused = cli(env, "retry", APP, done)
    assert refused.returncode == 1
    assert refused.stderr == (
        f"taskrunner: error: job {done} is succeeded: only failed, aborted, rejected or "
        "dead jobs can be retried\n"
    )
    not_aborted = cli(env, "abort", APP, done)
    assert not_aborted.returncode == 1
    assert not_aborted.stderr == (
        f"taskrunner: error: job {done} is succeeded: only scheduled, queued or running "
        "jobs can be aborted\n"
    )
    assert json.loads(cli(env, "job", APP, done, "--json").stdout)["status"] == "succeeded"
    missing = cli(env, "job", APP, "no-such-job")
    assert missing.returncode == 1
    assert missing.stderr == "taskrunner: error: no job 'no-such-job'\n"


def test_jobs_pages_with_a_cursor_and_abort_ends_a_queued_job(env: dict[str, str]) -> None:
    ids = [enqueue(env, "add", f"[{i}, 1]") for i in range(5)]
    seen: list[str] = []
    args = ["jobs", APP, "--status", "queued", "--limit", "2"]
    pages = 0
    while True:
        page = cli(env, *args)
        assert page.returncode == 0, page.stderr
        pages += 1
        lines = page.stdout.strip().splitlines()
        assert lines[0].startswith("ID")
        more = [line for line in lines if line.startswith("more: --cursor ")]
        seen += [line.split()[0] for line in lines[1:] if not line.startswith("more:")]
        if not more:
            break
        args = ["jobs", APP, "--status", "queued", "--limit", "2", "--cursor", more[0].split()[-1]]
    assert seen == ids
    assert pages == 3
    aborted = cli(env, "abort", APP, ids[0])
    assert aborted.stdout.strip() == f"job {ids[0]}: aborted"
    again = cli(env, "abort", APP, ids[0])  # an aborted job's abort: the same answer
    assert (again.returncode, again.stdout.strip()) == (0, f"job {ids[0]}: aborted")
    listed = cli(env, "jobs", APP, "--task", "add", "--status", "aborted", "--json")
    assert [j["id"] for j in json.loads(listed.stdout)["jobs"]] == [ids[0]]
    assert "note" not in listed.stderr
    typo = cli(env, "jobs", APP, "--task", "ad")  # listed all the same, with a note
    assert (typo.returncode, typo.stdout.strip()) == (0, "no jobs")
    assert typo.stderr.startswith("taskrunner: note: this app declares no task 'ad' (its tasks: ")
    assert "add" in typo.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["jobs", APP, "--status", "nope"], "Invalid value for '--status'"),
        (["jobs", APP, "--limit", "0"], "Invalid value for '--limit'"),
        (["jobs", APP, "--cursor", "garbage!"], "invalid cursor"),
        (["jobs", APP, "--queue", "bad queue"], "invalid queue name"),
        (["queue", "pause", APP, "bad{queue}"], "invalid queue name"),
        (["queue", "stop", APP, "default"], "No such command 'stop'"),
        (["job", APP], "Missing argument 'JOB_ID'"),
    ],
)
def test_bad_arguments_print_one_line_and_exit_2(
    env: dict[str, str], args: list[str], message: str
) -> None:
    done = cli(env, *args)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("taskrunner: error: ")
    assert message in done.stderr


async def test_queue_pause_and_resume_set_the_key_workers_follow(
    env: dict[str, str], redis: Redis, namespace: str
) -> None:
    keys = QueueKeys(namespace, "default")
    paused = cli(env, "queue", "pause", APP, "default")
    assert (paused.returncode, paused.stdout) == (0, "queue default paused\n")
    assert await redis.exists(keys.paused)
    job_id = enqueue(env, "add", "[2, 2]")  # a paused queue accepts jobs
    burst(env)  # a worker takes nothing from it
    assert await redis.hget(keys.job(job_id), "status") == "queued"
    resumed = cli(env, "queue", "resume", APP, "default")
    assert (resumed.returncode, resumed.stdout) == (0, "queue default resumed\n")
    assert not await redis.exists(keys.paused)
    burst(env)
    assert await redis.hget(keys.job(job_id), "status") == "succeeded"


async def test_queue_pause_of_a_queue_no_task_uses_is_done_with_a_note(
    env: dict[str, str], redis: Redis, namespace: str
) -> None:
    # a typo ("defualt") paused a queue nobody uses and said nothing
    paused = cli(env, "queue", "pause", APP, "defualt")
    assert (paused.returncode, paused.stdout) == (0, "queue defualt paused\n")
    assert paused.stderr == (
        "taskrunner: note: no task of this app uses queue 'defualt' (its queues: default, other)\n"
    )
    assert await redis.exists(QueueKeys(namespace, "defualt").paused)
    resumed = cli(env, "queue", "resume", APP, "defualt")
    assert resumed.returncode == 0
    assert "no task of this app uses queue 'defualt'" in resumed.stderr
    known = cli(env, "queue", "pause", APP, "other")
    assert (known.returncode, known.stderr) == (0, "")


async def test_jobs_filters_by_priority_and_refuses_an_unknown_level(
    env: dict[str, str], make_runner: Callable[..., TaskRunner]
) -> None:
    producer = make_runner()

    @producer.task(name="add")
    async def add(x: int, y: int) -> int:
        return x + y

    async with producer:
        high = (await add.options(priority="high").enqueue(1, 2)).id
        await add.options(priority="low").enqueue(3, 4)
    listed = json.loads(cli(env, "jobs", APP, "--priority", "high", "--json").stdout)
    assert [(j["id"], j["priority"]) for j in listed["jobs"]] == [(high, "high")]
    table = cli(env, "jobs", APP, "--priority", "high").stdout.splitlines()
    assert table[0].split()[:4] == ["ID", "STATUS", "QUEUE", "PRIORITY"]
    assert table[1].split()[:4] == [high, "queued", "default", "high"]
    refused = cli(env, "jobs", APP, "--priority", "urgent")
    assert refused.returncode == 2
    assert refused.stderr == (
        "taskrunner: error: unknown priority 'urgent' (levels: high, default, low)\n"
    )
