"""Helpers shared by the commands: one-line errors, loading the app, settings, running.

Exit codes (docs/workers.md): 2 when what the user gave is wrong and running the same
command again cannot help: a bad flag, APP or setting, a malformed Redis URL, and a
Redis URL the server turns down (credentials refused, a database index it does not
have, an endpoint that does not speak Redis); 1 when Redis cannot be reached (refused,
timed out, unknown host: perhaps only for now) and for other runtime failures. Every
message goes through ``taskrunner.urls.redact``: no password is ever printed.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import sys
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, NoReturn

import anyio
import click
from redis.asyncio.sentinel import MasterNotFoundError
from redis.exceptions import (
    AuthenticationError,
    InvalidResponse,
    RedisClusterException,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from taskrunner import logs
from taskrunner.exceptions import ConfigurationError, TaskrunnerError
from taskrunner.runner import TaskRunner
from taskrunner.settings import Settings, SettingsError, load
from taskrunner.urls import redact

LOG_FORMAT = logs.TEXT_FORMAT
USAGE_ERROR = 2
"""Exit code of a bad argument, flag, setting, APP or Redis URL (like click and argparse)."""
RUNTIME_ERROR = 1
"""Exit code of an unreachable Redis and of other failures at run time."""

_AUTH_REPLIES = ("NOAUTH", "WRONGPASS", "NOPERM")
_DB_REPLIES = ("DB index is out of range", "invalid DB index", "SELECT is not allowed")
_CLUSTER_AUTH_TEXTS = (*_AUTH_REPLIES, "invalid username-password", "Authentication required")

_target = {"redis": "redis"}
"""What the command connects to, redacted, for error messages (set by ``use_url``)."""


def fail(message: str, code: int = RUNTIME_ERROR) -> NoReturn:
    """Print one line to stderr (passwords hidden) and exit non-zero: no traceback."""
    line = " ".join(redact(message).split())
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


class _Seconds(click.FloatRange):
    """A finite number of seconds, zero or more (``nan``, ``inf`` and ``-1`` are refused
    where they are given, as a usage error)."""

    def __init__(self) -> None:
        super().__init__(min=0)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        seconds = super().convert(value, param, ctx)
        if not math.isfinite(seconds):
            self.fail(f"{value!r} is not a finite number of seconds", param, ctx)
        return seconds


SECONDS = _Seconds()


def load_app(path: str) -> TaskRunner:
    """Import ``module:attribute`` (like uvicorn) and return the TaskRunner it names."""
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        fail(f"APP must look like module:attribute, got {path!r}", USAGE_ERROR)
    _refuse_a_file_path(path, module_name, attribute)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    if not logging.getLogger().handlers:  # what the app logs on import is redacted too
        setup_logging("warning")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        fail(
            f"cannot import module {module_name!r}: {exc}{_where_hint(exc, module_name)}",
            USAGE_ERROR,
        )
    except ConfigurationError as exc:  # e.g. TaskRunner(url=...) with a bad URL
        fail(f"cannot load {path}: {exc}", USAGE_ERROR)
    except Exception as exc:  # noqa: BLE001 - the app's own error: one line, no source lines
        fail(f"cannot load {path}: importing {module_name} raised {_describe(exc)}", USAGE_ERROR)
    app = getattr(module, attribute, None)
    if app is None:
        fail(f"module {module_name!r} has no attribute {attribute!r}", USAGE_ERROR)
    if not isinstance(app, TaskRunner):
        fail(f"{path} is a {type(app).__name__}, not a TaskRunner", USAGE_ERROR)
    return app


def _refuse_a_file_path(path: str, module_name: str, attribute: str) -> None:
    """``shop/tasks.py:tr`` (a file, as python takes it) is a usage error that names
    the module path to write instead."""
    is_file = module_name.endswith(".py") and os.path.isfile(module_name)
    if is_file or "/" in module_name or "\\" in module_name:
        fail(
            f"APP names a module, not a file: got {path!r}; "
            f"write it as a dotted module path: {_as_module(module_name)}:{attribute}",
            USAGE_ERROR,
        )


def _where_hint(exc: ImportError, module_name: str) -> str:
    """Where modules are looked for, when the app's top-level package is not found
    (the command run from another directory than the project's)."""
    top = module_name.split(".", maxsplit=1)[0]
    if not isinstance(exc, ModuleNotFoundError) or exc.name != top:
        return ""
    return (
        f" (modules are imported from the current directory, {os.getcwd()}, and "
        f"PYTHONPATH: run the command from the directory that holds {top}/ or {top}.py)"
    )


def _as_module(file_path: str) -> str:
    """``shop/tasks.py`` (or ``./shop/tasks.py``) as the module path ``shop.tasks``."""
    parts = file_path.removesuffix(".py").replace("\\", "/").split("/")
    return ".".join(part for part in parts if part not in ("", "."))


def _describe(exc: BaseException) -> str:
    """``Type: message`` of an exception, with where it was raised for a syntax error."""
    where = ""
    if isinstance(exc, SyntaxError) and exc.filename:
        where = f" ({exc.filename}, line {exc.lineno})"
    return f"{type(exc).__name__}: {exc}{where}"


def settings_for(flags: Mapping[str, Any], runner: TaskRunner | None = None) -> Settings:
    """Resolve the settings (flags > TASKRUNNER_* > the runner > defaults), apply the
    Redis URL to the runner, and set up logging. Exits with one line if one is bad."""
    try:
        settings = load(flags, runner)
    except SettingsError as exc:
        fail(str(exc), USAGE_ERROR)
    setup_logging(settings.log_level, settings.log_format)
    if runner is not None:
        use_url(runner, settings)
    return settings


def use_url(runner: TaskRunner, settings: Settings) -> None:
    """Point ``runner`` at the settings' Redis URL (if any); name it in error messages."""
    if settings.redis_url:
        runner.url = settings.redis_url
    url = runner.url or os.environ.get("TASKRUNNER_REDIS_URL")
    _target["redis"] = f"redis at {redact(url)}" if url else "the embedded redis-server"


def setup_logging(level: str, fmt: str = "text") -> None:
    """Log to stderr at ``level`` as text or JSON lines; no line can show a URL's
    password (taskrunner.logs)."""
    logs.setup(level, fmt)


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
        lines = [one_line(leaf) for leaf in _leaves(group)]
        first = lines[0]
        if first is not None and all(lines):  # e.g. two tasks lost the same Redis
            fail(*first)
        raise
    except Exception as exc:
        line = one_line(exc)
        if line is not None:
            fail(*line)
        raise
    except KeyboardInterrupt:
        sys.exit(130)


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside ``exc``'s (nested) groups, in order; [exc] for one."""
    if not isinstance(exc, BaseExceptionGroup):
        return [exc]
    return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]


