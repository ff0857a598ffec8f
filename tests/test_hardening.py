"""Production hardening, in one process with a real redis-server: connection pools that
wait, jobs identified by (queue, id), the middleware contract, outcomes that are always
committable, payload limits, lease tokens, lock TTLs that never shrink, bounded logs."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import anyio
import pytest
from conftest import wait_until
from redis.asyncio import Redis

from taskrunner import (
    ErrorInfo,
    ExecutionContext,
    JobAborted,
    JobDeadLettered,
    JobFailed,
    JobStatus,
    Middleware,
    Outcome,
    OutcomeKind,
    PayloadTooLarge,
    TaskRunner,
    current_job,
    scripts,
)
from taskrunner.keys import GROUP, QueueKeys
from taskrunner.middleware.base import ExecuteNext

MakeRunner = Callable[..., TaskRunner]
DEADLINE = 30.0


async def namespace_keys(redis: Redis, namespace: str) -> set[str]:
    return {key async for key in redis.scan_iter(match=f"{namespace}:*")}


# -- connections -----------------------------------------------------------------------


async def test_five_thousand_concurrent_enqueues_from_one_process_all_succeed(
    make_runner: MakeRunner,
) -> None:
    tr = make_runner()  # the default pool: 100 connections; the rest wait for one

    @tr.task
    async def noop(n: int) -> int:
        return n

    async with tr:
        async with anyio.create_task_group() as tg:
            jobs: list[Any] = []

            async def one(n: int) -> None:
                jobs.append(await noop.enqueue(n))

            for n in range(5000):
                tg.start_soon(one, n)
        assert len(jobs) == 5000
        assert len({job.id for job in jobs}) == 5000


async def test_a_full_pool_makes_callers_wait_then_fail_after_pool_timeout(
    make_runner: MakeRunner,
) -> None:
    tr = make_runner(max_connections=2, pool_timeout=0.2)
    assert tr.pool_options.max_connections == 2

    @tr.task
    async def noop() -> None: ...

    async with tr:
        redis = tr.client.redis
        # Two connections held by blocking calls; a third caller waits, then gives up.

        async def hold(key: str) -> None:
            await redis.blpop([key], timeout=1)

        async with anyio.create_task_group() as tg:
            tg.start_soon(hold, "never-1")
            tg.start_soon(hold, "never-2")
            await anyio.sleep(0.1)
            from redis.exceptions import ConnectionError as RedisConnectionError

            with pytest.raises(RedisConnectionError):
                await noop.enqueue()
        job = await noop.enqueue()  # free again
        assert await job.status() == JobStatus.QUEUED


async def test_a_pool_of_one_connection_serves_every_waiting_caller(
    make_runner: MakeRunner,
) -> None:
    # 200 callers share one connection: each release must wake a waiting caller (the
    # pool's quick checkout only skips the wake-up when nobody waits).
    tr = make_runner(max_connections=1, pool_timeout=10)

    @tr.task
    async def noop() -> None: ...

    async with tr:
        jobs: list[Any] = []

        async def enqueue() -> None:
            jobs.append(await noop.enqueue())

        async with anyio.create_task_group() as tg:
            for _ in range(200):
                tg.start_soon(enqueue)
        assert len({job.id for job in jobs}) == 200
        pool = tr.client.redis.connection_pool
        assert len(pool._in_use_connections) == 0  # every connection went back
        assert len(pool._available_connections) == 1


async def test_a_pooled_connection_the_server_closed_is_replaced_at_checkout(
    make_runner: MakeRunner, redis: Redis
) -> None:
    tr = make_runner(max_connections=1)

    @tr.task
    async def noop() -> None: ...

    async with tr:
        await noop.enqueue()
        name = f"pooled-{id(tr)}"
        await tr.client.redis.client_setname(name)
        clients = await redis.client_list()
        [pooled] = [c for c in clients if c["name"] == name]
        assert await redis.client_kill_filter(_id=pooled["id"]) == 1
        job = await noop.enqueue()  # on a new connection, not an error
        assert await job.status() == JobStatus.QUEUED
        assert all(c["name"] != name for c in await redis.client_list())


async def test_tasks_that_hammer_redis_never_starve_the_workers_heartbeats(
    make_runner: MakeRunner, caplog: pytest.LogCaptureFixture
) -> None:
    # 150 running tasks each enqueue a child and wait for its result, through a user
    # pool of 10 connections; the worker's leases live on its own connections.
    tr = make_runner(heartbeat_interval=0.2, stale_after=2.0, max_connections=10)

    @tr.task
    async def child(n: int) -> int:
        return n

    @tr.task
    async def parent(n: int) -> int:
        kid = await child.enqueue(n)
        return await kid.result(timeout=DEADLINE) + 1

    caplog.set_level(logging.WARNING, logger="taskrunner")
    async with tr, tr.worker(concurrency=400, handle_signals=False):
        parents = await tr.enqueue_many([parent.call(n) for n in range(150)])
        results = [await job.result(timeout=DEADLINE) for job in parents]
        infos = [await job.info() for job in parents]
    assert results == [n + 1 for n in range(150)]
    assert {(i.attempts, i.reclaims) for i in infos} == {(1, 0)}
    assert "lease lost" not in caplog.text
    assert "heartbeats" not in caplog.text


# -- identity ----------------------------------------------------------------------------


async def test_abort_and_shutdown_tell_same_id_jobs_of_two_queues_apart(
    make_runner: MakeRunner,
) -> None:
    tr = make_runner(heartbeat_interval=0.2, stale_after=1.0)
    gate = anyio.Event()
    started: list[str] = []

    @tr.task(queue="pdf")
    async def render() -> str:
        started.append("pdf")
        await gate.wait()
        return "pdf"

    @tr.task(queue="email")
    async def send() -> str:
        started.append("email")
        await gate.wait()
        return "email"

    async with tr:
        pdf = await render.options(job_id="X").enqueue()
        email = await send.options(job_id="X").enqueue()
        worker = tr.worker(concurrency=4, grace_period=0.5, handle_signals=False)
        async with worker:

            async def both_running() -> bool:
                return len(worker.running) == 2

            await wait_until(both_running, DEADLINE)
            assert await pdf.abort() == JobStatus.RUNNING
            with pytest.raises(JobAborted):
                await pdf.result(timeout=DEADLINE)
            assert await email.status() == JobStatus.RUNNING  # the other X runs on
            begun = anyio.current_time()
        # Stopping: the grace period ends and the running X (email) is handed back.
        assert anyio.current_time() - begun < 10
        assert await email.status() == JobStatus.QUEUED
        gate.set()
        async with tr.worker(concurrency=2, handle_signals=False):
            assert await email.result(timeout=DEADLINE) == "email"


# -- the middleware contract ------------------------------------------------------------


class Forgetful(Middleware):
    """Forgets to return what the next layer returned."""

    async def execute(self, ctx: ExecutionContext, call_next: ExecuteNext) -> Outcome:
        await call_next(ctx)
        return None  # type: ignore[return-value]


class HandsBack(Middleware):
    async def execute(self, ctx: ExecutionContext, call_next: ExecuteNext) -> Outcome:
        return Outcome(OutcomeKind.HANDBACK)


class ReschedulesNever(Middleware):
    """An infinite due time (it once stopped the worker: OverflowError at commit)."""

    async def execute(self, ctx: ExecutionContext, call_next: ExecuteNext) -> Outcome:
        return Outcome.reschedule(math.inf)


class RetriesAtNaN(Middleware):
    """A NaN due time (it once ran the job again at once, without end)."""

    async def execute(self, ctx: ExecutionContext, call_next: ExecuteNext) -> Outcome:
        return Outcome.retry(math.nan, ErrorInfo(type="X", message="again"))


class ReschedulesToADatetime(Middleware):
    async def execute(self, ctx: ExecutionContext, call_next: ExecuteNext) -> Outcome:
        return Outcome.reschedule(datetime.now(UTC))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "culprit", [Forgetful, HandsBack, ReschedulesNever, RetriesAtNaN, ReschedulesToADatetime]
)
async def test_an_invalid_outcome_fails_the_attempt_naming_the_middleware(
    make_runner: MakeRunner, culprit: type[Middleware]
) -> None:
    tr = make_runner(middleware=[culprit()], max_retries=2)
    runs: list[int] = []

    @tr.task
    async def work() -> int:
        runs.append(current_job().attempt)
        return 1

    async with tr, tr.worker(handle_signals=False):
        job = await work.enqueue()
        with pytest.raises(JobFailed) as failed:
            await job.result(timeout=DEADLINE)
        info = await job.info()
    assert failed.value.exc_type == "taskrunner.exceptions.MiddlewareError"
    assert culprit.__name__ in failed.value.exc_message
    assert info.attempts == 3  # counted like any failure: 1 + max_retries, then failed
    assert info.status == JobStatus.FAILED


# -- outcomes are always committable ----------------------------------------------------


async def test_an_error_message_with_undecodable_bytes_is_recorded(
    make_runner: MakeRunner,
) -> None:
    tr = make_runner(max_retries=1)
    name = b"report-\xff.txt".decode("utf-8", "surrogateescape")  # a file name from disk

    @tr.task
    async def read() -> None:
        raise FileNotFoundError(f"no such file: {name}")

    async with tr, tr.worker(handle_signals=False):
        job = await read.enqueue()
        with pytest.raises(JobFailed) as failed:
            await job.result(timeout=DEADLINE)
        info = await job.info()
    assert failed.value.exc_message == "no such file: report-\\xff.txt"
    assert info.attempts == 2  # the retry policy ran as for any error
    assert info.reclaims == 0  # never reclaimed as poison


async def test_a_result_that_cannot_be_serialised_fails_the_job_for_good(
    make_runner: MakeRunner,
) -> None:
    tr = make_runner(max_retries=1)

    @tr.task
    async def bad() -> str:
        return "\udcff"  # not encodable as UTF-8 JSON

    async with tr, tr.worker(handle_signals=False):
        job = await bad.enqueue()
        with pytest.raises(JobFailed) as failed:
            await job.result(timeout=DEADLINE)
        info = await job.info()
    assert "Serializ" in failed.value.exc_type or "Unicode" in failed.value.exc_message
    assert (info.attempts, info.reclaims) == (1, 0)  # not retried: it would fail again


# -- payload limits -------------------------------------------------------------------------


async def test_oversized_arguments_are_refused_at_enqueue_and_nothing_is_written(
    make_runner: MakeRunner, redis: Redis, namespace: str
) -> None:
    tr = make_runner(max_payload=1000)

    @tr.task
    async def store(blob: str) -> None: ...

    async with tr:
        with pytest.raises(PayloadTooLarge, match="over max_payload"):
            await store.enqueue("x" * 2000)
        with pytest.raises(PayloadTooLarge):
            await tr.enqueue_many([store.call("ok"), store.call("y" * 5000)])
        assert await namespace_keys(redis, namespace) == set()
        small = await store.enqueue("x" * 10)
        assert await small.status() == JobStatus.QUEUED


async def test_an_oversized_result_fails_the_attempt_with_a_clear_error(
    make_runner: MakeRunner,
) -> None:
    tr = make_runner(max_payload=1000, max_retries=0)

    @tr.task
    async def big() -> str:
        return "z" * 5000

    async with tr, tr.worker(handle_signals=False):
        job = await big.enqueue()
        with pytest.raises(JobFailed, match="over max_payload") as failed:
            await job.result(timeout=DEADLINE)
    assert failed.value.exc_type == "taskrunner.exceptions.PayloadTooLarge"


async def test_oversized_arguments_written_behind_enqueues_back_are_dead_lettered_unread(
    make_runner: MakeRunner, redis: Redis, namespace: str
) -> None:
    tr = make_runner(max_payload=1000)
    ran: list[int] = []

    @tr.task
    async def store(blob: str) -> int:
        ran.append(len(blob))
        return len(blob)

    keys = QueueKeys(namespace, "default")
    async with tr:
        huge = '{"blob": "' + "x" * 50_000 + '"}'
        call = scripts.enqueue(scripts.Env(), keys, "huge", store.name, huge, "default", 0)
        await scripts.run(redis, call)
        async with tr.worker(handle_signals=False):
            with pytest.raises(JobDeadLettered, match="larger than max_payload"):
                await tr.job("huge").result(timeout=DEADLINE)
            ok = await store.enqueue("fine")
            assert await ok.result(timeout=DEADLINE) == 4
    assert ran == [4]


# -- leases and locks -------------------------------------------------------------------


async def test_lease_tokens_and_consumer_names_carry_128_random_bits(
    make_runner: MakeRunner,
) -> None:
    tr = make_runner()
    tokens: list[str] = []

    class Spy(Middleware):
        async def execute(self, ctx: ExecutionContext, call_next: ExecuteNext) -> Outcome:
            tokens.append(ctx.lease)
            return await call_next(ctx)

    tr.middleware.append(Spy())

    @tr.task
    async def noop() -> None: ...

    async with tr:
        worker = tr.worker(handle_signals=False)
        async with worker:
            for job in await tr.enqueue_many([noop.call() for _ in range(20)]):
                await job.result(timeout=DEADLINE)
    assert all(re.fullmatch(r"[0-9a-f]{32}", token) for token in tokens)
    assert len(set(tokens)) == 20
    assert re.fullmatch(r".+:\d+:[0-9a-f]{32}", worker.id)


async def test_a_heartbeat_never_shortens_a_lock_a_retry_extended(
    make_runner: MakeRunner, redis: Redis, namespace: str
) -> None:
    """At the script level, without timing: a running attempt's heartbeat renews its
    lock to lock_ttl only if that is longer than what the lock has left."""
    keys = QueueKeys(namespace, "default")
    lock = keys.lock("digest")
    await redis.hset(keys.job("J"), mapping={"lease": "T", "status": "running"})
    await redis.xgroup_create(keys.stream, GROUP, id="0", mkstream=True)
    entry = await redis.xadd(keys.stream, {"job": "J"})
    await redis.xreadgroup(GROUP, "c", {keys.stream: ">"})
    await redis.set(lock, "J", px=100_000)  # extended through a retry's wait
    beat = scripts.heartbeat(keys, keys.stream, "J", "c", str(entry), "T", 10_000, [lock])
    assert await scripts.run(redis, beat) == 1
    assert await redis.pttl(lock) > 90_000
    await redis.pexpire(lock, 1_000)
    assert await scripts.run(redis, beat) == 1
    assert 9_000 < await redis.pttl(lock) <= 10_000  # renewed when it had less left


# -- logs stay bounded ----------------------------------------------------------------


async def test_a_huge_hostile_entry_is_logged_as_a_bounded_excerpt_and_kept_raw(
    make_runner: MakeRunner, redis: Redis, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    tr = make_runner()

    @tr.task
    async def noop() -> None: ...

    keys = QueueKeys(namespace, "default")
    caplog.set_level(logging.INFO, logger="taskrunner")
    async with tr:
        await redis.xgroup_create(keys.stream, GROUP, id="0", mkstream=True)
        entry = str(await redis.xadd(keys.stream, {"blob": "y" * 5_000_000}))
        async with tr.worker(handle_signals=False):

            async def dead() -> bool:
                return bool(await redis.zcard(keys.dead))

            await wait_until(dead, DEADLINE)
        [info] = await tr.dead_letters()
    assert info.id == f"entry-{entry}"
    assert info.error is not None
    assert len(info.error.message) < 2000
    assert info.error.raw is not None
    assert len(info.error.raw) > 1_000_000  # the raw bytes are kept (base64, 1 MiB cap)
    assert max(len(record.getMessage()) for record in caplog.records) < 4000
