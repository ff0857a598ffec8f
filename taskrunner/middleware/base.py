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

import math
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from taskrunner.exceptions import MiddlewareError
from taskrunner.job import ErrorInfo, JobContext
from taskrunner.options import MAX_SECONDS, OptionalSeconds, OptionsT, TaskOptions, to_seconds

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from taskrunner.job import Job
    from taskrunner.keys import QueueKeys
    from taskrunner.scripts import Env
    from taskrunner.task import TaskDefinition

__all__ = [
    "CancelReason",
    "EnqueueContext",
    "ExecutionContext",
    "Held",
    "Middleware",
    "OptionalSeconds",
    "Outcome",
    "OutcomeKind",
    "TaskOptions",
    "WorkerPort",
    "to_seconds",
]


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
    """Epoch seconds (by this process's clock) when the job becomes runnable; None means
    now. It is sent as a delay from now: the server's clock decides when it is due."""
    now: float
    locks: list[tuple[str, int]] = field(default_factory=list)
    """Lock keys (with TTL in ms) that the write must take atomically with the job."""
    meta: dict[str, str] = field(default_factory=dict)
    """Small string headers stored with the job and handed to every attempt
    (``ExecutionContext.meta``), e.g. a trace context. Keep it small."""
    partition: int | None = None
    """The queue partition the job goes to; None lets the producer choose (the job id's
    home partition). The unique-job middleware sets it from the lock digest."""
    priority: str | None = None
    """The priority level; None is the runner's default level."""
    job_id_given: bool = False
    """The caller chose ``job_id`` (else it is random, and may be drawn again so that
    its home partition is the one a lock digest chose)."""
    follow: str = ""
    """The job's follow-ups as JSON (the rest of a chain, taskrunner.chain), written
    with the job; "" for none. Set by ``Chain.enqueue``, not by middleware."""


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
    """For retry and reschedule: epoch seconds (this process's clock) when the job runs
    again; sent to Redis as a delay from now."""
    encoded: str | None = field(default=None, compare=False, repr=False)
    """For succeeded: the result as stored (JSON), set by the innermost layer."""

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
    HANDBACK = "handback"
    """Not started yet and given back to the queue (a job is about to run alone)."""


class Held(Protocol):
    """A job a worker holds under a lease but has not started yet (it waits for a free
    consumer): heartbeated like a running job."""

    keys: QueueKeys
    stream: str
    job_id: str
    entry_id: str
    token: str


