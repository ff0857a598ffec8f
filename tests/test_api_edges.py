"""What the docs promise at the edges of the public API, found by an audit of the docs
against the code: bad per-enqueue options and settings are refused where they are
given, an enqueue middleware may move a job to another queue, a chain's length is
checked at enqueue, an object whose ``__call__`` is async is a task, and ``@tr.cron``
on a function names the task as ``@tr.task`` does."""

from __future__ import annotations

import asyncio
import copy
import math
import pickle
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from typing import Any, cast

import anyio
import pytest
from pydantic import BaseModel, ValidationError
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from taskrunner import (
    ConfigurationError,
    EnqueueContext,
    Job,
    JobAborted,
    JobDeadLettered,
    JobError,
    JobFailed,
    JobNotFound,
    JobRejected,
    JobStatus,
    LockConflictError,
    Middleware,
    NotReplicated,
    PayloadTooLarge,
    Retry,
    TaskRunner,
    TaskrunnerError,
)
from taskrunner.middleware.base import EnqueueNext
from taskrunner.options import MAX_SECONDS
from taskrunner.task import Task

DEADLINE = 30.0
MakeRunner = Callable[..., TaskRunner]


class Point(BaseModel):  # its own config: it writes a NaN as null
    x: float


async def namespace_keys(redis: Redis, namespace: str) -> list[str]:
    return [k async for k in redis.scan_iter(match=f"{namespace}:*")]


@pytest.mark.parametrize(
    "options",
    [
        {"delay": math.nan},
        {"delay": math.inf},
        {"delay": "10"},
        {"delay": True},
        {"delay": 1e20},
        {"delay": timedelta(days=365 * 101)},
        {"job_id": ""},
        {"job_id": 42},
        {"queue": ""},
        {"queue": "a b"},
        {"priority": ""},
        {"at": "2030-01-01"},
        {"at": datetime(9999, 12, 31, tzinfo=UTC)},  # beyond the 100 years a delay has
        {"at": datetime(1, 1, 1)},  # naive: local time, which year 1 has none of
    ],
)
async def test_a_bad_enqueue_option_is_refused_where_it_is_given_and_writes_nothing(
    make_runner: MakeRunner, redis: Redis, namespace: str, options: dict[str, Any]
) -> None:
    tr = make_runner()

    @tr.task
    async def noop() -> None: ...

    async with tr:
        with pytest.raises(ConfigurationError):
            await noop.options(**options).enqueue()
        assert await namespace_keys(redis, namespace) == []


async def test_good_enqueue_options_are_taken(make_runner: MakeRunner) -> None:
    tr = make_runner()

    @tr.task
    async def noop() -> None: ...

    async with tr:
        for options in ({"delay": 10}, {"delay": 2.5}, {"delay": timedelta(seconds=3)}):
            job = await noop.options(**options).enqueue()
            assert await job.status() == JobStatus.SCHEDULED
        assert await (await noop.options(delay=-1).enqueue()).status() == JobStatus.QUEUED


@pytest.mark.parametrize(
    "setting",
    [
        {"result_ttl": "10"},
        {"timeout": "5"},
        {"retry_delay": "1"},
        {"lock_ttl": "60"},
        {"stale_after": math.inf},
        {"pool_timeout": math.nan},
        {"partitions": 1025},
        {"result_ttl": 1e20},  # was taken: every commit then failed halfway
        {"dead_letter_ttl": timedelta(days=365 * 101)},
        {"lock_ttl": MAX_SECONDS + 1},
    ],
)
def test_a_setting_that_is_not_a_finite_number_of_seconds_is_refused(
    make_runner: MakeRunner, setting: dict[str, Any]
) -> None:
    with pytest.raises(ConfigurationError):
        make_runner(**setting)


