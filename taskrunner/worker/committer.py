"""Commits: each attempt's outcome recorded in Redis, coalesced into pipelined round trips.

``Coalescer``: callers submit script calls; a flusher sends what gathered meanwhile as
one pipeline, so a busy worker records many outcomes per round trip and an idle one
sends each at once. Connection errors are retried with backoff (the scripts are safe
to repeat: a repeat finds the lease already spent).

``Committer``: turns a held job and its outcome into a commit call, frees its slot at
once (``Slots.finish``: the next read overlaps the round trip), logs the outcome when
Redis answers, and tells the middleware (``on_commit``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import anyio
from redis.asyncio import Redis

from taskrunner import scripts
from taskrunner.chain import NEXT_HEADER
from taskrunner.connection import REDIS_ERRORS, reachable, report, unavailable
from taskrunner.exceptions import PayloadTooLarge
from taskrunner.job import ErrorInfo, JobContext, safe_text
from taskrunner.logs import job_extra
from taskrunner.middleware.base import Middleware, Outcome, OutcomeKind
from taskrunner.worker.held import Claimed
from taskrunner.worker.slots import Slots

if TYPE_CHECKING:
    from taskrunner.task import TaskDefinition

logger = logging.getLogger("taskrunner.worker")

Done = Callable[[Any], None]


class Coalescer:
    """Pipelines script calls submitted by many concurrent jobs."""

    def __init__(self, redis: Redis, max_batch: int = 1000) -> None:
        self._redis = redis
        self._max_batch = max_batch
        self._pending: list[tuple[scripts.ScriptCall, Done]] = []
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def unanswered(self) -> int:
        return len(self._pending)

    def submit_nowait(self, call: scripts.ScriptCall, done: Done) -> None:
        """Queue ``call`` for the next pipeline; ``done(reply)`` gets its reply, or the
        script's error as an exception object (e.g. OOM): that caller's only."""
        self._pending.append((call, done))
        self._idle.clear()
        self._wakeup.set()

    async def submit(self, call: scripts.ScriptCall, abandoned: Done | None = None) -> Any:
        """Queue ``call`` and wait for its reply (a script error is raised). If the
        caller is cancelled first, the call is sent anyway and ``abandoned(reply)``
        gets its reply (or error) instead."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def done(reply: Any) -> None:
            if future.done():  # its caller was cancelled; the call happened anyway
                if abandoned is not None:
                    abandoned(reply)
                return
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

        self.submit_nowait(call, done)
        return await future

    async def drained(self) -> None:
        """Wait until everything submitted so far has been sent and answered."""
        await self._idle.wait()

    async def run(self) -> None:
        """Flush forever; cancel it only once nothing more will be submitted."""
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                await self._flush(batch)
            self._idle.set()

    async def _flush(self, batch: list[tuple[scripts.ScriptCall, Done]]) -> None:
        """Send ``batch``; hand each reply to its caller. Calls the server could not
        take now (unreachable, failing over, a slot moving) are sent again, with
        backoff, until it can: an outcome is never given up while the worker runs."""
        delay = 0.05
        while batch:
            try:
                calls = [call for call, _ in batch]
                results = await scripts.run_many(self._redis, calls, raise_on_error=False)
            except REDIS_ERRORS as exc:
                report("recording outcomes", exc)
                results = [exc] * len(batch)
            later = []
            for item, result in zip(batch, results, strict=True):
                if isinstance(result, Exception) and unavailable(result):
                    later.append(item)
                else:
                    _deliver(item[1], result)
            if later:
                report("recording outcomes", next(r for r in results if isinstance(r, Exception)))
                await anyio.sleep(delay)
                delay = min(delay * 2, 2.0)
            else:
                reachable()
            batch = later


def _deliver(done: Done, result: Any) -> None:
    try:
        done(result)
    except Exception:
        logger.exception("internal error after a commit reply")