class WorkerPort(Protocol):
    """What a middleware may use of the worker that runs it: its identity and Redis
    client, the partitions it reads, background services and events, the jobs it holds
    that have not started, and the run-alone gate. Nothing else of the worker's inside."""

    @property
    def id(self) -> str:
        """The consumer name (``host:pid:random``)."""

    @property
    def redis(self) -> Redis:
        """The worker's own command client (user code cannot exhaust its connections)."""

    @property
    def stopping(self) -> bool: ...

    @property
    def env(self) -> Env:
        """What the worker's script calls share: how to publish, and the clock."""

    def partitions(self) -> Sequence[QueueKeys]:
        """Every partition of every queue the worker reads."""

    def tasks(self) -> Collection[str]:
        """Names of the tasks the worker runs (its runner's declared tasks)."""

    @property
    def result_ttl(self) -> float:
        """Seconds a finished job's state is kept (the runner's ``result_ttl``)."""

    @property
    def stale_after(self) -> float:
        """Seconds without a heartbeat after which a worker's leases are stale."""

    def streams(self, keys: QueueKeys) -> Sequence[str]:
        """The priority-level streams of one partition, highest first."""

    def spawn(self, fn: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        """Run a background service until the worker stops."""

    def on_event(self, kind: str, handler: Callable[[str, str], None]) -> None:
        """Call ``handler(queue, argument)`` for each ``kind`` message on an events channel."""

    def held(self) -> Sequence[Held]:
        """Claimed jobs not started yet."""

    def drop_held(self, token: str, reason: CancelReason) -> None:
        """Do not start a held job: commit ``reason`` instead (abort), or nothing."""

    def run_alone(self) -> AbstractAsyncContextManager[None]:
        """Wait until no other job runs in this worker, and keep it so while inside."""

    def run_shared(self) -> AbstractAsyncContextManager[None]:
        """Run beside other jobs (waits while a job runs alone)."""

    async def server_identity(self) -> str:
        """Run ids of the Redis primaries (a restart or failover changes it)."""

    async def server_uptime(self) -> float:
        """Seconds the Redis primaries have been up (the shortest)."""


@dataclass(slots=True)
class ExecutionContext:
    """A job about to run in a worker, with its decoded arguments and its lease."""

    job: JobContext
    task: TaskDefinition
    args: list[Any]
    kwargs: dict[str, Any]
    worker: WorkerPort
    keys: QueueKeys
    """The partition the job lives in."""
    stream: str
    """The stream its entry is in (its priority level's)."""
    entry_id: str
    lease: str
    """This attempt's fencing token: every commit checks it."""
    locks: list[str]
    """Lock keys the job holds; final commits release them, heartbeats renew them."""
    cancel: Callable[[CancelReason], None]
    """Cancel this attempt; the worker turns the reason into the outcome, also when
    the task catches the cancellation and returns or raises something else."""
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

    async def on_worker_start(self, worker: WorkerPort) -> None:
        """Called once when a worker starts, before it reads any job."""

    def on_commit(self, job: JobContext, outcome: Outcome) -> None:
        """Called in the worker after an attempt's outcome was recorded in Redis, for
        every recorded outcome, including those decided outside the execution chain
        (dead letters of unknown tasks, undecodable payloads, poison jobs, aborts of
        jobs that had not started). Not called when the commit lost its lease. Must be
        quick and must not raise (an exception is logged and ignored)."""

    async def on_worker_stop(self, worker: WorkerPort) -> None:
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


_COMMITTABLE = frozenset(
    {
        OutcomeKind.SUCCEEDED,
        OutcomeKind.FAILED,
        OutcomeKind.ABORTED,
        OutcomeKind.REJECTED,
        OutcomeKind.DEAD,
        OutcomeKind.RETRY,
        OutcomeKind.RESCHEDULE,
    }
)
"""What an execution chain may return. A hand-back is the worker's own (at shutdown):
returned by a middleware, it would put the job back without end."""


def check_outcome(mw: object, value: object) -> Outcome:
    """``value`` if it is an Outcome a chain may return, else a MiddlewareError that
    names the middleware (the attempt fails, under the retry policy)."""
    if isinstance(value, Outcome) and value.kind in _COMMITTABLE:
        if value.kind in (OutcomeKind.RETRY, OutcomeKind.RESCHEDULE):
            problem = _due_problem(value.due)
            if problem is not None:
                raise MiddlewareError(f"{_name(mw)}.execute returned {value.kind} {problem}")
        return value
    raise MiddlewareError(
        f"{_name(mw)}.execute returned {_excerpt(value)}, not an Outcome it may return "
        "(a forgotten `return await call_next(ctx)`?)"
    )


def _due_problem(due: object) -> str | None:
    """What is wrong with a retry's or reschedule's due time, None if nothing: it must
    be epoch seconds, finite and at most ``MAX_SECONDS`` ahead (an infinite one once
    stopped the worker, a NaN one ran the job again at once, without end)."""
    if due is None:
        return "without a due time"
    if (
        isinstance(due, bool)
        or not isinstance(due, int | float)
        or not math.isfinite(due)
        or due - time.time() > MAX_SECONDS
    ):
        return (
            f"with due={_excerpt(due)}, not a time in epoch seconds at most 100 years "
            "ahead (time.time() + delay)"
        )
    return None


def _name(mw: object) -> str:
    return type(mw).__qualname__


def _excerpt(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _bind_execute(mw: Middleware, call_next: ExecuteNext) -> ExecuteNext:
    async def layer(ctx: ExecutionContext) -> Outcome:
        return check_outcome(mw, await mw.execute(ctx, call_next))

    return layer
