"""The worker in-process: results, statuses, retries, timeouts, delays, shutdown, races.

The core (enqueue, run, result, retry, abort, delay, shutdown) runs on every topology
(``ALL``); a Cluster queue has one partition per master, so tests look jobs and
streams up through the runner (``locate``, ``pending_count``), never partition 0 alone.
Tests of codecs, context variables and pure functions run once, on standalone."""

from __future__ import annotations

import enum
import itertools
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import anyio
import anyio.lowlevel
import pytest
from conftest import wait_until
from pydantic import BaseModel
from redis.asyncio import Redis
from redis.typing import EncodableT, FieldT

from taskrunner import (
    JobAborted,
    JobDeadLettered,
    JobFailed,
    JobNotFound,
    JobStatus,
    Retry,
    Task,
    TaskRunner,
    Worker,
    current_job,
    scripts,
)
from taskrunner.keys import GROUP, QueueKeys
from taskrunner.middleware.retry import RetryMiddleware, RetryOptions

MakeRunner = Callable[..., TaskRunner]
DEADLINE = 20.0
ALL = pytest.mark.topologies("standalone", "cluster", "sentinel")


@asynccontextmanager
async def background_worker(tr: TaskRunner, **kwargs: object) -> AsyncIterator[Worker]:
    worker = tr.worker(handle_signals=False, **kwargs)  # type: ignore[arg-type]
    async with worker:
        yield worker


async def status_is(tr: TaskRunner, job_id: str, *statuses: str, queue: str = "default") -> bool:
    try:
        return await tr.job(job_id, queue).status() in statuses
    except JobNotFound:
        return False


async def pending_count(tr: TaskRunner, redis: Redis, queue: str = "default") -> int:
    """Entries delivered and not acknowledged, over every partition of ``queue``."""
    total = 0
    for keys in (await tr.client.resolve(queue, refresh=True)).parts:
        if await redis.exists(keys.stream):
            total += int((await redis.xpending(keys.stream, GROUP))["pending"])
    return total


# -- results and payloads ----------------------------------------------------------------


class Kind(enum.Enum):
    A = "a"
    B = "b"


class Order(BaseModel):
    id: uuid.UUID
    placed: datetime
    total: Decimal
    kind: Kind
    lines: list[dict[str, int]]


class Receipt(BaseModel):
    order: Order
    seen_types: list[str]


@ALL
async def test_typed_payload_reaches_the_task_and_result_is_rebuilt(
    make_runner: MakeRunner,
) -> None:
    tr = make_runner()

    @tr.task
    async def process(order: Order, when: datetime, ident: uuid.UUID, *, total: Decimal) -> Receipt:
        seen = [type(v).__name__ for v in (order, when, ident, total, order.kind)]
        return Receipt(order=order, seen_types=seen)

    order = Order(
        id=uuid.uuid4(),
        placed=datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=-5))),
        total=Decimal("10.05"),
        kind=Kind.B,
        lines=[{"sku": 1, "qty": 2}],
    )
    async with tr, background_worker(tr):
        job = await process.enqueue(order, datetime.now(UTC), uuid.uuid4(), total=Decimal("0.30"))
        receipt = await job.result(timeout=DEADLINE)
    assert isinstance(receipt, Receipt)
    assert receipt.order == order
    assert receipt.order.placed.utcoffset() == timedelta(hours=-5)
    assert receipt.seen_types == ["Order", "datetime", "UUID", "Decimal", "Kind"]


@ALL
async def test_job_life_scheduled_queued_running_succeeded(make_runner: MakeRunner) -> None:
    tr = make_runner()
    gate = anyio.Event()
    seen_inside: list[JobStatus] = []

    @tr.task
    async def blocker() -> None:
        await gate.wait()

    @tr.task
    async def watched(x: int) -> int:
        seen_inside.append(await tr.job(current_job().id).status())
        return x * 2

    async with tr:
        busy = await blocker.enqueue()
        job = await watched.options(delay=0.5).enqueue(21)
        assert await job.status() == JobStatus.SCHEDULED
        async with background_worker(tr, concurrency=1):
            await wait_until(lambda: status_is(tr, busy.id, "running"), DEADLINE)
            # Promoted when due, but the only slot is busy: it waits in the stream.
            await wait_until(lambda: status_is(tr, job.id, "queued"), DEADLINE)
            gate.set()
            assert await job.result(timeout=DEADLINE) == 42
        info = await job.info()
    assert seen_inside == [JobStatus.RUNNING]
    succeeded: str = "succeeded"
    assert info.status == JobStatus.SUCCEEDED == succeeded
    assert info.attempts == 1
    assert info.task == watched.name
    assert info.started_at is not None
    assert info.finished_at is not None
    assert info.enqueued_at <= info.started_at <= info.finished_at
    assert info.error is None
    assert info.worker


