"""Helpers shared by the commands: one-line errors, loading the app, settings, running."""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, NoReturn

import anyio
import click
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from taskrunner.exceptions import TaskrunnerError
from taskrunner.runner import TaskRunner
from taskrunner.settings import Settings, SettingsError, load

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
USAGE_ERROR = 2
"""Exit code of a bad argument, flag, setting or APP (like click and argparse)."""


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one line to stderr and exit non-zero: no traceback for user errors."""
    line = " ".join(message.split())
    click.echo(f"taskrunner: error: {line}", err=True)
    sys.exit(code)


class TaskrunnerGroup(click.Group):
    """A click group whose usage errors are one line (no usage block) on stderr."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> NoReturn:
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:
            click.echo(exc.ctx.get_help() if exc.ctx else exc.format_message())
            sys.exit(0)
        except click.ClickException as exc:
            fail(_usage_message(exc), exc.exit_code)
        except click.Abort:
            fail("aborted", 130)
        sys.exit(code if isinstance(code, int) else 0)


def _usage_message(exc: click.ClickException) -> str:
    message = exc.format_message()
    ctx = getattr(exc, "ctx", None)
    if isinstance(exc, click.UsageError) and ctx is not None:
        message += f" (see '{ctx.command_path} --help')"
    return message


def load_app(path: str) -> TaskRunner:
    """Import ``module:attribute`` (like uvicorn) and return the TaskRunner it names."""
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        fail(f"APP must look like module:attribute, got {path!r}", USAGE_ERROR)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        fail(f"cannot import module {module_name!r}: {exc}", USAGE_ERROR)
    app = getattr(module, attribute, None)
    if app is None:
        fail(f"module {module_name!r} has no attribute {attribute!r}", USAGE_ERROR)
    if not isinstance(app, TaskRunner):
        fail(f"{path} is a {type(app).__name__}, not a TaskRunner", USAGE_ERROR)
    return app


def settings_for(flags: Mapping[str, Any], runner: TaskRunner | None = None) -> Settings:
    """Resolve the settings (flags > TASKRUNNER_* > the runner > defaults), apply the
    Redis URL to the runner, and set up logging. Exits with one line if one is bad."""
    try:
        settings = load(flags, runner)
    except SettingsError as exc:
        fail(str(exc), USAGE_ERROR)
    setup_logging(settings.log_level)
    if runner is not None and settings.redis_url:
        runner.url = settings.redis_url
    return settings


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT)


def run_async(fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run on asyncio (with uvloop when installed); turn connection errors into one line."""
    try:
        import uvloop  # noqa: F401

        options: dict[str, Any] = {"use_uvloop": True}
    except ImportError:
        options = {}
    try:
        anyio.run(fn, backend="asyncio", backend_options=options)
    except BaseExceptionGroup as group:
        _fail_known(_first_leaf(group))
        raise
    except Exception as exc:
        _fail_known(exc)
        raise
    except KeyboardInterrupt:
        sys.exit(130)


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _fail_known(exc: BaseException) -> None:
    """One line (and exit 1) for errors that are about the setup, not a bug."""
    if isinstance(exc, (RedisConnectionError, RedisTimeoutError, OSError)):
        fail(f"cannot reach redis: {exc}")
    if isinstance(exc, TaskrunnerError):
        fail(str(exc))


def example(text: str) -> str:
    """The example block of a command's ``--help`` (click keeps ``\\b`` blocks as is)."""
    return "\n\n\b\nExample:\n" + "\n".join(f"  {line}" for line in text.strip().splitlines())