def one_line(exc: BaseException) -> tuple[str, int] | None:
    """The line and exit code for an error about the setup, not a bug (None for any
    other): 2 when the URL or the configuration is wrong, 1 when Redis cannot be
    reached or for another failure."""
    if isinstance(exc, ConfigurationError):
        return str(exc), USAGE_ERROR
    rejected = _rejected_by_server(exc)
    if rejected is not None:
        return f"{_target['redis']} {rejected}: {exc}", USAGE_ERROR
    if isinstance(exc, MasterNotFoundError):  # its text lists every sentinel's repr
        head = str(exc).split(" : ", 1)[0]
        return (
            f"cannot reach {_target['redis']}: {head} "
            "(check the master name and that the sentinels are up)",
            RUNTIME_ERROR,
        )
    if isinstance(exc, (RedisConnectionError, RedisTimeoutError, OSError)) or (
        _cluster_unreachable(exc)
    ):
        return f"cannot reach {_target['redis']}: {exc}", RUNTIME_ERROR
    if isinstance(exc, TaskrunnerError):
        return str(exc), RUNTIME_ERROR
    return None


def _rejected_by_server(exc: BaseException) -> str | None:
    """What the server's answer says is wrong with the URL, or None if it is not that."""
    text = str(exc)
    if isinstance(exc, AuthenticationError) or (
        isinstance(exc, ResponseError) and text.startswith(_AUTH_REPLIES)
    ):
        return "refused the credentials (check the user and password in the URL)"
    if isinstance(exc, ResponseError) and text.startswith(_DB_REPLIES):
        return "has no such database (check the /DB of the URL)"
    if isinstance(exc, InvalidResponse) or (
        isinstance(exc, RedisError) and "Protocol error" in text
    ):
        return "does not speak the Redis protocol (check the host and port of the URL)"
    if isinstance(exc, RedisClusterException):  # its text carries the node's reply
        if any(reply in text for reply in _CLUSTER_AUTH_TEXTS):
            return "refused the credentials (check the user and password in the URL)"
        if "Cluster mode is not enabled" in text:
            return "is not a cluster (check the scheme of the URL)"
    if isinstance(exc, ResponseError) and "unknown command 'SENTINEL'" in text:
        return "is not a sentinel (check the scheme and the hosts of the URL)"
    return None


def _cluster_unreachable(exc: BaseException) -> bool:
    """A cluster client that could reach none of its start-up nodes."""
    return isinstance(exc, RedisClusterException) and "cannot be connected" in str(exc)


def example(text: str) -> str:
    """The example block of a command's ``--help`` (click keeps ``\\b`` blocks as is)."""
    return "\n\n\b\nExample:\n" + "\n".join(f"  {line}" for line in text.strip().splitlines())
