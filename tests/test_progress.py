"""Progress with real worker processes (tests/apps/progress_app.py): values round-trip as
JSON and are followed live, non-JSON values and values over 64 KiB are refused, a stale
copy of a job cannot overwrite the progress of the copy that replaced it, following ends
when the job is final (whatever the status), it survives a pub/sub reconnect, and
``taskrunner enqueue --wait`` prints it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import pytest
from apps.progress_app import Tasks, declare, go_key, notes_key, runner
from conftest import StartWorker, subprocess_env, wait_until
from redis.asyncio import Redis
from tcpproxy import MakeProxy

from taskrunner import Job, JobAborted, JobFailed, JobStatus, TaskRunner

APP = "apps.progress_app:tr"
DEADLINE = 30.0
VALUES: list[Any] = [
    0.0,
    0.25,
    {"done": 3, "of": 10, "note": "café ☕"},
    [1, "two", None, True],
    "almost there",
    {"nested": {"deep": [1.5, {"x": None}]}},
    1.0,
]


def app_runner(redis_url: str, namespace: str) -> tuple[TaskRunner, Tasks]:
    tr = runner(redis_url, namespace)
    return tr, declare(tr)


async def follow(job: Job[Any], tr: TaskRunner, *, open_gates: bool = False) -> list[Any]:
    """Every value ``job.progress()`` yields. With ``open_gates``, the gate of the next
    step opens after each value, so a gated ``stepped`` job is followed value by value."""
    seen: list[Any] = []
    with anyio.fail_after(DEADLINE):
        async for value in job.progress():
            seen.append(value)
            if open_gates:
                await tr.client.redis.set(go_key(tr.namespace, len(seen)), "1")
    return seen


async def notes(tr: TaskRunner) -> list[str]:
    return [str(n) for n in await tr.client.redis.lrange(notes_key(tr.namespace), 0, -1)]


async def test_every_value_round_trips_as_json_and_is_followed_live(
    cli_workers: StartWorker, redis_url: str, namespace: str
) -> None:
    await cli_workers(APP).ready()
    tr, tasks = app_runner(redis_url, namespace)
    async with tr:
        job = await tasks.stepped.enqueue(VALUES, True, False)
        seen = await follow(job, tr, open_gates=True)
        assert await job.result(timeout=DEADLINE) == len(VALUES)
        info = await job.info()
    assert seen == VALUES  # each value once, in order; the iterator ended with the job
    assert info.progress == VALUES[-1]


async def test_values_that_are_not_json_or_over_64_kib_are_refused_and_change_nothing(
    cli_workers: StartWorker, redis_url: str, namespace: str
) -> None:
    await cli_workers(APP).ready()
    tr, tasks = app_runner(redis_url, namespace)
    async with tr:
        job = await tasks.bounds.enqueue()
        happened = await job.result(timeout=DEADLINE)
        info = await job.info()
    assert happened == [
        "stored True",  # {"ok": 1}
        "TypeError",  # object(): no JSON form
        "TypeError",  # NaN is not JSON
        "TypeError",  # nested deeper than JSON encoding goes (a RecursionError before)
        "stored True",  # exactly 64 KiB
        "PayloadTooLarge",  # one byte more
    ]
    assert info.progress == "x" * (64 * 1024 - 2)  # the last value that was stored


async def test_a_stale_copy_cannot_overwrite_the_progress_of_the_copy_that_replaced_it(
    cli_workers: StartWorker, redis_url: str, namespace: str
) -> None:
    first = cli_workers(APP)
    await first.ready()
    tr, tasks = app_runner(redis_url, namespace)
    async with tr:
        job = await tasks.stalls.enqueue()

        async def first_runs() -> bool:
            return "first copy running" in await notes(tr)

        await wait_until(first_runs, DEADLINE)
        os.kill(first.pid, signal.SIGSTOP)  # stalls: its lease goes stale
        try:
            await cli_workers(APP).ready()  # reclaims the job after stale_after

            async def second_runs() -> bool:
                return bool((await job.info()).progress == "second copy")

            await wait_until(second_runs, DEADLINE)
            await tr.client.redis.set(go_key(namespace, "stale"), "1")
        finally:
            os.kill(first.pid, signal.SIGCONT)  # the stale copy now tries to write

        async def stale_tried() -> bool:
            return any(n.startswith("stale copy stored") for n in await notes(tr))

        await wait_until(stale_tried, DEADLINE)
        assert "stale copy stored: False" in await notes(tr)
        assert (await job.info()).progress == "second copy"
        await tr.client.redis.set(go_key(namespace, "second"), "1")
        assert await job.result(timeout=DEADLINE) == "second copy"
        info = await job.info()
    assert info.progress == "second copy"
    assert info.reclaims == 1


async def test_following_ends_when_the_job_is_final_whatever_its_status(
    cli_workers: StartWorker, redis_url: str, namespace: str
) -> None:
    await cli_workers(APP, "--concurrency", "4").ready()
    tr, tasks = app_runner(redis_url, namespace)
    async with tr:
        failed = await tasks.stepped.enqueue([0.5], False, True)
        assert await follow(failed, tr) == [0.5]
        with pytest.raises(JobFailed, match="failed after its progress"):
            await failed.result(timeout=1)

        silent = await tasks.stepped.enqueue([], False, False)
        assert await follow(silent, tr) == []  # never set: nothing, then the end
        assert await silent.status() == JobStatus.SUCCEEDED

        done = await tasks.stepped.enqueue([1, 2, 3], False, False)
        assert await done.result(timeout=DEADLINE) == 3
        assert await follow(done, tr) == [3]  # already final: its last value, then the end

        endless = await tasks.endless.enqueue()
        seen: list[Any] = []

        async def follow_endless() -> None:
            seen.extend(await follow(endless, tr))

        async with anyio.create_task_group() as tg:
            tg.start_soon(follow_endless)

            async def running() -> bool:
                return bool((await endless.info()).progress == 0.1)

            await wait_until(running, DEADLINE)
            await endless.abort()
        assert seen == [0.1]  # the follower ended on its own when the abort was final
        with pytest.raises(JobAborted):
            await endless.result(timeout=1)


async def test_following_survives_a_pubsub_reconnect(
    cli_workers: StartWorker, redis_url: str, namespace: str
) -> None:
    await cli_workers(APP).ready()
    tr, tasks = app_runner(redis_url, namespace)
    admin = Redis.from_url(redis_url, decode_responses=True)
    seen: list[Any] = []
    try:
        async with tr:
            job = await tasks.stepped.enqueue(["one", "two", "three"], True, False)
            with anyio.fail_after(DEADLINE):
                async for value in job.progress():
                    seen.append(value)
                    if value == "one":
                        # Cut every pub/sub connection (ours included) mid-follow.
                        assert await admin.client_kill_filter(_type="pubsub") >= 1
                    await tr.client.redis.set(go_key(namespace, len(seen)), "1")
            assert await job.result(timeout=DEADLINE) == 3
    finally:
        await admin.aclose()
    assert seen == ["one", "two", "three"]


async def test_following_that_starts_during_an_outage_waits_for_redis(
    cli_workers: StartWorker, redis_url: str, namespace: str, make_proxy: MakeProxy
) -> None:
    # job.result() rode out an outage at its start; job.progress() raised the
    # connection error of its first lookup (the job's queue not known to it yet)
    parts = urlsplit(redis_url)
    proxy = make_proxy(parts.hostname or "127.0.0.1", parts.port or 6379)
    tr, tasks = app_runner(redis_url, namespace)
    proxied = TaskRunner(f"redis://127.0.0.1:{proxy.port}/0", namespace=namespace)
    seen: list[Any] = []

    async def follow(job_id: str) -> None:
        async for value in proxied.job(job_id).progress():
            seen.append(value)

    async with tr, proxied:
        job = await tasks.stepped.enqueue(["one", "two"], False, False)
        proxy.refuse()
        proxy.cut()
        refused = proxy.stats.refused
        with anyio.fail_after(DEADLINE):
            async with anyio.create_task_group() as tg:
                tg.start_soon(follow, job.id)
                # past the connection's own retries (3 attempts): the follower's rounds
                await wait_until(lambda: _more(proxy.stats.refused, refused + 9), DEADLINE)
                proxy.accept()  # Redis is back for the follower: then the job runs
                await cli_workers(APP).ready()
        assert await job.result(timeout=DEADLINE) == 2
    assert seen[-1] == "two"  # it followed until the job was final


async def _more(now: int, before: int) -> bool:
    return now > before


async def test_hostile_progress_reads_as_absent(
    cli_workers: StartWorker, redis_url: str, namespace: str
) -> None:
    await cli_workers(APP).ready()
    tr, tasks = app_runner(redis_url, namespace)
    async with tr:
        job = await tasks.stepped.enqueue([1], False, False)
        assert await job.result(timeout=DEADLINE) == 1
        keys = await tr.client.locate(job.queue, job.id)
        await tr.client.redis.hset(keys.job(job.id), "progress", "{not json \udcff")
        assert (await job.info()).progress is None
        assert await follow(job, tr) == [None]


def run_cli(redis_url: str, namespace: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).with_name("taskrunner")), *args],
        env=subprocess_env(redis_url, namespace),
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )


def test_the_cli_prints_progress_live_with_enqueue_wait_and_in_job(
    cli_workers: StartWorker, redis_url: str, namespace: str
) -> None:
    cli_workers(APP).wait_for(" ready: ")
    values = [0.5, {"step": 2}, 1.0]
    args = json.dumps({"values": values})
    done = run_cli(
        redis_url, namespace, "enqueue", APP, "stepped", args, "--wait", "--job-id", "p1"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "3\n"
    lines = done.stderr.splitlines()
    assert lines, "no progress printed"
    assert all(line.startswith("progress: ") for line in lines), lines
    printed = [json.loads(line.removeprefix("progress: ")) for line in lines]
    # Values set faster than they are read may be merged; the order holds and the
    # final value is always printed.
    assert printed == [v for v in values if v in printed]
    assert printed[-1] == values[-1]

    shown = run_cli(redis_url, namespace, "job", APP, "p1")
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"^progress +1\.0$", shown.stdout, re.MULTILINE), shown.stdout