@ALL
async def test_failed_job_raises_job_failed_with_remote_details(make_runner: MakeRunner) -> None:
    tr = make_runner()

    @tr.task(max_retries=0)
    async def explode(word: str) -> None:
        raise ValueError(f"bad {word}")

    async with tr, background_worker(tr):
        job = await explode.enqueue("apple")
        with pytest.raises(JobFailed) as failure:
            await job.result(timeout=DEADLINE)
        info = await job.info()
    assert failure.value.job_id == job.id
    assert failure.value.exc_type == "ValueError"
    assert failure.value.exc_message == "bad apple"
    assert "Traceback" in failure.value.traceback
    assert "in explode" in failure.value.traceback
    assert 'raise ValueError(f"bad {word}")' in failure.value.traceback
    assert info.status == JobStatus.FAILED
    assert info.attempts == 1
    assert info.error is not None
    assert (info.error.type, info.error.message) == ("ValueError", "bad apple")
    assert info.finished_at is not None


async def test_custom_exception_type_is_named_with_its_module(make_runner: MakeRunner) -> None:
    tr = make_runner()

    class PaymentDeclined(Exception):
        pass

    @tr.task(max_retries=0)
    async def pay() -> None:
        raise PaymentDeclined("card")

    async with tr, background_worker(tr):
        job = await pay.enqueue()
        with pytest.raises(JobFailed) as failure:
            await job.result(timeout=DEADLINE)
    assert failure.value.exc_type.endswith("PaymentDeclined")
    assert failure.value.exc_type.startswith(__name__)


@ALL
async def test_result_timeout_raises_timeout_error(make_runner: MakeRunner) -> None:
    tr = make_runner()

    @tr.task
    async def never_run() -> None:
        return None

    async with tr:
        job = await never_run.enqueue()
        with pytest.raises(TimeoutError):
            await job.result(timeout=0.2)
        assert await job.status() == JobStatus.QUEUED


async def test_a_waiter_sees_a_job_final_without_its_message(
    make_runner: MakeRunner, redis: Redis, namespace: str
) -> None:
    """A message lost on a live pub/sub connection (a cluster node that rejoins its
    shard misses the shard's messages for a moment) does not leave ``result()`` or
    ``progress()`` waiting: they read the job again after a while without one. Here
    each job is made final by hand once its waiter has read it, with no message."""
    tr = make_runner()

    @tr.task
    async def never_run() -> int:
        raise NotImplementedError

    async with tr:
        first, second = await never_run.enqueue(), await never_run.enqueue()
        keys = [QueueKeys(namespace, "default").job(job.id) for job in (first, second)]
        results: list[int] = []
        progress: list[object] = []

        async def wait_result() -> None:
            results.append(await first.result())

        async def follow() -> None:
            progress.extend([value async for value in second.progress()])

        async def both_watched() -> bool:
            return all([await redis.hget(key, "watch") == "1" for key in keys])

        with anyio.fail_after(DEADLINE):
            async with anyio.create_task_group() as tg:
                tg.start_soon(wait_result)
                tg.start_soon(follow)
                await wait_until(both_watched, DEADLINE)  # each read its job once: queued
                final: dict[FieldT, EncodableT] = {"status": "succeeded", "result": "7"}
                final["progress"] = '"done"'
                for key in keys:
                    await redis.hset(key, mapping=final)
        assert results == [7]
        assert progress == ["done"]


