"""The consumers: ``concurrency`` long-lived tasks that each run one claimed job at a
time through its task's execution chain, and hand the outcome to the committer.

A job that cannot run (poisonous, aborted before it started, arguments too large,
unknown task, undecodable arguments) gets its outcome here without running. Every
outcome a chain returns is checked (``check_outcome``); an exception that escapes the
chain fails the attempt. Nothing a task or a middleware does stops a consumer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
from pydantic_core import PydanticSerializationError, to_jsonable_python

from taskrunner import scripts
from taskrunner.job import ErrorInfo, raw_bytes, reset_current_job, set_current_job
from taskrunner.logs import excerpt, job_extra
from taskrunner.middleware.base import (
    CancelReason,
    ExecuteNext,
    ExecutionContext,
    Middleware,
    Outcome,
    OutcomeKind,
    WorkerPort,
    build_execute_chain,
    execute_layers,
)
from taskrunner.worker.committer import Committer, check_size, context_of
from taskrunner.worker.held import Claimed

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from taskrunner.task import TaskDefinition

logger = logging.getLogger("taskrunner.worker")

CANCEL_OUTCOMES = {
    CancelReason.ABORTED: Outcome(OutcomeKind.ABORTED),
    CancelReason.SHUTDOWN: Outcome(OutcomeKind.HANDBACK),
    CancelReason.HANDBACK: Outcome(OutcomeKind.HANDBACK),
}
PROGRESS_LIMIT = 64 * 1024
"""Bytes of JSON a progress value may have."""


def _cancelling() -> bool:
    """Whether the current task has a cancellation pending (anyio cancels through it)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def terminal(max_payload: int) -> ExecuteNext:
    """The innermost layer of every execution chain: run the function and encode its
    result. A result that does not fit the return annotation or cannot be serialised
    fails the job for good (running it again would return the same); one larger than
    ``max_payload`` fails the attempt under the retry policy, like any error of the
    task. A task cancelled while it ran (timeout, abort, lost lease, shutdown) that
    caught the cancellation and returned or raised another error ends by that
    cancellation all the same (``_cancelled_anyway``)."""

    async def call_task(ctx: ExecutionContext) -> Outcome:
        try:
            result = await ctx.task.fn(*ctx.args, **ctx.kwargs)
        except Exception as exc:
            await _cancelled_anyway(ctx, exc)
            raise
        await _cancelled_anyway(ctx, None)
        try:
            encoded = ctx.task.codec.result.encode(result)
        except ValueError as exc:  # pydantic's ValidationError, PydanticSerializationError
            return Outcome.failed(ErrorInfo.from_exception(exc))
        check_size("the result", encoded, max_payload)
        return Outcome(OutcomeKind.SUCCEEDED, result=result, encoded=encoded)

    return call_task


async def _cancelled_anyway(ctx: ExecutionContext, error: Exception | None) -> None:
    """Raise the cancellation of an attempt that was cancelled while its task ran, if
    the task caught it and returned (or raised an error of its own) instead of letting
    it out: the cancel decides the outcome (a timeout's ``TaskTimeout``, an abort, a
    lost lease, a hand-back) exactly as when it propagates, and the task's value or
    error is dropped. A cancel that comes after the task returned changes nothing here.
    """
    task = asyncio.current_task()
    # No cancel was delivered to this task: nothing to look up (anyio's deadline walk
    # costs about 3 us, a tenth of a job's CPU; this look about 0.3).
    if task is None or not task.cancelling():
        return
    if anyio.current_effective_deadline() != -math.inf:  # -inf: a scope was cancelled
        return
    logger.warning(
        "job %s %s attempt %d: the task caught its cancellation and %s; the "
        "cancellation decides the outcome",
        ctx.job.id,
        ctx.job.task,
        ctx.job.attempt,
        "returned" if error is None else "raised " + type(error).__name__,
        extra=job_extra(ctx.job),
    )
    await anyio.lowlevel.checkpoint_if_cancelled()


