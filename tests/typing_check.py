"""Static typing contract: the whole public API, checked by mypy --strict and pyright --strict.

Never run by pytest. ``mypy`` checks it with the rest of tests/ (pyproject's ``files``);
``tests/test_typing.py`` runs pyright --strict over it and checks that it imports every
name of ``taskrunner.__all__``, so a new public name needs a line here. Calls that must
be refused are in ``tests/typing_errors.py``, with the error each checker must report.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, TypedDict, assert_type

from pydantic import BaseModel

from taskrunner import (
    BoundTask,
    Call,
    Chain,
    ChainJob,
    ConfigurationError,
    CronInfo,
    CronSchedule,
    CronTab,
    DeadLetters,
    EmbeddedRedisError,
    EnqueueContext,
    ErrorInfo,
    ExecutionContext,
    Group,
    Job,
    JobAborted,
    JobContext,
    JobDeadLettered,
    JobError,
    JobFailed,
    JobInfo,
    JobNotFound,
    JobRejected,
    JobStatus,
    LockConflictError,
    LostLease,
    Middleware,
    MiddlewareError,
    NotReplicated,
    Outcome,
    OutcomeKind,
    PayloadTooLarge,
    Retry,
    ScheduleNotFound,
    Task,
    TaskOptions,
    TaskRunner,
    TaskrunnerError,
    TaskTimeout,
    UnknownOptionError,
    Worker,
    WorkerPort,
    __version__,
    current_job,
)
from taskrunner.middleware.base import EnqueueNext, ExecuteNext
from taskrunner.typed_options import TaskOptionsDict


class Receipt(BaseModel):
    to: str


class AuditOptions(TaskOptions):
    audited: bool = False


class AuditTaskOptions(TypedDict, total=False):
    """The user middleware's options for type checkers (``options=``)."""

    audited: bool


class Audit(Middleware):
    Options = AuditOptions

    async def enqueue(self, ctx: EnqueueContext, call_next: EnqueueNext) -> Job[Any]:
        assert_type(ctx.job_id, str)
        assert_type(ctx.due, float | None)
        assert_type(ctx.meta, dict[str, str])
        return await call_next(ctx)

    async def on_worker_start(self, worker: WorkerPort) -> None:
        assert_type(worker.id, str)
        assert_type(worker.stopping, bool)

    async def execute(self, ctx: ExecutionContext, call_next: ExecuteNext) -> Outcome:
        assert_type(ctx.job, JobContext)
        assert_type(self.options(ctx.task, AuditOptions).audited, bool)
        outcome = await call_next(ctx)
        assert_type(outcome.kind, OutcomeKind)
        return outcome


tr = TaskRunner("redis://127.0.0.1:6379/0", middleware=[Audit()], lock_ttl=timedelta(minutes=5))
assert_type(tr, TaskRunner)
version: str = __version__


@tr.task
async def add(x: int, y: int) -> int:
    return x + y


@tr.task(queue="emails", timeout=30, max_retries=5, retry_delay=timedelta(seconds=2))
async def send(to: str, when: datetime, *, cc: list[str] | None = None) -> Receipt:
    return Receipt(to=to)


@tr.task(lock="while_executing", on_conflict="reschedule", reschedule_delay=1.5, lock_ttl=60)
async def sync_account(account_id: int, full: bool = False) -> None:
    assert_type(current_job(), JobContext)


@tr.task(concurrency_limit=2, rate_limit="100/m", limit_args=["account_id"])
async def limited(account_id: int) -> None:
    stored = await current_job().set_progress({"done": 1, "total": 3})
    assert_type(stored, bool)


async def follow_progress(job: Job[int]) -> None:
    async for value in job.progress():
        assert_type(value, Any)
    assert_type((await job.info()).progress, Any)


def by_account(account_id: int) -> list[int]:
    return [account_id]


@tr.task(lock="until_executed", unique_args=by_account)
async def rebuild(account_id: int) -> None: ...


@tr.task(name="audited", options=AuditTaskOptions(audited=True))
async def audited_task() -> str:
    return "ok"


builtin: TaskOptionsDict = {"timeout": 3, "max_retries": 0}


@tr.task(**builtin)
async def forwarded() -> None: ...


def declared(runner: TaskRunner) -> Callable[..., Any]:
    return runner.task(timeout=None, max_retries=None)


