"""The ``taskrunner`` command: ``worker``, ``enqueue``, ``info``, ``cron`` and the dead-letter
commands.

Why click: it is already a dependency of most of the ecosystem (uvicorn, typer, flask),
so it costs nothing extra to install; its help output, repeatable options, choices and
exit codes are what a command like this needs; and it has no runtime type-hint magic
that would slow start-up (a supervisor starts worker processes with it) or fight our
own pydantic validation of settings. typer is click plus annotations, which we do not
need for four commands.

Every usage or configuration error (a bad flag, ARGS, APP or ``TASKRUNNER_*`` setting,
a malformed Redis URL, or one the server turns down: credentials, database, not Redis)
prints one line on stderr and exits 2; a Redis that cannot be reached prints one line
and exits 1 (see ``taskrunner.cli._common``). No line shows a password. Each command
lives in its own module; the commands of ``taskrunner.cli.deadletters`` are added to
the group when present.
"""

from __future__ import annotations

import importlib

import click

from taskrunner import __version__
from taskrunner.cli._common import TaskrunnerGroup, fail, load_app, run_async
from taskrunner.cli.cron import cron
from taskrunner.cli.dashboard import dashboard
from taskrunner.cli.enqueue import enqueue
from taskrunner.cli.info import info
from taskrunner.cli.jobs import abort, job, jobs, retry
from taskrunner.cli.queue import queue
from taskrunner.cli.worker import worker

__all__ = ["fail", "load_app", "main", "run_async"]


@click.group(cls=TaskrunnerGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(
    __version__, "--version", "-V", prog_name="taskrunner", message="%(prog)s %(version)s"
)
def main() -> None:
    """taskrunner: an asyncio task runner on Redis streams.

    \b
    Example:
      taskrunner worker examples.quickstart:tr
      taskrunner enqueue examples.quickstart:tr add '[1, 2]' --wait
      taskrunner info examples.quickstart:tr
      taskrunner jobs examples.quickstart:tr --status failed
      taskrunner dashboard examples.quickstart:tr
    """


main.add_command(worker)
main.add_command(enqueue)
main.add_command(info)
for command in (job, jobs, abort, retry, queue, dashboard):  # operations (docs/operations.md)
    main.add_command(command)
main.add_command(cron)


def _add_optional(module_name: str) -> None:
    """Add the commands of an optional module (a click command or group it defines)."""
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        return
    for value in vars(module).values():
        if isinstance(value, click.Command) and value.name not in main.commands:
            if value is main or getattr(value.callback, "__module__", module_name) != module_name:
                continue
            main.add_command(value)


_add_optional("taskrunner.cli.deadletters")

if __name__ == "__main__":  # pragma: no cover
    main()