@ALL
async def test_abort_cancels_a_running_job(make_runner: MakeRunner) -> None:
    tr = make_runner()
    started = anyio.Event()
    cancelled = anyio.Event()

    @tr.task
    async def forever() -> None:
        started.set()
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.set()

    async with tr, background_worker(tr):
        job = await forever.enqueue()
        # Started, not just claimed ("running" is set at claim): an abort of a claimed
        # job no consumer has started yet aborts it unrun, and nothing is cancelled.
        with anyio.fail_after(DEADLINE):
            await started.wait()
        assert await job.abort() == JobStatus.RUNNING
        with pytest.raises(JobAborted):
            await job.result(timeout=DEADLINE)
        assert cancelled.is_set()
        assert await job.status() == JobStatus.ABORTED


async def test_current_job_inside_a_task_and_outside(make_runner: MakeRunner) -> None:
    tr = make_runner()

    @tr.task(queue="inner")
    async def who() -> list[str]:
        ctx = current_job()
        return [ctx.id, ctx.task, str(ctx.attempt), ctx.queue]

    with pytest.raises(RuntimeError, match="outside"):
        current_job()
    async with tr, background_worker(tr):
        job = await who.enqueue()
        assert await job.result(timeout=DEADLINE) == [job.id, who.name, "1", "inner"]
    with pytest.raises(RuntimeError):
        current_job()


@ALL
async def test_results_expire_after_result_ttl(make_runner: MakeRunner, redis: Redis) -> None:
    tr = make_runner(result_ttl=timedelta(seconds=40))

    @tr.task(max_retries=0)
    async def echo(fail: bool) -> bool:
        if fail:
            raise RuntimeError("no")
        return fail

    async with tr:
        async with background_worker(tr):
            ok = await echo.enqueue(False)
            bad = await echo.enqueue(True)
            assert await ok.result(timeout=DEADLINE) is False
            with pytest.raises(JobFailed):
                await bad.result(timeout=DEADLINE)
            pending = await echo.options(delay=60).enqueue(False)
        for job in (ok, bad):
            key = (await tr.client.locate("default", job.id)).job(job.id)
            assert 30_000 < await redis.pttl(key) <= 40_000
        key = (await tr.client.locate("default", pending.id)).job(pending.id)
        assert await redis.pttl(key) == -1  # unfinished jobs never expire


@ALL
async def test_expired_result_is_gone(make_runner: MakeRunner) -> None:
    tr = make_runner(result_ttl=0.3)

    @tr.task
    async def one() -> int:
        return 1

    async with tr, background_worker(tr):
        job = await one.enqueue()
        assert await job.result(timeout=DEADLINE) == 1

        async def gone() -> bool:
            try:
                await job.status()
            except JobNotFound:
                return True
            return False

        await wait_until(gone, DEADLINE)


# -- retries ------------------------------------------------------------------------------


@ALL
async def test_retried_job_keeps_its_id_and_counts_attempts(make_runner: MakeRunner) -> None:
    tr = make_runner()
    seen: list[tuple[str, int]] = []

    @tr.task(max_retries=3)
    async def flaky() -> int:
        ctx = current_job()
        seen.append((ctx.id, ctx.attempt))
        if ctx.attempt < 3:
            raise ConnectionError(f"try {ctx.attempt}")
        return ctx.attempt

    async with tr, background_worker(tr):
        job = await flaky.enqueue()
        assert await job.result(timeout=DEADLINE) == 3
        info = await job.info()
    assert seen == [(job.id, 1), (job.id, 2), (job.id, 3)]
    assert info.attempts == 3
    assert info.status == JobStatus.SUCCEEDED


@ALL
async def test_retries_exhausted_fail_with_the_last_error(make_runner: MakeRunner) -> None:
    tr = make_runner(max_retries=2)
    attempts: list[int] = []

    @tr.task
    async def always() -> None:
        attempts.append(current_job().attempt)
        raise KeyError(f"attempt {current_job().attempt}")

    async with tr, background_worker(tr):
        job = await always.enqueue()
        with pytest.raises(JobFailed) as failure:
            await job.result(timeout=DEADLINE)
        assert (await job.info()).attempts == 3
    assert attempts == [1, 2, 3]
    assert failure.value.exc_type == "KeyError"
    assert "attempt 3" in failure.value.exc_message


