"""The ``taskrunner`` command.

Built on click: it is already a dependency of most of the ecosystem (uvicorn,
typer), gives good ``--help`` output and exit codes, and costs no import time
of its own beyond what a worker needs.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn

import anyio
import click
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from taskrunner import __version__
from taskrunner.exceptions import TaskrunnerError
from taskrunner.runner import TaskRunner

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one line to stderr and exit non-zero: no traceback for user errors."""
    click.echo(f"taskrunner: error: {message}", err=True)
    sys.exit(code)


def load_app(path: str) -> TaskRunner:
    """Import ``module:attribute`` (like uvicorn) and return the TaskRunner it names."""
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        fail(f"APP must look like module:attribute, got {path!r}", 2)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        fail(f"cannot import module {module_name!r}: {exc}", 2)
    app = getattr(module, attribute, None)
    if app is None:
        fail(f"module {module_name!r} has no attribute {attribute!r}", 2)
    if not isinstance(app, TaskRunner):
        fail(f"{path} is a {type(app).__name__}, not a TaskRunner", 2)
    return app


def run_async(fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run on asyncio (with uvloop when installed); turn connection errors into one line."""
    try:
        import uvloop  # noqa: F401

        options: dict[str, Any] = {"use_uvloop": True}
    except ImportError:
        options = {}
    try:
        anyio.run(fn, backend="asyncio", backend_options=options)
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        fail(f"cannot reach redis: {exc}")
    except TaskrunnerError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        sys.exit(130)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="taskrunner")
def main() -> None:
    """taskrunner: an asyncio task runner on Redis streams."""


@main.command()
@click.argument("app")
@click.option(
    "--queue",
    "-q",
    "queues",
    multiple=True,
    help="Queue to consume (repeatable). Default: every queue the app's tasks use.",
)
@click.option(
    "--concurrency",
    "-c",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Jobs run at once.",
)
@click.option("--burst", is_flag=True, help="Drain what is ready, then exit 0.")
@click.option(
    "--grace-period",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="Seconds running jobs get to finish on SIGTERM before they are handed back.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="info",
    show_default=True,
)
def worker(
    app: str,
    queues: tuple[str, ...],
    concurrency: int,
    burst: bool,
    grace_period: float,
    log_level: str,
) -> None:
    """Run a worker for APP (module:attribute).

    \b
    Example:
      taskrunner worker examples.quickstart:tr --concurrency 50
    """
    logging.basicConfig(level=log_level.upper(), format=LOG_FORMAT)
    runner = load_app(app)
    w = runner.worker(
        queues=queues or None, concurrency=concurrency, burst=burst, grace_period=grace_period
    )
    run_async(w.run)


if __name__ == "__main__":  # pragma: no cover
    main()
