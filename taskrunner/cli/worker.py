"""``taskrunner worker``: one worker process, N under a supervisor, or one that reloads."""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import click

from taskrunner.cli._common import example, fail, load_app, run_async, settings_for
from taskrunner.cli._queues import check_queue_names
from taskrunner.runner import TaskRunner
from taskrunner.settings import Settings, with_runner_defaults

logger = logging.getLogger("taskrunner.cli")

EXAMPLE = """
taskrunner worker examples.quickstart:tr --concurrency 50
taskrunner worker myapp.tasks:tr -q emails -q reports --processes 4
"""


@click.command(
    help="Run workers for APP (module:attribute naming a TaskRunner).\n\n"
    "Every setting also reads a TASKRUNNER_* variable (TASKRUNNER_CONCURRENCY, "
    "TASKRUNNER_QUEUES=a,b, ...); a flag wins over the variable." + example(EXAMPLE)
)
@click.argument("app")
@click.option(
    "--queue",
    "-q",
    "queues",
    multiple=True,
    help="Queue to consume (repeatable). [default: every queue the app's tasks use]",
)
@click.option("--concurrency", "-c", type=int, help="Jobs run at once per process. [default: 100]")
@click.option(
    "--processes",
    "-p",
    type=int,
    help="Worker processes, under one supervisor that restarts crashed ones. [default: 1]",
)
@click.option("--burst", is_flag=True, default=None, help="Drain what is ready, then exit 0.")
@click.option(
    "--reload", is_flag=True, help="Restart when a .py file below the current directory changes."
)
@click.option(
    "--grace-period",
    type=float,
    help="Seconds running jobs get to finish on SIGTERM before they are handed back. [default: 30]",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    help="[default: info]",
)
@click.option(
    "--max-deliveries",
    type=int,
    help="Deliveries before a job goes to the dead letters. [default: 5]",
)
@click.option("--supervised", is_flag=True, hidden=True)
def worker(
    app: str,
    queues: tuple[str, ...],
    concurrency: int | None,
    processes: int | None,
    burst: bool | None,
    reload: bool,
    grace_period: float | None,
    log_level: str | None,
    max_deliveries: int | None,
    supervised: bool,
) -> None:
    flags: dict[str, Any] = {
        "queues": list(queues),
        "concurrency": concurrency,
        "processes": processes,
        "burst": burst or None,
        "grace_period": grace_period,
        "log_level": log_level,
        "max_deliveries": max_deliveries,
    }
    base = settings_for(flags)
    check_queue_names(base.queues)  # from -q or TASKRUNNER_QUEUES, before any Redis starts
    if reload:
        run_with_reload(child_argv(app, base, processes=base.processes), base.grace_period)
        return
    runner = load_app(app)
    settings = with_runner_defaults(base, runner)
    if settings.redis_url:
        runner.url = settings.redis_url
    if settings.processes > 1:
        from taskrunner.cli.supervisor import supervise

        sys.exit(supervise(child_argv(app, base, processes=1, supervised=True), settings.processes))
    run_worker(runner, settings, supervised=supervised)


def run_worker(runner: TaskRunner, settings: Settings, *, supervised: bool = False) -> None:
    """Run one worker in this process until SIGTERM/SIGINT (or drained, with --burst)."""
    w = runner.worker(
        queues=settings.queues or None,
        concurrency=settings.concurrency,
        burst=settings.burst,
        grace_period=settings.grace_period,
        max_deliveries=settings.max_deliveries,
        handle_signals=True,
    )
    if supervised:
        _stop_when_parent_exits()
    run_async(w.run)


def child_argv(
    app: str, settings: Settings, *, processes: int, supervised: bool = False
) -> list[str]:
    """The command line of a child worker: the settings made explicit as flags (queues
    only when a flag or the environment chose them, so a reloaded app's queues apply)."""
    argv = [sys.executable, "-m", "taskrunner.cli", "worker", app]
    argv += ["--processes", str(processes), "--concurrency", str(settings.concurrency)]
    argv += ["--grace-period", repr(settings.grace_period), "--log-level", settings.log_level]
    argv += ["--max-deliveries", str(settings.max_deliveries)]
    for queue in settings.queues:
        argv += ["--queue", queue]
    if settings.burst:
        argv.append("--burst")
    if supervised:
        argv.append("--supervised")
    return argv


def _stop_when_parent_exits() -> None:
    """Stop gracefully (as on SIGTERM) when stdin, a pipe from the supervisor, closes."""

    fd = sys.stdin.fileno()

    def wait_for_eof() -> None:
        # os.read, not sys.stdin: a daemon thread blocked in a buffered read holds its
        # lock and makes the interpreter abort at exit.
        try:
            while os.read(fd, 4096):
                pass
        except OSError:
            pass
        logger.warning("the supervisor is gone; stopping")
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=wait_for_eof, name="taskrunner-supervisor-watch", daemon=True).start()


def run_with_reload(argv: list[str], grace_period: float) -> None:
    """Run ``argv`` and restart it whenever a .py file below the current directory
    changes. The old process gets SIGINT (a graceful stop) and the grace period."""
    try:
        import watchfiles
    except ImportError:
        fail("--reload needs watchfiles: pip install 'taskrunner-streams[reload]'")

    def changed(changes: set[tuple[watchfiles.Change, str]]) -> None:
        paths = sorted({Path(p).name for _, p in changes})
        logger.info("detected changes in %s; restarting the worker", ", ".join(paths))

    root = os.getcwd()
    logger.info("watching %s for changes (--reload)", root)
    watchfiles.run_process(
        root,
        target=shlex.join(argv),
        target_type="command",
        callback=changed,
        watch_filter=watchfiles.PythonFilter(),
        sigint_timeout=int(grace_period) + 5,
    )