def test_the_longest_duration_is_taken_and_one_beyond_it_is_refused(
    make_runner: MakeRunner,
) -> None:
    """About 100 years: as a setting, a task option and an enqueue delay; beyond it
    (lock_ttl=1e20 once made every enqueue of the task fail in Redis) refused."""
    tr = make_runner(result_ttl=MAX_SECONDS, dead_letter_ttl=timedelta(seconds=MAX_SECONDS))

    @tr.task(lock="until_executed", lock_ttl=MAX_SECONDS, timeout=MAX_SECONDS)
    async def noop() -> None: ...

    noop.options(delay=MAX_SECONDS)
    with pytest.raises(ConfigurationError, match="lock_ttl"):

        @tr.task(lock="until_executed", lock_ttl=1e20)
        async def locked() -> None: ...

    with pytest.raises(ConfigurationError, match="retry_delay"):

        @tr.task(retry_delay=timedelta(days=365 * 101))
        async def later() -> None: ...


@pytest.mark.parametrize("delay", [math.nan, math.inf, 1e20, "3", True])
def test_retry_with_a_delay_out_of_range_is_refused(delay: Any) -> None:
    with pytest.raises(ConfigurationError, match="Retry"):
        Retry(delay=delay)
    assert Retry(delay=timedelta(seconds=2)).delay == 2
    assert Retry(delay=-1).delay == -1  # in the past: due at once, as a negative delay


def test_retry_copies_and_pickles_with_its_delay_and_takes_any_real_number() -> None:
    # a task run in a process pool raises a Retry that is pickled on its way back
    for retry in (Retry(delay=5), Retry(), Retry(delay=timedelta(minutes=1))):
        assert copy.copy(retry).delay == retry.delay
        assert pickle.loads(pickle.dumps(retry)).delay == retry.delay
    other_reals: list[Any] = [Decimal("1.5"), Fraction(1, 4)]  # outside the typed API
    assert [Retry(delay=d).delay for d in other_reals] == [1.5, 0.25]


class _MoveTo(Middleware):
    """Moves every job to ``queue`` (not used by the runner before)."""

    def __init__(self, queue: str) -> None:
        self.queue = queue

    async def enqueue(self, ctx: EnqueueContext, call_next: EnqueueNext) -> Job[Any]:
        ctx.queue = self.queue
        return await call_next(ctx)


async def test_an_enqueue_middleware_may_move_a_job_to_a_queue_not_resolved_yet(
    make_runner: MakeRunner,
) -> None:
    tr = make_runner(queue="origin", middleware=[_MoveTo("elsewhere")])

    @tr.task
    async def one() -> int:
        return 1

    async with tr:
        with anyio.fail_after(DEADLINE):
            job = await one.enqueue()
        assert job.queue == "elsewhere"
        assert await job.status() == JobStatus.QUEUED
        await tr.run_until_idle(queues=["elsewhere"], timeout=DEADLINE)
        assert await job.result(timeout=1) == 1


async def test_a_write_that_cannot_be_built_raises_through_enqueue_middleware(
    make_runner: MakeRunner, redis: Redis, namespace: str
) -> None:
    tr = make_runner(middleware=[_MoveTo("bad name")])  # refused when the write is built

    @tr.task
    async def one() -> int:
        return 1

    async with tr:
        with anyio.fail_after(DEADLINE), pytest.raises(ConfigurationError):
            await one.enqueue()
        with anyio.fail_after(DEADLINE), pytest.raises(ConfigurationError):
            await tr.enqueue_many([one.call(), one.call()])
        assert await namespace_keys(redis, namespace) == []


async def test_a_chain_has_at_most_one_hundred_steps_after_its_first_job(
    make_runner: MakeRunner, redis: Redis, namespace: str
) -> None:
    tr = make_runner()

    @tr.task
    async def inc(x: int) -> int:
        return x + 1

    async with tr:
        chain = inc.chain(0)
        for _ in range(100):
            chain = chain.then(inc)
        with pytest.raises(ConfigurationError, match="at most 100 steps"):
            await chain.then(inc).enqueue()
        assert await namespace_keys(redis, namespace) == []
        handle = await chain.enqueue()
        assert len(handle.jobs) == 101


