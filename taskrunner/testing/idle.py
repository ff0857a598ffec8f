"""``run_until_idle``: run a worker in this process until every job is final.

Idle means, for every queue of the runner (or those given): nothing queued, nothing
running (in this worker or any other), and nothing scheduled that falls due by the
clock (the runner's ``clock``, which the scripts read). With a running clock, "by the
clock" is before the call's ``timeout`` runs out: a retry due in half a second is
waited for, a reminder due tomorrow is left scheduled. Under ``frozen_time`` it is
the frozen time: jobs due later stay scheduled until the test advances the clock.
Every queue is looked at in all its partitions and priority levels
(``taskrunner.counts``).

Every outcome a worker of this runner records in this process meanwhile (this one's,
and an embedded one's, e.g. a FastAPI app's) is collected through
``Middleware.on_commit``; the first job that failed for good or was dead-lettered is
raised at the end (``JobFailed``, ``JobDeadLettered``) unless ``raise_failures=False``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol

import anyio

from taskrunner.connection import REDIS_ERRORS
from taskrunner.counts import QueueCounts, queue_counts, resolve
from taskrunner.exceptions import JobDeadLettered, JobFailed
from taskrunner.job import ErrorInfo, JobContext
from taskrunner.middleware.base import Middleware, Outcome, OutcomeKind
from taskrunner.options import wait_seconds

if TYPE_CHECKING:
    from taskrunner.client import Client
    from taskrunner.clock import Clock
    from taskrunner.worker import Worker


class Runner(Protocol):
    """What ``run_until_idle`` needs of a TaskRunner."""

    middleware: list[Middleware]
    result_ttl: float
    clock: Clock

    @property
    def client(self) -> Client: ...

    def queues(self) -> list[str]: ...

    def worker(
        self,
        *,
        queues: Sequence[str] | None = ...,
        concurrency: int = ...,
        burst: bool = ...,
        handle_signals: bool | None = ...,
        grace_period: float = ...,
    ) -> Worker: ...

    async def __aenter__(self) -> Any: ...

    async def __aexit__(self, et: Any, e: Any, tb: Any) -> Any: ...


BUSY_POLL = 0.02
"""Seconds between two looks at the queues while another worker runs a job."""
COUNT_WAIT = 1.0
"""Seconds the look at what is left may take at the deadline, before the stop."""
STOP_GRACE = 10.0
"""Seconds a worker stopped at the deadline has to hand its running jobs back (Redis
may be away) before it is cancelled outright."""


@dataclass(frozen=True, slots=True)
class Committed:
    """An outcome a worker recorded while ``run_until_idle`` ran."""

    job: JobContext
    outcome: Outcome

    @property
    def id(self) -> str:
        return self.job.id

    @property
    def task(self) -> str:
        return self.job.task

    @property
    def kind(self) -> OutcomeKind:
        return self.outcome.kind

    @property
    def error(self) -> ErrorInfo | None:
        return self.outcome.error


class _Recorder(Middleware):
    def __init__(self) -> None:
        self.committed: list[Committed] = []

    def on_commit(self, job: JobContext, outcome: Outcome) -> None:
        self.committed.append(Committed(job, outcome))


async def run_until_idle(
    runner: Runner,
    *,
    queues: Sequence[str] | None = None,
    timeout: float | timedelta = 30.0,
    concurrency: int = 10,
    raise_failures: bool = True,
) -> list[Committed]:
    """Run a worker in this process until every job is final (see the module docstring);
    return the outcomes recorded meanwhile, in order.

    Raises ``TimeoutError`` (saying what is left) if that takes longer than
    ``timeout`` (seconds or a ``timedelta``), and the first job that failed for good
    (``JobFailed``) or was dead-lettered (``JobDeadLettered``) unless ``raise_failures``
    is false.
    """
    seconds = wait_seconds(timeout)
    if seconds is None:  # infinity
        seconds = math.inf
    names = list(queues) if queues else runner.queues()
    recorder = _Recorder()
    runner.middleware.append(recorder)
    try:
        async with runner:
            await _run(runner, names, seconds, concurrency)
    finally:
        runner.middleware.remove(recorder)
    if raise_failures:
        _raise_first_failure(recorder.committed)
    return recorder.committed


async def _run(runner: Runner, queues: list[str], timeout: float, concurrency: int) -> None:
    deadline = time.monotonic() + timeout
    while True:
        left: list[list[QueueCounts]] = []  # what was left when the time ran out
        with anyio.move_on_after(deadline + STOP_GRACE - time.monotonic()):
            if await _round(runner, queues, concurrency, deadline, left):
                return
        if left or time.monotonic() >= deadline:
            counts = left[0] if left and left[0] else await _counts(runner, queues)
            if _wait(runner, counts, deadline) is None:
                return  # idle as the time ran out (timeout=0 on empty queues): no error
            raise TimeoutError(f"run_until_idle: not idle after {timeout:g}s: {_describe(counts)}")


async def _round(
    runner: Runner,
    queues: list[str],
    concurrency: int,
    deadline: float,
    left: list[list[QueueCounts]],
) -> bool:
    """Run a burst worker (until nothing is ready, running in it, or due now); then
    True if the queues are idle, else wait until they may have changed and False. At
    the deadline the worker is stopped: its running jobs are cancelled and handed back
    to the queue (not left running under a lease nobody renews)."""
    worker = runner.worker(
        queues=queues, concurrency=concurrency, burst=True, handle_signals=False, grace_period=0
    )
    failed: list[Exception] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(_stop_at, runner, queues, worker, deadline, left)
        try:
            await worker.run()
        except Exception as exc:  # noqa: BLE001 - raised below as it is, not in a group
            failed.append(exc)
        tg.cancel_scope.cancel()
    if failed:
        raise failed[0]
    if left:
        return False
    wait = _wait(runner, await _counts(runner, queues), deadline)
    if wait is None:
        return True
    await anyio.sleep(wait)
    return False


async def _stop_at(
    runner: Runner,
    queues: list[str],
    worker: Worker,
    deadline: float,
    left: list[list[QueueCounts]],
) -> None:
    await anyio.sleep(max(0.0, deadline - time.monotonic()))
    counts: list[QueueCounts] = []
    try:  # what is left, for the error; the worker stops whatever happens to the look
        with anyio.move_on_after(COUNT_WAIT):
            counts = await _counts(runner, queues)
    except REDIS_ERRORS:
        pass
    finally:
        left.append(counts)
        worker.stop()


async def _counts(runner: Runner, queues: list[str]) -> list[QueueCounts]:
    found = await resolve(runner.client, queues)
    now = runner.clock.now()
    return await queue_counts(runner.client.redis, found, now=now, result_ttl=runner.result_ttl)


def _wait(runner: Runner, counts: list[QueueCounts], deadline: float) -> float | None:
    """Seconds to wait before running a worker again, or None when idle."""
    if any(c.queued for c in counts):
        return 0.0  # arrived after the worker's last read (e.g. from another worker)
    if any(c.running for c in counts):
        return BUSY_POLL  # another worker (an embedded one) holds a job
    dues = [c.next_due for c in counts if c.next_due is not None]
    if not dues:
        return None
    wait = min(dues) - runner.clock.now()
    if wait <= 0:
        return 0.0
    if runner.clock.frozen_ms is not None:
        return None  # frozen: due later only when the test advances the clock
    if time.monotonic() + wait < deadline:
        return wait
    return None  # due after the deadline: left scheduled


def _describe(counts: list[QueueCounts]) -> str:
    parts = []
    for c in counts:
        left = {k: v for k, v in c.by_status().items() if k in ("queued", "running") and v}
        if c.scheduled:
            left["scheduled"] = c.scheduled
        if left:
            text = ", ".join(f"{n} {status}" for status, n in left.items())
            parts.append(f"queue {c.queue}: {text}")
    return "; ".join(parts) or "the queues emptied as the time ran out"


def _raise_first_failure(committed: list[Committed]) -> None:
    for record in committed:
        error = record.error or ErrorInfo(type="", message="")
        if record.kind == OutcomeKind.FAILED:
            raise JobFailed(record.id, error.type, error.message, error.traceback)
        if record.kind == OutcomeKind.DEAD:
            raise JobDeadLettered(record.id, error.message)


__all__ = ["Committed", "run_until_idle"]
