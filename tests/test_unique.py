"""Unique jobs: the lock x on_conflict x outcome matrix, TTLs, concurrency, atomicity.

Workers that must die run in real subprocesses (tests/apps/unique_app.py) and are
SIGKILLed; everything else runs an in-process worker. Tests with Redis in them run on
standalone, Cluster and Sentinel (``ALL``).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from apps.unique_app import Settings, build, events_key, gate_key
from conftest import subprocess_env, wait_until
from pydantic import BaseModel
from redis.asyncio import Redis
from topology import Topology

from taskrunner import (
    ConfigurationError,
    EnqueueContext,
    Job,
    JobAborted,
    JobFailed,
    JobRejected,
    JobStatus,
    LockConflictError,
    Middleware,
    Task,
    TaskRunner,
    current_job,
    scripts,
)
from taskrunner.middleware.base import EnqueueNext
from taskrunner.middleware.unique import ALLOWED_STRATEGIES

DEADLINE = 30.0
ALL_COMBINATIONS = [
    (lock, s) for lock, strategies in ALLOWED_STRATEGIES.items() for s in strategies
]
OUTCOMES = ("success", "retry", "failure", "abort", "sigkill")
MATRIX = [
    pytest.param(lock, strategy, outcome, id=f"{lock}-{strategy}-{outcome}")
    for lock, strategy in ALL_COMBINATIONS
    for outcome in OUTCOMES
]

MakeRunner = Callable[..., TaskRunner]
ALL = pytest.mark.topologies("standalone", "cluster", "sentinel")
"""Every test with Redis in it runs on each topology (a unique job's lock and the job
share the lock's partition: one slot on a Cluster); declaration checks run once."""


# -- helpers ------------------------------------------------------------------------------


HOUSEKEEPING = (":workers", ":meta", ":idle", ":reclaim")
"""Keys workers write on their own schedule (presence, partition counts, drained marks,
reclaim turns): they say nothing about jobs or locks."""


async def namespace_keys(redis: Redis, namespace: str) -> set[str]:
    """Every key of the namespace but the workers' housekeeping keys."""
    return {
        key
        async for key in redis.scan_iter(match=f"{namespace}:*")
        if not key.endswith(HOUSEKEEPING)
    }


async def job_keys(redis: Redis, namespace: str) -> set[str]:
    return {key async for key in redis.scan_iter(match=f"{namespace}:*:job:*", count=1000)}


async def events(redis: Redis, namespace: str) -> list[str]:
    found = await redis.lrange(events_key(namespace), 0, -1)
    return [str(item) for item in found]


async def has_started(redis: Redis, namespace: str, job_id: str, attempt: int = 1) -> bool:
    return f"start {job_id} {attempt}" in await events(redis, namespace)


async def status_is(job: Job[Any], status: JobStatus) -> bool:
    return await job.status() == status


@contextlib.contextmanager
def worker_process(
    redis_url: str, namespace: str, settings: Settings, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """A real worker process for the unique app; SIGKILLed on exit if still alive."""
    env = subprocess_env(redis_url, namespace) | settings.to_env()
    with log.open("wb") as out:
        proc = spawn(["worker"], env, out)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=DEADLINE)


def spawn(command: list[str], env: dict[str, str], stdout: Any) -> subprocess.Popen[bytes]:
    """Start ``python -m apps.unique_app COMMAND...``."""
    return subprocess.Popen(
        [sys.executable, "-m", "apps.unique_app", *command],
        env=env,
        stdout=stdout,
        stderr=subprocess.STDOUT if stdout is not subprocess.PIPE else None,
    )


def finish(proc: subprocess.Popen[bytes]) -> bytes:
    out, _ = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == 0
    return out


def kill(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait(timeout=DEADLINE)
    assert proc.returncode == -9


@contextlib.asynccontextmanager
async def running(tr: TaskRunner, concurrency: int = 4) -> AsyncIterator[None]:
    async with tr.worker(concurrency=concurrency, handle_signals=False, grace_period=1.0):
        yield


# -- the matrix ----------------------------------------------------------------------------


class Scenario:
    """One holder job ``a = guarded("k", "gate")`` under one lock and strategy: what a
    duplicate meets while it runs, and what is left of its lock after its outcome."""

    def __init__(self, tr: TaskRunner, guarded: Task[[str, str], str], redis: Redis, ns: str):
        self.tr = tr
        self.guarded = guarded
        self.redis = redis
        self.ns = ns
        self.settings = Settings()
        self.rescheduled: Job[str] | None = None

    @property
    def lock(self) -> str:
        return self.tr.unique.lock_key(self.guarded, ("k",))

    async def start_holder(self) -> Job[str]:
        a = await self.guarded.enqueue("k", "gate")
        assert not a.deduplicated
        await wait_until(lambda: has_started(self.redis, self.ns, a.id), DEADLINE)
        return a

    async def check_while_running(self, a: Job[str]) -> None:
        holder = await self.redis.get(self.lock)
        if self.settings.lock == "until_executing":
            assert holder is None, "until_executing is released when the attempt starts"
            home = await self.tr.client.locate("default", a.id)  # the lock's partition
            assert await self.redis.hget(home.job(a.id), "locks") == ""
        else:
            assert holder == a.id
            assert 0 < await self.redis.pttl(self.lock) <= self.settings.lock_ttl * 1000
        await self.duplicate_while_running(a)

    async def duplicate_while_running(self, a: Job[str]) -> None:
        if self.settings.lock == "until_executed":
            await self.expect_enqueue_conflict(a)
            return
        b = await self.guarded.enqueue("k", "ok")
        assert not b.deduplicated
        assert b.id != a.id
        if self.settings.lock == "until_executing":
            assert await b.result(timeout=DEADLINE) == "done"  # runs alongside a
            return
        await self.expect_execution_conflict(b)

    async def expect_enqueue_conflict(self, a: Job[str]) -> None:
        before = await namespace_keys(self.redis, self.ns)
        if self.settings.on_conflict == "raise":
            with pytest.raises(LockConflictError) as caught:
                await self.guarded.enqueue("k", "ok")
            assert caught.value.holder == a.id
            assert caught.value.lock == self.lock
        else:
            b = await self.guarded.enqueue("k", "ok")
            assert b.deduplicated
            assert b.id == a.id
        assert await namespace_keys(self.redis, self.ns) == before

    async def expect_execution_conflict(self, b: Job[str]) -> None:
        strategy = self.settings.on_conflict
        if strategy == "reject":
            with pytest.raises(JobRejected):
                await b.result(timeout=DEADLINE)
            assert (await b.info()).status == JobStatus.REJECTED
        elif strategy == "raise":
            await wait_until(lambda: self.has_error(b), DEADLINE)
            info = await b.info()
            assert info.error is not None
            assert info.error.type == "taskrunner.exceptions.LockConflictError"
            retries_left = self.settings.max_retries > 0
            assert info.status == (JobStatus.SCHEDULED if retries_left else JobStatus.FAILED)
        else:
            await wait_until(lambda: self.rescheduled_times(b, 2), DEADLINE)
            self.rescheduled = b
        assert not await has_started(self.redis, self.ns, b.id)

    async def has_error(self, job: Job[str]) -> bool:
        return (await job.info()).error is not None

    async def rescheduled_times(self, job: Job[str], times: int) -> bool:
        return (await job.info()).reschedules >= times

    async def finish(self, a: Job[str], outcome: str) -> None:
        gate = gate_key(self.ns, "k")
        if outcome == "success":
            await self.redis.set(gate, "ok")
            assert await a.result(timeout=DEADLINE) == "done"
        elif outcome == "failure":
            await self.redis.set(gate, "fail")
            with pytest.raises(JobFailed):
                await a.result(timeout=DEADLINE)
        elif outcome == "retry":
            await self.redis.set(gate, "fail")
            await wait_until(lambda: status_is(a, JobStatus.SCHEDULED), DEADLINE)
            info = await a.info()
            assert info.attempts == 1
            assert info.error is not None
            assert info.error.type == "ValueError"
        else:
            await a.abort()
            with pytest.raises(JobAborted):
                await a.result(timeout=DEADLINE)

    async def check_after(self, a: Job[str], outcome: str) -> None:
        if outcome == "retry" and self.settings.lock == "until_executed":
            await self.check_held_through_retry(a)
        else:
            assert await self.redis.get(self.lock) is None
        await self.check_rescheduled_runs()
        c = await self.guarded.enqueue("k", "ok")
        assert not c.deduplicated
        assert await c.result(timeout=DEADLINE) == "done"
        assert await self.redis.get(self.lock) is None

    async def check_held_through_retry(self, a: Job[str]) -> None:
        """until_executed keeps its lock while the retry waits: until due + lock_ttl."""
        assert await self.redis.get(self.lock) == a.id
        due_at = (await a.info()).due_at
        assert due_at is not None
        wait_ms = (due_at.timestamp() - time.time()) * 1000
        ttl_ms = self.settings.lock_ttl * 1000
        assert wait_ms > 10_000  # retry_delay is 60 s (with jitter)
        assert wait_ms < await self.redis.pttl(self.lock) <= wait_ms + ttl_ms + 1000
        await self.expect_enqueue_conflict(a)
        await a.abort()  # a scheduled job is aborted at once, and its lock released
        assert await a.status() == JobStatus.ABORTED
        assert await self.redis.get(self.lock) is None

    async def check_rescheduled_runs(self, max_attempts: int = 1) -> None:
        b = self.rescheduled
        if b is None:
            return
        assert await b.result(timeout=DEADLINE) == "done"
        info = await b.info()
        assert info.reschedules >= 2
        assert 1 <= info.attempts <= max_attempts

    async def after_kill(self, a: Job[str]) -> None:
        """The holder's worker was SIGKILLed mid-attempt."""
        if self.settings.lock == "until_executing":
            assert await self.redis.get(self.lock) is None
        else:
            assert await self.redis.get(self.lock) == a.id
            assert 0 < await self.redis.pttl(self.lock) <= self.settings.lock_ttl * 1000
            await wait_until(self.lock_gone, DEADLINE)  # nobody renews it: it expires
        await self.redis.set(gate_key(self.ns, "k"), "ok")
        async with running(self.tr):  # reclaims a after stale_after; it runs again
            assert await a.result(timeout=DEADLINE) == "done"
            info = await a.info()
            assert (info.attempts, info.reclaims) == (2, 1)
            assert await self.redis.get(self.lock) is None
            # a rescheduled job caught mid-attempt by the kill is reclaimed: attempt 2
            await self.check_rescheduled_runs(max_attempts=2)
            c = await self.guarded.enqueue("k", "ok")
            assert await c.result(timeout=DEADLINE) == "done"

    async def lock_gone(self) -> bool:
        return not await self.redis.exists(self.lock)


@ALL
@pytest.mark.parametrize(("lock", "strategy", "outcome"), MATRIX)
async def test_lock_strategy_outcome_matrix(
    lock: str,
    strategy: str,
    outcome: str,
    redis: Redis,
    redis_url: str,
    namespace: str,
    tmp_path: Path,
) -> None:
    settings = Settings(
        lock=lock,
        on_conflict=strategy,
        max_retries=1 if outcome == "retry" else 0,
        lock_ttl=2.0 if outcome == "sigkill" else 30.0,
    )
    tr, guarded = build(redis_url, namespace, settings)
    scenario = Scenario(tr, guarded, redis, namespace)
    scenario.settings = settings
    async with tr:
        if outcome == "sigkill":
            with worker_process(redis_url, namespace, settings, tmp_path / "worker.log") as proc:
                a = await scenario.start_holder()
                await scenario.check_while_running(a)
                kill(proc)
            await scenario.after_kill(a)
            return
        async with running(tr):
            a = await scenario.start_holder()
            await scenario.check_while_running(a)
            await scenario.finish(a, outcome)
            await scenario.check_after(a, outcome)


# -- declaration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lock": "until_executing", "on_conflict": "reschedule"}, "cannot be used with"),
        ({"lock": "until_executed", "on_conflict": "reschedule"}, "cannot be used with"),
        ({"on_conflict": "reject"}, "only apply to unique jobs"),
        ({"lock_ttl": 10}, "only apply to unique jobs"),
        ({"unique_args": lambda x: x}, "only apply to unique jobs"),
        ({"lock": "while_executing", "reschedule_delay": 1}, "reschedule_delay only applies"),
        ({"lock": "forever"}, "lock"),
        ({"lock": "until_executed", "on_conflict": "ignore"}, "on_conflict"),
        ({"lock": "until_executed", "lock_ttl": 0}, "lock_ttl"),
    ],
)
def test_invalid_unique_options_are_refused_at_declaration(
    make_runner: MakeRunner, options: dict[str, Any], message: str
) -> None:
    tr = make_runner()
    with pytest.raises(ConfigurationError, match=message):

        @tr.task(**options)
        async def f(x: int) -> None: ...


