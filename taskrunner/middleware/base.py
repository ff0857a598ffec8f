"""The middleware chain: onion layers around enqueue and around execution.

A middleware overrides any of ``enqueue``, ``execute``, ``on_worker_start`` and
``on_worker_stop``. Each of the first two receives a context and ``call_next``;
it may change the context, call the next layer (or not), and look at or replace
what comes back, so one layer can hold a lock or a timer across the call and
release it in ``finally``. A middleware declares the task options it owns as a
pydantic model in ``Options``; an option nobody owns is refused at declaration.

Never catch cancellation (``BaseException``) in a middleware: catch ``Exception``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict

from taskrunner.job import ErrorInfo, JobContext

if TYPE_CHECKING:
    from taskrunner.job import Job
    from taskrunner.task import TaskDefinition
    from taskrunner.worker import Worker


def to_seconds(value: object) -> object:
    """Seconds from a ``timedelta`` (anything else is left to pydantic)."""
    return value.total_seconds() if isinstance(value, timedelta) else value


OptionalSeconds = Annotated[float | None, BeforeValidator(to_seconds)]
"""A task option in seconds that also takes a ``timedelta``; None means "not set"."""


class TaskOptions(BaseModel):
    """Base for a middleware's task options: frozen, unknown keys forbidden."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


OptionsT = TypeVar("OptionsT", bound=TaskOptions)


@dataclass(slots=True)
class EnqueueContext:
    """An outgoing job. Middleware may change any field before calling the next layer."""

    task: TaskDefinition
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    payload: str
    """The arguments as validated JSON (what the worker will decode)."""
    job_id: str
    queue: str
    due: float | None
    """Epoch seconds when the job becomes runnable; None means now."""
    now: float
    locks: list[tuple[str, int]] = field(default_factory=list)
    """Lock keys (with TTL in ms) that the write must take atomically with the job."""
    meta: dict[str, str] = field(default_factory=dict)
    """Small string headers stored with the job and handed to every attempt
    (``ExecutionContext.meta``), e.g. a trace context. Keep it small."""


