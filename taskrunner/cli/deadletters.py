"""``taskrunner dead-letters`` and ``taskrunner retry-dead``: inspect and revive dead letters."""

from __future__ import annotations

import json

import click

from taskrunner.cli._common import fail, load_app, run_async, settings_for
from taskrunner.job import JobInfo


def _line(info: JobInfo) -> str:
    reason = info.error.message if info.error else ""
    when = info.finished_at.isoformat(timespec="seconds") if info.finished_at else "-"
    return f"{info.id}\t{info.queue}\t{info.task or '-'}\t{when}\t{reason}"


@click.command("dead-letters")
@click.argument("app")
@click.option("--queue", "-q", default=None, help="Only this queue (default: every queue).")
@click.option("--json", "as_json", is_flag=True, help="One JSON array with every job's info.")
def dead_letters(app: str, queue: str | None, as_json: bool) -> None:
    """List the dead-lettered jobs of APP (module:attribute) with the reason.

    \b
    Columns: job id, queue, task, when it died, reason.
    """
    runner = load_app(app)
    settings_for({}, runner)  # TASKRUNNER_* apply here as in every command

    async def main() -> None:
        async with runner:
            found = await runner.dead_letters(queue)
        if as_json:
            rows = [
                {**info.model_dump(mode="json"), "reason": info.error.message if info.error else ""}
                for info in found
            ]
            click.echo(json.dumps(rows, indent=2))
            return
        for info in found:
            click.echo(_line(info))

    run_async(main)


@click.command("retry-dead")
@click.argument("app")
@click.argument("job_ids", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Every dead-lettered job.")
@click.option("--queue", "-q", default=None, help="Only this queue (default: every queue).")
def retry_dead(app: str, job_ids: tuple[str, ...], all_: bool, queue: str | None) -> None:
    """Put dead-lettered jobs of APP back on their queue (same id, attempts reset).

    \b
    Examples:
      taskrunner retry-dead myapp:tr 3f2a9c...   # these jobs
      taskrunner retry-dead myapp:tr --all       # every dead letter
    """
    if all_ == bool(job_ids):
        fail("give JOB_ID arguments or --all (not both)", 2)
    runner = load_app(app)
    settings_for({}, runner)

    revived: list[int] = []

    async def main() -> None:
        async with runner:
            ids = list(job_ids) or None
            revived.append(await runner.retry_dead(ids, all=all_, queue=queue))

    run_async(main)
    click.echo(f"revived {revived[0]} job(s)")
    if job_ids and revived[0] < len(job_ids):
        fail(f"{len(job_ids) - revived[0]} of the given job(s) were not in the dead letters")