@ALL
async def test_max_retries_zero_disables_retries(make_runner: MakeRunner) -> None:
    tr = make_runner()
    runs = Counter[str]()

    @tr.task(max_retries=0)
    async def once() -> None:
        runs["once"] += 1
        raise RuntimeError("boom")

    async with tr, background_worker(tr):
        job = await once.enqueue()
        with pytest.raises(JobFailed):
            await job.result(timeout=DEADLINE)
        assert (await job.info()).attempts == 1
    assert runs["once"] == 1


@ALL
async def test_raise_retry_with_delay_waits_at_least_that_long(make_runner: MakeRunner) -> None:
    tr = make_runner()
    started: list[float] = []

    @tr.task(retry_delay=60)  # the backoff would be a minute: Retry(delay) overrides it
    async def later() -> int:
        started.append(time.time())
        if current_job().attempt == 1:
            raise Retry(delay=timedelta(seconds=0.4))
        return current_job().attempt

    async with tr, background_worker(tr):
        job = await later.enqueue()
        await wait_until(lambda: status_is(tr, job.id, "scheduled"), DEADLINE)
        info = await job.info()
        assert info.error is not None
        assert info.error.type == "taskrunner.exceptions.Retry"
        assert await job.result(timeout=DEADLINE) == 2
    assert started[1] - started[0] >= 0.4


def test_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    mw = RetryMiddleware(retry_delay=1.0, max_delay=10.0)
    opts = RetryOptions()
    for attempt in range(1, 8):
        full = min(10.0, 2.0 ** (attempt - 1))
        samples = [mw.backoff(attempt, opts) for _ in range(200)]
        assert all(full / 2 <= s <= full for s in samples)
        assert len(set(samples)) > 1  # jittered
    assert RetryMiddleware(retry_delay=1.0).backoff(1, RetryOptions(retry_delay=0.1)) <= 0.1


@ALL
async def test_backoff_between_attempts_grows(make_runner: MakeRunner) -> None:
    tr = make_runner()
    dues: list[float] = []
    failed_at: list[float] = []

    @tr.task(max_retries=3, retry_delay=0.1)
    async def failing() -> None:
        failed_at.append(time.time())
        raise RuntimeError("again")

    async with tr, background_worker(tr):
        job = await failing.enqueue()

        async def next_retry_scheduled() -> bool:
            info = await job.info()
            if info.status == JobStatus.SCHEDULED and info.due_at is not None:
                due = info.due_at.timestamp()
                if not dues or dues[-1] != due:
                    dues.append(due)
            return info.status == JobStatus.FAILED

        await wait_until(next_retry_scheduled, DEADLINE, interval=0.005)
    assert len(failed_at) == 4
    # Each retry is scheduled at least base * 2**(n-1) / 2 after the failure, and the
    # gaps between attempts grow: 0.05-0.1, 0.1-0.2, 0.2-0.4 seconds.
    gaps = [b - a for a, b in itertools.pairwise(failed_at)]
    for n, gap in enumerate(gaps, start=1):
        assert gap >= 0.1 * 2 ** (n - 1) / 2
    assert gaps[2] > gaps[0]


# -- timeouts ----------------------------------------------------------------------------


@ALL
async def test_timeout_cancels_and_counts_as_a_failed_attempt_then_retries(
    make_runner: MakeRunner,
) -> None:
    tr = make_runner()
    cancelled: list[int] = []

    @tr.task(timeout=0.3, max_retries=1)
    async def slow_once() -> int:
        attempt = current_job().attempt
        if attempt == 1:
            try:
                await anyio.sleep(60)
            except anyio.get_cancelled_exc_class():
                cancelled.append(attempt)
                raise
        return attempt

    async with tr, background_worker(tr):
        job = await slow_once.enqueue()
        assert await job.result(timeout=DEADLINE) == 2
        assert (await job.info()).attempts == 2
    assert cancelled == [1]