async def test_an_object_whose_call_is_async_is_a_task(make_runner: MakeRunner) -> None:
    tr = make_runner()

    class Charge:
        async def __call__(self, amount: int) -> int:
            return amount * 2

    charge = tr.task(Charge())
    named = tr.task(name="charge-named")(Charge())
    assert charge.name == "test_an_object_whose_call_is_async_is_a_task.<locals>.Charge"
    async with tr:
        jobs = [await charge.enqueue(21), await named.enqueue(5)]
        await tr.run_until_idle(timeout=DEADLINE)
        assert [await job.result(timeout=1) for job in jobs] == [42, 10]


def test_cron_on_a_function_names_the_task_as_tr_task_does(make_runner: MakeRunner) -> None:
    tr = make_runner()

    @tr.cron("0 9 * * *", name="morning")
    async def send_report() -> None: ...

    assert send_report.name.endswith("tr_task_does.<locals>.send_report")
    assert tr.crontab.get("morning").task.name == send_report.name


async def test_a_result_that_does_not_fit_its_annotation_fails_the_job_for_good(
    make_runner: MakeRunner,
) -> None:
    tr = make_runner(max_retries=3)
    runs: list[str] = []

    @tr.task
    async def count() -> int:
        runs.append("count")
        return cast(int, "not a number")

    @tr.task
    async def opaque() -> Any:
        runs.append("opaque")
        return object()  # no JSON for it

    @tr.task
    async def lenient() -> int:
        return cast(int, "7")  # pydantic's lax mode takes it as 7

    async with tr:
        jobs = [await count.enqueue(), await opaque.enqueue(), await lenient.enqueue()]
        await tr.run_until_idle(timeout=DEADLINE, raise_failures=False)
        errors = ["ValidationError", "PydanticSerializationError"]
        for job, error in zip(jobs[:2], errors, strict=True):
            info = await job.info()
            assert (info.status, info.attempts) == (JobStatus.FAILED, 1)
            assert info.error is not None
            assert info.error.type.endswith(error)
            with pytest.raises(JobFailed):
                await job.result(timeout=1)
        assert await jobs[2].result(timeout=1) == 7
    assert sorted(runs) == ["count", "opaque"]  # once each: not retried


@pytest.mark.parametrize(
    "options",
    [
        {"grace_period": -5},
        {"grace_period": math.nan},
        {"grace_period": math.inf},
        {"grace_period": MAX_SECONDS + 1},
        {"grace_period": "5"},
        {"concurrency": 0},
        {"concurrency": 10_001},
        {"concurrency": "5"},
        {"concurrency": 2.0},
        {"max_deliveries": 0},
        {"burst": 1},
        {"queues": "emails"},  # a str is not a list of names (it was read as its letters)
        {"queues": ["a b"]},
        {"queues": [""]},
        {"queues": [3]},
    ],
)
def test_a_worker_refuses_a_bad_argument_where_it_is_made(
    make_runner: MakeRunner, options: dict[str, Any]
) -> None:
    tr = make_runner()
    name = next(iter(options))
    with pytest.raises(ConfigurationError, match=name.rstrip("s")):
        tr.worker(handle_signals=False, **options)


def test_a_bad_queue_in_the_list_is_named_by_its_place(make_runner: MakeRunner) -> None:
    tr = make_runner()
    with pytest.raises(ConfigurationError, match=r"queues\[1\]=1: it must be a str"):
        tr.worker(queues=["a", 1])  # type: ignore[list-item]


def test_a_worker_takes_its_grace_period_as_a_timedelta_and_queues_as_any_sequence(
    make_runner: MakeRunner,
) -> None:
    tr = make_runner()
    worker = tr.worker(grace_period=timedelta(seconds=3), queues=("emails", "reports"))
    assert worker.grace_period == 3.0
    assert worker.queue_names == ["emails", "reports"]


