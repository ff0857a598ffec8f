"""``taskrunner worker``: one worker process, N under a supervisor, or one that reloads.

Signals: a worker process stops gracefully on the first SIGINT or SIGTERM and exits at
once on the second. Under ``--processes`` and ``--reload`` the workers run in sessions
of their own, so a terminal's Ctrl-C reaches only the supervisor or the reloader, which
forwards it once: one Ctrl-C is one graceful stop."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from types import ModuleType
from typing import TYPE_CHECKING, Any

import click

from taskrunner.cli._common import example, fail, load_app, run_async, settings_for, use_url
from taskrunner.cli._queues import check_queue_names
from taskrunner.runner import TaskRunner
from taskrunner.settings import Settings, with_runner_defaults

if TYPE_CHECKING:
    from taskrunner.metrics import MetricsServer

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
    help="Queue to consume (repeatable; -q a,b is -q a -q b). A queue none of the "
    "app's tasks uses is consumed with a warning. "
    "[default: every queue the app's tasks use, plus the runner's default queue]",
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
    "--log-format",
    type=click.Choice(["text", "json"], case_sensitive=False),
    help="text lines, or one JSON object per line with job_id, task, queue and attempt "
    "fields. [default: text]",
)
@click.option(
    "--max-deliveries",
    type=int,
    help="Deliveries before a job goes to the dead letters. [default: 5]",
)
@click.option(
    "--metrics-port",
    type=int,
    help="Serve Prometheus metrics on this port; 0 picks a free port, logged (needs the "
    "metrics extra). [default: off]",
)
@click.option("--metrics-host", help="Address the metrics port binds. [default: 0.0.0.0]")
@click.option("--supervised", is_flag=True, hidden=True)
@click.option("--metrics-to-supervisor", is_flag=True, hidden=True)
def worker(
    app: str,
    queues: tuple[str, ...],
    concurrency: int | None,
    processes: int | None,
    burst: bool | None,
    reload: bool,
    grace_period: float | None,
    log_level: str | None,
    log_format: str | None,
    max_deliveries: int | None,
    metrics_port: int | None,
    metrics_host: str | None,
    supervised: bool,
    metrics_to_supervisor: bool,
) -> None:
    flags: dict[str, Any] = {
        "queues": list(queues),
        "concurrency": concurrency,
        "processes": processes,
        "burst": burst or None,
        "grace_period": grace_period,
        "log_level": log_level,
        "log_format": log_format,
        "max_deliveries": max_deliveries,
        "metrics_port": metrics_port,
        "metrics_host": metrics_host,
    }
    base = settings_for(flags)
    check_queue_names(base.queues)  # from -q or TASKRUNNER_QUEUES, before any Redis starts
    if reload:
        argv = child_argv(app, base, processes=base.processes, supervised=True)
        run_with_reload(argv, base.grace_period)
        return
    if base.processes > 1:  # the supervisor imports nothing of the app: its children do
        if supervised:  # the child of --reload: stop when the reloader is gone
            _stop_when_parent_exits()
        argv = child_argv(app, base, processes=1, supervised=True, metrics_to_supervisor=True)
        sys.exit(supervise_workers(argv, base))
    runner = load_app(app)
    settings = with_runner_defaults(base, runner)
    use_url(runner, settings)
    run_worker(runner, settings, supervised=supervised, metrics_to_supervisor=metrics_to_supervisor)


def supervise_workers(argv: list[str], settings: Settings) -> int:
    """Run ``settings.processes`` children under a supervisor (which also serves their
    summed metrics with ``--metrics-port``); its exit code."""
    from taskrunner.cli.supervisor import supervise

    if settings.metrics_port is None:
        return supervise(argv, settings.processes)
    metrics = _metrics_module()
    try:
        exporter = metrics.MultiprocessExporter(settings.metrics_port, settings.metrics_host)
    except OSError as exc:
        fail(f"cannot serve metrics on {settings.metrics_host}:{settings.metrics_port}: {exc}")
    with exporter:
        return supervise(
            argv, settings.processes, env=exporter.env(), on_exit=exporter.child_exited
        )


def run_worker(
    runner: TaskRunner,
    settings: Settings,
    *,
    supervised: bool = False,
    metrics_to_supervisor: bool = False,
) -> None:
    """Run one worker in this process until SIGTERM/SIGINT (or drained, with --burst).
    ``supervised``: stop when the parent (a supervisor or a reloader) is gone;
    ``metrics_to_supervisor``: record metrics for a ``--processes`` supervisor to serve,
    instead of serving them here."""
    _warn_unknown_queues(runner, settings.queues)
    w = runner.worker(
        queues=settings.queues or None,
        concurrency=settings.concurrency,
        burst=settings.burst,
        grace_period=settings.grace_period,
        max_deliveries=settings.max_deliveries,
        handle_signals=True,
    )
    server = _serve_metrics(runner, settings, to_supervisor=metrics_to_supervisor)
    if supervised:
        _stop_when_parent_exits()
    try:
        run_async(w.run)
    finally:
        if server is not None:
            server.close()


def _warn_unknown_queues(runner: TaskRunner, queues: list[str]) -> None:
    """A ``-q`` queue that none of the app's tasks uses is likely a typo (the worker
    would wait on it forever): consumed anyway (jobs may be sent to it with
    ``options(queue=...)``), with a warning naming the app's queues."""
    known = runner.queues()
    for name in queues:
        if name not in known:
            logger.warning(
                "no task of this app uses queue %r (its queues: %s); consuming it anyway",
                name,
                ", ".join(known),
            )