@pytest.mark.parametrize(("lock", "strategy"), ALL_COMBINATIONS)
def test_every_allowed_combination_is_accepted(
    make_runner: MakeRunner, lock: Any, strategy: Any
) -> None:
    tr = make_runner(lock_ttl=180)

    @tr.task(lock=lock, on_conflict=strategy)
    async def f(x: int) -> None: ...

    assert f.definition.options_for(type(tr.unique).Options) is not None
    assert tr.unique.lock_ttl == 180


def test_default_lock_ttl_is_ten_minutes(make_runner: MakeRunner) -> None:
    assert make_runner().unique.lock_ttl == 600


# -- uniqueness: which calls are the same job ---------------------------------------------


@ALL
async def test_default_unique_args_bind_the_signature_with_defaults(
    make_runner: MakeRunner, redis: Redis, namespace: str
) -> None:
    tr = make_runner()

    @tr.task(lock="until_executed")
    async def sync_account(account_id: int, full: bool = False) -> None: ...

    async with tr:
        first = await sync_account.enqueue(1)
        same = [
            await sync_account.enqueue(account_id=1),
            await sync_account.enqueue(1, full=False),
            await sync_account.enqueue(1, False),
            await sync_account.enqueue("1"),  # type: ignore[arg-type]  # validated to 1
        ]
        assert not first.deduplicated
        assert all(job.deduplicated and job.id == first.id for job in same)
        other = [await sync_account.enqueue(1, full=True), await sync_account.enqueue(2)]
        assert not any(job.deduplicated for job in other)
        assert len(await job_keys(redis, namespace)) == 3


