"""``taskrunner cron list|pause|resume``: the cron schedules of an app (``tr.crontab``).

A schedule named on the command line that the app does not declare is a usage error:
one line, exit 2, before anything connects. A schedule's state key that Redis refuses
to read (another type: WRONGTYPE) is one line and exit 1, as in every operations
command.
"""

from __future__ import annotations

import json

import click

from taskrunner.cli._common import USAGE_ERROR, example, fail, load_app, run_async, settings_for
from taskrunner.cli._data import data_errors
from taskrunner.cron.schedule import CronInfo
from taskrunner.runner import TaskRunner

EXAMPLE = """
taskrunner cron list examples.cron:tr
taskrunner cron pause examples.cron:tr heartbeat
taskrunner cron resume examples.cron:tr heartbeat
"""


def _when(info: CronInfo, which: str) -> str:
    value = getattr(info, which)
    return value.isoformat(timespec="seconds") if value is not None else "-"


def table(found: list[CronInfo]) -> str:
    """One aligned row per schedule: name, expression, zone, next and last run, state."""
    if not found:
        return "no cron schedules"
    rows = [("CRON", "SCHEDULE", "TZ", "NEXT RUN", "LAST RUN", "STATE")]
    rows += [
        (
            i.name,
            i.expression,
            i.timezone,
            _when(i, "next_run"),
            _when(i, "last_run"),
            "paused" if i.paused else "active",
        )
        for i in found
    ]
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


@click.group(
    "cron",
    help="List, pause and resume the cron schedules of APP (module:attribute)." + example(EXAMPLE),
)
def cron() -> None:
    pass


@cron.command("list", help="Each schedule with its next and last run, and whether it is paused.")
@click.argument("app")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (for scripts).")
def list_schedules(app: str, as_json: bool) -> None:
    runner = load_app(app)
    settings_for({}, runner)
    found: list[CronInfo] = []

    async def main() -> None:
        async with runner:
            with data_errors():  # a schedule's state key of another type: one line
                found.extend(await runner.crontab.list())

    run_async(main)
    if as_json:
        click.echo(json.dumps([i.model_dump(mode="json") for i in found], indent=2))
    else:
        click.echo(table(found))


def _checked(app: str, name: str) -> TaskRunner:
    runner = load_app(app)
    if name not in runner.crontab:
        known = ", ".join(s.name for s in runner.crontab) or "none"
        fail(f"{app} has no cron schedule named {name!r} (schedules: {known})", USAGE_ERROR)
    settings_for({}, runner)
    return runner


@cron.command(help="Pause schedule NAME: its ticks are skipped until it is resumed.")
@click.argument("app")
@click.argument("name")
def pause(app: str, name: str) -> None:
    runner = _checked(app, name)

    async def main() -> None:
        async with runner:
            with data_errors():
                await runner.crontab.pause(name)

    run_async(main)
    click.echo(f"paused {name}")


@cron.command(help="Resume schedule NAME from its next tick (skipped ticks are not replayed).")
@click.argument("app")
@click.argument("name")
def resume(app: str, name: str) -> None:
    runner = _checked(app, name)

    async def main() -> None:
        async with runner:
            with data_errors():
                await runner.crontab.resume(name)

    run_async(main)
    click.echo(f"resumed {name}")
