"""The settings of a ``TaskRunner``, validated by one pydantic model.

``TaskRunner(...)`` checks its arguments here, like task options are checked by their
middleware: a value of the wrong type or out of range raises ``ConfigurationError``
where the runner is built, with one sentence per bad setting that names it::

    invalid TaskRunner setting max_retries=-1: it must be 0 or more.

Durations are seconds (``float``) or ``datetime.timedelta``; the model turns them
into seconds.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    model_validator,
)
from pydantic_core import ErrorDetails

from taskrunner.exceptions import ConfigurationError
from taskrunner.keys import MAX_PARTITIONS
from taskrunner.options import at_most_max

MAX_CONCURRENCY = 10_000
"""The most jobs one worker process runs at once (``concurrency``): each is a task and a
slot, so a typo of a few more zeros would take the memory of the machine; run more
processes for more."""
DEFAULT_DEAD_LETTER_LIMIT = 10_000
"""Dead letters kept per queue: the oldest beyond this are removed (Sidekiq's default)."""
DEFAULT_DEAD_LETTER_TTL = 30 * 24 * 3600.0
"""Seconds a dead letter is kept (30 days)."""


def _seconds(value: object) -> object:
    if isinstance(value, bool):
        raise ValueError("it must be a number of seconds or a timedelta, not a boolean")  # noqa: TRY004 (pydantic wants ValueError)
    return value.total_seconds() if isinstance(value, timedelta) else value


Seconds = Annotated[
    float,
    BeforeValidator(_seconds),
    Field(strict=True, allow_inf_nan=False),
    AfterValidator(at_most_max),
]
"""Seconds as a finite number or a ``timedelta`` (``"10"`` is refused, as in a task
option), at most ``MAX_SECONDS`` (about 100 years)."""
Count = Annotated[int, Field(strict=True)]
"""A whole number (``1.5``, ``"3"`` and ``True`` are refused)."""


class RunnerSettings(BaseModel):
    """Every setting of ``TaskRunner(...)`` but the URL (checked by ``taskrunner.urls``),
    the names (checked by ``taskrunner.keys.check_name``) and the middleware."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    result_ttl: Seconds = Field(default=24 * 3600.0, gt=0)
    max_retries: Count = Field(default=3, ge=0)
    retry_delay: Seconds = Field(default=1.0, ge=0)
    timeout: Seconds | None = Field(default=None, gt=0)
    heartbeat_interval: Seconds = Field(default=5.0, gt=0)
    stale_after: Seconds = Field(default=30.0, gt=0)
    socket_timeout: Seconds = Field(default=10.0, gt=0)
    lock_ttl: Seconds = Field(default=600.0, gt=0)
    partitions: Count | None = Field(default=None, ge=1, le=MAX_PARTITIONS)
    priority_aging: Seconds = Field(default=60.0, gt=0)
    max_connections: Count = Field(default=100, ge=1)
    pool_timeout: Seconds = Field(default=20.0, gt=0)
    max_payload: Count = Field(default=1 << 20, ge=1)
    dead_letter_limit: Count = Field(default=DEFAULT_DEAD_LETTER_LIMIT, ge=1)
    dead_letter_ttl: Seconds = Field(default=DEFAULT_DEAD_LETTER_TTL, gt=0)
    wait_replicas: Count = Field(default=0, ge=0)
    wait_timeout: Seconds = Field(default=1.0, gt=0)

    @model_validator(mode="after")
    def _stale_after_covers_two_heartbeats(self) -> Self:
        if self.stale_after < 2 * self.heartbeat_interval:
            raise ValueError(
                f"stale_after ({self.stale_after:g}s) must be at least twice "
                f"heartbeat_interval ({self.heartbeat_interval:g}s), or live jobs would be "
                "reclaimed"
            )
        return self

    @classmethod
    def check(cls, **values: Any) -> RunnerSettings:
        """Validate ``values``; raise ``ConfigurationError`` naming each bad setting."""
        try:
            return cls(**values)
        except ValidationError as exc:
            raise ConfigurationError(describe(exc)) from None


class WorkerSettings(BaseModel):
    """The arguments of ``tr.worker(...)``, checked like a runner's settings: a wrong
    type or a value out of range raises ``ConfigurationError`` where the worker is
    made (the queue names are checked by ``taskrunner.keys.check_name``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    queues: tuple[str, ...] | None = None  # a str is refused, not read as its letters
    concurrency: Count = Field(default=100, ge=1, le=MAX_CONCURRENCY)
    burst: StrictBool = False
    grace_period: Seconds = Field(default=30.0, ge=0)
    handle_signals: StrictBool | None = None
    max_deliveries: Count = Field(default=5, ge=1)

    @classmethod
    def check(cls, **values: Any) -> WorkerSettings:
        """Validate ``values``; raise ``ConfigurationError`` naming each bad one."""
        try:
            return cls(**values)
        except ValidationError as exc:
            raise ConfigurationError(describe(exc, "worker setting")) from None


_READABLE = {
    "greater_than": "it must be more than {gt:g}",
    "greater_than_equal": "it must be {ge:g} or more",
    "int_type": "it must be a whole number",
    "int_from_float": "it must be a whole number",
    "int_parsing": "it must be a whole number",
    "float_type": "it must be a number of seconds or a timedelta",
    "float_parsing": "it must be a number of seconds or a timedelta",
    "less_than_equal": "it must be {le:g} or less",
    "bool_type": "it must be True or False",
    "tuple_type": "it must be a list of names",
    "finite_number": "it must be a finite number",
}
# Only for settings: a task argument keeps pydantic's "input should be a valid string".
_SETTING_READABLE = {"string_type": "it must be a str"}


def describe(exc: ValidationError, what: str = "TaskRunner setting") -> str:
    """One sentence: each bad setting with its value and what it must be."""
    return "; ".join(_one(error, what) for error in exc.errors()) + "."


def reason(error: ErrorDetails, readable: dict[str, str] = _READABLE) -> str:
    """What a value must be, in words (``it must be 0.05 or more``). The words are
    for settings and options; for a task's arguments pass ``{}``: pydantic's own."""
    ctx = error.get("ctx") or {}
    template = readable.get(error["type"])
    return template.format(**ctx) if template else str(error["msg"]).removeprefix("Value error, ")


def _one(error: ErrorDetails, what: str) -> str:
    location = [str(part) for part in error["loc"] if isinstance(part, str)]
    why = reason(error, _READABLE | _SETTING_READABLE)
    if not location:  # a rule over several settings: its message names them
        return f"invalid {what}s: {why}"
    value = error["input"]
    items = "".join(f"[{part}]" for part in error["loc"] if isinstance(part, int))
    return f"invalid {what} {location[0]}{items}={value!r}: {why}"