async def test_a_worker_run_raises_its_error_itself_not_in_a_group(namespace: str) -> None:
    tr = TaskRunner("redis://127.0.0.1:1/0", namespace=namespace)  # nothing listens on 1
    with pytest.raises(RedisConnectionError):
        await tr.worker(burst=True, handle_signals=False).run()


@pytest.mark.parametrize("name", [5, ""])
def test_a_task_name_must_be_a_non_empty_string(make_runner: MakeRunner, name: Any) -> None:
    tr = make_runner()

    async def noop() -> None: ...

    with pytest.raises(ConfigurationError, match="task name"):
        tr.task(name=name)(noop)
    assert tr.registry == {}


@pytest.mark.parametrize("url", [5, 5.0, b"redis://localhost"])
def test_a_url_that_is_not_a_str_is_a_configuration_error(url: Any) -> None:
    with pytest.raises(ConfigurationError, match="must be a str"):
        TaskRunner(url)


async def test_an_enqueue_middleware_error_writes_nothing_of_its_pipeline(
    make_runner: MakeRunner, redis: Redis, namespace: str
) -> None:
    tr = make_runner()

    @tr.task(lock="until_executed")
    async def unique(x: int) -> None: ...

    def broken(x: int) -> int:
        raise ZeroDivisionError("unique_args failed")

    @tr.task(lock="until_executed", unique_args=broken)
    async def bad(x: int) -> None: ...

    @tr.task
    async def plain(x: int) -> None: ...

    async with tr:
        with pytest.raises(ZeroDivisionError, match="unique_args failed"):
            await tr.enqueue_many([unique.call(5), plain.call(1), bad.call(1), plain.call(2)])
        assert await namespace_keys(redis, namespace) == []
        [job] = await tr.enqueue_many([unique.call(5)])  # the runner still works
        assert await job.status() == JobStatus.QUEUED


async def test_an_integer_the_worker_could_not_read_back_fails_at_enqueue(
    make_runner: MakeRunner, redis: Redis, namespace: str
) -> None:
    tr = make_runner()

    @tr.task
    async def add(a: int, b: int) -> int:
        return a + b

    huge = 10**5000  # pydantic encodes it, but reads at most 4,300 digits
    async with tr:
        with pytest.raises(ValidationError):
            await add.enqueue(huge, 1)
        with pytest.raises(ValidationError):
            await add.chain(1, 2).then(add, huge).enqueue()
        assert await namespace_keys(redis, namespace) == []
        long_but_fine = 10**4000
        job = await add.enqueue(long_but_fine, 1)
        await tr.run_until_idle()
        assert await job.result(timeout=DEADLINE) == long_but_fine + 1


async def test_a_result_the_caller_could_not_read_back_fails_the_job(
    make_runner: MakeRunner,
) -> None:
    tr = make_runner(max_retries=0)

    @tr.task
    async def huge() -> int:
        return 10**5000

    async with tr:
        job = await huge.enqueue()
        await tr.run_until_idle(raise_failures=False)
        with pytest.raises(JobFailed, match="number out of range"):
            await job.result(timeout=DEADLINE)


async def test_a_wait_that_runs_out_says_which_job(make_runner: MakeRunner) -> None:
    tr = make_runner()

    @tr.task
    async def noop() -> None: ...

    async with tr:
        job = await noop.enqueue()
        with pytest.raises(TimeoutError, match=rf"job {job.id} is not final after 0\.1s"):
            await job.result(timeout=0.1)
        group = await tr.group([noop.call()])
        with pytest.raises(TimeoutError, match=r"a group of 1 jobs is not done after 0\.1s"):
            await group.results(timeout=0.1)


