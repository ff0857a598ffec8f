"""``taskrunner job``, ``jobs``, ``abort`` and ``retry``: see and steer single jobs.

Each is a thin shell over the admin API (``tr.admin``): ``job`` shows one job's
detail, ``jobs`` lists a page from the indexes kept per queue and status (never a scan
of the key space) and prints the cursor of the next page, ``abort`` and ``retry`` act
on one job by id (looked for in every queue of APP unless ``--queue`` is given).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Any

import click

from taskrunner.admin import CursorError, JobDetail, JobPage
from taskrunner.admin.listing import MAX_LIMIT, STATUS_ORDER
from taskrunner.cli._common import (
    RUNTIME_ERROR,
    USAGE_ERROR,
    example,
    fail,
    load_app,
    run_async,
    settings_for,
)
from taskrunner.cli._data import data_errors
from taskrunner.exceptions import ConfigurationError, TaskrunnerError
from taskrunner.job import JobInfo, JobStatus
from taskrunner.runner import TaskRunner
from taskrunner.urls import redact

QUEUE_OPTION = click.option(
    "--queue", "-q", default=None, help="The job's queue. [default: looked for in every queue]"
)


def _run(app: str, body: Callable[[TaskRunner], Coroutine[Any, Any, None]]) -> None:
    """Load APP, apply the settings, open the runner and run ``body``; a bad queue name
    or cursor is a usage error (one line, exit 2)."""
    runner = load_app(app)
    settings_for({}, runner)

    async def main() -> None:
        async with runner:
            try:
                with data_errors():
                    await body(runner)
            except (ConfigurationError, CursorError, ValueError) as exc:
                fail(str(exc), USAGE_ERROR)
            except TaskrunnerError as exc:  # e.g. a job whose record is hostile: exit 1
                fail(redact(str(exc)), RUNTIME_ERROR)

    run_async(main)


def _when(value: datetime | None) -> str:
    return value.isoformat(timespec="milliseconds") if value else "-"


def _seconds(value: float | None) -> str:
    return f"{value:.3f}s" if value is not None else "-"


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


def detail_text(d: JobDetail) -> str:
    """One job's detail as aligned ``label  value`` lines, then the traceback."""
    rows = [
        ("job", d.id),
        ("queue", f"{d.queue} (partition {d.partition})"),
        ("task", d.task or "-"),
        ("status", d.status.value + (" (abort requested)" if d.abort_requested else "")),
        ("priority", d.priority or "-"),
        (
            "attempts",
            f"{d.attempts} (reclaims {d.reclaims}, reschedules {d.reschedules}, "
            f"retried by hand {d.reruns})",
        ),
        ("enqueued", _when(d.enqueued_at)),
        ("due", _when(d.due_at)),
        ("started", _when(d.started_at)),
        ("finished", _when(d.finished_at)),
        ("queue wait", _seconds(d.queue_wait)),
        ("run time", _seconds(d.run_time)),
        ("worker", d.worker or "-"),
        ("arguments", _json(d.args)),
    ]
    if d.progress is not None:
        rows.append(("progress", _json(d.progress)))
    rows += [("lock", _lock_line(d, i)) for i in range(len(d.locks))]
    if d.meta:
        rows.append(("headers", _json(d.meta)))
    if d.result is not None or d.status == "succeeded":
        rows.append(("result", _json(d.result)))
    if d.error is not None:
        rows.append(("error", f"{d.error.type}: {d.error.message}"))
    rows.append(("expires in", _seconds(d.expires_in) if d.expires_in else "never"))
    width = max(len(label) for label, _ in rows)
    text = "\n".join(f"{label.ljust(width)}  {value}" for label, value in rows)
    if d.error is not None and d.error.traceback:
        text += "\n\n" + d.error.traceback.rstrip()
    return text


def _lock_line(d: JobDetail, index: int) -> str:
    lock = d.locks[index]
    if lock.holder is None:
        return f"{lock.key} (free)"
    who = "this job" if lock.held_by(d.id) else f"job {lock.holder}"
    ttl = f", expires in {lock.ttl:.1f}s" if lock.ttl is not None else ""
    return f"{lock.key} held by {who}{ttl}"


def detail_json(d: JobDetail) -> dict[str, Any]:
    return {**d.model_dump(mode="json"), "queue_wait": d.queue_wait, "run_time": d.run_time}


JOB_EXAMPLE = """
taskrunner job myapp:tr 3f2a9c41d0e54b7e9a1c2b3d4e5f6a7b
taskrunner job myapp:tr 3f2a9c41d0e54b7e9a1c2b3d4e5f6a7b --json | jq .error.traceback
"""


@click.command(
    "job",
    help="Show one job of APP: status, timings, attempts, arguments, result or error with "
    "its traceback, progress, and who holds its unique locks." + example(JOB_EXAMPLE),
)
@click.argument("app")
@click.argument("job_id")
@QUEUE_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print JSON (for scripts).")
def job(app: str, job_id: str, queue: str | None, as_json: bool) -> None:
    async def body(runner: TaskRunner) -> None:
        found = await runner.admin.job(job_id, queue)
        shown = json.dumps(detail_json(found), indent=2) if as_json else detail_text(found)
        click.echo(redact(shown))  # a password in the job's arguments, result, progress

    _run(app, body)


