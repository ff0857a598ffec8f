"""Settings of the ``taskrunner`` command, validated by one pydantic settings model.

Each setting comes from the first of these that has it:

1. a command-line flag (``--concurrency 50``);
2. a ``TASKRUNNER_*`` environment variable (``TASKRUNNER_CONCURRENCY=50``);
3. the TaskRunner object the command loads (its ``url`` and the queues of its tasks);
4. the default below.

An environment variable that starts with ``TASKRUNNER_`` but names no setting (a typo
such as ``TASKRUNNER_CONCURENCY``) is an error, never silently ignored, and so is a
bad value; both are reported in one line that names the variable or the flag::

    TASKRUNNER_REDIS_URL      redis://host:6379/0 (default: the TaskRunner's url, else
                              an embedded redis-server for the current directory)
    TASKRUNNER_QUEUES         comma-separated queues to consume (default: every queue
                              the app's tasks use)
    TASKRUNNER_CONCURRENCY    jobs one worker process runs at once (default 100)
    TASKRUNNER_PROCESSES      worker processes under one supervisor (default 1)
    TASKRUNNER_BURST          drain what is ready, then exit (default false)
    TASKRUNNER_GRACE_PERIOD   seconds running jobs get to finish on SIGTERM (default 30)
    TASKRUNNER_LOG_LEVEL      debug, info, warning or error (default info)
    TASKRUNNER_LOG_FORMAT     text, or json: one JSON object per line (default text)
    TASKRUNNER_MAX_DELIVERIES deliveries before a job goes to the dead letters (default 5)
    TASKRUNNER_METRICS_PORT   serve Prometheus metrics on this port (default: off)
    TASKRUNNER_METRICS_HOST   address the metrics port binds (default 0.0.0.0)

Precedence note: a TaskRunner created with an explicit ``url`` in Python still uses that
url when it enqueues; ``TASKRUNNER_REDIS_URL`` overrides it only for the command. The
command logs a warning when the two differ, because producers and workers must share
one Redis.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from taskrunner.config import MAX_CONCURRENCY
from taskrunner.exceptions import ConfigurationError
from taskrunner.options import MAX_SECONDS
from taskrunner.urls import parse_url, redact

if TYPE_CHECKING:
    from taskrunner.runner import TaskRunner

ENV_PREFIX = "TASKRUNNER_"
LogLevel = Literal["debug", "info", "warning", "error"]

logger = logging.getLogger("taskrunner.settings")


class SettingsError(ConfigurationError):
    """A setting (flag or ``TASKRUNNER_*`` variable) is unknown or invalid."""


class Settings(BaseSettings):
    """Every setting of the ``taskrunner`` command; see the module docstring."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", case_sensitive=False, validate_default=True
    )

    redis_url: str | None = Field(default=None, repr=False)  # it may hold a password
    queues: Annotated[list[str], NoDecode] = Field(default_factory=list)
    concurrency: int = Field(default=100, ge=1, le=MAX_CONCURRENCY)
    processes: int = Field(default=1, ge=1)
    burst: bool = False
    grace_period: float = Field(default=30.0, ge=0, le=MAX_SECONDS, allow_inf_nan=False)
    log_level: LogLevel = "info"
    log_format: Literal["text", "json"] = "text"
    max_deliveries: int = Field(default=5, ge=1)
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_host: str = "0.0.0.0"  # noqa: S104 - metrics are scraped from other hosts

    @field_validator("queues", mode="before")
    @classmethod
    def _split_queues(cls, value: object) -> object:
        if isinstance(value, str):  # TASKRUNNER_QUEUES=a,b
            return [q.strip() for q in value.split(",") if q.strip()]
        if isinstance(value, list):  # -q a,b is -q a -q b ("-q ''" stays, refused)
            return [q.strip() for item in value for q in str(item).split(",")]
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value


FLAG_NAMES = {"queues": "--queue"}
"""Flags whose name is not the field's name with dashes."""


def flag_name(field: str) -> str:
    return FLAG_NAMES.get(field, "--" + field.replace("_", "-"))


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def check_environment(environ: Mapping[str, str]) -> None:
    """Refuse ``TASKRUNNER_*`` variables that name no setting (with a suggestion)."""
    known = {env_name(f) for f in Settings.model_fields}
    for key in sorted(environ):
        if not key.upper().startswith(ENV_PREFIX) or key.upper() in known:
            continue
        close = difflib.get_close_matches(key.upper(), sorted(known), n=1)
        hint = f"; did you mean {close[0]}?" if close else f"; known: {', '.join(sorted(known))}"
        raise SettingsError(f"unknown setting {key}{hint}")


def describe(exc: ValidationError, flags: Mapping[str, Any]) -> str:
    """One line naming the flag or variable each error came from, and the bad value."""
    parts = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else "?"
        source = flag_name(field) if field in flags else env_name(field)
        parts.append(f"invalid {source}={error['input']!r}: {error['msg']}")
    return redact("; ".join(parts))


def load(
    flags: Mapping[str, Any],
    runner: TaskRunner | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Resolve the settings: ``flags`` (None or empty means not given) > ``TASKRUNNER_*``
    variables > the runner's url and queues > defaults. Raises ``SettingsError``."""
    check_environment(os.environ if environ is None else environ)
    given = {k: v for k, v in flags.items() if v is not None and v not in ((), [])}
    try:
        settings = Settings(**given)
    except ValidationError as exc:
        raise SettingsError(describe(exc, given)) from None
    if settings.redis_url is not None:
        try:
            parse_url(settings.redis_url)
        except ConfigurationError as exc:
            raise SettingsError(f"{env_name('redis_url')}: {exc}") from None
    if runner is None:
        return settings
    return with_runner_defaults(settings, runner)


def with_runner_defaults(settings: Settings, runner: TaskRunner) -> Settings:
    """Fill what neither a flag nor the environment set from the TaskRunner object."""
    update: dict[str, Any] = {}
    if "redis_url" not in settings.model_fields_set and runner.url:
        update["redis_url"] = runner.url
    elif runner.url and settings.redis_url != runner.url:
        logger.warning(
            "TASKRUNNER_REDIS_URL (%s) overrides the url given to TaskRunner() (%s) for this "
            "command; producers that use that TaskRunner in Python still use the latter",
            redact(settings.redis_url or ""),
            redact(runner.url),
        )
    if not settings.queues:  # not given, or an empty TASKRUNNER_QUEUES: every queue
        update["queues"] = runner.queues()
    return settings.model_copy(update=update)