def _serve_metrics(
    runner: TaskRunner, settings: Settings, *, to_supervisor: bool
) -> MetricsServer | None:
    """With ``--metrics-port``: make sure the runner has the Prometheus middleware and,
    unless a ``--processes`` supervisor serves the children's sum, serve it from this
    process (also as the child of ``--reload``, whose reloader serves nothing)."""
    if settings.metrics_port is None:
        return None
    metrics = _metrics_module()
    middleware = metrics.install(runner)
    if to_supervisor:  # the supervisor serves what this child writes to its directory
        return None
    registry = metrics.exposed_registry(middleware.registry)
    try:
        server: MetricsServer = metrics.MetricsServer(
            registry, settings.metrics_port, settings.metrics_host
        )
    except OSError as exc:
        fail(f"cannot serve metrics on {settings.metrics_host}:{settings.metrics_port}: {exc}")
    return server


def _metrics_module() -> ModuleType:
    try:
        from taskrunner import metrics
    except ImportError:
        fail("--metrics-port needs prometheus-client: pip install 'taskrunner-streams[metrics]'")
    return metrics


def child_argv(
    app: str,
    settings: Settings,
    *,
    processes: int,
    supervised: bool = False,
    metrics_to_supervisor: bool = False,
) -> list[str]:
    """The command line of a child worker: the settings made explicit as flags (queues
    only when a flag or the environment chose them, so a reloaded app's queues apply).
    ``metrics_to_supervisor``: a ``--processes`` supervisor's child, which leaves
    serving the metrics to it."""
    argv = [sys.executable, "-m", "taskrunner.cli", "worker", app]
    argv += ["--processes", str(processes), "--concurrency", str(settings.concurrency)]
    argv += ["--grace-period", repr(settings.grace_period), "--log-level", settings.log_level]
    argv += ["--log-format", settings.log_format]
    argv += ["--max-deliveries", str(settings.max_deliveries)]
    if settings.metrics_port is not None:
        argv += ["--metrics-port", str(settings.metrics_port)]
        argv += ["--metrics-host", settings.metrics_host]
    for queue in settings.queues:
        argv += ["--queue", queue]
    if settings.burst:
        argv.append("--burst")
    if supervised:
        argv.append("--supervised")
    if metrics_to_supervisor and settings.metrics_port is not None:
        argv.append("--metrics-to-supervisor")
    return argv


def _stop_when_parent_exits() -> None:
    """Stop gracefully (as on SIGTERM) when stdin, a pipe from the supervisor or the
    reloader, closes."""

    fd = sys.stdin.fileno()

    def wait_for_eof() -> None:
        # os.read, not sys.stdin: a daemon thread blocked in a buffered read holds its
        # lock and makes the interpreter abort at exit.
        try:
            while os.read(fd, 4096):
                pass
        except OSError:
            pass
        logger.warning("the supervisor is gone; stopping")  # (or the reloader)
        os.kill(os.getpid(), signal.SIGHUP)  # a graceful stop, never a second signal

    threading.Thread(target=wait_for_eof, name="taskrunner-supervisor-watch", daemon=True).start()


def run_with_reload(argv: list[str], grace_period: float) -> None:
    """Run ``argv`` and restart it whenever a .py file below the current directory
    changes; Ctrl-C (or SIGTERM) is one graceful stop (see ``taskrunner.cli.reloader``)."""
    try:
        import watchfiles  # noqa: F401
    except ImportError:
        fail("--reload needs watchfiles: pip install 'taskrunner-streams[reload]'")
    from taskrunner.cli.reloader import reload

    sys.exit(reload(argv, os.getcwd(), grace_period))