JOBS_EXAMPLE = """
taskrunner jobs myapp:tr --status failed
taskrunner jobs myapp:tr --queue emails --task send_email --limit 100
taskrunner jobs myapp:tr --status queued --priority high
taskrunner jobs myapp:tr --status failed --cursor WyJkZWZhdWx0IiwiZmFpbGVkIiwiMTcw...
"""


@click.command(
    "jobs",
    help="List jobs of APP, a page at a time, from the indexes kept per queue and status "
    "(never a scan of the keys), merged over the queue's partitions and priority levels. "
    "Without --status every status is listed in turn (queued, running, scheduled, "
    "failed, dead, succeeded, aborted, rejected); finished jobs newest first. When more "
    "remain, the last line gives the --cursor of the next page." + example(JOBS_EXAMPLE),
)
@click.argument("app")
@click.option("--queue", "-q", default=None, help="Only this queue. [default: every queue]")
@click.option(
    "--status", "-s", type=click.Choice([s.value for s in STATUS_ORDER]), help="Only this status."
)
@click.option(
    "--task",
    "-t",
    default=None,
    help="Only jobs of this task (one the app does not declare gets a note on stderr).",
)
@click.option(
    "--priority", "-p", default=None, help="Only jobs of this priority level (e.g. high)."
)
@click.option(
    "--limit",
    "-n",
    type=click.IntRange(1, MAX_LIMIT),
    default=50,
    show_default=True,
    help="Jobs per page.",
)
@click.option("--cursor", "-c", default=None, help="Where the previous page ended.")
@click.option("--json", "as_json", is_flag=True, help='Print {"jobs": [...], "cursor": ...}.')
def jobs(
    app: str,
    queue: str | None,
    status: str | None,
    task: str | None,
    priority: str | None,
    limit: int,
    cursor: str | None,
    as_json: bool,
) -> None:
    async def body(runner: TaskRunner) -> None:
        page = await runner.admin.jobs(
            queue=queue, status=status, task=task, priority=priority, limit=limit, cursor=cursor
        )
        click.echo(redact(page.model_dump_json(indent=2) if as_json else page_text(page)))
        _note_unknown_task(runner, task)

    _run(app, body)


def _note_unknown_task(runner: TaskRunner, task: str | None) -> None:
    """A ``--task`` the app does not declare is likely a typo (another app's jobs may
    still be there, so the listing stands): a note on stderr naming the app's tasks."""
    if task is not None and task not in runner.registry:
        click.echo(
            f"taskrunner: note: this app declares no task {task!r} "
            f"(its tasks: {', '.join(sorted(runner.registry)) or 'none'})",
            err=True,
        )


def page_text(page: JobPage) -> str:
    rows: list[tuple[str, ...]] = [
        ("ID", "STATUS", "QUEUE", "PRIORITY", "TASK", "ATTEMPTS", "ENQUEUED", "FINISHED", "ERROR")
    ]
    rows += [_row(info) for info in page.jobs]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = [
        "  ".join([*(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)), r[-1]]).rstrip()
        for r in rows
    ]
    if not page.jobs:
        lines = ["no jobs"]
    if page.cursor:
        lines.append(f"more: --cursor {page.cursor}")
    return "\n".join(lines)


def _row(info: JobInfo) -> tuple[str, ...]:
    error = f"{info.error.type}: {info.error.message}" if info.error else ""
    return (
        info.id,
        info.status.value,
        info.queue,
        info.priority or "-",
        info.task or "-",
        str(info.attempts),
        _when(info.enqueued_at),
        _when(info.finished_at),
        " ".join(error.split())[:80],
    )


@click.command(
    "abort",
    help="Abort a job of APP: a scheduled or queued job never runs; a running one is "
    "cancelled by its worker. Prints the status right after the call. Exits 1 if the job "
    "had already finished otherwise (succeeded, failed, rejected or dead)."
    + example("taskrunner abort myapp:tr 3f2a9c41d0e54b7e9a1c2b3d4e5f6a7b"),
)
@click.argument("app")
@click.argument("job_id")
@QUEUE_OPTION
def abort(app: str, job_id: str, queue: str | None) -> None:
    async def body(runner: TaskRunner) -> None:
        status = await runner.admin.abort(job_id, queue)
        if status.is_final and status != JobStatus.ABORTED:
            fail(f"job {job_id} is {status}: only scheduled, queued or running jobs can be aborted")
        click.echo(f"job {job_id}: {'aborting (running)' if status == 'running' else status}")

    _run(app, body)


@click.command(
    "retry",
    help="Run a failed, aborted, rejected or dead job of APP again under the same id, in "
    "its own priority level, with its attempts counted from zero. Exits 1 if the job's "
    "status does not allow it (succeeded, or not finished)."
    + example("taskrunner retry myapp:tr 3f2a9c41d0e54b7e9a1c2b3d4e5f6a7b"),
)
@click.argument("app")
@click.argument("job_id")
@QUEUE_OPTION
def retry(app: str, job_id: str, queue: str | None) -> None:
    async def body(runner: TaskRunner) -> None:
        if await runner.admin.retry(job_id, queue):
            click.echo(f"job {job_id}: queued again")
            return
        status = (await runner.admin.job(job_id, queue)).status
        fail(
            f"job {job_id} is {status}: only failed, aborted, rejected or dead jobs can be retried"
        )

    _run(app, body)