async def test_nan_and_infinities_reach_the_task_and_come_back_as_its_result(
    make_runner: MakeRunner,
) -> None:
    tr = make_runner()

    @tr.task
    async def echo(x: float, xs: list[float]) -> list[float]:
        return [x, *xs]

    async with tr:
        job = await echo.enqueue(math.nan, [math.inf, -math.inf])
        await tr.run_until_idle()
        got = await job.result(timeout=DEADLINE)
        assert math.isnan(got[0])
        assert got[1:] == [math.inf, -math.inf]


async def test_a_nan_the_worker_could_not_read_back_fails_at_enqueue(
    make_runner: MakeRunner, redis: Redis, namespace: str
) -> None:
    tr = make_runner()

    @tr.task
    async def place(p: Point) -> None: ...

    async with tr:
        with pytest.raises(ValidationError):
            await place.enqueue(Point(x=math.nan))
        assert await namespace_keys(redis, namespace) == []


async def test_a_zero_timeout_returns_the_result_of_a_final_job_without_waiting(
    make_runner: MakeRunner,
) -> None:
    tr = make_runner()

    @tr.task
    async def one() -> int:
        return 1

    async with tr:
        job = await one.enqueue()
        with pytest.raises(TimeoutError, match="is not final"):
            await job.result(timeout=0)  # queued: not final, and no time to wait
        await tr.run_until_idle()
        assert await job.result(timeout=0) == 1
        assert await job.result(timeout=-1) == 1


def with_inc(make_runner: MakeRunner) -> tuple[TaskRunner, Task[[int], int]]:
    """A runner with one task, ``inc(x) = x + 1``."""
    tr = make_runner()

    @tr.task
    async def inc(x: int) -> int:
        return x + 1

    return tr, inc


async def test_a_zero_timeout_looks_once_for_groups_and_chains_too(
    make_runner: MakeRunner,
) -> None:
    tr, inc = with_inc(make_runner)

    async with tr:
        group = await tr.group([inc.call(1), inc.call(2)])
        chain = await inc.chain(1).then(inc).enqueue()
        with pytest.raises(TimeoutError, match="a group of 2 jobs is not done after 0s"):
            await group.results(timeout=0)
        with pytest.raises(TimeoutError, match="is not final"):
            await chain.result(timeout=0)
        await tr.run_until_idle()
        assert await group.results(timeout=0) == [2, 3]
        assert await chain.result(timeout=0) == 3


async def test_every_wait_takes_its_timeout_as_a_timedelta_and_refuses_what_is_no_duration(
    make_runner: MakeRunner,
) -> None:
    tr, inc = with_inc(make_runner)

    async with tr:
        job = await inc.enqueue(0)
        group = await tr.group([inc.call(1), inc.call(2)])
        chain = await inc.chain(3).then(inc).enqueue()
        with pytest.raises(TimeoutError, match=r"job \S+ is not final after 0.05s"):
            await job.result(timeout=timedelta(milliseconds=50))
        with pytest.raises(TimeoutError, match="a group of 2 jobs is not done after 0s"):
            await group.results(timeout=timedelta(0))
        with pytest.raises(TimeoutError, match="is not final"):
            await chain.result(timeout=timedelta(seconds=-1))
        done = await tr.run_until_idle(timeout=timedelta(seconds=DEADLINE))
        assert len(done) == 5
        assert await job.result(timeout=timedelta(seconds=DEADLINE)) == 1
        assert await group.results(timedelta(seconds=DEADLINE)) == [2, 3]
        assert await chain.result(timeout=timedelta(seconds=DEADLINE)) == 5
        for unbounded in (math.inf, timedelta.max, 10**400, MAX_SECONDS * 2):
            assert await job.result(timeout=unbounded) == 1
        waits: list[Callable[[Any], Awaitable[object]]] = [
            lambda t: job.result(timeout=t),
            lambda t: group.results(timeout=t),
            lambda t: chain.result(timeout=t),
            lambda t: tr.run_until_idle(timeout=t),
        ]
        for bad in ("5", True, math.nan, -math.inf):
            for wait in waits:
                with pytest.raises(ValueError, match="timeout must be a finite number of seconds"):
                    await wait(bad)