class Committer:
    """Records outcomes of held jobs; see the module docstring."""

    def __init__(
        self,
        coalescer: Coalescer,
        env: Callable[[], scripts.Env],
        middleware: Sequence[Middleware],
        slots: Slots,
        *,
        result_ttl_ms: int,
        max_payload: int,
    ) -> None:
        self.coalescer = coalescer
        self._env = env
        self._middleware = middleware
        self._slots = slots
        self._result_ttl_ms = result_ttl_ms
        self._max_payload = max_payload
        self.on_retry: Callable[[], None] = lambda: None
        self.on_follow_up: Callable[[], None] = lambda: None
        """Called when a chain step's success was recorded (its id is in the outbox)."""
        self.unrecorded: dict[str, Claimed] = {}
        """Held jobs whose commit is not answered yet, by lease token."""

    def commit(
        self,
        item: Claimed,
        task: TaskDefinition | None,
        outcome: Outcome,
        duration: float | None = None,
    ) -> None:
        """Send the outcome through the coalesced pipeline and free the slot; the
        outcome is logged when the reply comes back, without holding up the consumer."""
        outcome, payload = self._payload(item, task, outcome)
        delay = max(0.0, outcome.due - time.time()) if outcome.due is not None else 0.0
        call = scripts.commit(
            self._env(),
            item.keys,
            item.stream,
            item.job_id,
            item.entry_id,
            item.token,
            outcome.kind,
            payload,
            self._result_ttl_ms,
            math.ceil(delay * 1000),
            item.level,
            item.locks,
            item.lock_ttl_ms,
            follow=NEXT_HEADER in item.meta,
        )
        self.unrecorded[item.token] = item
        self._slots.finish()
        self.coalescer.submit_nowait(
            call, lambda reply: self._committed(item, outcome, reply, duration)
        )

    def _payload(
        self, item: Claimed, task: TaskDefinition | None, outcome: Outcome
    ) -> tuple[Outcome, str]:
        """What the commit stores: the result's JSON or the error's. A result that
        cannot be stored fails the attempt instead (outside the retry policy: the
        innermost layer already encodes results, so only a middleware that replaced
        the outcome gets here)."""
        if outcome.kind != OutcomeKind.SUCCEEDED:
            return outcome, error_json(outcome.error)
        if outcome.encoded is not None:
            return outcome, outcome.encoded
        try:
            encoded = task.codec.result.encode(outcome.result) if task else "null"
            check_size("the result", encoded, self._max_payload)
        except Exception as exc:  # noqa: BLE001 - any encoding failure is this job's
            failed = Outcome.failed(ErrorInfo.from_exception(exc))
            return failed, error_json(failed.error)
        return outcome, encoded

    def _committed(
        self, item: Claimed, outcome: Outcome, reply: Any, duration: float | None
    ) -> None:
        self.unrecorded.pop(item.token, None)
        self._slots.recorded()
        if isinstance(reply, Exception):
            logger.error(
                "job %s %s attempt %d: its %s could not be recorded (%s); it will be reclaimed",
                item.job_id,
                item.task_name,
                item.attempt,
                outcome.kind,
                safe_text(str(reply), 200),
                extra=job_extra(context_of(item)),
            )
            return
        if reply != 1:
            logger.warning(
                "job %s %s attempt %d lost its lease; its %s was not recorded",
                item.job_id,
                item.task_name,
                item.attempt,
                outcome.kind,
                extra=job_extra(context_of(item)),
            )
            return
        # The job's context only for a log record or an on_commit hook that takes it.
        job = None
        if logger.isEnabledFor(_level(outcome)):
            job = context_of(item)
            log_outcome(job, outcome, duration)
        if outcome.kind in (OutcomeKind.RETRY, OutcomeKind.RESCHEDULE):
            self.on_retry()
        elif outcome.kind == OutcomeKind.SUCCEEDED and NEXT_HEADER in item.meta:
            self.on_follow_up()
        for mw in self._middleware:  # the live list: run_until_idle adds its recorder
            if type(mw).on_commit is Middleware.on_commit:  # the base class's does nothing
                continue
            if job is None:
                job = context_of(item)
            try:
                mw.on_commit(job, outcome)
            except Exception:
                logger.exception("middleware %s: on_commit failed", type(mw).__name__)


def check_size(what: str, encoded: str, limit: int, *, setting: str = "max_payload") -> None:
    if len(encoded) * 4 <= limit:  # at most 4 bytes a character: no need to encode it
        return
    size = len(encoded.encode("utf-8", "surrogateescape"))
    if size > limit:
        raise PayloadTooLarge(what, size, limit, setting=setting)


def error_json(error: ErrorInfo | None) -> str:
    """An error as stored; always valid JSON (hostile text is made valid first)."""
    if error is None:
        return ""
    try:
        return error.model_dump_json()
    except Exception:  # noqa: BLE001 - e.g. lone surrogates from a middleware's message
        clean = ErrorInfo(
            type=safe_text(error.type),
            message=safe_text(error.message),
            traceback=safe_text(error.traceback),
            raw=error.raw,
        )
        return clean.model_dump_json()


def context_of(item: Claimed) -> JobContext:
    return JobContext(
        id=item.job_id,
        task=item.task_name,
        attempt=item.attempt,
        queue=item.queue,
        deliveries=item.reclaims + 1,
        reclaimed=item.reclaimed,
        reclaims=item.reclaims,
        priority=item.level,
        ready_at=item.ready_at,
    )


def _level(outcome: Outcome) -> int:
    """The level ``outcome``'s line is logged at (``log_outcome`` takes it from here, so
    the commit path can skip building a record that would not be logged)."""
    kind = outcome.kind
    if kind == OutcomeKind.DEAD or (kind == OutcomeKind.FAILED and outcome.error is not None):
        return logging.ERROR
    if kind in (OutcomeKind.RETRY, OutcomeKind.RESCHEDULE):
        return logging.DEBUG
    return logging.INFO


def log_outcome(job: JobContext, outcome: Outcome, duration: float | None) -> None:
    """One line per recorded outcome: failures for good and dead letters at ERROR (with
    the error, and the task's traceback once), the rest at INFO."""
    extra = job_extra(job)
    took = f" in {duration:.3f}s" if duration is not None else ""
    error = outcome.error
    if outcome.kind == OutcomeKind.FAILED and error is not None:
        trace = f"\n{error.traceback.rstrip()}" if error.traceback else ""
        logger.log(
            _level(outcome),
            "job %s %s attempt %d failed for good%s: %s: %s%s",
            job.id,
            job.task,
            job.attempt,
            took,
            error.type,
            error.message,
            trace,
            extra=extra,
        )
    elif outcome.kind == OutcomeKind.DEAD:
        logger.log(
            _level(outcome),
            "job %s %s attempt %d dead-lettered: %s",
            job.id,
            job.task,
            job.attempt,
            error.message if error else "no reason given",
            extra=extra,
        )
    elif outcome.kind in (OutcomeKind.RETRY, OutcomeKind.RESCHEDULE):
        logger.log(
            _level(outcome),
            "job %s %s attempt %d %s recorded",
            job.id,
            job.task,
            job.attempt,
            outcome.kind,
            extra=extra,
        )
    else:
        logger.log(
            _level(outcome),
            "job %s %s attempt %d %s%s",
            job.id,
            job.task,
            job.attempt,
            outcome.kind,
            took,
            extra=extra,
        )
