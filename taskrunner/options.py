"""Task options: the base model a middleware declares its options with, and units."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict


def to_seconds(value: object) -> object:
    """Seconds from a ``timedelta`` (anything else is left to pydantic)."""
    return value.total_seconds() if isinstance(value, timedelta) else value


OptionalSeconds = Annotated[float | None, BeforeValidator(to_seconds)]
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