async def check_tasks() -> None:
    as_task: Task[[int, int], int] = add
    bound: BoundTask[[int, int], int] = add.options(delay=1.0)
    later: BoundTask[[int, int], int] = add.options(at=datetime.now(), job_id="j", queue="q")
    assert_type(add.name, str)
    assert_type(add.queue, str)
    del as_task, bound, later

    job = await add.enqueue(1, 2)
    assert_type(job, Job[int])
    assert_type(job.id, str)
    assert_type(job.queue, str)
    assert_type(job.deduplicated, bool)
    assert_type(await job.result(), int)
    assert_type(await job.result(timeout=5), int)
    assert_type(await job.status(), JobStatus)
    assert_type(await job.info(), JobInfo)
    assert_type(await job.abort(), JobStatus)
    assert_type(await add(1, 2), int)

    receipt_job = await send.options(delay=10, job_id="r1", queue="q").enqueue("a", datetime.now())
    assert_type(receipt_job, Job[Receipt])
    assert_type(await receipt_job.result(), Receipt)
    assert_type(await send.enqueue("a", datetime.now(), cc=["b"]), Job[Receipt])
    assert_type(await sync_account.enqueue(1), Job[None])
    assert_type(await audited_task.enqueue(), Job[str])

    call = add.call(1, 2)
    assert_type(call, Call[int])
    assert_type(await add.enqueue_many([call, add.call(3, 4)]), list[Job[int]])
    assert_type(await add.options(delay=5).enqueue_many([call]), list[Job[int]])
    assert_type(await tr.enqueue_many([call]), list[Job[int]])


async def check_mixed_batches() -> None:
    # A tuple of calls: one handle per position, each typed by its own task.
    a, s = await tr.enqueue_many((add.call(1, 2), send.call("a", datetime.now())))
    assert_type(a, Job[int])
    assert_type(s, Job[Receipt])
    triple = await tr.enqueue_many((add.call(1, 2), audited_task.call(), rebuild.call(3)))
    assert_type(triple, tuple[Job[int], Job[str], Job[None]])
    # A longer tuple, or one of unknown length, gives a tuple too (it was typed a list).
    assert_type(await tr.enqueue_many((add.call(1, 2),) * 7), tuple[Job[int], ...])
    assert_type(
        await tr.enqueue_many(tuple(add.call(n, n) for n in range(9))), tuple[Job[int], ...]
    )
    # A list of calls of different tasks: handles of the common result type.
    mixed: list[Job[int | Receipt]] = await tr.enqueue_many(
        [add.call(1, 2), send.call("a", datetime.now())]
    )
    calls: list[Call[int | Receipt]] = [add.call(1, 2), send.call("a", datetime.now())]
    assert_type(await tr.enqueue_many(calls), list[Job[int | Receipt]])
    for job in mixed:
        assert_type(await job.result(), int | Receipt)


async def check_runner_and_worker() -> None:
    async with tr as entered:
        assert_type(entered, TaskRunner)
        assert_type(tr.job("id"), Job[Any])
        assert_type(tr.job("id", queue="emails"), Job[Any])
        page = await tr.dead_letters()
        assert_type(page, DeadLetters)
        assert_type(page.next_cursor, str | None)
        assert_type(list(page), list[JobInfo])
        assert_type(await tr.retry_dead(["id"]), int)
        assert_type(await tr.retry_dead(all=True, queue="emails"), int)
        assert_type(tr.queues(), list[str])
    worker = tr.worker(queues=["default"], concurrency=10, burst=True, grace_period=1.0)
    assert_type(worker, Worker)
    assert_type(worker.id, str)
    async with worker as running:
        assert_type(running, Worker)
        running.stop()
    await tr.worker(handle_signals=False, max_deliveries=3).run()


@tr.cron("*/5 * * * *", tz="Europe/Paris")
async def cleanup() -> int:
    return 0


@tr.cron("*/10 * * * * *", name="tick", max_drift=timedelta(minutes=5))
@tr.task(lock="until_executed")
async def locked_tick() -> None: ...


daily: CronSchedule = tr.cron("0 8 * * *", send.call("a", datetime.now()), name="daily")
urgent = tr.cron("0 * * * *", send.options(priority="high").call("b", datetime.now()), name="u")


@tr.task
async def double(x: int) -> int:
    return 2 * x


@tr.task(queue="reports")
async def describe(total: int, unit: str, *, precise: bool = False) -> str:
    return f"{total} {unit}"


