"""The middleware chain: onion layers around enqueue and execution, typed options, order,
worker hooks, and the worked example in examples/middleware.py."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from conftest import subprocess_env, wait_until
from redis.asyncio import Redis

from taskrunner import (
    ConfigurationError,
    EnqueueContext,
    ExecutionContext,
    Job,
    JobFailed,
    JobStatus,
    Middleware,
    Outcome,
    OutcomeKind,
    TaskOptions,
    TaskRunner,
    UnknownOptionError,
)
from taskrunner.middleware.base import EnqueueNext, ExecuteNext

if TYPE_CHECKING:
    from taskrunner import WorkerPort

MakeRunner = Callable[..., TaskRunner]
DEADLINE = 30.0
REPO = Path(__file__).resolve().parents[1]


async def namespace_keys(redis: Redis, namespace: str) -> set[str]:
    return {key async for key in redis.scan_iter(match=f"{namespace}:*")}


class Recorder(Middleware):
    """Records what it sees on both sides, and the order of layers and hooks."""

    def __init__(self, name: str, trail: list[str]) -> None:
        self.name = name
        self.trail = trail
        self.outcomes: list[Outcome] = []
        self.errors: list[BaseException] = []
        self.enqueued: list[tuple[str, tuple[Any, ...], dict[str, Any], str, str]] = []

    async def enqueue(self, ctx: EnqueueContext, call_next: EnqueueNext) -> Job[Any]:
        self.trail.append(f"{self.name}>enqueue")
        self.enqueued.append((ctx.task.name, ctx.args, ctx.kwargs, ctx.job_id, ctx.queue))
        job = await call_next(ctx)
        self.trail.append(f"{self.name}<enqueue")
        return job

    async def execute(self, ctx: ExecutionContext, call_next: ExecuteNext) -> Outcome:
        self.trail.append(f"{self.name}>execute")
        try:
            outcome = await call_next(ctx)
        except Exception as exc:
            self.errors.append(exc)
            raise
        finally:
            self.trail.append(f"{self.name}<execute")
        self.outcomes.append(outcome)
        return outcome

    async def on_worker_start(self, worker: WorkerPort) -> None:
        self.trail.append(f"{self.name}:start")

    async def on_worker_stop(self, worker: WorkerPort) -> None:
        self.trail.append(f"{self.name}:stop")


async def test_execution_middleware_sees_the_result(make_runner: MakeRunner) -> None:
    recorder = Recorder("r", [])
    tr = make_runner(middleware=[recorder])

    @tr.task
    async def add(x: int, y: int) -> int:
        return x + y

    async with tr, tr.worker(handle_signals=False):
        job = await add.enqueue(2, 3)
        assert await job.result(timeout=DEADLINE) == 5
    assert recorder.outcomes == [Outcome.succeeded(5)]
    assert recorder.errors == []


async def test_execution_middleware_sees_the_exception(make_runner: MakeRunner) -> None:
    recorder = Recorder("r", [])
    tr = make_runner(middleware=[recorder])

    @tr.task(max_retries=1)
    async def boom(x: int) -> None:
        raise ValueError(f"bad {x}")

    async with tr, tr.worker(handle_signals=False):
        job = await boom.enqueue(7)
        with pytest.raises(JobFailed) as caught:
            await job.result(timeout=DEADLINE)
    assert caught.value.exc_type == "ValueError"
    # Both attempts' exceptions pass through the user layer on their way to retry.
    assert [str(e) for e in recorder.errors] == ["bad 7", "bad 7"]
    assert all(isinstance(e, ValueError) for e in recorder.errors)
    assert recorder.outcomes == []


class RefuseOdd(Middleware):
    async def enqueue(self, ctx: EnqueueContext, call_next: EnqueueNext) -> Job[Any]:
        if ctx.args and ctx.args[0] % 2:
            raise PermissionError("odd numbers are refused")
        return await call_next(ctx)


async def test_a_middleware_that_refuses_an_enqueue_stops_the_write(
    make_runner: MakeRunner, redis: Redis, namespace: str
) -> None:
    tr = make_runner(middleware=[RefuseOdd()])

    @tr.task
    async def f(x: int) -> int:
        return x

    async with tr:
        with pytest.raises(PermissionError, match="odd"):
            await f.enqueue(1)
        assert await namespace_keys(redis, namespace) == set()
        with pytest.raises(PermissionError):
            await f.enqueue_many([f.call(2), f.call(3)])
        assert (await f.enqueue(4)).deduplicated is False


class DelayEverything(Middleware):
    async def enqueue(self, ctx: EnqueueContext, call_next: EnqueueNext) -> Job[Any]:
        ctx.due = ctx.now + 100
        ctx.job_id = f"delayed-{ctx.job_id}"
        return await call_next(ctx)


async def test_an_enqueue_middleware_can_change_the_outgoing_job(
    make_runner: MakeRunner,
) -> None:
    recorder = Recorder("r", [])
    tr = make_runner(middleware=[DelayEverything(), recorder])

    @tr.task(queue="other")
    async def f(x: int, y: str = "a") -> int:
        return x

    async with tr:
        job = await f.options(job_id="abc").enqueue(1, y="b")
        assert job.id == "delayed-abc"
        info = await job.info()
        assert info.status == JobStatus.SCHEDULED
        assert info.due_at is not None
        assert info.due_at.timestamp() > time.time() + 90
    name = f.name
    assert recorder.enqueued == [(name, (1,), {"y": "b"}, "delayed-abc", "other")]


async def test_layers_nest_like_an_onion_and_hooks_run_in_order(
    make_runner: MakeRunner,
) -> None:
    trail: list[str] = []
    tr = make_runner(middleware=[Recorder("a", trail), Recorder("b", trail)])

    @tr.task
    async def f() -> None:
        trail.append("task")

    async with tr:
        async with tr.worker(handle_signals=False):
            job = await f.enqueue()
            await job.result(timeout=DEADLINE)
        assert trail == [
            "a:start",
            "b:start",
            "a>enqueue",
            "b>enqueue",
            "b<enqueue",
            "a<enqueue",
            "a>execute",
            "b>execute",
            "task",
            "b<execute",
            "a<execute",
            "b:stop",
            "a:stop",
        ]


def test_built_in_middleware_come_first_in_the_documented_order(make_runner: MakeRunner) -> None:
    mine = Recorder("mine", [])
    tr = make_runner(middleware=[mine])
    names = [type(mw).__name__ for mw in tr.middleware]
    assert names == [
        "LeaseMiddleware",
        "IsolationMiddleware",
        "LimitsMiddleware",
        "UniqueMiddleware",
        "RetryMiddleware",
        "TimeoutMiddleware",
        "CronMiddleware",
        "Recorder",
    ]
    assert tr.middleware[-1] is mine
    assert tr.middleware[2] is tr.limits
    assert tr.middleware[3] is tr.unique


class WeightOptions(TaskOptions):
    weight: int = 0
    tags: tuple[str, ...] = ()


class Weigh(Middleware):
    Options = WeightOptions
    seen: list[int]

    def __init__(self) -> None:
        self.seen = []

    async def execute(self, ctx: ExecutionContext, call_next: ExecuteNext) -> Outcome:
        self.seen.append(self.options(ctx.task, WeightOptions).weight)
        return await call_next(ctx)


async def test_a_middleware_owns_typed_task_options(make_runner: MakeRunner) -> None:
    weigh = Weigh()
    tr = make_runner(middleware=[weigh])

    @tr.task(options={"weight": 5, "tags": ("a",)})
    async def heavy() -> None: ...

    @tr.task
    async def normal() -> None: ...

    assert heavy.definition.options_for(WeightOptions) == WeightOptions(weight=5, tags=("a",))
    with pytest.raises(ConfigurationError, match="weight"):

        @tr.task(options={"weight": "high"})
        async def wrong() -> None: ...

    async with tr, tr.worker(handle_signals=False):
        await (await heavy.enqueue()).result(timeout=DEADLINE)
        await (await normal.enqueue()).result(timeout=DEADLINE)
    assert weigh.seen == [5, 0]


def test_an_option_no_middleware_owns_is_refused_by_name(make_runner: MakeRunner) -> None:
    tr = make_runner()
    unknown: dict[str, Any] = {"colour": "red"}  # as a keyword, a static error
    with pytest.raises(UnknownOptionError, match="'colour'") as caught:

        @tr.task(**unknown)
        async def f() -> None: ...

    assert "lock" in str(caught.value)  # the message lists the known options


def test_two_middleware_cannot_own_one_option(make_runner: MakeRunner) -> None:
    class Clash(TaskOptions):
        lock: str = ""

    class Clasher(Middleware):
        Options = Clash

    with pytest.raises(ConfigurationError, match="'lock'"):
        make_runner(middleware=[Clasher()])


class SkipWhenAsked(Middleware):
    """Replaces the call: an execution layer may skip the task and decide the outcome."""

    async def execute(self, ctx: ExecutionContext, call_next: ExecuteNext) -> Outcome:
        if ctx.kwargs.get("skip"):
            return Outcome(OutcomeKind.REJECTED)
        return await call_next(ctx)


async def test_an_execution_middleware_can_skip_the_task(make_runner: MakeRunner) -> None:
    ran: list[bool] = []
    tr = make_runner(middleware=[SkipWhenAsked()])

    @tr.task
    async def f(*, skip: bool = False) -> None:
        ran.append(skip)

    async with tr, tr.worker(handle_signals=False):
        skipped = await f.enqueue(skip=True)
        done = await f.enqueue()
        await done.result(timeout=DEADLINE)

        async def final() -> bool:
            return (await skipped.status()).is_final

        await wait_until(final, DEADLINE)
        assert await skipped.status() == JobStatus.REJECTED
    assert ran == [False]


def test_the_worked_example_runs(redis_url: str, namespace: str, tmp_path: Path) -> None:
    env = subprocess_env(redis_url, namespace)
    proc = subprocess.run(
        [sys.executable, "-m", "examples.middleware"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=DEADLINE * 2,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["add -> 3", "divide -> ZeroDivisionError"]
    records = [
        json.loads(line.partition(" ")[2])
        for line in proc.stderr.splitlines()
        if line.startswith("examples.middleware ")
    ]
    events = [(r["event"], r.get("task"), r.get("outcome")) for r in records]
    assert events[0] == ("worker_started", None, None)
    assert ("enqueued", "add", None) in events
    assert ("finished", "add", "succeeded") in events
    assert ("raised", "divide", None) in events
    assert events[-1] == ("worker_stopped", None, None)
    finished = next(r for r in records if r["event"] == "finished")
    assert finished["seconds"] >= 0.05  # the task sleeps 50 ms
    assert finished["args"] == [[1, 2], {}]  # log_args=True on add only
    assert not any("args" in r for r in records if r.get("task") == "divide")


def test_the_unique_jobs_example_runs(redis_url: str, namespace: str, tmp_path: Path) -> None:
    env = subprocess_env(redis_url, namespace)
    proc = subprocess.run(
        [sys.executable, "-m", "examples.unique_jobs"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=DEADLINE * 2,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:4] == [
        "rebuild deduplicated: True True",
        "notify conflict: held by True",
        "rebuild -> rebuilt 1 (full=True)",
        "sync_account attempts -> 1 1",
    ]
    assert lines[4].startswith("reschedules (a, b) -> ")


class Headers(Middleware):
    """Carries a header from enqueue to every attempt, and watches recorded outcomes."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []
        self.committed: list[tuple[str, int, OutcomeKind]] = []
        self.waits: list[float] = []

    async def enqueue(self, ctx: EnqueueContext, call_next: EnqueueNext) -> Job[Any]:
        ctx.meta["trace"] = f"t-{ctx.job_id}"
        return await call_next(ctx)

    async def execute(self, ctx: ExecutionContext, call_next: ExecuteNext) -> Outcome:
        self.seen.append(dict(ctx.meta))
        self.waits.append(time.time() - ctx.job.ready_at)
        return await call_next(ctx)

    def on_commit(self, job: Any, outcome: Outcome) -> None:
        self.committed.append((job.id, job.attempt, outcome.kind))


async def test_meta_reaches_every_attempt_and_on_commit_sees_each_recorded_outcome(
    make_runner: MakeRunner,
) -> None:
    headers = Headers()
    tr = make_runner(middleware=[headers], max_retries=1)

    @tr.task
    async def flaky() -> int:
        from taskrunner import current_job

        if current_job().attempt == 1:
            raise ValueError("first attempt fails")
        return 7

    async with tr, tr.worker(concurrency=2):
        job = await flaky.enqueue()
        assert await job.result(timeout=DEADLINE) == 7
        await wait_until(lambda: _true(len(headers.committed) == 2), DEADLINE)
    assert headers.seen == [{"trace": f"t-{job.id}"}] * 2
    # the retry became runnable at its due time: both waits are from a recent ready time
    assert all(0 <= wait < DEADLINE for wait in headers.waits)
    assert headers.committed == [
        (job.id, 1, OutcomeKind.RETRY),
        (job.id, 2, OutcomeKind.SUCCEEDED),
    ]


async def _true(value: bool) -> bool:
    return value