class Consumers:
    """The pool of consumers of one worker."""

    def __init__(
        self,
        *,
        port: WorkerPort,
        registry: dict[str, TaskDefinition],
        middleware: Sequence[Middleware],
        committer: Committer,
        release: Callable[[int], None],
        redis: Redis,
        env: Callable[[], scripts.Env],
        max_deliveries: int,
        max_payload: int,
    ) -> None:
        self._port = port
        self._registry = registry
        self._middleware = middleware
        self._committer = committer
        self._release = release
        self._redis = redis
        self._env = env
        self._max_deliveries = max_deliveries
        self._max_payload = max_payload
        self._terminal = terminal(max_payload)
        self._chains: dict[str, ExecuteNext] = {}
        self.running: dict[str, ExecutionContext] = {}
        """Running attempts by lease token (a token is one attempt of one job)."""
        self.waiting: dict[str, Claimed] = {}
        """Claimed jobs not started yet, by lease token (heartbeated like running ones)."""
        self.queue: asyncio.Queue[Claimed | None] = asyncio.Queue()
        self._scope_type: type[anyio.CancelScope] | None = None

    def _cancel_scope(self) -> anyio.CancelScope:
        """A new cancel scope of the running backend's class, made directly (an
        ``anyio.CancelScope()`` looks the backend up again for each job)."""
        scope_type = self._scope_type
        if scope_type is None:
            scope = anyio.CancelScope()
            self._scope_type = type(scope)
            return scope
        return scope_type()

    def chain(self, task: TaskDefinition) -> ExecuteNext:
        """``task``'s execution chain (built once)."""
        found = self._chains.get(task.name)
        if found is None:
            layers = execute_layers(self._middleware, task)
            found = self._chains[task.name] = build_execute_chain(layers, self._terminal)
        return found

    def deliver(self, items: list[Claimed], stopping: bool) -> None:
        for item in items:
            if stopping:  # claimed while stopping: give it back at once
                self._committer.commit(item, self._registry.get(item.task_name), HANDBACK)
                continue
            self.waiting[item.token] = item
            self.queue.put_nowait(item)

    def hand_back_waiting(self, reason: CancelReason) -> None:
        """Settle every claimed job no consumer has started, now: hand it back, or
        record its abort (at shutdown the consumers may all be busy for the whole grace
        period; before a job runs alone, none may be caught in its crash)."""
        for item in list(self.waiting.values()):
            if item.cancelled is None:  # a lost lease or an abort stays what it is
                item.cancelled = reason
            self._settle(item)

    def drop(self, token: str, reason: CancelReason) -> None:
        item = self.waiting.get(token)
        if item is not None and item.cancelled is None:
            item.cancelled = reason

    def _settle(self, item: Claimed) -> None:
        item.settled = True
        self.waiting.pop(item.token, None)
        outcome = CANCEL_OUTCOMES.get(item.cancelled) if item.cancelled else None
        if outcome is None:
            self._release(1)
        else:
            self._committer.commit(item, self._registry.get(item.task_name), outcome)

    def cancel_running(self, reason: CancelReason) -> None:
        for ctx in list(self.running.values()):
            ctx.cancel(reason)

    async def consume(self) -> None:
        """One consumer: runs claimed jobs one at a time until it gets None."""
        while (item := await self.queue.get()) is not None:
            if item.settled:
                continue
            self.waiting.pop(item.token, None)
            task = self._registry.get(item.task_name)
            started = time.perf_counter()
            try:
                outcome = await self._run(item, task)
            except Exception:  # a bug: keep the consumer alive; the entry is requeued
                logger.exception(
                    "job %s %s: internal error; it will be reclaimed",
                    excerpt(item.job_id),
                    excerpt(item.task_name),
                    extra=job_extra(context_of(item)),
                )
                outcome = None
            if outcome is None:  # lost lease: commit nothing
                self._release(1)
                continue
            self._committer.commit(item, task, outcome, time.perf_counter() - started)

    async def _run(self, item: Claimed, task: TaskDefinition | None) -> Outcome | None:
        """The outcome to commit for a claimed job (None: commit nothing)."""
        if item.cancelled is not None:  # while it waited: commit that, do not run it
            return CANCEL_OUTCOMES.get(item.cancelled)
        refused = self._refuse(item, task)
        if refused is not None or task is None:
            return refused
        try:
            args, kwargs = task.codec.decode(item.payload)
        except Exception as exc:  # noqa: BLE001 - any bad payload goes to the dead letters
            return dead(
                f"undecodable arguments: {excerpt(str(exc), 500)}",
                raw_bytes(item.payload, self._max_payload),
            )
        return await self._execute(item, task, args, kwargs)

    def _refuse(self, item: Claimed, task: TaskDefinition | None) -> Outcome | None:
        """The outcome of a job that must not run, else None."""
        if item.verdict == "poison":
            return dead(
                f"its worker died while it ran alone {self._max_deliveries} times "
                f"(max_deliveries={self._max_deliveries}): it kills or stalls its workers"
            )
        if item.verdict == "abort":
            return Outcome(OutcomeKind.ABORTED)
        if item.verdict == "toolarge":
            return dead(f"its arguments are larger than max_payload ({self._max_payload:,} bytes)")
        if task is None:
            return dead(
                f"unknown task {excerpt(item.task_name)!r}",
                raw_bytes(item.task_name, 4096) if not item.task_name.isprintable() else None,
            )
        return None

    async def _execute(
        self, item: Claimed, task: TaskDefinition, args: list[Any], kwargs: dict[str, Any]
    ) -> Outcome | None:
        reason: list[CancelReason] = []
        outcome: Outcome | None = None
        job = context_of(item)
        job.reporter = self._reporter(item)
        with self._cancel_scope() as scope:

            def cancel(why: CancelReason) -> None:
                reason.append(why)
                scope.cancel()

            ctx = ExecutionContext(
                job=job,
                task=task,
                args=args,
                kwargs=kwargs,
                worker=self._port,
                keys=item.keys,
                stream=item.stream,
                entry_id=item.entry_id,
                lease=item.token,
                locks=item.locks,
                cancel=cancel,
                payload=item.payload,
                meta=item.meta,
            )
            self.running[item.token] = ctx
            token = set_current_job(job)
            if logger.isEnabledFor(logging.INFO):  # job_extra() only for a record
                logger.info(
                    "job %s %s attempt %d started",
                    job.id,
                    job.task,
                    job.attempt,
                    extra=job_extra(job),
                )
            try:
                outcome = await self.chain(task)(ctx)
            except Exception as exc:  # noqa: BLE001 - the task's own error is its outcome
                outcome = Outcome.failed(ErrorInfo.from_exception(exc))
            except asyncio.CancelledError as exc:
                if scope.cancel_called or _cancelling():
                    raise  # a real cancellation: this job's (abort, lease, shutdown) or ours
                # The task's own code let a CancelledError out (it awaited something
                # cancelled elsewhere): that is the job failing, not the worker stopping.
                outcome = Outcome.failed(ErrorInfo.from_exception(exc))
            finally:
                reset_current_job(token)
                self.running.pop(item.token, None)
                item.lock_ttl_ms = ctx.lock_ttl_ms
                item.locks = ctx.locks
        if outcome is None or scope.cancelled_caught:  # a late cancel keeps a real outcome
            why = reason[0] if reason else CancelReason.SHUTDOWN
            outcome = CANCEL_OUTCOMES.get(why)
        return outcome

    def _reporter(self, item: Claimed) -> Callable[[Any], Awaitable[bool]]:
        async def report(value: Any) -> bool:
            text = progress_json(value)
            call = scripts.progress(self._env(), item.keys, item.job_id, item.token, text)
            # In the commit pipeline: concurrent jobs' progress goes in one round trip.
            return int(await self._committer.coalescer.submit(call)) == 1

        return report


HANDBACK = Outcome(OutcomeKind.HANDBACK)


def progress_json(value: Any) -> str:
    """A progress value as stored: compact JSON (pydantic serialises what ``json`` does
    not: models, dataclasses, datetimes), at most ``PROGRESS_LIMIT`` bytes. TypeError
    for a value that has no JSON form, PayloadTooLarge above the limit."""
    try:
        text = json.dumps(value, separators=(",", ":"), allow_nan=False, default=_jsonable)
    except (TypeError, ValueError, RecursionError) as exc:  # Recursion: nested too deep
        raise TypeError(f"set_progress() needs a JSON-serialisable value: {exc}") from None
    check_size("the progress value", text, PROGRESS_LIMIT, setting="the progress limit")
    return text


def _jsonable(value: Any) -> Any:
    try:
        return to_jsonable_python(value)
    except PydanticSerializationError:
        raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable") from None


def dead(reason: str, raw: str | None = None) -> Outcome:
    return Outcome(OutcomeKind.DEAD, error=ErrorInfo(type="DeadLetter", message=reason, raw=raw))
