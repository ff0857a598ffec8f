"""A user middleware: time every job and log one structured (JSON) line per event.

It wraps both sides of a job's life: around enqueue it logs what was sent (or that a
unique lock deduplicated it); around execution it times the attempt and logs its
outcome, or the exception on its way to the retry policy. It owns one typed task
option, ``log_args``. Run it (a worker runs in the same process; the embedded
redis-server is used unless ``TASKRUNNER_REDIS_URL`` is set)::

    python -m examples.middleware
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any, TypedDict

import anyio

from taskrunner import (
    EnqueueContext,
    ExecutionContext,
    Job,
    JobFailed,
    Middleware,
    Outcome,
    TaskOptions,
    TaskRunner,
)
from taskrunner.middleware.base import EnqueueNext, ExecuteNext

if TYPE_CHECKING:
    from taskrunner import WorkerPort

logger = logging.getLogger("examples.middleware")


class TimingOptions(TaskOptions):
    log_args: bool = False
    """Include the job's arguments in its log lines (off by default: they may be private)."""


class TimingTaskOptions(TypedDict, total=False):
    """The same option for type checkers: ``@tr.task(options=TimingTaskOptions(...))``."""

    log_args: bool


class TimingLog(Middleware):
    """Logs ``{"event": ..., "job": ..., "task": ..., ...}`` lines; times each attempt."""

    Options = TimingOptions

    def __init__(self, log: logging.Logger = logger) -> None:
        self.log = log

    def emit(self, event: str, **fields: Any) -> None:
        self.log.info("%s", json.dumps({"event": event, **fields}, default=str))

    async def enqueue(self, ctx: EnqueueContext, call_next: EnqueueNext) -> Job[Any]:
        job = await call_next(ctx)
        extra = {"args": ctx.payload} if self.options(ctx.task, TimingOptions).log_args else {}
        self.emit(
            "enqueued",
            job=job.id,
            task=ctx.task.name,
            queue=ctx.queue,
            due=ctx.due,
            deduplicated=job.deduplicated,
            **extra,
        )
        return job

    async def execute(self, ctx: ExecutionContext, call_next: ExecuteNext) -> Outcome:
        fields: dict[str, Any] = {"job": ctx.job.id, "task": ctx.job.task}
        fields["attempt"] = ctx.job.attempt
        if self.options(ctx.task, TimingOptions).log_args:
            fields["args"] = [ctx.args, ctx.kwargs]
        started = time.perf_counter()
        try:
            outcome = await call_next(ctx)
        except Exception as exc:
            seconds = round(time.perf_counter() - started, 6)
            self.emit("raised", error=type(exc).__name__, seconds=seconds, **fields)
            raise  # the retry policy (an outer layer) decides what happens next
        seconds = round(time.perf_counter() - started, 6)
        self.emit("finished", outcome=str(outcome.kind), seconds=seconds, **fields)
        return outcome

    async def on_worker_start(self, worker: WorkerPort) -> None:
        queues = sorted({keys.queue for keys in worker.partitions()})
        self.emit("worker_started", worker=worker.id, queues=queues)

    async def on_worker_stop(self, worker: WorkerPort) -> None:
        self.emit("worker_stopped", worker=worker.id)


tr = TaskRunner(middleware=[TimingLog()], namespace="examples-middleware")


@tr.task(options=TimingTaskOptions(log_args=True))
async def add(x: int, y: int) -> int:
    await anyio.sleep(0.05)
    return x + y


@tr.task(max_retries=0)
async def divide(x: int, y: int) -> float:
    return x / y


async def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    async with tr, tr.worker(handle_signals=False):
        total = await add.enqueue(1, 2)
        broken = await divide.enqueue(1, 0)
        print("add ->", await total.result(timeout=30))
        try:
            await broken.result(timeout=30)
        except JobFailed as exc:
            print("divide ->", exc.exc_type)


if __name__ == "__main__":
    anyio.run(main)
