"""``taskrunner dead-letters``, ``retry-dead``, ``delete-dead`` and ``purge-dead``:
list (a page at a time), revive and remove dead letters. Every one works in bounded
steps (see ``taskrunner.deadletters``)."""

from __future__ import annotations

import json

import click

from taskrunner.cli._common import (
    SECONDS,
    USAGE_ERROR,
    example,
    fail,
    load_app,
    run_async,
    settings_for,
)
from taskrunner.cli._data import data_errors
from taskrunner.deadletters import DEFAULT_PAGE, MAX_PAGE, DeadLetters, decode_cursor
from taskrunner.job import JobInfo
from taskrunner.urls import redact

LIST_EXAMPLE = """
taskrunner dead-letters myapp:tr                  # the oldest 100
taskrunner dead-letters myapp:tr --limit 500 --cursor CURSOR
taskrunner dead-letters myapp:tr -q emails --json
"""
RETRY_EXAMPLE = """
taskrunner retry-dead myapp:tr 3f2a9c... 81bd07...   # these jobs
taskrunner retry-dead myapp:tr --all -q emails       # every dead letter of a queue
"""
DELETE_EXAMPLE = """
taskrunner delete-dead myapp:tr 3f2a9c... 81bd07...
"""
PURGE_EXAMPLE = """
taskrunner purge-dead myapp:tr --older-than 604800   # dead for more than a week
taskrunner purge-dead myapp:tr --all -q emails
"""


def _line(info: JobInfo) -> str:
    reason = info.error.message if info.error else ""
    when = info.finished_at.isoformat(timespec="seconds") if info.finished_at else "-"
    return f"{info.id}\t{info.queue}\t{info.task or '-'}\t{when}\t{' '.join(reason.split())}"


@click.command(
    "dead-letters",
    help="List the dead-lettered jobs of APP (module:attribute), oldest first, a page at "
    "a time: one tab-separated line each (job id, queue, task, when it died, reason). "
    "When more remain, the last line on stderr gives the --cursor of the next page."
    + example(LIST_EXAMPLE),
)
@click.argument("app")
@click.option("--queue", "-q", default=None, help="Only this queue (default: every queue).")
@click.option(
    "--limit",
    type=click.IntRange(1, MAX_PAGE),
    default=DEFAULT_PAGE,
    show_default=True,
    help=f"Dead letters on this page (at most {MAX_PAGE}).",
)
@click.option("--cursor", default=None, help="Where the previous page ended (printed by it).")
@click.option("--json", "as_json", is_flag=True, help="One JSON array of the page's job infos.")
def dead_letters(
    app: str, queue: str | None, limit: int, cursor: str | None, as_json: bool
) -> None:
    if cursor is not None:
        try:
            decode_cursor(cursor)
        except ValueError as exc:
            fail(str(exc), USAGE_ERROR)
    runner = load_app(app)
    settings_for({}, runner)  # TASKRUNNER_* apply here as in every command
    found: list[DeadLetters] = []

    async def main() -> None:
        async with runner:
            try:
                with data_errors():
                    found.append(await runner.dead_letters(queue, limit=limit, cursor=cursor))
            except ValueError as exc:  # a cursor of another queue or app
                fail(str(exc), USAGE_ERROR)

    run_async(main)
    page = found[0]
    if as_json:
        rows = [
            {**info.model_dump(mode="json"), "reason": info.error.message if info.error else ""}
            for info in page
        ]
        click.echo(redact(json.dumps(rows, indent=2)))
    else:
        for info in page:
            click.echo(redact(_line(info)))
    if page.next_cursor:
        click.echo(f"more: --cursor {page.next_cursor}", err=True)


RETRY_HELP = "Put dead-lettered jobs of APP back on their queue (same id, attempts reset)."
DELETE_HELP = "Remove dead-lettered jobs of APP for good (their job info too)."
PURGE_HELP = (
    "Remove every dead-lettered job of APP (--all), or those dead for more than "
    "--older-than seconds, for good, in bounded batches; then apply the dead-letter limits."
)


@click.command("retry-dead", help=RETRY_HELP + example(RETRY_EXAMPLE))
@click.argument("app")
@click.argument("job_ids", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Every dead-lettered job.")
@click.option("--queue", "-q", default=None, help="Only this queue (default: every queue).")
def retry_dead(app: str, job_ids: tuple[str, ...], all_: bool, queue: str | None) -> None:
    if all_ == bool(job_ids):
        fail("give JOB_ID arguments or --all (not both)", USAGE_ERROR)
    runner = load_app(app)
    settings_for({}, runner)
    revived: list[int] = []

    async def main() -> None:
        async with runner:
            ids = list(job_ids) or None
            with data_errors():
                revived.append(await runner.retry_dead(ids, all=all_, queue=queue))

    run_async(main)
    click.echo(f"revived {revived[0]} job(s)")
    if job_ids and revived[0] < len(job_ids):
        fail(f"{len(job_ids) - revived[0]} of the given job(s) were not in the dead letters")


@click.command("delete-dead", help=DELETE_HELP + example(DELETE_EXAMPLE))
@click.argument("app")
@click.argument("job_ids", nargs=-1, required=True)
@click.option("--queue", "-q", default=None, help="Only this queue (default: every queue).")
def delete_dead(app: str, job_ids: tuple[str, ...], queue: str | None) -> None:
    runner = load_app(app)
    settings_for({}, runner)
    removed: list[int] = []

    async def main() -> None:
        async with runner:
            with data_errors():
                removed.append(await runner.delete_dead(list(job_ids), queue=queue))

    run_async(main)
    click.echo(f"deleted {removed[0]} job(s)")
    if removed[0] < len(job_ids):
        fail(f"{len(job_ids) - removed[0]} of the given job(s) were not in the dead letters")


@click.command("purge-dead", help=PURGE_HELP + example(PURGE_EXAMPLE))
@click.argument("app")
@click.option("--all", "all_", is_flag=True, help="Every dead-lettered job.")
@click.option(
    "--older-than",
    type=SECONDS,
    default=None,
    help="Only jobs that died more than this many seconds ago.",
)
@click.option("--queue", "-q", default=None, help="Only this queue (default: every queue).")
def purge_dead(app: str, all_: bool, older_than: float | None, queue: str | None) -> None:
    if all_ == (older_than is not None):
        fail("give --all or --older-than SECONDS (not both)", USAGE_ERROR)
    runner = load_app(app)
    settings_for({}, runner)
    removed: list[int] = []

    async def main() -> None:
        async with runner:
            with data_errors():
                removed.append(await runner.purge_dead(queue=queue, older_than=older_than))

    run_async(main)
    click.echo(f"purged {removed[0]} job(s)")