@ALL
async def test_unique_args_selects_a_subset_of_the_arguments(
    make_runner: MakeRunner, redis: Redis, namespace: str
) -> None:
    tr = make_runner()

    @tr.task(lock="until_executed", unique_args=lambda account_id, full=False: [account_id])
    async def rebuild(account_id: int, full: bool = False) -> None: ...

    async with tr:
        first = await rebuild.enqueue(1, full=True)
        again = await rebuild.enqueue(1)
        other = await rebuild.enqueue(2, full=True)
        assert again.deduplicated
        assert again.id == first.id
        assert not other.deduplicated
        assert len(await job_keys(redis, namespace)) == 2


def differently_ordered(differ: Callable[[list[str], list[str]], bool]) -> list[str]:
    """Two words such that ``differ(words, reversed words)``: a set of strings lists its
    items in the order of their hashes (which differ from process to process) and, for
    two words that want one slot of its table, in the order they were added."""
    for n in itertools.count():
        words = [f"tag-{n}", f"tag-{n + 1}"]
        if differ(words, words[::-1]):
            return words
    raise AssertionError("unreachable")


@ALL
async def test_a_set_is_one_job_whatever_the_order_of_its_items(
    make_runner: MakeRunner, redis: Redis, namespace: str
) -> None:
    tr = make_runner()

    @tr.task(lock="until_executed")
    async def tag(tags: set[str]) -> None: ...

    @tr.task(lock="until_executed", unique_args=set)
    async def label(tags: list[str]) -> None: ...

    def stored(a: list[str], b: list[str]) -> bool:
        encode = tag.definition.codec.encode
        return encode((set(a),), {}) != encode((set(b),), {})

    def iterated(a: list[str], b: list[str]) -> bool:
        return list(set(a)) != list(set(b))

    async with tr:
        words = differently_ordered(stored)  # as another process would store them
        first = await tag.enqueue(set(words))
        again = await tag.enqueue(set(words[::-1]))
        assert again.deduplicated
        assert again.id == first.id
        words = differently_ordered(iterated)
        first = await label.enqueue(words)
        again = await label.enqueue(words[::-1])
        assert again.deduplicated
        assert again.id == first.id
        assert len(await job_keys(redis, namespace)) == 2