@ALL
async def test_timeout_without_retries_fails_the_job(make_runner: MakeRunner) -> None:
    tr = make_runner(timeout=0.2)  # the runner's default timeout

    @tr.task(max_retries=0)
    async def slow() -> None:
        await anyio.sleep(60)

    async with tr, background_worker(tr):
        job = await slow.enqueue()
        started = time.monotonic()
        with pytest.raises(JobFailed) as failure:
            await job.result(timeout=DEADLINE)
    assert time.monotonic() - started < DEADLINE
    assert failure.value.exc_type == "taskrunner.exceptions.TaskTimeout"
    assert "0.2" in failure.value.exc_message


@pytest.mark.parametrize("cleanup", ["returns", "raises"])
async def test_a_timeout_the_task_swallows_still_fails_the_attempt_with_task_timeout(
    make_runner: MakeRunner, cleanup: str
) -> None:
    # The task catches its cancellation and returns a value, or raises an error of its
    # own: the attempt still failed by its timeout (the value is not its result).
    tr = make_runner()
    cleaned: list[int] = []

    @tr.task(timeout=0.2, max_retries=0)
    async def swallow() -> str:
        try:
            await anyio.sleep(60)
        except anyio.get_cancelled_exc_class():
            cleaned.append(current_job().attempt)
            if cleanup == "raises":
                raise ValueError("cleanup failed") from None
            return "cleaned up"
        return "done"

    async with tr, background_worker(tr):
        job = await swallow.enqueue()
        with pytest.raises(JobFailed) as failure:
            await job.result(timeout=DEADLINE)
        assert failure.value.exc_type == "taskrunner.exceptions.TaskTimeout"
        assert (await job.info()).attempts == 1
    assert cleaned == [1]


async def test_a_swallowed_timeout_is_retried_under_the_retry_policy(
    make_runner: MakeRunner,
) -> None:
    tr = make_runner(retry_delay=0.01)
    cleaned: list[int] = []

    @tr.task(timeout=0.2, max_retries=1)
    async def swallow_once() -> int:
        attempt = current_job().attempt
        if attempt == 1:
            try:
                await anyio.sleep(60)
            except anyio.get_cancelled_exc_class():
                cleaned.append(attempt)
                return 0  # swallowed: not the job's result
        return attempt

    async with tr, background_worker(tr):
        job = await swallow_once.enqueue()
        assert await job.result(timeout=DEADLINE) == 2
        assert (await job.info()).attempts == 2
    assert cleaned == [1]


async def test_a_task_that_could_swallow_its_timeout_and_returns_in_time_succeeds(
    make_runner: MakeRunner,
) -> None:
    tr = make_runner()

    @tr.task(timeout=DEADLINE)
    async def prompt() -> str:
        try:
            await anyio.lowlevel.checkpoint()
        except anyio.get_cancelled_exc_class():
            return "cleaned up"
        return "done"

    async with tr, background_worker(tr):
        job = await prompt.enqueue()
        assert await job.result(timeout=DEADLINE) == "done"
        assert await job.status() == JobStatus.SUCCEEDED


# -- delayed jobs --------------------------------------------------------------------------


@ALL
async def test_delayed_jobs_never_run_early(
    make_runner: MakeRunner,
) -> None:
    tr = make_runner()

    @tr.task
    async def timed(due: float) -> float:
        return time.time() - due

    async with tr, background_worker(tr):
        now = datetime.now(UTC)
        jobs = []
        for i in range(12):
            at = now + timedelta(seconds=0.3 + 0.1 * i)
            jobs.append(await timed.options(at=at).enqueue(at.timestamp()))
        jobs.append(await timed.options(delay=0.5).enqueue(time.time() + 0.5))
        lateness = [await job.result(timeout=DEADLINE) for job in jobs]
    # never early; how late is a matter of speed (benchmarks/cron_cost.py measures the
    # lateness of due jobs), not of correctness, so no upper bound is asserted here
    assert all(late >= 0 for late in lateness), lateness


