"""What the worker tells its operator: a failure for good at ERROR with the task's
traceback once (no taskrunner frames), a retry at WARNING with its delay, every dead
letter at ERROR with its reason, one line per Redis outage and one when it ends, DEBUG
lines for claims, promotions and reclaims, job fields on every job record, JSON lines,
and an embedded worker's lines under uvicorn."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO

import anyio
import httpx
import pytest
from conftest import subprocess_env, wait_until
from ports import start_uvicorn
from redisproc import RedisProcess

from taskrunner import JobDeadLettered, JobFailed, JobRejected, Retry, TaskRunner, current_job
from taskrunner.logs import JsonFormatter

MakeRunner = Callable[..., TaskRunner]
DEADLINE = 30.0
REPO = Path(__file__).resolve().parents[1]


def job_records(caplog: pytest.LogCaptureFixture, job_id: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "job_id", None) == job_id]


async def test_a_failure_for_good_is_one_error_with_the_tasks_traceback(
    make_runner: MakeRunner, caplog: pytest.LogCaptureFixture
) -> None:
    tr = make_runner(max_retries=0)

    @tr.task
    async def explode(n: int) -> None:
        raise ValueError(f"bad value {n}")

    caplog.set_level(logging.DEBUG, logger="taskrunner")
    async with tr, tr.worker(handle_signals=False):
        job = await explode.enqueue(7)
        with pytest.raises(JobFailed):
            await job.result(timeout=DEADLINE)

        async def logged() -> bool:
            return any(r.levelno == logging.ERROR for r in job_records(caplog, job.id))

        await wait_until(logged, DEADLINE)
    [error] = [r for r in job_records(caplog, job.id) if r.levelno == logging.ERROR]
    text = error.getMessage()
    assert f"job {job.id} " in text
    assert "explode attempt 1 failed for good" in text
    assert "ValueError: bad value 7" in text
    assert text.count("Traceback (most recent call last)") == 1
    assert 'raise ValueError(f"bad value {n}")' in text  # the task's own frame
    assert "/taskrunner/" not in text  # none of taskrunner's frames
    assert (error.task, error.queue, error.attempt) == (explode.name, "default", 1)  # type: ignore[attr-defined]
    assert all(r.exc_info is None for r in caplog.records)  # the traceback once, in text


@pytest.mark.parametrize(("delay", "said"), [(0.25, "0.250s"), (-5, "0.000s")])
async def test_a_retry_is_a_warning_that_says_its_delay(
    make_runner: MakeRunner, caplog: pytest.LogCaptureFixture, delay: float, said: str
) -> None:
    tr = make_runner(max_retries=1)

    @tr.task
    async def once_more() -> int:
        if current_job().attempt == 1:
            raise Retry(delay=delay)  # a negative delay: at once, not "in -5.000s"
        return 2

    caplog.set_level(logging.INFO, logger="taskrunner")
    async with tr, tr.worker(handle_signals=False):
        job = await once_more.enqueue()
        assert await job.result(timeout=DEADLINE) == 2
    [warning] = [r for r in job_records(caplog, job.id) if r.levelno == logging.WARNING]
    assert f"attempt 1 failed (Retry: retry requested); retry 1 of 1 in {said}" in (
        warning.getMessage()
    )


async def test_every_dead_letter_is_an_error_with_its_reason(
    make_runner: MakeRunner, caplog: pytest.LogCaptureFixture
) -> None:
    producer = make_runner()

    @producer.task(name="ghost")
    async def ghost() -> None: ...

    consumer = make_runner()

    @consumer.task(name="other")
    async def other() -> None: ...

    caplog.set_level(logging.INFO, logger="taskrunner")
    async with producer, consumer, consumer.worker(handle_signals=False):
        job = await ghost.enqueue()
        with pytest.raises(JobDeadLettered):
            await producer.job(job.id).result(timeout=DEADLINE)

        async def logged() -> bool:
            return any(r.levelno == logging.ERROR for r in job_records(caplog, job.id))

        await wait_until(logged, DEADLINE)
    [error] = [r for r in job_records(caplog, job.id) if r.levelno == logging.ERROR]
    assert "dead-lettered: unknown task 'ghost'" in error.getMessage()


async def test_a_unique_lock_conflict_line_carries_the_job_fields(
    make_runner: MakeRunner, caplog: pytest.LogCaptureFixture
) -> None:
    tr = make_runner()
    holding = anyio.Event()
    release = anyio.Event()

    @tr.task(lock="while_executing", unique_args=lambda: [])
    async def solo() -> None:
        holding.set()
        await release.wait()

    caplog.set_level(logging.INFO, logger="taskrunner")
    async with tr, tr.worker(handle_signals=False):
        holder = await solo.enqueue()
        with anyio.fail_after(DEADLINE):
            await holding.wait()
        rejected = await solo.enqueue()
        with pytest.raises(JobRejected):
            await rejected.result(timeout=DEADLINE)
        release.set()
        await holder.result(timeout=DEADLINE)
    [line] = [r for r in caplog.records if f"unique lock held by job {holder.id}" in r.message]
    fields = (line.job_id, line.task, line.queue, line.attempt)  # type: ignore[attr-defined]
    assert fields == (rejected.id, solo.name, "default", 1)


async def test_an_outage_is_one_warning_and_one_line_when_it_ends(
    tmp_path: Path, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    with RedisProcess(tmp_path / "redis") as server:
        tr = TaskRunner(server.url, namespace=namespace, heartbeat_interval=0.1, stale_after=1)

        @tr.task
        async def noop() -> None: ...

        caplog.set_level(logging.DEBUG, logger="taskrunner")
        async with tr, tr.worker(handle_signals=False):
            server.stop()
            await anyio.sleep(3.0)  # the outage: every loop of the worker fails meanwhile
            server.start()
            job = await noop.enqueue()
            await job.result(timeout=DEADLINE)

            async def ended() -> bool:
                return any("reachable again" in r.getMessage() for r in caplog.records)

            await wait_until(ended, DEADLINE)
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
    outage = [r for r in lines if "redis unavailable" in r.getMessage()]
    assert len(outage) == 1, [r.getMessage() for r in lines]
    assert len([r for r in caplog.records if "reachable again" in r.getMessage()]) == 1


async def test_debug_lines_show_claims_promotions_and_requeues(
    make_runner: MakeRunner, caplog: pytest.LogCaptureFixture
) -> None:
    tr = make_runner()

    @tr.task
    async def later() -> int:
        return 1

    caplog.set_level(logging.DEBUG, logger="taskrunner")
    async with tr, tr.worker(handle_signals=False):
        job = await later.options(delay=0.2).enqueue()
        await job.result(timeout=DEADLINE)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert f"claimed job {job.id}" in text
    assert "promoted 1 due job(s)" in text


def test_json_lines_carry_the_job_fields_and_hide_passwords() -> None:
    record = logging.LogRecord(
        "taskrunner.worker",
        logging.INFO,
        __file__,
        1,
        "job %s at %s",
        ("j1", "redis://:pw@h:1/0"),
        None,
    )
    record.job_id, record.task, record.queue, record.attempt = "j1", "add", "default", 2
    line = json.loads(JsonFormatter().format(record))
    assert (line["job_id"], line["task"], line["queue"], line["attempt"]) == (
        "j1",
        "add",
        "default",
        2,
    )
    assert line["level"] == "INFO"
    assert "pw" not in line["message"]
    assert line["message"] == "job j1 at redis://:***@h:1/0"


async def test_a_cli_worker_logs_json_lines(
    redis_url: str, namespace: str, make_runner: MakeRunner
) -> None:
    tr = make_runner()

    @tr.task(name="add")
    async def add(x: int, y: int) -> int:
        raise NotImplementedError

    env = subprocess_env(redis_url, namespace)
    async with tr:
        job = await add.enqueue(1, 2)
        command = ["worker", "apps.cli_app:tr", "--burst", "--log-format", "json"]
        with anyio.fail_after(DEADLINE):
            done = await anyio.run_process(
                [sys.executable, "-m", "taskrunner.cli", *command], env=env, check=False
            )
    stderr = done.stderr.decode()
    assert done.returncode == 0, stderr
    lines = [json.loads(line) for line in stderr.splitlines()]
    mine = [line for line in lines if line.get("job_id") == job.id]
    assert [line["message"].split(" ", 2)[2] for line in mine][:1] == ["add attempt 1 started"]
    assert all(line["task"] == "add" and line["attempt"] == 1 for line in mine)


def uvicorn(env: dict[str, str], log: IO[bytes]) -> tuple[subprocess.Popen[bytes], int]:
    """The FastAPI example under uvicorn, on a socket bound before it starts (its port
    cannot be taken meanwhile, tests/ports.py); (process, port)."""
    return start_uvicorn(
        "examples.fastapi_app:app",
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


async def test_an_embedded_worker_logs_through_uvicorn(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    env = subprocess_env(redis_url, namespace)
    log = (tmp_path / "uvicorn.log").open("wb")
    server, port = uvicorn(env, log)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:

            async def up() -> bool:
                try:
                    return (await client.get("/docs")).status_code == 200
                except httpx.HTTPError:
                    return False

            await wait_until(up, DEADLINE, interval=0.1)
            reply = await client.post("/jobs", json={"x": 2, "y": 3})
            job_id = reply.json()["id"]

            async def logged() -> bool:
                return f"job {job_id} " in (tmp_path / "uvicorn.log").read_text(errors="replace")

            await wait_until(logged, DEADLINE)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=DEADLINE)
        log.close()
    text = (tmp_path / "uvicorn.log").read_text(errors="replace")
    assert f"INFO:     job {job_id} add attempt 1 started" in text  # uvicorn's format