@ALL
async def test_lock_key_names_the_lock_a_call_takes_before_its_queue_was_used(
    make_runner: MakeRunner, redis: Redis, topology: Topology
) -> None:
    """A fresh process asks before it enqueues anything: on a Cluster, where a queue
    has one partition per master, the key must be the call's partition's. (The test
    names ``topology``: without it, redis_url stays the standalone server's.)"""
    tr = make_runner()

    @tr.task(lock="until_executed")
    async def touch(x: int) -> None: ...

    async with tr:
        keys = [tr.unique.lock_key(touch, (x,)) for x in range(8)]
        jobs = [await touch.enqueue(x) for x in range(8)]
        assert [await redis.get(key) for key in keys] == [job.id for job in jobs]


class Order(BaseModel):
    customer: str
    amount: int


@ALL
async def test_unique_args_receives_the_arguments_as_the_task_does(
    make_runner: MakeRunner,
) -> None:
    tr = make_runner()
    seen: list[tuple[Any, ...]] = []

    def by_customer(order: Order, priority: int = 0) -> str:
        seen.append((order, priority))
        return order.customer

    @tr.task(lock="until_executed", unique_args=by_customer)
    async def charge(order: Order, priority: int = 0) -> None: ...

    async with tr:
        first = await charge.enqueue(Order(customer="ann", amount=1))
        again = await charge.enqueue({"customer": "ann", "amount": 2})  # type: ignore[arg-type]
        assert again.deduplicated
        assert again.id == first.id
    assert all(isinstance(order, Order) and priority == 0 for order, priority in seen)