class OutcomeKind(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ABORTED = "aborted"
    REJECTED = "rejected"
    DEAD = "dead"
    RETRY = "retry"
    RESCHEDULE = "reschedule"
    HANDBACK = "handback"


@dataclass(slots=True, frozen=True)
class Outcome:
    """What happens next to a job after an attempt; the worker commits it atomically."""

    kind: OutcomeKind
    result: Any = None
    error: ErrorInfo | None = None
    due: float | None = None
    """For retry and reschedule: epoch seconds when the job runs again."""

    @classmethod
    def succeeded(cls, result: Any) -> Outcome:
        return cls(OutcomeKind.SUCCEEDED, result=result)

    @classmethod
    def failed(cls, error: ErrorInfo) -> Outcome:
        return cls(OutcomeKind.FAILED, error=error)

    @classmethod
    def retry(cls, due: float, error: ErrorInfo) -> Outcome:
        return cls(OutcomeKind.RETRY, error=error, due=due)

    @classmethod
    def reschedule(cls, due: float) -> Outcome:
        return cls(OutcomeKind.RESCHEDULE, due=due)

    @classmethod
    def dead(cls, reason: str) -> Outcome:
        return cls(OutcomeKind.DEAD, error=ErrorInfo(type="DeadLetter", message=reason))


class CancelReason(StrEnum):
    ABORTED = "aborted"
    LOST_LEASE = "lost_lease"
    SHUTDOWN = "shutdown"


@dataclass(slots=True)
class ExecutionContext:
    """A job about to run in a worker, with its decoded arguments and its lease."""

    job: JobContext
    task: TaskDefinition
    args: list[Any]
    kwargs: dict[str, Any]
    worker: Worker
    entry_id: str
    lease: str
    """This attempt's fencing token: every commit checks it."""
    locks: list[str]
    """Lock keys the job holds; final commits release them, heartbeats renew them."""
    cancel: Callable[[CancelReason], None]
    """Cancel this attempt; the worker turns the reason into the outcome."""
    payload: str = ""
    """The arguments as stored (validated JSON keyed by parameter name)."""
    lock_ttl_ms: int = 0
    """TTL the heartbeat gives the job's locks (set by the unique-job middleware)."""
    meta: dict[str, str] = field(default_factory=dict)
    """The headers the job was enqueued with (``EnqueueContext.meta``)."""


EnqueueNext = Callable[[EnqueueContext], Awaitable["Job[Any]"]]
ExecuteNext = Callable[[ExecutionContext], Awaitable[Outcome]]


class Middleware:
    """Base class: override what you need; the defaults pass straight through."""

    Options: ClassVar[type[TaskOptions] | None] = None
    """The task options this middleware owns (a TaskOptions model), or None."""

    async def enqueue(self, ctx: EnqueueContext, call_next: EnqueueNext) -> Job[Any]:
        return await call_next(ctx)

    async def execute(self, ctx: ExecutionContext, call_next: ExecuteNext) -> Outcome:
        return await call_next(ctx)

    def applies_to(self, task: TaskDefinition) -> bool:
        """Whether this middleware takes part in ``task``'s jobs. One that does not is
        left out of that task's chains, so an unused layer costs nothing per job (a
        unique-jobs layer for a task without ``lock=``, a timeout layer with no timeout)."""
        return True

    async def on_worker_start(self, worker: Worker) -> None:
        """Called once when a worker starts, before it reads any job."""

    def on_commit(self, job: JobContext, outcome: Outcome) -> None:
        """Called in the worker after an attempt's outcome was recorded in Redis, for
        every recorded outcome, including those decided outside the execution chain
        (dead letters of unknown tasks, undecodable payloads, poison jobs, aborts of
        jobs that had not started). Not called when the commit lost its lease. Must be
        quick and must not raise (an exception is logged and ignored)."""

    async def on_worker_stop(self, worker: Worker) -> None:
        """Called once when a worker stops, after its last job is committed."""

    def options(self, task: TaskDefinition, model: type[OptionsT]) -> OptionsT:
        """This middleware's options for ``task`` (defaults when the task set none)."""
        return task.options_for(model)


def enqueue_layers(middleware: Sequence[Middleware], task: TaskDefinition) -> list[Middleware]:
    """The middleware that wrap ``task``'s enqueue, outermost first."""
    return [
        mw
        for mw in middleware
        if type(mw).enqueue is not Middleware.enqueue and mw.applies_to(task)
    ]


def execute_layers(middleware: Sequence[Middleware], task: TaskDefinition) -> list[Middleware]:
    """The middleware that wrap ``task``'s execution, outermost first."""
    return [
        mw
        for mw in middleware
        if type(mw).execute is not Middleware.execute and mw.applies_to(task)
    ]


def build_enqueue_chain(middleware: Sequence[Middleware], terminal: EnqueueNext) -> EnqueueNext:
    """Compose the enqueue sides, first middleware outermost; skip pass-through layers."""
    handler = terminal
    for mw in reversed(middleware):
        if type(mw).enqueue is not Middleware.enqueue:
            handler = _bind_enqueue(mw, handler)
    return handler


def build_execute_chain(middleware: Sequence[Middleware], terminal: ExecuteNext) -> ExecuteNext:
    """Compose the execution sides, first middleware outermost; skip pass-through layers."""
    handler = terminal
    for mw in reversed(middleware):
        if type(mw).execute is not Middleware.execute:
            handler = _bind_execute(mw, handler)
    return handler


def _bind_enqueue(mw: Middleware, call_next: EnqueueNext) -> EnqueueNext:
    async def layer(ctx: EnqueueContext) -> Job[Any]:
        return await mw.enqueue(ctx, call_next)

    return layer


def _bind_execute(mw: Middleware, call_next: ExecuteNext) -> ExecuteNext:
    async def layer(ctx: ExecutionContext) -> Outcome:
        return await mw.execute(ctx, call_next)

    return layer
