"""Task options: the base model a middleware declares its options with, and units."""

from __future__ import annotations

import contextlib
import math
from datetime import timedelta
from typing import Annotated, TypeVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict

MAX_SECONDS = 100 * 365 * 24 * 3600.0
"""The longest duration taskrunner takes, about 100 years (a setting, a task option, a
delay): in milliseconds it stays a whole number that Redis's expiries and a Lua
number hold exactly."""


def to_seconds(value: object) -> object:
    """Seconds from a ``timedelta`` (anything else is left to pydantic)."""
    return value.total_seconds() if isinstance(value, timedelta) else value


def at_most_max(value: float | None) -> float | None:
    """Refuse a duration longer than ``MAX_SECONDS`` (pydantic turns this into the
    setting's or option's error)."""
    if value is not None and value > MAX_SECONDS:
        raise ValueError(f"it must be at most {MAX_SECONDS:.0f} seconds (100 years)")
    return value


def signed_seconds(value: object) -> float | None:
    """Seconds of a delay (``options(delay=...)``, ``Retry(delay=...)``): any real number
    or a ``timedelta``, of either sign, finite and at most ``MAX_SECONDS`` long; None
    stays None. ValueError for anything else (a boolean, text, NaN, infinity)."""
    if value is None:
        return None
    seconds = math.nan  # refused below: a boolean, text, or what float() refuses
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif not isinstance(value, bool | str | bytes):
        with contextlib.suppress(TypeError, ValueError):
            seconds = float(value)  # type: ignore[arg-type]
    if not -MAX_SECONDS <= seconds <= MAX_SECONDS:  # NaN too
        raise ValueError(
            f"must be a finite number of seconds, at most {MAX_SECONDS:.0f} (100 years), "
            f"or a timedelta, got {value!r}"
        )
    return seconds


def wait_seconds(value: object) -> float | None:
    """A wait's ``timeout`` (``job.result``, ``group.results``, ``run_until_idle``...)
    in seconds: a number or a ``timedelta`` (0 or less: look once, do not wait); None,
    infinity and anything longer than ``MAX_SECONDS`` (``timedelta.max``): no bound.
    ValueError naming ``timeout`` for anything else."""
    if _beyond_max(value):
        return None
    try:
        return signed_seconds(value)
    except ValueError as exc:
        raise ValueError(f"timeout {exc}") from None


def _beyond_max(value: object) -> bool:
    """Whether ``value`` is a duration longer than ``MAX_SECONDS`` (infinity too)."""
    if isinstance(value, timedelta):
        return value.total_seconds() > MAX_SECONDS
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value > MAX_SECONDS
    return False


OptionalSeconds = Annotated[float | None, BeforeValidator(to_seconds), AfterValidator(at_most_max)]
"""A task option in seconds that also takes a ``timedelta``; None means "not set"."""


FUNCTION = "function"
"""Key of the validation context that holds the decorated function: ``@tr.task``
validates every option model with ``context={FUNCTION: fn}``, so a validator can check
an option against the task's signature (``info.context``; absent when a model is
validated elsewhere)."""


class TaskOptions(BaseModel):
    """Base for a middleware's task options: frozen, unknown keys forbidden. Validators
    may read the decorated function from the validation context (``FUNCTION``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


OptionsT = TypeVar("OptionsT", bound=TaskOptions)
