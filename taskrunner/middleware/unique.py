"""Unique jobs: at most one job per task and unique arguments, held by a TTL lock.

The model and names are Cloudtasker's (``lock`` and ``on_conflict``)::

    lock               held from          until                          on_conflict
    until_executing    enqueue            the first attempt starts       reject*, raise
    while_executing    an attempt starts  that attempt ends              reject*, reschedule, raise
    until_executed     enqueue            a final state (succeeded,      reject*, raise
                                          failed, aborted, rejected, dead)

The lock is ``{ns}:{queue}:lock:{digest}``, where the digest covers the task name
and the canonical JSON of the unique arguments, a set's items sorted (by default every
argument bound to the signature with defaults applied, so ``f(1)``, ``f(x=1)`` and
``f(1, full=False)`` are one job). Its value is the holder's job id.

- Enqueue side (``until_executing``, ``until_executed``): the lock goes into the
  job's write (enqueue.lua), so the lock and the job exist together or not at all.
  Its TTL is (due time - now) + ``lock_ttl``. On conflict ``reject`` writes
  nothing and returns the holder's handle (``deduplicated=True``); ``raise``
  raises ``LockConflictError``.
- Partitions: a unique job goes to the partition its lock digest maps to, so the job,
  its lock and every script touching both share one Cluster slot, and the lock still
  means "one per key" across the whole queue (while the partition count is unchanged).
- Execution side: ``until_executing`` releases the lock when an attempt starts;
  ``until_executed`` re-enters its lock at every attempt (a reclaimed or retried
  job is its holder already; an expired lock is taken again) and, on a retry, the
  commit extends it to the retry's delay + ``lock_ttl`` (a heartbeat never shortens a
  lock's TTL); ``while_executing`` takes the
  lock (lock.lua: SET PX if free or already this job's, fenced by the lease) for
  the attempt and releases it by compare-and-delete when the attempt ends.
  On conflict ``reject`` ends the job as ``rejected``, ``reschedule`` sends it back
  to the delayed set for ``reschedule_delay`` (same id, same attempt count), and
  ``raise`` fails the attempt with ``LockConflictError`` under the retry policy.
- While a job runs, its heartbeat renews its locks to ``lock_ttl``
  (``ExecutionContext.lock_ttl_ms``); final commits and abort release them.
- A worker sends these takes and releases in one pipeline for all its running
  attempts (taskrunner.middleware.pipeline): concurrent attempts share a round trip.
  Through an outage a take waits for Redis (the attempt can still be cancelled); a
  release waits at most ``RELEASE_DEADLINE`` (the lock then expires at its TTL, or the
  final commit releases it).

Order in the chain: lease, isolation, limits, unique, retry, timeout, user. Unique sits
inside limits (a job refused by its limit has not started, so its ``until_executing``
lock stays held while it waits) and inside lease
so that the attempt's heartbeats (which renew the locks) run while it holds them,
and outside retry and timeout so that the lock spans the whole attempt including
the retry decision, a lock conflict is decided before the timeout clock starts,
and ``reject``/``reschedule`` are outcomes that the retry policy never sees.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, Self

import anyio
from pydantic import BaseModel, Field, model_validator
from pydantic_core import to_jsonable_python

from taskrunner import scripts
from taskrunner.codec import canonical_json
from taskrunner.connection import REDIS_ERRORS, wrong_type
from taskrunner.exceptions import ConfigurationError, LockConflictError, LostLease
from taskrunner.job import ErrorInfo, Job
from taskrunner.keys import home_partition
from taskrunner.logs import job_extra
from taskrunner.middleware.base import (
    EnqueueContext,
    EnqueueNext,
    ExecuteNext,
    ExecutionContext,
    Middleware,
    Outcome,
    OutcomeKind,
    WorkerPort,
)
from taskrunner.middleware.pipeline import WorkerPipelines
from taskrunner.options import OptionalSeconds, TaskOptions
from taskrunner.task import TaskDefinition

if TYPE_CHECKING:
    from taskrunner.client import Client
    from taskrunner.middleware.retry import RetryMiddleware
    from taskrunner.task import Task

logger = logging.getLogger("taskrunner.unique")

LockKind = Literal["until_executing", "while_executing", "until_executed"]
ConflictStrategy = Literal["reject", "raise", "reschedule"]

ALLOWED_STRATEGIES: dict[str, tuple[str, ...]] = {
    "until_executing": ("reject", "raise"),
    "while_executing": ("reject", "reschedule", "raise"),
    "until_executed": ("reject", "raise"),
}
"""Which ``on_conflict`` each ``lock`` accepts (the first is the default)."""

DEFAULT_LOCK_TTL = 600.0
DEFAULT_RESCHEDULE_DELAY = 5.0
MIN_RESCHEDULE_DELAY = 0.05
"""Below this a conflicting job would spin (reschedule, promote, conflict, ...)."""
RELEASE_DEADLINE = 5.0
"""Seconds a lock's release at the start or end of an attempt may take (Redis away):
after that the attempt goes on and the lock expires at its TTL (or is released by the
job's final commit)."""
_ENQUEUE_LOCKS = ("until_executing", "until_executed")
_RETRY_AFTER_REDIS_ERROR = 1.0


class UniqueOptions(TaskOptions):
    """The unique-job options of a task (all None: not unique)."""

    lock: LockKind | None = None
    on_conflict: ConflictStrategy | None = None
    """None means ``reject``."""
    lock_ttl: OptionalSeconds = Field(default=None, gt=0)
    """Seconds (or a timedelta) a lock outlives its due time or last heartbeat;
    None uses the runner's ``lock_ttl``."""
    unique_args: Callable[..., Any] | None = None
    """Called with the job's arguments as the task receives them; returns the
    JSON-able value that defines uniqueness. None: every argument, defaults applied."""
    reschedule_delay: OptionalSeconds = Field(default=None, ge=MIN_RESCHEDULE_DELAY)
    """Seconds (or a timedelta) before a rescheduled job is tried again (5 s); at
    least ``MIN_RESCHEDULE_DELAY`` (0.05 s)."""

    @model_validator(mode="after")
    def _combination(self) -> Self:
        if self.lock is None:
            stray = [
                name
                for name in ("on_conflict", "lock_ttl", "unique_args", "reschedule_delay")
                if getattr(self, name) is not None
            ]
            if stray:
                raise ValueError(
                    f"{', '.join(stray)} only apply to unique jobs: also set lock= "
                    "'until_executing', 'while_executing' or 'until_executed'"
                )
            return self
        allowed = ALLOWED_STRATEGIES[self.lock]
        if self.on_conflict is not None and self.on_conflict not in allowed:
            raise ValueError(
                f"on_conflict={self.on_conflict!r} cannot be used with lock={self.lock!r} "
                f"(allowed: {', '.join(allowed)})"
            )
        if self.reschedule_delay is not None and self.on_conflict != "reschedule":
            raise ValueError("reschedule_delay only applies with on_conflict='reschedule'")
        return self

    @property
    def strategy(self) -> ConflictStrategy:
        return self.on_conflict or "reject"


def lock_digest(task_name: str, unique_value: Any) -> str:
    """The digest naming a lock: the task name and the canonical JSON of the value
    (its sets in a fixed order: see ``sets_ordered``)."""
    text = f"{task_name}\n{canonical_json(to_jsonable_python(sets_ordered(unique_value)))}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def sets_ordered(value: Any) -> Any:
    """``value`` with every set in it (also in lists, dicts and models) made a list sorted
    by its items' canonical JSON; ``value`` itself when it holds no set. A set's own
    order follows string hashes, which differ from process to process, so the same
    set would name another lock in each producer."""
    if isinstance(value, set | frozenset):
        items = [sets_ordered(item) for item in value]
        return sorted(items, key=lambda item: canonical_json(to_jsonable_python(item)))
    if isinstance(value, BaseModel):
        dumped = value.model_dump()
        ordered = sets_ordered(dumped)
        return value if ordered is dumped else ordered
    if isinstance(value, dict):
        pairs = {key: sets_ordered(item) for key, item in value.items()}
        changed = any(pairs[key] is not item for key, item in value.items())
        return pairs if changed else value
    if isinstance(value, list | tuple):
        items = [sets_ordered(item) for item in value]
        changed = any(new is not old for new, old in zip(items, value, strict=True))
        return items if changed else value
    return value


def stored_arguments(task: TaskDefinition, payload: str) -> Any:
    """The arguments as stored (JSON keyed by parameter name); for arguments that hold a
    set, as validated with their sets ordered (the stored JSON lists a set's items in
    the order of the process that wrote it)."""
    stored = json.loads(payload)
    if not _may_hold_sets(stored):
        return stored
    try:
        validated = task.codec.model.model_validate_json(payload).model_dump(by_alias=True)
    except ValueError:  # not readable back here: the worker dead-letters it
        return stored
    ordered = sets_ordered(validated)
    return stored if ordered is validated else ordered


def _may_hold_sets(stored: Any) -> bool:
    """Whether stored arguments have a list of two or more items (as a set is stored)."""
    if isinstance(stored, list):
        return len(stored) > 1 or any(_may_hold_sets(item) for item in stored)
    if isinstance(stored, dict):
        return any(_may_hold_sets(item) for item in stored.values())
    return False


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class UniqueMiddleware(Middleware):
    """Takes, re-enters, renews and releases the locks of unique jobs (see the module)."""

    Options = UniqueOptions

    def __init__(
        self,
        client: Callable[[], Client],
        *,
        lock_ttl: float = DEFAULT_LOCK_TTL,
        retry: RetryMiddleware | None = None,
    ) -> None:
        if lock_ttl <= 0:
            raise ConfigurationError("lock_ttl must be positive")
        self._client = client
        self.lock_ttl = lock_ttl
        self.retry = retry
        """The retry policy that ``on_conflict="raise"`` at execution hands the error to."""
        self._calls = WorkerPipelines("lock calls")
        """Takes and releases of concurrent attempts go in one pipeline per worker."""

    def applies_to(self, task: TaskDefinition) -> bool:
        return task.options_for(UniqueOptions).lock is not None

    def ttl(self, opts: UniqueOptions) -> float:
        return self.lock_ttl if opts.lock_ttl is None else opts.lock_ttl

    def lock_key(
        self,
        task: Task[..., Any] | TaskDefinition,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        queue: str | None = None,
    ) -> str:
        """The lock key a call of ``task`` takes (for inspection and tests)."""
        definition: TaskDefinition = task if isinstance(task, TaskDefinition) else task.definition
        payload = definition.codec.encode(tuple(args), kwargs or {})
        digest = lock_digest(definition.name, self._unique_value(definition, payload))
        name = queue or definition.queue
        client = self._client()
        try:
            partitions = client.cached(name).partitions
        except Exception:  # noqa: BLE001 - not resolved yet: what resolving would give
            partitions = client.partitions or client.default_partitions()
        return client.keys(name, home_partition(digest, partitions)).lock(digest)

    def partition_for(self, task: TaskDefinition, payload: str, partitions: int) -> int | None:
        """The partition a job of ``task`` with these arguments (``payload``, as
        encoded) goes to among ``partitions``: its lock digest's; None if not unique."""
        if not self.applies_to(task):
            return None
        return home_partition(lock_digest(task.name, self._unique_value(task, payload)), partitions)

    @staticmethod
    def _unique_value(task: TaskDefinition, payload: str) -> Any:
        opts = task.options_for(UniqueOptions)
        if opts.unique_args is None:
            return stored_arguments(task, payload)
        args, kwargs = task.codec.decode(payload)
        return opts.unique_args(*args, **kwargs)

    # -- enqueue side --------------------------------------------------------------------

    async def enqueue(self, ctx: EnqueueContext, call_next: EnqueueNext) -> Job[Any]:
        opts = self.options(ctx.task, UniqueOptions)
        client = self._client()
        digest = lock_digest(ctx.task.name, self._unique_value(ctx.task, ctx.payload))
        queue = await client.resolve(ctx.queue)
        ctx.partition = home_partition(digest, queue.partitions)
        if not ctx.job_id_given and queue.partitions > 1:
            ctx.job_id = client.id_for(ctx.partition, queue.partitions)
        if opts.lock not in _ENQUEUE_LOCKS:
            return await call_next(ctx)
        key = queue.part(ctx.partition).lock(digest)
        ahead = max(0.0, ctx.due - ctx.now) if ctx.due is not None else 0.0
        ctx.locks.append((key, _ms(ahead + self.ttl(opts))))
        try:
            return await call_next(ctx)
        except LockConflictError as exc:
            if exc.lock != key or opts.strategy == "raise":
                raise
            logger.info(
                "task %s: unique lock held by job %s; not enqueued (deduplicated)",
                ctx.task.name,
                exc.holder,
            )
            return Job(client, exc.holder, ctx.queue, ctx.task.codec.result, deduplicated=True)

    # -- execution side ------------------------------------------------------------------

    async def execute(self, ctx: ExecutionContext, call_next: ExecuteNext) -> Outcome:
        opts = self.options(ctx.task, UniqueOptions)
        if opts.lock is None:
            return await call_next(ctx)
        ctx.lock_ttl_ms = _ms(self.ttl(opts))
        if opts.lock == "until_executing":
            await self._release_at_start(ctx)
            return await call_next(ctx)
        if opts.lock == "until_executed":
            return await self._until_executed(ctx, call_next, opts)
        return await self._while_executing(ctx, call_next, opts)

    async def _release_at_start(self, ctx: ExecutionContext) -> None:
        if not ctx.locks:
            return
        problem = f"no answer within {RELEASE_DEADLINE:g}s"
        with anyio.move_on_after(RELEASE_DEADLINE):
            try:
                await self._unlock(ctx, ctx.locks, forget=True)
            except REDIS_ERRORS as exc:
                problem = str(exc)
            else:
                ctx.locks.clear()
                return
        logger.warning(  # the lock then expires at its TTL
            "job %s %s attempt %d: could not release its lock (%s)",
            ctx.job.id,
            ctx.job.task,
            ctx.job.attempt,
            problem,
            extra=job_extra(ctx.job),
        )
        ctx.locks.clear()

    async def _until_executed(
        self, ctx: ExecutionContext, call_next: ExecuteNext, opts: UniqueOptions
    ) -> Outcome:
        if ctx.locks:
            refused = await self._take_or_refuse(ctx, ctx.locks, opts)
            if refused is not None:
                return refused
        return await call_next(ctx)  # a retry's commit keeps the lock through the wait

    async def _while_executing(
        self, ctx: ExecutionContext, call_next: ExecuteNext, opts: UniqueOptions
    ) -> Outcome:
        value = self._unique_value(ctx.task, ctx.payload)  # as stored: no re-encoding
        key = ctx.keys.lock(lock_digest(ctx.task.name, value))
        # Listed before the take: if the attempt is cancelled while the take is on its
        # way (it is sent anyway), the heartbeat renews and a final commit releases the
        # lock the take may have left (each checks the holder: one not taken is left).
        ctx.locks.append(key)
        refused = await self._take_or_refuse(ctx, [key], opts)
        if refused is not None:
            ctx.locks.remove(key)
            return refused
        try:
            return await call_next(ctx)
        finally:
            await self._release_after(ctx, key)

    async def _release_after(self, ctx: ExecutionContext, key: str) -> None:
        """Release the attempt's lock, shielded from cancellation and bounded in time:
        a lock not released is left in ``ctx.locks`` (a final commit releases it)."""
        problem = f"no answer within {RELEASE_DEADLINE:g}s"
        with anyio.CancelScope(shield=True, deadline=anyio.current_time() + RELEASE_DEADLINE):
            try:
                await self._unlock(ctx, [key])
            except REDIS_ERRORS as exc:
                problem = str(exc)
            else:
                ctx.locks.remove(key)
                return
        logger.warning(
            "job %s %s attempt %d: could not release its lock (%s); it expires in %.1fs",
            ctx.job.id,
            ctx.job.task,
            ctx.job.attempt,
            problem,
            ctx.lock_ttl_ms / 1000,
            extra=job_extra(ctx.job),
        )

    # -- conflicts -----------------------------------------------------------------------

    async def _take_or_refuse(
        self, ctx: ExecutionContext, locks: Sequence[str], opts: UniqueOptions
    ) -> Outcome | None:
        """Take ``locks`` for this attempt: None when taken, else the attempt's outcome."""
        try:
            conflict = await self._take(ctx, locks)
        except REDIS_ERRORS as exc:  # a refused call (a worker's pipeline rides outages)
            if wrong_type(exc):  # hostile data: rescheduling would not mend it
                return Outcome.dead(f"its lock key holds another type of value ({exc})")
            logger.warning(
                "job %s %s attempt %d: cannot take its lock (%s); rescheduled",
                ctx.job.id,
                ctx.job.task,
                ctx.job.attempt,
                exc,
                extra=job_extra(ctx.job),
            )
            return Outcome.reschedule(time.time() + _RETRY_AFTER_REDIS_ERROR)
        if conflict is None:
            return None
        strategy = opts.strategy
        logger.info(
            "job %s %s attempt %d: unique lock held by job %s (on_conflict=%s)",
            ctx.job.id,
            ctx.job.task,
            ctx.job.attempt,
            conflict.holder,
            strategy,
            extra=job_extra(ctx.job),
        )
        if strategy == "reschedule":
            delay = opts.reschedule_delay
            return Outcome.reschedule(
                time.time() + (DEFAULT_RESCHEDULE_DELAY if delay is None else delay)
            )
        if strategy == "reject":
            error = ErrorInfo(type="taskrunner.LockConflictError", message=str(conflict))
            return Outcome(OutcomeKind.REJECTED, error=error)
        return await self._fail_attempt(ctx, conflict)

    async def _fail_attempt(self, ctx: ExecutionContext, conflict: LockConflictError) -> Outcome:
        """``raise``: the attempt fails with the conflict; the retry policy decides."""

        async def conflicted(_: ExecutionContext) -> Outcome:
            raise conflict

        if self.retry is None:
            return await conflicted(ctx)
        return await self.retry.execute(ctx, conflicted)

    # -- scripts (in the worker's pipeline of lock calls) ----------------------------------

    async def on_worker_start(self, worker: WorkerPort) -> None:
        self._calls.start(worker)

    async def on_worker_stop(self, worker: WorkerPort) -> None:
        self._calls.stop(worker)

    async def _take(self, ctx: ExecutionContext, locks: Sequence[str]) -> LockConflictError | None:
        """Take ``locks`` for ``ctx.lock_ttl_ms`` (set by ``execute``): None when taken."""
        call = scripts.lock(ctx.keys, ctx.job.id, ctx.lease, ctx.lock_ttl_ms, locks)
        reply = await self._calls.run(ctx.worker, call)
        code = int(reply[0])
        if code == 0:
            raise LostLease(f"job {ctx.job.id}: lease lost before its lock was taken")
        if code == 2:
            return LockConflictError(str(reply[2]), str(reply[1]))
        return None

    async def _unlock(
        self, ctx: ExecutionContext, locks: Sequence[str], *, forget: bool = False
    ) -> None:
        call = scripts.unlock(ctx.keys, ctx.job.id, ctx.lease, list(locks), forget=forget)
        await self._calls.run(ctx.worker, call)