@ALL
async def test_duplicates_in_one_enqueue_many_write_one_job(
    make_runner: MakeRunner, redis: Redis, namespace: str
) -> None:
    tr = make_runner()

    @tr.task(lock="until_executing")
    async def ping(x: int) -> int:
        return x

    async with tr:
        jobs = await ping.enqueue_many([ping.call(1), ping.call(2), ping.call(1), ping.call(x=1)])
        assert [job.deduplicated for job in jobs] == [False, False, True, True]
        assert jobs[2].id == jobs[3].id == jobs[0].id
        assert len(await job_keys(redis, namespace)) == 2


# -- enqueue-side behaviour ----------------------------------------------------------------


@ALL
async def test_reject_at_enqueue_returns_the_holders_handle(make_runner: MakeRunner) -> None:
    tr = make_runner()

    @tr.task(lock="until_executed")
    async def square(x: int) -> int:
        return x * x

    async with tr:
        holder = await square.enqueue(3)
        duplicate = await square.enqueue(3)
        assert duplicate.deduplicated
        assert duplicate == holder
        async with running(tr):
            assert await duplicate.result(timeout=DEADLINE) == 9


@ALL
async def test_raise_at_enqueue_writes_nothing(
    make_runner: MakeRunner, redis: Redis, namespace: str
) -> None:
    tr = make_runner()

    @tr.task(lock="until_executing", on_conflict="raise")
    async def square(x: int) -> int:
        return x * x

    async with tr:
        holder = await square.enqueue(3)
        before = {k: await redis.type(k) for k in await namespace_keys(redis, namespace)}
        with pytest.raises(LockConflictError) as caught:
            await square.enqueue(3)
        assert caught.value.holder == holder.id
        after = {k: await redis.type(k) for k in await namespace_keys(redis, namespace)}
        assert after == before
        home = await tr.client.locate("default", holder.id)
        assert await redis.xlen(home.stream) == 1


@ALL
@pytest.mark.parametrize("lock", ["until_executing", "until_executed"])
async def test_delayed_jobs_lock_lives_until_due_plus_lock_ttl(
    make_runner: MakeRunner, redis: Redis, lock: Any
) -> None:
    tr = make_runner(lock_ttl=50)

    @tr.task(lock=lock)
    async def later(x: int) -> None: ...

    async with tr:
        sent = time.time()
        job = await later.options(delay=100).enqueue(1)
        pttl = await redis.pttl(tr.unique.lock_key(later, (1,)))
        elapsed_ms = (time.time() - sent) * 1000
        assert 150_000 - elapsed_ms - 1000 <= pttl <= 150_000
        assert await redis.get(tr.unique.lock_key(later, (1,))) == job.id


