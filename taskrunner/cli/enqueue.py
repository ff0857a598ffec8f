"""``taskrunner enqueue``: send a job from the shell, validated like a Python caller's."""

from __future__ import annotations

import json
from typing import Any

import anyio
import click
import pydantic

from taskrunner.cli._common import (
    SECONDS,
    USAGE_ERROR,
    example,
    fail,
    load_app,
    run_async,
    settings_for,
)
from taskrunner.cli._queues import check_queue_names
from taskrunner.connection import REDIS_ERRORS
from taskrunner.exceptions import ConfigurationError, JobError
from taskrunner.runner import TaskRunner
from taskrunner.task import Call, EnqueueOptions, TaskDefinition
from taskrunner.urls import redact

EXAMPLE = """
taskrunner enqueue examples.quickstart:tr add '[1, 2]' --wait
taskrunner enqueue examples.quickstart:tr greet '{"name": "world"}' --delay 10
"""


@click.command(
    help="Enqueue a job of TASK from APP and print its id.\n\n"
    "ARGS is JSON: an array of positional arguments or an object of keyword arguments "
    "(default: none). They are validated against the task's signature exactly as "
    "task.enqueue(...) validates them; nothing is sent when they do not fit. With "
    "--wait, the job's result is printed as JSON instead, and each progress value the "
    "task sets on stderr as 'progress: <json>'." + example(EXAMPLE)
)
@click.argument("app")
@click.argument("task")
@click.argument("args", required=False)
@click.option("--delay", type=SECONDS, help="Run it no earlier than this many seconds from now.")
@click.option("--queue", "-q", help="Queue to send it to. [default: the task's queue]")
@click.option("--job-id", help="A job id of your choice (enqueue is idempotent while it exists).")
@click.option(
    "--wait",
    is_flag=True,
    help="Wait until the job is final; print its progress (stderr) and result.",
)
@click.option("--timeout", type=SECONDS, help="With --wait: give up after this many seconds.")
def enqueue(
    app: str,
    task: str,
    args: str | None,
    delay: float | None,
    queue: str | None,
    job_id: str | None,
    wait: bool,
    timeout: float | None,
) -> None:
    if timeout is not None and not wait:
        fail("--timeout only applies with --wait (it bounds the wait for the result)", USAGE_ERROR)
    if queue is not None:
        check_queue_names([queue])
    runner = load_app(app)
    settings_for({}, runner)
    definition = runner.registry.get(task)
    if definition is None:
        known = ", ".join(sorted(runner.registry)) or "none"
        fail(f"{app} has no task {task!r} (tasks: {known})", USAGE_ERROR)
    positional, keywords = parse_args(args)
    try:
        options = EnqueueOptions(delay=delay, job_id=job_id, queue=queue)
    except ConfigurationError as exc:  # e.g. an empty --job-id
        fail(str(exc), USAGE_ERROR)
    call: Call[Any] = Call(definition, positional, keywords, options)

    async def main() -> None:
        async with runner:
            job_id = await send(runner, call)
            await warn_if_unserved(runner, call.options.queue or definition.queue)
            if wait:
                await print_result(runner, definition, job_id, call.options.queue, timeout)
            else:
                click.echo(job_id)

    run_async(main)


async def warn_if_unserved(runner: TaskRunner, queue: str) -> None:
    """Warn when no declared task uses ``queue`` and no live worker consumes it.

    A worker is live on a queue while its last heartbeat in the queue's workers sorted
    set (``{ns}:{queue}:workers``, scored in ms) is at most ``stale_after`` old by the
    Redis clock. A failed check only skips the warning: the job is already sent.
    """
    if queue in runner.queues():
        return
    try:
        seconds, micros = await runner.client.redis.time()
        oldest = (seconds + micros / 1e6 - runner.lease.stale_after) * 1000
        live = await runner.client.redis.zcount(runner.client.keys(queue).workers, oldest, "+inf")
    except REDIS_ERRORS:
        return
    if not live:
        click.echo(
            f"taskrunner: warning: no task is declared on queue {queue!r} and no worker "
            f"consumes it: the job waits until one runs (taskrunner worker ... -q {queue})",
            err=True,
        )


def parse_args(text: str | None) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """ARGS: a JSON array (positional) or object (keyword); nothing when absent."""
    if text is None:
        return (), {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        fail(f"ARGS is not valid JSON ({exc}): {text!r}", USAGE_ERROR)
    if isinstance(value, list):
        return tuple(value), {}
    if isinstance(value, dict):
        return (), value
    fail(f"ARGS must be a JSON array or object, got {type(value).__name__}", USAGE_ERROR)


async def send(runner: TaskRunner, call: Call[Any]) -> str:
    """Validate and write one job; a bad argument exits with one line and writes nothing."""
    try:
        jobs = await runner.enqueue_many([call])
    except pydantic.ValidationError as exc:
        fail(f"invalid arguments for {call.task.name}: {describe(exc)}", USAGE_ERROR)
    except TypeError as exc:
        fail(f"invalid arguments for {call.task.name}: {exc}", USAGE_ERROR)
    job = jobs[0]
    if job.deduplicated:  # an existing job (its job_id, or a unique lock's holder)
        click.echo(f"taskrunner: note: job {job.id} already exists; nothing new was written",
                   err=True)  # fmt: skip
    return job.id


def describe(exc: pydantic.ValidationError) -> str:
    """One line: ``x: Input should be a valid integer (got 'a'); ...``."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "arguments"
        parts.append(f"{where}: {error['msg']} (got {error['input']!r})")
    return "; ".join(parts)


async def print_result(
    runner: TaskRunner,
    definition: TaskDefinition,
    job_id: str,
    queue: str | None,
    timeout: float | None,
) -> None:
    """Wait for the job, printing each progress value it sets on stderr
    (``progress: <json>``); print its result as JSON, or one line and exit 1 if it
    failed."""
    job = runner.job(job_id, queue or definition.queue)
    try:
        with anyio.fail_after(timeout):
            async for progress in job.progress():
                line = f"progress: {json.dumps(progress, separators=(',', ':'))}"
                click.echo(redact(line), err=True)
            value = await job.result()
    except TimeoutError:
        fail(f"job {job_id} did not finish within {timeout:g}s (the job itself goes on)")
    except JobError as exc:
        fail(str(exc))
    click.echo(redact(definition.codec.result.encode(value)))
