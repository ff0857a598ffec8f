"""``taskrunner queue pause|resume APP QUEUE``: stop and restart a queue's consumption.

A paused queue keeps accepting jobs; its workers take no new ones from the moment the
pause is recorded (every partition of the queue; jobs they hold run to the end).
``taskrunner info``, the dashboard and ``tr.admin.counts()`` show which queues are
paused.
"""

from __future__ import annotations

import click

from taskrunner.cli._common import TaskrunnerGroup, example
from taskrunner.cli.jobs import _run
from taskrunner.runner import TaskRunner


@click.group(
    "queue",
    cls=TaskrunnerGroup,
    help="Pause or resume a queue of APP."
    + example("taskrunner queue pause myapp:tr emails\ntaskrunner queue resume myapp:tr emails"),
)
def queue() -> None:
    """The ``queue`` command group."""


@queue.command(
    "pause",
    help="Pause QUEUE: it keeps accepting jobs, and its workers stop taking new ones.",
)
@click.argument("app")
@click.argument("queue_name", metavar="QUEUE")
def pause(app: str, queue_name: str) -> None:
    async def body(runner: TaskRunner) -> None:
        await runner.pause(queue_name)
        click.echo(f"queue {queue_name} paused")
        _note_unknown(runner, queue_name)

    _run(app, body)


@queue.command("resume", help="Resume QUEUE: its workers take jobs from it again.")
@click.argument("app")
@click.argument("queue_name", metavar="QUEUE")
def resume(app: str, queue_name: str) -> None:
    async def body(runner: TaskRunner) -> None:
        await runner.resume(queue_name)
        click.echo(f"queue {queue_name} resumed")
        _note_unknown(runner, queue_name)

    _run(app, body)


def _note_unknown(runner: TaskRunner, queue_name: str) -> None:
    """A queue none of the app's tasks uses is likely a typo: done (another app may
    use it), with a note on stderr naming the app's queues."""
    known = runner.queues()
    if queue_name not in known:
        click.echo(
            f"taskrunner: note: no task of this app uses queue {queue_name!r} "
            f"(its queues: {', '.join(known)})",
            err=True,
        )