@ALL
async def test_per_task_lock_ttl_overrides_the_runner_default(
    make_runner: MakeRunner, redis: Redis
) -> None:
    tr = make_runner(lock_ttl=50)

    @tr.task(lock="until_executed", lock_ttl=7)
    async def short(x: int) -> None: ...

    async with tr:
        await short.enqueue(1)
        assert 6_000 <= await redis.pttl(tr.unique.lock_key(short, (1,))) <= 7_000


@ALL
@pytest.mark.parametrize("lock", ["until_executing", "until_executed"])
async def test_aborting_a_waiting_job_releases_its_lock(
    make_runner: MakeRunner, redis: Redis, lock: Any
) -> None:
    tr = make_runner()

    @tr.task(lock=lock)
    async def later(x: int) -> None: ...

    async with tr:
        job = await later.options(delay=100).enqueue(1)
        key = tr.unique.lock_key(later, (1,))
        assert await redis.get(key) == job.id
        assert await job.abort() == JobStatus.ABORTED
        assert await redis.get(key) is None
        assert not (await later.options(delay=100).enqueue(1)).deduplicated


class Refuse(Middleware):
    """Refuses every enqueue (inside the unique layer, after it chose its lock)."""

    async def enqueue(self, ctx: EnqueueContext, call_next: EnqueueNext) -> Job[Any]:
        raise PermissionError(f"refused {ctx.task.name}")


@ALL
async def test_a_refused_enqueue_takes_no_lock(
    make_runner: MakeRunner, redis: Redis, namespace: str
) -> None:
    tr = make_runner(middleware=[Refuse()])

    @tr.task(lock="until_executed")
    async def f(x: int) -> None: ...

    async with tr:
        with pytest.raises(PermissionError):
            await f.enqueue(1)
        assert await namespace_keys(redis, namespace) == set()