async def test_a_job_handle_used_after_its_runner_closed_raises_and_opens_nothing(
    make_runner: MakeRunner,
) -> None:
    # it used to reconnect the closed pool and start a pub/sub task nobody stopped (or,
    # on the embedded server, stopped with the runner, fail with a bare ConnectionError)
    tr, inc = with_inc(make_runner)

    async with tr:
        job = await inc.enqueue(1)
        chain = await inc.chain(1).then(inc).enqueue()
        await tr.run_until_idle()
    before = {task.get_name() for task in asyncio.all_tasks()}
    closed = "the runner this job handle came from was closed"
    for use in (job.status, job.info, job.result, job.abort, chain.result):
        with pytest.raises(TaskrunnerError, match=closed):
            await use()
    with pytest.raises(TaskrunnerError, match=closed):
        await anext(aiter(job.progress()))
    assert {task.get_name() for task in asyncio.all_tasks()} == before
    async with tr:  # open again: a new handle of the same job works
        assert await tr.job(job.id).result(timeout=DEADLINE) == 2


def _same_error(exc: BaseException, other: BaseException) -> bool:
    return (type(other), str(other), other.args, vars(other)) == (
        type(exc),
        str(exc),
        exc.args,
        vars(exc),
    )


async def test_job_errors_and_the_other_errors_copy_and_pickle_as_themselves(
    make_runner: MakeRunner,
) -> None:
    # a caller in a process pool (or anything that copies) gets the error back whole:
    # it was rebuilt from its message alone, which its __init__ did not take
    tr = make_runner(max_retries=0)

    @tr.task
    async def fail() -> None:
        raise ValueError("boom")

    async with tr:
        job = await fail.enqueue()
        await tr.run_until_idle(raise_failures=False)
        with pytest.raises(JobFailed) as failed:
            await job.result(timeout=DEADLINE)
    failed.value.add_note("seen by the caller")
    errors: list[TaskrunnerError] = [
        failed.value,
        JobError("j1", "something"),
        JobNotFound("j1"),
        JobNotFound("j1", "emails"),
        JobAborted("j1"),
        JobRejected("j1"),
        JobDeadLettered("j1", "unknown task 'x'"),
        PayloadTooLarge("the result of t", 10, 5, setting="64 KiB"),
        NotReplicated(2, 1, 500),
        LockConflictError("ns:{q}:lock:abc", "j1"),
    ]
    for exc in errors:
        assert _same_error(exc, pickle.loads(pickle.dumps(exc))), exc
        assert _same_error(exc, copy.copy(exc)), exc
    assert pickle.loads(pickle.dumps(failed.value)).__notes__ == ["seen by the caller"]


class OrderMissing(JobNotFound):
    """A user's subclass that keeps JobNotFound's constructor."""


class PaymentFailed(JobError):
    """A user's subclass with a constructor of its own (one argument)."""

    def __init__(self, order: str) -> None:
        super().__init__(f"pay-{order}", f"payment for {order} failed")
        self.order = order


def test_users_subclasses_of_the_errors_copy_and_pickle_too() -> None:
    # a subclass whose __init__ taskrunner does not know is remade as Python does by
    # default (from its args, then its attributes): with the rebuild made for the base
    # class's constructor, unpickling it raised TypeError
    kept = OrderMissing("o-1")
    for copied in (pickle.loads(pickle.dumps(kept)), copy.copy(kept)):
        assert _same_error(kept, copied)
    own = PaymentFailed("o-2")
    for copied in (pickle.loads(pickle.dumps(own)), copy.copy(own)):
        assert type(copied) is PaymentFailed
        assert (copied.job_id, copied.order) == ("pay-o-2", "o-2")