@ALL
async def test_two_racing_workers_never_run_a_delayed_job_twice(
    make_runner: MakeRunner,
) -> None:
    runs = Counter[str]()

    def app() -> tuple[TaskRunner, Task[[int], int]]:
        tr = make_runner()

        @tr.task(name="count")
        async def count(n: int) -> int:
            runs[current_job().id] += 1
            await anyio.lowlevel.checkpoint()
            return n

        return tr, count

    (producer, count), (tr_a, _), (tr_b, _) = app(), app(), app()
    async with producer, background_worker(tr_a), background_worker(tr_b):
        base = time.time() + 0.3
        calls = [
            count.options(at=datetime.fromtimestamp(base + (i % 20) * 0.02, UTC)).call(i)
            for i in range(400)
        ]
        jobs = await count.enqueue_many(calls)
        results = [await job.result(timeout=DEADLINE) for job in jobs]
    assert results == list(range(400))
    assert set(runs) == {job.id for job in jobs}
    assert set(runs.values()) == {1}


# -- the pool --------------------------------------------------------------------------------


@ALL
async def test_worker_reads_only_as_many_entries_as_free_slots(
    make_runner: MakeRunner, redis: Redis
) -> None:
    tr = make_runner()
    gate = anyio.Event()
    running = 0
    peak = 0

    @tr.task
    async def held() -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await gate.wait()
        running -= 1

    async with tr:
        jobs = await held.enqueue_many([held.call() for _ in range(10)])
        async with background_worker(tr, concurrency=3):

            async def three_running() -> bool:
                return running == 3

            await wait_until(three_running, DEADLINE)
            # The other seven were never delivered (on any partition).
            assert await pending_count(tr, redis) == 3
            gate.set()
            for job in jobs:
                await job.result(timeout=DEADLINE)
    assert peak == 3


@ALL
async def test_burst_worker_drains_and_returns(make_runner: MakeRunner) -> None:
    tr = make_runner()

    @tr.task
    async def double(x: int) -> int:
        await anyio.sleep(0.01)
        return 2 * x

    async with tr:
        jobs = await double.enqueue_many([double.call(i) for i in range(50)])
        soon = await double.options(delay=0.3).enqueue(100)
        later = await double.options(delay=3600).enqueue(7)
        await wait_until(lambda: status_is(tr, soon.id, "scheduled"), DEADLINE)
        with anyio.fail_after(DEADLINE):
            await tr.worker(burst=True, handle_signals=False).run()
        assert [await job.result(timeout=1) for job in jobs] == [2 * i for i in range(50)]
        assert await later.status() == JobStatus.SCHEDULED  # not due: not waited for


# -- graceful shutdown -------------------------------------------------------------------------


@ALL
async def test_graceful_shutdown_finishes_running_jobs_and_hands_back_the_rest(
    make_runner: MakeRunner, redis: Redis
) -> None:
    tr = make_runner(stale_after=60.0, heartbeat_interval=5.0)
    finish_quick = anyio.Event()
    quick_started, stuck_started = anyio.Event(), anyio.Event()
    stuck_runs: list[int] = []

    @tr.task
    async def quick() -> str:
        quick_started.set()
        await finish_quick.wait()
        return "finished"

    @tr.task
    async def stuck() -> int:
        stuck_started.set()
        stuck_runs.append(current_job().attempt)
        if len(stuck_runs) == 1:
            await anyio.sleep_forever()
        return current_job().attempt

    async with tr:
        q = await quick.enqueue()
        s = await stuck.enqueue()
        # Two slots, both busy: the reader waits for a free slot, not in XREADGROUP.
        worker = tr.worker(handle_signals=False, grace_period=1.0, concurrency=2)
        async with worker:
            # Both started, not just claimed ("running" is set at claim): a stop hands
            # a claimed job no consumer has started back at once, unrun.
            with anyio.fail_after(DEADLINE):
                await quick_started.wait()
                await stuck_started.wait()
            worker.stop()
            unread = await quick.enqueue()  # the stopping worker reads nothing more
            finish_quick.set()  # finishes inside the grace period
        assert await q.result(timeout=1) == "finished"
        assert await unread.status() == JobStatus.QUEUED
        info = await s.info()
        assert info.status == JobStatus.QUEUED  # handed back at once, not left to go stale
        assert info.attempts == 0  # the interrupted attempt is not counted
        assert await pending_count(tr, redis) == 0

        started = time.monotonic()
        async with background_worker(tr):
            assert await s.result(timeout=DEADLINE) == 1
            assert await unread.result(timeout=DEADLINE) == "finished"
        assert time.monotonic() - started < 60.0  # long before stale_after
        assert (await s.info()).attempts == 1
    assert stuck_runs == [1, 1]