@ALL
async def test_producer_killed_mid_enqueue_leaves_no_job_without_lock_or_lock_without_job(
    redis: Redis, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    """The enqueue-side lock and the job are one script: kill a producer writing
    pipelines of unique jobs at full speed, then check every lock against every job."""
    env = subprocess_env(redis_url, namespace) | Settings().to_env()
    with (tmp_path / "producer.log").open("wb") as log:
        proc = spawn(["flood"], env, log)
    try:

        async def enough() -> bool:
            return len(await job_keys(redis, namespace)) >= 500

        await wait_until(enough, DEADLINE)
    finally:
        kill(proc)
    jobs = await job_keys(redis, namespace)
    locks = {k async for k in redis.scan_iter(match=f"{namespace}:*:lock:*", count=1000)}
    assert len(jobs) >= 500
    assert len(jobs) == len(locks)
    job_ids = {key.rsplit(":", 1)[1] for key in jobs}
    for lock in locks:
        assert await redis.get(lock) in job_ids
    for key in jobs:
        held = str(await redis.hget(key, "locks")).split()
        assert len(held) == 1
        assert await redis.get(held[0]) == key.rsplit(":", 1)[1]


# -- concurrency ---------------------------------------------------------------------------


@ALL
@pytest.mark.parametrize("strategy", ["reject", "raise"])
async def test_50_concurrent_enqueues_from_3_processes_create_one_job(
    redis: Redis, redis_url: str, namespace: str, strategy: str
) -> None:
    settings = Settings(lock="until_executed", on_conflict=strategy)
    env = subprocess_env(redis_url, namespace) | settings.to_env()
    counts = (17, 17, 16)
    procs = [spawn(["produce", str(n)], env, subprocess.PIPE) for n in counts]
    try:
        for proc in procs:
            assert proc.stdout is not None
            ready = await anyio.to_thread.run_sync(proc.stdout.readline)
            assert json.loads(ready) == {"ready": True}
        await redis.set(f"{namespace}:test:go", "1")
        outputs = [await anyio.to_thread.run_sync(finish, proc) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    results = [json.loads(line) for out in outputs for line in out.splitlines()]
    assert len(results) == 50
    jobs = await job_keys(redis, namespace)
    assert len(jobs) == 1
    (job_id,) = (key.rsplit(":", 1)[1] for key in jobs)
    written = [r for r in results if r.get("deduplicated") is False]
    assert written == [{"id": job_id, "deduplicated": False}]
    others = [r for r in results if r.get("deduplicated") is not False]
    if strategy == "reject":
        assert others == [{"id": job_id, "deduplicated": True}] * 49
    else:
        assert others == [{"conflict": job_id}] * 49


@ALL
async def test_while_executing_reschedule_never_overlaps_and_keeps_identity(
    make_runner: MakeRunner,
) -> None:
    """A slow holder and three duplicates: they come back every reschedule_delay, never
    run alongside each other, keep their ids and attempt 1, and run once the holder ends."""
    tr = make_runner()
    release = anyio.Event()
    holding = anyio.Event()
    runs: list[tuple[str, int, float, float]] = []
    active: list[str] = []
    slow = [True]  # the first run is the slow holder

    @tr.task(lock="while_executing", on_conflict="reschedule", reschedule_delay=0.05)
    async def sync_account(account_id: int, full: bool = False) -> None:
        job = current_job()
        assert not active, f"{job.id} started while {active} ran"
        active.append(job.id)
        started = time.monotonic()
        if slow.pop() if slow else False:
            holding.set()
            await release.wait()
        active.remove(job.id)
        runs.append((job.id, job.attempt, started, time.monotonic()))

    async with tr, running(tr, concurrency=10):
        holder = await sync_account.enqueue(7)
        # Started, holding its while_executing lock; not just claimed ("running" is set
        # at claim, the lock taken only when the attempt starts).
        with anyio.fail_after(DEADLINE):
            await holding.wait()
        waiting = [
            await sync_account.enqueue(7),
            await sync_account.enqueue(account_id=7),
            await sync_account.enqueue(7, full=False),
        ]

        async def all_rescheduled() -> bool:
            infos = [await job.info() for job in waiting]
            return all(info.reschedules >= 3 for info in infos)

        await wait_until(all_rescheduled, DEADLINE)
        assert runs == []
        release.set()
        for job in waiting:
            await job.result(timeout=DEADLINE)
        await holder.result(timeout=DEADLINE)
        infos = {job.id: await job.info() for job in waiting}

    assert runs[0][0] == holder.id
    assert {r[0] for r in runs[1:]} == set(infos)
    assert all(attempt == 1 for _, attempt, _, _ in runs)
    assert all(info.attempts == 1 and info.reschedules >= 3 for info in infos.values())
    ordered = sorted(runs, key=lambda r: r[2])
    for before, after in itertools.pairwise(ordered):
        assert before[3] <= after[2], "two runs overlapped"


@ALL
@pytest.mark.parametrize("lock", ["while_executing", "until_executed"])
async def test_a_job_aborted_while_its_lock_is_taken_leaves_no_lock(
    make_runner: MakeRunner, redis: Redis, monkeypatch: pytest.MonkeyPatch, lock: Any
) -> None:
    # The take runs in Redis but its reply is held back, as on a slow round trip; the
    # abort cancels the attempt while it waits. The lock the take left is the job's:
    # the abort's commit releases it (before the reply could lead to anything).
    took, gate = anyio.Event(), anyio.Event()
    run_many = scripts.run_many

    async def held_takes(redis: Any, calls: Any, **kwargs: Any) -> list[Any]:
        replies = await run_many(redis, calls, **kwargs)
        if any(call.script is scripts.LOCK for call in calls):
            took.set()
            await gate.wait()
        return replies

    monkeypatch.setattr(scripts, "run_many", held_takes)
    tr = make_runner(heartbeat_interval=0.2)

    @tr.task(lock=lock)
    async def guarded(x: int) -> None: ...

    try:
        async with tr, running(tr):
            job = await guarded.enqueue(1)
            key = tr.unique.lock_key(guarded, (1,))
            await took.wait()
            assert await redis.get(key) == job.id
            await job.abort()
            with pytest.raises(JobAborted):
                await job.result(timeout=DEADLINE)
            assert await redis.get(key) is None
            gate.set()
    finally:
        gate.set()


# -- TTLs and heartbeats -------------------------------------------------------------------


@ALL
@pytest.mark.parametrize("lock", ["while_executing", "until_executed"])
async def test_a_job_running_longer_than_lock_ttl_keeps_its_lock_while_heartbeating(
    make_runner: MakeRunner, redis: Redis, lock: Any
) -> None:
    lock_ttl = 1.5
    tr = make_runner(lock_ttl=lock_ttl, heartbeat_interval=0.2, stale_after=3.0)
    release = anyio.Event()
    entered = anyio.Event()

    @tr.task(lock=lock)
    async def long(x: int) -> None:
        entered.set()
        await release.wait()

    async with tr, running(tr):
        job = await long.enqueue(1)
        key = tr.unique.lock_key(long, (1,))
        # Started, not just claimed ("running" is set at claim): a while_executing lock
        # is taken only when the attempt starts.
        with anyio.fail_after(DEADLINE):
            await entered.wait()
        started = time.monotonic()

        async def held_for_three_ttls() -> bool:
            assert await redis.get(key) == job.id, "the lock was lost while the job ran"
            assert await redis.pttl(key) <= lock_ttl * 1000
            return time.monotonic() - started > 3 * lock_ttl

        await wait_until(held_for_three_ttls, DEADLINE)
        release.set()
        await job.result(timeout=DEADLINE)
        assert await redis.get(key) is None


@ALL
@pytest.mark.parametrize("lock", ["while_executing", "until_executed"])
async def test_a_reclaimed_job_reenters_its_own_lock(
    redis: Redis, redis_url: str, namespace: str, tmp_path: Path, lock: str
) -> None:
    settings = Settings(lock=lock, lock_ttl=30.0, stale_after=1.0)
    tr, guarded = build(redis_url, namespace, settings)
    async with tr:
        key = tr.unique.lock_key(guarded, ("k",))
        with worker_process(redis_url, namespace, settings, tmp_path / "worker.log") as proc:
            job = await guarded.enqueue("k", "gate")
            await wait_until(lambda: has_started(redis, namespace, job.id), DEADLINE)
            kill(proc)
        assert await redis.get(key) == job.id
        ttl_after_kill = await redis.pttl(key)
        killed_at = time.monotonic()
        async with running(tr):
            await wait_until(lambda: has_started(redis, namespace, job.id, 2), DEADLINE)
            assert await redis.get(key) == job.id
            # Without a refresh the TTL would have decayed by the time since the kill
            # (at least stale_after); re-entered, it is back near lock_ttl.
            decayed = (time.monotonic() - killed_at) * 1000
            assert decayed >= 900
            assert ttl_after_kill - decayed / 2 < await redis.pttl(key) <= 30_000
            await redis.set(gate_key(namespace, "k"), "ok")
            assert await job.result(timeout=DEADLINE) == "done"
            assert (await job.info()).reclaims == 1
            assert await redis.get(key) is None


@ALL
async def test_while_executing_lock_of_a_killed_holder_expires_and_unblocks_waiters(
    redis: Redis, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    """No other worker reclaims the holder: its lock expires lock_ttl after its last
    heartbeat, and a rescheduled duplicate then runs."""
    settings = Settings(
        lock="while_executing", on_conflict="reschedule", lock_ttl=1.0, stale_after=600.0
    )
    tr, guarded = build(redis_url, namespace, settings)
    async with tr:
        key = tr.unique.lock_key(guarded, ("k",))
        with worker_process(redis_url, namespace, settings, tmp_path / "worker.log") as proc:
            holder = await guarded.enqueue("k", "gate")
            await wait_until(lambda: has_started(redis, namespace, holder.id), DEADLINE)
            kill(proc)
        assert await redis.get(key) == holder.id
        killed = time.monotonic()

        async def expired() -> bool:
            return not await redis.exists(key)

        await wait_until(expired, DEADLINE)
        assert time.monotonic() - killed <= settings.lock_ttl + 5  # generous bound
        async with running(tr):
            waiter = await guarded.enqueue("k", "ok")
            assert await waiter.result(timeout=DEADLINE) == "done"
        assert await holder.status() == JobStatus.RUNNING  # never reclaimed (stale_after)