async def check_chains_and_groups() -> None:
    chain = add.chain(1, 2).then(double).then(describe, "m", precise=True)
    assert_type(chain, Chain[str])
    assert_type(add.chain(1, 2), Chain[int])
    assert_type(add.options(queue="urgent").chain(1, y=2).then(double), Chain[int])
    bound_step = add.chain(1, 2).then(describe.options(priority="high", delay=5), "s")
    assert_type(bound_step, Chain[str])
    handle = await chain.enqueue()
    assert_type(handle, ChainJob[str])
    assert_type(await handle.result(timeout=10), str)
    assert_type(handle.last, Job[str])
    assert_type(handle.jobs, tuple[Job[Any], ...])
    assert_type(handle.id, str)
    assert_type(handle.deduplicated, bool)

    group = await tr.group([add.call(1, 2), double.call(3)])
    assert_type(group, Group[int])
    assert_type(await group.results(timeout=10), list[int])
    assert_type(await group.results(return_exceptions=True), list[int | JobError])
    assert_type(group.jobs, tuple[Job[int], ...])
    mixed: Group[int | str] = await tr.group([add.call(1, 2), describe.call(1, "m")])
    assert_type(await mixed.results(), list[int | str])
    rebuilt = Group([tr.job(j.id) for j in group.jobs])
    del rebuilt


async def check_cron() -> None:
    assert_type(cleanup, Task[[], int])
    assert_type(locked_tick, Task[[], None])
    assert_type(await cleanup.enqueue(), Job[int])
    assert_type(urgent, CronSchedule)
    assert_type(daily.name, str)
    assert_type(daily.max_drift, float)
    assert_type(daily.job_id(0), str)
    assert_type(daily.next_run(), datetime | None)
    crontab: CronTab = tr.crontab
    assert_type(list(crontab), list[CronSchedule])
    assert_type(crontab.get("daily"), CronSchedule)
    found = await crontab.list()
    assert_type(found, list[CronInfo])
    assert_type(found[0].next_run, datetime | None)
    assert_type(found[0].paused, bool)
    assert_type(await crontab.info("daily"), CronInfo)
    assert_type(await crontab.pause("daily"), None)
    assert_type(await crontab.resume("daily"), None)
    assert_type(await crontab.trigger("daily"), Job[Any])
    try:
        crontab.get("nope")
    except ScheduleNotFound as exc:
        assert_type(exc, ScheduleNotFound)


def check_job_values(info: JobInfo, ctx: JobContext, outcome: Outcome) -> None:
    assert_type(info.status, JobStatus)
    assert_type(info.status.is_final, bool)
    assert_type(info.attempts, int)
    assert_type(info.enqueued_at, datetime)
    assert_type(info.due_at, datetime | None)
    assert_type(info.started_at, datetime | None)
    assert_type(info.finished_at, datetime | None)
    assert_type(info.error, ErrorInfo | None)
    assert_type(info.worker, str | None)
    assert_type(info.reclaims, int)
    assert_type(info.reschedules, int)
    assert_type(info.abort_requested, bool)
    assert_type(ErrorInfo.from_exception(ValueError("x")).message, str)
    assert_type(ctx.attempt, int)
    assert_type(ctx.reclaimed, bool)
    assert_type(ctx.extra, dict[str, Any])
    assert_type(Outcome.succeeded(1), Outcome)
    assert_type(Outcome.reschedule(0.0), Outcome)
    assert_type(outcome.error, ErrorInfo | None)
    statuses: list[JobStatus] = [JobStatus.SUCCEEDED, JobStatus.ABORTED, *JobStatus]
    kinds: list[OutcomeKind] = [OutcomeKind.RETRY, *OutcomeKind]
    del statuses, kinds


def check_exceptions() -> None:
    errors: list[type[TaskrunnerError]] = [
        ConfigurationError,
        UnknownOptionError,
        EmbeddedRedisError,
        JobError,
        JobNotFound,
        JobFailed,
        JobAborted,
        JobRejected,
        JobDeadLettered,
        LockConflictError,
        LostLease,
        MiddlewareError,
        NotReplicated,
        PayloadTooLarge,
        Retry,
        TaskTimeout,
    ]
    del errors
    failed = JobFailed("id", "ValueError", "bad", "Traceback ...")
    assert_type(failed.exc_type, str)
    assert_type(failed.traceback, str)
    assert_type(JobDeadLettered("id", "why").reason, str)
    too_large = PayloadTooLarge("the arguments", 2_000_000, 1_000_000)
    assert_type(too_large.limit, int)
    assert_type(NotReplicated(1, 0, 1000).wanted, int)
    conflict = LockConflictError("lock", "holder")
    assert_type(conflict.holder, str)
    raise Retry(delay=timedelta(seconds=3))