async def test_a_job_that_swallows_its_cancellation_at_shutdown_is_handed_back(
    make_runner: MakeRunner,
) -> None:
    # Cancelled at the end of the grace period, the task catches it and returns: the
    # interrupted attempt is handed back (not counted), not recorded as succeeded.
    tr = make_runner()
    started = anyio.Event()
    runs: list[str] = []

    @tr.task
    async def swallow() -> str:
        if not runs:
            runs.append("cancelled")
            started.set()
            try:
                await anyio.sleep_forever()
            except anyio.get_cancelled_exc_class():
                return "cleaned up"
        runs.append("done")
        return "done"

    async with tr:
        job = await swallow.enqueue()
        async with tr.worker(handle_signals=False, grace_period=0.1) as worker:
            await started.wait()
            worker.stop()
        info = await job.info()
        assert (info.status, info.attempts) == (JobStatus.QUEUED, 0)
        async with background_worker(tr):
            assert await job.result(timeout=DEADLINE) == "done"
        assert (await job.info()).attempts == 1
    assert runs == ["cancelled", "done"]


@ALL
async def test_stop_during_a_read_strands_no_entry_and_is_prompt(
    make_runner: MakeRunner, redis: Redis
) -> None:
    tr = make_runner(socket_timeout=60.0)

    @tr.task
    async def echo(x: int) -> int:
        return x

    racing_jobs = []
    async with tr:
        for round_ in range(5):
            worker = tr.worker(handle_signals=False, concurrency=4)
            async with worker:
                warm = await echo.enqueue(round_)
                assert await warm.result(timeout=DEADLINE) == round_
                worker.stop()
                racing = await echo.enqueue(100 + round_)  # may land in the read in flight
                stopped = time.monotonic()
            assert time.monotonic() - stopped < 4.0  # an idle reader stops at once
            assert await pending_count(tr, redis) == 0
            assert await racing.status() in (JobStatus.QUEUED, JobStatus.SUCCEEDED)
            racing_jobs.append(racing)
        async with background_worker(tr):
            results = [await job.result(timeout=DEADLINE) for job in racing_jobs]
    assert results == [100, 101, 102, 103, 104]


@ALL
async def test_worker_validates_arguments_again_and_dead_letters_a_bad_payload(
    make_runner: MakeRunner, redis: Redis
) -> None:
    tr = make_runner()
    ran: list[int] = []

    @tr.task
    async def add(x: int, y: int) -> int:
        ran.append(x)
        return x + y

    async with tr, background_worker(tr):
        # Written behind enqueue's back (another producer, an old version of the task),
        # in the id's home partition, announced as the runner would (PUBLISH or SPUBLISH).
        keys = (await tr.client.resolve("default")).for_id("tampered")
        bad = scripts.enqueue(
            tr.client.env, keys, "tampered", add.name, '{"x": "nope", "y": 1}', "default", 0
        )
        await scripts.run(redis, bad)
        good = await add.enqueue(1, 2)
        assert await good.result(timeout=DEADLINE) == 3
        with pytest.raises(JobDeadLettered, match="undecodable arguments"):
            await tr.job("tampered").result(timeout=DEADLINE)
    assert ran == [1]


@ALL
async def test_handle_by_id_rebuilds_the_result_into_the_task_return_type(
    make_runner: MakeRunner,
) -> None:
    tr = make_runner()

    @tr.task
    async def make_order() -> Order:
        return Order(
            id=uuid.UUID(int=7),
            placed=datetime(2024, 1, 1, tzinfo=UTC),
            total=Decimal("1.5"),
            kind=Kind.A,
            lines=[],
        )

    async with tr, background_worker(tr):
        job = await make_order.enqueue()
        await job.result(timeout=DEADLINE)
        by_id = await tr.job(job.id).result(timeout=DEADLINE)
    assert isinstance(by_id, Order)
    assert by_id.total == Decimal("1.5")
    assert by_id.kind is Kind.A
