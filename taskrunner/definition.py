"""What a task is to the runtime (``TaskDefinition``) and one call of it, ready to
enqueue (``Call``, with its ``EnqueueOptions``). ``Calls`` is anything that makes calls
of a task: ``Task`` and ``BoundTask`` (taskrunner.task), as chain steps take them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Generic, ParamSpec, Protocol, TypeVar

from taskrunner.codec import ArgsCodec
from taskrunner.exceptions import ConfigurationError
from taskrunner.keys import check_name
from taskrunner.options import TaskOptions, signed_seconds

P = ParamSpec("P")
R_co = TypeVar("R_co", covariant=True)
OptionsT = TypeVar("OptionsT", bound=TaskOptions)


class TaskDefinition:
    """What the runtime knows of a task: name, function, queue, codec and options."""

    __slots__ = ("codec", "fn", "name", "options", "priority", "queue")

    def __init__(
        self,
        fn: Callable[..., Awaitable[Any]],
        name: str,
        queue: str,
        options: dict[type[TaskOptions], TaskOptions],
        priority: str | None = None,
    ) -> None:
        self.fn = fn
        self.name = name
        self.queue = queue
        self.options = options
        self.priority = priority
        self.codec = ArgsCodec(fn, name)

    def options_for(self, model: type[OptionsT]) -> OptionsT:
        """The validated options of one middleware (its defaults when none were given)."""
        found = self.options.get(model)
        if found is None:
            found = self.options[model] = model()
        return found  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f"TaskDefinition({self.name!r}, queue={self.queue!r})"


@dataclass(frozen=True, slots=True)
class EnqueueOptions:
    """Per-enqueue options: when, under which id, on which queue, at which priority."""

    delay: float | timedelta | None = None
    at: datetime | None = None
    job_id: str | None = None
    queue: str | None = None
    priority: str | None = None

    def __post_init__(self) -> None:
        """Refuse a bad value where it is given: nothing is written for it."""
        try:
            signed_seconds(self.delay)
        except ValueError as exc:
            raise ConfigurationError(f"delay {exc}") from None
        if self.at is not None and not isinstance(self.at, datetime):
            raise ConfigurationError(f"at must be a datetime, got {self.at!r}")
        if self.job_id is not None and (not isinstance(self.job_id, str) or not self.job_id):
            raise ConfigurationError(f"job_id must be a non-empty string, got {self.job_id!r}")
        if self.queue is not None:
            check_name("queue", self.queue)
        if self.priority is not None and (not isinstance(self.priority, str) or not self.priority):
            raise ConfigurationError(f"priority must be the name of a level, got {self.priority!r}")


@dataclass(frozen=True, slots=True)
class Call(Generic[R_co]):
    """One call of a task with its arguments, ready for ``enqueue_many``.

    ``Call[R]`` is covariant in the task's result type ``R``, so calls of different
    tasks go together: a list of them is a ``list[Call[int | str]]`` (pyright) or
    ``list[Call[object]]`` (mypy), and ``tr.enqueue_many`` of a tuple of calls
    returns a tuple with one correctly typed ``Job`` per position.
    """

    task: TaskDefinition
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    options: EnqueueOptions


class Calls(Protocol[P, R_co]):
    """Makes calls of one task (``Task``, ``BoundTask``)."""

    def call(self, *args: P.args, **kwargs: P.kwargs) -> Call[R_co]: ...
