"""Rate and concurrency limits: options refused at declaration, the rate window on a
frozen clock, wake-ups when a slot frees, slots given back on every outcome and renewed
while a long job runs, and how limits meet unique locks and aborts.

These run an in-process worker on the session's redis-server; three worker processes
are in tests/test_limits_processes.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from conftest import wait_until

from taskrunner import (
    ConfigurationError,
    ExecutionContext,
    Job,
    JobAborted,
    JobFailed,
    JobStatus,
    Middleware,
    Outcome,
    TaskRunner,
    UnknownOptionError,
    current_job,
)
from taskrunner import scripts as lua
from taskrunner.keys import LimitKeys
from taskrunner.middleware.base import ExecuteNext
from taskrunner.middleware.limits import LimitOptions, Rate, limit_digest
from taskrunner.testing import frozen_time

MakeRunner = Callable[..., TaskRunner]
DEADLINE = 30.0


async def holders(tr: TaskRunner, task: str, values: dict[str, Any] | None = None) -> int:
    keys = LimitKeys(tr.namespace, limit_digest(task, values or {}))
    return int(await tr.client.redis.zcard(keys.running))


# -- declaring limits --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "count", "period_ms"),
    [
        ("100/m", 100, 60_000),
        ("5/s", 5, 1_000),
        ("1/h", 1, 3_600_000),
        ("10/30s", 10, 30_000),
        (" 3 / 2m ", 3, 120_000),
        ("100000/s", 100_000, 1_000),
    ],
)
def test_a_rate_is_a_count_per_period(text: str, count: int, period_ms: int) -> None:
    assert Rate.parse(text) == Rate(count, period_ms)


async def send(order: int, account_id: str = "main") -> None: ...


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"rate_limit": "fast"}, "invalid option rate_limit='fast': it must be a count, '/'"),
        ({"rate_limit": "0/m"}, "invalid option rate_limit='0/m': its count must be from 1"),
        ({"rate_limit": "10/0s"}, "rate_limit='10/0s': its period must be at least 1 s"),
        ({"rate_limit": "100/d"}, "invalid option rate_limit='100/d'"),
        ({"rate_limit": "100001/s"}, "its count must be from 1 to 100,000"),
        # every check then failed in Redis and the job was rescheduled forever
        ({"rate_limit": "1/99999999999h"}, "its period must be at most 3153600000 seconds"),
        ({"rate_limit": 100}, "invalid option rate_limit=100"),
        ({"concurrency_limit": 0}, "invalid option concurrency_limit=0: it must be 1 or more"),
        ({"concurrency_limit": True}, "invalid option concurrency_limit=True"),
        ({"concurrency_limit": "2"}, "invalid option concurrency_limit='2'"),
        (
            {"concurrency_limit": 1, "limit_args": ["acount_id"]},
            "invalid option limit_args=['acount_id']: the function has no parameter "
            "'acount_id' (its parameters: order, account_id)",
        ),
        ({"rate_limit": "1/s", "limit_args": "account_id"}, "limit_args='account_id'"),
        ({"rate_limit": "1/s", "limit_args": []}, "it must name at least one parameter"),
        ({"rate_limit": "1/s", "limit_args": ["order", "order"]}, "names a parameter twice"),
        ({"limit_args": ["order"]}, "limit_args only applies with a limit"),
    ],
)
def test_a_bad_limit_is_refused_at_declaration_in_one_sentence(
    options: dict[str, Any], expected: str
) -> None:
    tr = TaskRunner("redis://127.0.0.1:1/0")
    with pytest.raises(ConfigurationError) as caught:
        tr.task(**options)(send)
    message = str(caught.value)
    assert message.startswith("task 'send': "), message
    assert "\n" not in message
    assert expected in message, message
    assert tr.registry == {}


def test_limit_options_are_typed_keywords_owned_by_the_limits_middleware() -> None:
    tr = TaskRunner("redis://127.0.0.1:1/0")
    task = tr.task(concurrency_limit=3, rate_limit="10/s", limit_args=["account_id"])(send)
    opts = task.definition.options_for(LimitOptions)
    assert (opts.concurrency_limit, opts.rate, opts.limit_args) == (
        3,
        Rate(10, 1000),
        ["account_id"],
    )
    assert tr.limits.applies_to(task.definition)
    plain = tr.task(name="plain")(send)
    assert not tr.limits.applies_to(plain.definition)  # no layer, no cost
    with pytest.raises(UnknownOptionError, match="did you mean 'rate_limit'"):
        tr.task(name="typo", rate_limt="1/s")(send)  # type: ignore[call-overload]


def test_a_limit_is_per_task_and_per_value_of_its_arguments() -> None:
    assert limit_digest("send", {}) != limit_digest("other", {})
    assert limit_digest("send", {"a": 1, "b": 2}) == limit_digest("send", {"b": 2, "a": 1})
    assert limit_digest("send", {"a": 1}) != limit_digest("send", {"a": 2})
    keys = LimitKeys("ns", limit_digest("send", {}))
    assert keys.running.startswith("ns:limit:{")
    assert keys.running.endswith("}:running")


# -- rate window and wake-ups ------------------------------------------------------------


async def test_a_job_over_the_rate_waits_for_the_window_end_in_the_delayed_set(
    make_runner: MakeRunner,
) -> None:
    tr = make_runner()

    @tr.task(name="paced", rate_limit="2/m", max_retries=0)
    async def paced(i: int) -> int:
        return i

    async with tr, frozen_time(tr) as clock, tr.worker(concurrency=5):
        start = clock.now()
        jobs = await tr.enqueue_many([paced.call(i) for i in range(3)])

        async def two_ran_one_waits() -> bool:
            infos = [await job.info() for job in jobs]
            statuses = sorted(info.status for info in infos)
            return statuses == ["scheduled", "succeeded", "succeeded"] and all(
                info.reschedules == 1 for info in infos if info.status == "scheduled"
            )

        await wait_until(two_ran_one_waits, DEADLINE)
        [late] = [job for job in jobs if await job.status() == JobStatus.SCHEDULED]
        info = await late.info()
        assert info.attempts == 0  # a reschedule is not an attempt
        assert info.due_at is not None
        # due when the window's oldest start leaves it, plus at most 1 s of jitter
        assert start + 60 <= info.due_at.timestamp() <= start + 61
        await clock.advance(30)
        assert await late.status() == JobStatus.SCHEDULED
        await clock.advance(31)
        assert await late.result(timeout=DEADLINE) in range(3)
        final = await late.info()
    assert final.attempts == 1
    assert final.error is None


async def test_waiting_jobs_are_woken_when_a_slot_frees_not_at_their_lease_bound(
    make_runner: MakeRunner,
) -> None:
    # stale_after=30: a waiter's own fallback check comes after up to 33 s.
    tr = make_runner(stale_after=30)
    running: list[int] = []
    peak: list[int] = [0]

    @tr.task(name="one_at_a_time", concurrency_limit=1, max_retries=0)
    async def one_at_a_time(i: int) -> int:
        running.append(i)
        peak[0] = max(peak[0], len(running))
        await anyio.sleep(0.02)
        running.remove(i)
        return i

    async with tr, tr.worker(concurrency=10):
        jobs = await tr.enqueue_many([one_at_a_time.call(i) for i in range(20)])
        with anyio.fail_after(15):  # without wake-ups the refused jobs wait ~30 s
            assert sorted([await job.result() for job in jobs]) == list(range(20))
        infos = [await job.info() for job in jobs]
        assert await holders(tr, "one_at_a_time") == 0
    assert peak[0] == 1
    assert sum(i.reschedules for i in infos) > 0
    assert all(i.attempts == 1 for i in infos)


class RefuseFirst(Middleware):
    """Refuses the first check of each job for an hour, once the test lets it answer."""

    def __init__(self) -> None:
        self.answered: set[str] = set()
        self.checking = anyio.Event()
        self.answer = anyio.Event()

    async def execute(self, ctx: ExecutionContext, call_next: ExecuteNext) -> Outcome:
        if ctx.job.id in self.answered:
            return await call_next(ctx)
        self.answered.add(ctx.job.id)
        self.checking.set()
        await self.answer.wait()
        return Outcome.reschedule(time.time() + 3600)


async def test_a_wake_up_that_arrives_while_the_refusal_commits_is_kept(
    make_runner: MakeRunner,
) -> None:
    refuse = RefuseFirst()
    tr = make_runner(middleware=[refuse])

    @tr.task
    async def waits() -> str:
        return "ran"

    async with tr, tr.worker():
        job = await waits.enqueue()
        await refuse.checking.wait()  # the attempt runs; its refusal is not committed
        keys = await tr.client.locate(job.queue, job.id)
        assert await lua.run(tr.client.redis, lua.hasten(tr.client.env, keys, job.id)) == 1
        refuse.answer.set()  # the reschedule (an hour) is committed now: due at once
        assert await job.result(timeout=DEADLINE) == "ran"
        info = await job.info()
    assert info.reschedules == 1
    assert info.attempts == 1


async def waits(job: Job[Any]) -> bool:
    """The job was refused by its limit and waits in the delayed set."""
    info = await job.info()
    return info.reschedules >= 1 and info.status == JobStatus.SCHEDULED


async def test_an_aborted_waiter_passes_its_wake_up_to_the_next(
    make_runner: MakeRunner,
) -> None:
    tr = make_runner(stale_after=30)
    gate = anyio.Event()
    holding = anyio.Event()

    @tr.task(name="gated", concurrency_limit=1, max_retries=0)
    async def gated(i: int) -> int:
        if i == 0:
            holding.set()
            await gate.wait()
        return i

    async with tr, tr.worker(concurrency=5):
        first = await gated.enqueue(0)
        # Started, holding the slot; not just claimed ("running" is set at claim, the
        # slot taken only when the attempt starts).
        with anyio.fail_after(DEADLINE):
            await holding.wait()
        second = await gated.enqueue(1)
        await wait_until(lambda: waits(second), DEADLINE)
        third = await gated.enqueue(2)  # a waiter after the second: woken after it
        await wait_until(lambda: waits(third), DEADLINE)
        assert await second.abort() == JobStatus.ABORTED
        gate.set()
        with anyio.fail_after(15):  # the third is woken, not left to its ~30 s bound
            assert await first.result() == 0
            assert await third.result() == 2
        with pytest.raises(JobAborted):
            await second.result(timeout=1)


# -- slots: given back on every outcome, renewed while held ------------------------------


async def test_a_slot_is_given_back_whatever_the_outcome(make_runner: MakeRunner) -> None:
    tr = make_runner()
    started = anyio.Event()

    @tr.task(name="fails", concurrency_limit=1, max_retries=0)
    async def fails() -> None:
        raise ValueError("no")

    @tr.task(name="too_slow", concurrency_limit=1, max_retries=0, timeout=0.05)
    async def too_slow() -> None:
        await anyio.sleep(10)

    @tr.task(name="aborted", concurrency_limit=1, max_retries=0)
    async def aborted() -> None:
        started.set()
        await anyio.sleep(10)

    @tr.task(name="retried", concurrency_limit=1, max_retries=1)
    async def retried() -> int:
        if current_job().attempt == 1:
            raise ValueError("once")
        return current_job().attempt

    async with tr, tr.worker():
        with pytest.raises(JobFailed):
            await (await fails.enqueue()).result(timeout=DEADLINE)
        with pytest.raises(JobFailed, match="TaskTimeout"):
            await (await too_slow.enqueue()).result(timeout=DEADLINE)
        job = await aborted.enqueue()
        await started.wait()
        assert await holders(tr, "aborted") == 1
        await job.abort()
        with pytest.raises(JobAborted):
            await job.result(timeout=DEADLINE)
        assert await (await retried.enqueue()).result(timeout=DEADLINE) == 2
        for name in ("fails", "too_slow", "aborted", "retried"):
            assert await holders(tr, name) == 0, name


async def test_a_long_job_keeps_its_slot_past_stale_after(make_runner: MakeRunner) -> None:
    tr = make_runner(stale_after=1.0, heartbeat_interval=0.2)
    spans: dict[int, tuple[float, float]] = {}

    @tr.task(name="long", concurrency_limit=1, max_retries=0)
    async def long(i: int, seconds: float) -> int:
        begun = time.monotonic()
        await anyio.sleep(seconds)
        spans[i] = (begun, time.monotonic())
        return i

    async with tr, tr.worker():
        first = await long.enqueue(1, 3.5)  # 3.5 x stale_after: renewed, not expired

        async def holds() -> bool:
            return await holders(tr, "long") == 1

        await wait_until(holds, DEADLINE)
        second = await long.enqueue(2, 0.0)
        assert await first.result(timeout=DEADLINE) == 1
        assert await second.result(timeout=DEADLINE) == 2
    assert spans[2][0] >= spans[1][1]  # the second started after the first had ended


async def test_a_job_waiting_for_a_slot_still_holds_its_until_executing_lock(
    make_runner: MakeRunner,
) -> None:
    tr = make_runner(stale_after=30)
    gate = anyio.Event()
    holding = anyio.Event()

    @tr.task(name="report", concurrency_limit=1, lock="until_executing", max_retries=0)
    async def report(account: str) -> str:
        if account == "first":
            holding.set()
            await gate.wait()
        return account

    async with tr, tr.worker():
        first = await report.enqueue("first")
        # Started, holding the slot; not just claimed (see above).
        with anyio.fail_after(DEADLINE):
            await holding.wait()
        waiting = await report.enqueue("second")

        async def refused() -> bool:
            return (await waiting.info()).reschedules >= 1

        await wait_until(refused, DEADLINE)
        duplicate = await report.enqueue("second")  # the first "second" has not started
        assert duplicate.deduplicated
        assert duplicate.id == waiting.id
        gate.set()
        assert await waiting.result(timeout=DEADLINE) == "second"
        assert await first.result(timeout=DEADLINE) == "first"


async def test_keyed_limits_use_the_stored_arguments_with_defaults(
    make_runner: MakeRunner,
) -> None:
    tr = make_runner()
    seen: list[str] = []

    @tr.task(name="charge", concurrency_limit=1, limit_args=["account_id"])
    async def charge(order: int, account_id: str = "main") -> int:
        seen.append(account_id)
        assert await holders(tr, "charge", {"account_id": account_id}) == 1
        return order

    async with tr, tr.worker():
        assert await (await charge.enqueue(1)).result(timeout=DEADLINE) == 1
        assert await (await charge.enqueue(2, account_id="x")).result(timeout=DEADLINE) == 2
        assert await holders(tr, "charge", {"account_id": "main"}) == 0
    assert seen == ["main", "x"]


async def test_keyed_limits_key_a_set_by_its_items_whatever_order_it_was_stored_in(
    make_runner: MakeRunner,
) -> None:
    """A set is stored in the order of the process that enqueued it (string hashes differ
    from process to process): two producers' jobs for the same set share one limit."""
    tr = make_runner()
    tenants = frozenset({"alpha", "beta", "gamma", "delta"})
    release = anyio.Event()
    started: list[int] = []

    @tr.task(name="sync", concurrency_limit=1, limit_args=["tenants"])
    async def sync(tenants: frozenset[str], run: int) -> int:
        started.append(run)
        if len(started) == 1:  # the first to start holds the slot until released
            await release.wait()
        return run

    async with tr:
        jobs = [await sync.enqueue(tenants, run) for run in (1, 2)]
        orders = (sorted(tenants), sorted(tenants, reverse=True))
        for run, (job, order) in enumerate(zip(jobs, orders, strict=True), start=1):
            keys = await tr.client.locate(job.queue, job.id)  # as another producer wrote it
            payload = json.dumps({"tenants": order, "run": run}, separators=(",", ":"))
            await tr.client.redis.hset(keys.job(job.id), "args", payload)

        async def both_checked() -> bool:
            if not started:
                return False
            other = jobs[2 - started[0]]  # the job that did not start first
            return len(started) == 2 or (await other.info()).reschedules > 0

        async with tr.worker(concurrency=4):
            await wait_until(both_checked)
            assert len(started) == 1  # the other waits for the slot the first holds
            release.set()
            assert [await job.result(timeout=DEADLINE) for job in jobs] == [1, 2]
