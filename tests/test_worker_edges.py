"""Edge cases of the worker's life: cancellation from outside, start-up failures,
jobs claimed but not started yet, partial errors in a batch, abort racing a retry,
enqueue middleware that replace the job, and names that would break the key schema."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, cast

import anyio
import pytest
from conftest import wait_until
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from taskrunner import (
    ConfigurationError,
    EnqueueContext,
    Job,
    JobAborted,
    JobFailed,
    JobStatus,
    Middleware,
    Retry,
    TaskRunner,
    current_job,
    scripts,
)
from taskrunner.keys import GROUP, QueueKeys
from taskrunner.middleware.base import EnqueueNext
from taskrunner.worker import Worker

DEADLINE = 30.0


def claim_call(
    keys: QueueKeys, job_id: str, consumer: str, entry: str, token: str
) -> scripts.ScriptCall:
    """claim.lua for an entry of the default level's stream, by hand."""
    return scripts.claim(
        scripts.Env(), keys, keys.stream, job_id, consumer, entry, token, 5, 1 << 20
    )


def commit_call(
    keys: QueueKeys,
    job_id: str,
    entry: str,
    token: str,
    outcome: str,
    payload: str,
    locks: list[str],
) -> scripts.ScriptCall:
    """commit.lua for an entry of the default level's stream, by hand."""
    return scripts.commit(
        scripts.Env(),
        keys,
        keys.stream,
        job_id,
        entry,
        token,
        outcome,
        payload,
        60_000,
        0,
        keys.default_level,
        locks,
        0,
    )


async def read_as(redis: Redis, keys: QueueKeys, consumer: str) -> list[tuple[str, Any]]:
    """Create the queue's group and read every ready entry as ``consumer`` (by hand, so
    a test can run the scripts step by step)."""
    await redis.xgroup_create(keys.stream, GROUP, id="0", mkstream=True)
    reply = cast(Any, await redis.xreadgroup(GROUP, consumer, {keys.stream: ">"}, count=100))
    return list(reply[0][1])


async def test_a_running_worker_is_cancelled_from_outside(
    make_runner: Callable[..., TaskRunner],
) -> None:
    tr = make_runner()

    @tr.task
    async def noop() -> None:
        pass

    async with tr:
        started = time.monotonic()
        with anyio.move_on_after(0.5) as scope:
            await tr.worker(concurrency=2, handle_signals=False).run()
        assert scope.cancelled_caught
        assert time.monotonic() - started < 10  # not stuck in its shielded read


async def test_a_worker_whose_stream_key_holds_another_type_starts_and_warns(
    make_runner: Callable[..., TaskRunner], redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    # hostile data, not a setup error: the worker starts, says which partition it
    # cannot read, and reads the others (tests/test_hostile_keys.py)
    tr = make_runner()

    @tr.task
    async def noop() -> None:
        pass

    caplog.set_level(logging.WARNING, logger="taskrunner")
    async with tr:
        await redis.set(tr.client.keys("default").stream, "not a stream")
        async with tr.worker(concurrency=1, handle_signals=False):

            async def warned() -> bool:
                return "WRONGTYPE" in caplog.text

            await wait_until(warned, DEADLINE)


def gated_tasks(tr: TaskRunner, gate: anyio.Event, runs: str, redis: Redis) -> tuple[Any, Any, Any]:
    """Two slow tasks on queue a, one on b, and a quick one on b. A worker with three
    slots reading both queues runs the three slow ones; ``hold_claimed`` then makes it
    claim the quick one, which waits for a consumer."""

    @tr.task(queue="a")
    async def slow() -> None:
        await gate.wait()

    @tr.task(queue="b")
    async def slow_b() -> None:
        await gate.wait()

    @tr.task(queue="b")
    async def quick() -> str:
        await redis.rpush(runs, f"attempt{current_job().attempt}")
        return "done"

    return slow, slow_b, quick


async def enqueue_gated(tasks: tuple[Any, Any, Any]) -> Job[str]:
    slow, slow_b, quick = tasks
    await slow.enqueue()
    await slow.enqueue()
    await slow_b.enqueue()
    job: Job[str] = await quick.enqueue()  # the last (oldest first within a level)
    return job


async def hold_claimed(tr: TaskRunner, worker: Worker, job: Job[str]) -> None:
    """Make ``worker``, whose slots are all busy, claim ``job`` (queue b) anyway: the
    reader's fetch and claim for one more slot, done from here. The job then waits for
    a consumer, as a job claimed in the instant before its consumer takes it does."""

    async def running() -> bool:
        return len(worker.running) == 3

    await wait_until(running, DEADLINE)
    assert await job.status() == JobStatus.QUEUED
    q = await tr.client.resolve("b")
    worker.slots.take(1)
    fetched = await worker.reader._fetch([(q, q.parts[0], 1, None)])
    worker.consumers.deliver(await worker.reader._claim(fetched), False)


async def test_a_claimed_job_waiting_for_a_consumer_keeps_its_lease(
    make_runner: Callable[..., TaskRunner], redis: Redis, namespace: str
) -> None:
    # The quick job waits locally longer than stale_after; its heartbeats must keep
    # another worker from running it too.
    tr = make_runner(heartbeat_interval=0.1, stale_after=0.5)
    gate = anyio.Event()
    runs = f"{namespace}:runs"
    tasks = gated_tasks(tr, gate, runs, redis)

    async with tr:
        job = await enqueue_gated(tasks)
        async with tr.worker(concurrency=3, queues=["a", "b"], handle_signals=False) as first:
            await hold_claimed(tr, first, job)
            assert (len(first.running), len(first.waiting)) == (3, 1)
            assert [item.job_id for item in first.waiting.values()] == [job.id]
            async with tr.worker(concurrency=5, handle_signals=False):
                await anyio.sleep(1.5)  # three times stale_after, for a reclaim to happen
                assert await redis.lrange(runs, 0, -1) == []
                gate.set()
                await job.result(timeout=DEADLINE)
        assert await redis.lrange(runs, 0, -1) == ["attempt1"]
        assert (await job.info()).reclaims == 0


async def test_an_error_in_one_call_of_a_batch_stays_in_its_place(
    make_runner: Callable[..., TaskRunner], redis: Redis
) -> None:
    tr = make_runner()

    @tr.task
    async def noop() -> None:
        pass

    async with tr:
        keys = tr.client.keys("default")
        first, second = await noop.enqueue(), await noop.enqueue()
        entries = await read_as(redis, keys, "c1")
        claims = [
            claim_call(keys, fields["job"], "c1", entry, f"token{i}")
            for i, (entry, fields) in enumerate(entries)
        ]
        assert [r[0] for r in await scripts.run_many(redis, claims)] == ["ok", "ok"]
        await redis.set(keys.job("hostile"), "not a hash")  # the middle commit fails on it
        commits = [
            commit_call(keys, job or fields["job"], entry, token, "succeeded", "null", [])
            for (entry, fields), token, job in [
                (entries[0], "token0", None),
                (entries[1], "token1", "hostile"),
                (entries[1], "token1", None),
            ]
        ]
        results = await scripts.run_many(redis, commits, raise_on_error=False)
        assert results[0] == 1
        assert isinstance(results[1], ResponseError)
        assert "WRONGTYPE" in str(results[1])
        assert results[2] == 1  # the call after the failed one ran, in its place
        assert await first.status() == JobStatus.SUCCEEDED
        assert await second.status() == JobStatus.SUCCEEDED


async def test_an_abort_during_a_failing_attempt_ends_the_job_at_once(
    make_runner: Callable[..., TaskRunner],
) -> None:
    tr = make_runner(retry_delay=300.0)  # a retry would wait five minutes
    entered = anyio.Event()
    release = anyio.Event()

    @tr.task(max_retries=3)
    async def flaky() -> None:
        entered.set()
        with anyio.CancelScope(shield=True):  # finishes its failure despite the abort
            await release.wait()
        raise ValueError("boom")

    async with tr, tr.worker(concurrency=2, handle_signals=False):
        job = await flaky.enqueue()
        await entered.wait()
        assert await job.abort() == JobStatus.RUNNING
        release.set()
        with pytest.raises(JobAborted):
            await job.result(timeout=DEADLINE)
        assert await job.status() == JobStatus.ABORTED


class Replacing(Middleware):
    """Passes a new context on (dataclasses.replace), with a chosen job id."""

    async def enqueue(self, ctx: EnqueueContext, call_next: EnqueueNext) -> Job[Any]:
        return await call_next(dataclasses.replace(ctx, job_id=f"fixed-{ctx.job_id}"))


async def test_an_enqueue_middleware_may_pass_a_new_context_on(
    make_runner: Callable[..., TaskRunner],
) -> None:
    tr = make_runner(middleware=[Replacing()])

    @tr.task
    async def add(x: int, y: int) -> int:
        return x + y

    async with tr, tr.worker(concurrency=4, handle_signals=False):
        jobs = await add.enqueue_many([add.call(i, i) for i in range(20)])
        assert all(job.id.startswith("fixed-") for job in jobs)
        assert [await job.result(timeout=DEADLINE) for job in jobs] == [2 * i for i in range(20)]


@pytest.mark.parametrize("name", ["", "has space", "br{ace", "tab\there"])
def test_names_that_would_break_the_key_schema_are_refused(name: str) -> None:
    with pytest.raises(ConfigurationError, match="invalid"):
        TaskRunner("redis://127.0.0.1:1/0", queue=name)
    with pytest.raises(ConfigurationError, match="invalid"):
        TaskRunner("redis://127.0.0.1:1/0", namespace=name)
    tr = TaskRunner("redis://127.0.0.1:1/0", namespace=f"n{uuid.uuid4().hex[:6]}")
    with pytest.raises(ConfigurationError, match="invalid"):

        @tr.task(queue=name)
        async def noop() -> None:
            pass


async def test_a_worker_that_stops_leaves_the_group_when_it_holds_nothing(
    make_runner: Callable[..., TaskRunner], redis: Redis
) -> None:
    tr = make_runner()

    @tr.task
    async def add(x: int, y: int) -> int:
        return x + y

    async with tr:
        keys = tr.client.keys("default")
        worker = tr.worker(concurrency=2, handle_signals=False)
        async with worker:
            assert await (await add.enqueue(1, 2)).result(timeout=DEADLINE) == 3
            consumers = await redis.xinfo_consumers(keys.stream, GROUP)
            assert [c["name"] for c in consumers] == [worker.id]
        assert await redis.xinfo_consumers(keys.stream, GROUP) == []


async def test_a_task_that_lets_a_cancelled_error_out_fails_alone(
    make_runner: Callable[..., TaskRunner],
) -> None:
    tr = make_runner()

    @tr.task(max_retries=0)
    async def leaky() -> None:
        inner = asyncio.ensure_future(asyncio.sleep(3600))
        inner.cancel()
        await inner  # raises CancelledError in the task, not a cancellation of the worker

    @tr.task
    async def add(x: int, y: int) -> int:
        return x + y

    async with tr, tr.worker(concurrency=2, handle_signals=False) as worker:
        job = await leaky.enqueue()
        with pytest.raises(JobFailed, match="CancelledError"):
            await job.result(timeout=DEADLINE)
        assert await (await add.enqueue(2, 3)).result(timeout=DEADLINE) == 5
        assert not worker.stopping


async def test_stopping_hands_back_claimed_jobs_that_have_not_started(
    make_runner: Callable[..., TaskRunner], redis: Redis, namespace: str
) -> None:
    tr = make_runner()
    gate = anyio.Event()
    tasks = gated_tasks(tr, gate, f"{namespace}:runs", redis)

    async with tr:
        job = await enqueue_gated(tasks)
        first = tr.worker(concurrency=3, queues=["a", "b"], grace_period=3600, handle_signals=False)
        async with anyio.create_task_group() as tg:
            tg.start_soon(first.run)
            await hold_claimed(tr, first, job)
            assert (len(first.running), len(first.waiting)) == (3, 1)
            first.stop()  # the slow jobs keep their grace period; the quick one goes back
            async with tr.worker(concurrency=2, queues=["b"], handle_signals=False):
                assert await job.result(timeout=DEADLINE) == "done"
            assert first.running  # the first worker is still in its grace period
            assert (await job.info()).attempts == 1
            gate.set()


async def test_a_commit_under_a_stale_lease_changes_nothing(
    make_runner: Callable[..., TaskRunner], redis: Redis
) -> None:
    # The fencing rule at the script level, without timing: attempt 1's token is spent
    # the moment attempt 2 claims the entry; attempt 1's commit is then refused.
    tr = make_runner()

    @tr.task
    async def noop() -> None:
        pass

    async with tr:
        keys = tr.client.keys("default")
        job = await noop.enqueue()
        [(entry, _fields)] = await read_as(redis, keys, "old")
        await scripts.run(redis, claim_call(keys, job.id, "old", entry, "token-1"))
        await redis.xclaim(keys.stream, GROUP, "new", 0, [entry])  # taken over
        await scripts.run(redis, claim_call(keys, job.id, "new", entry, "token-2"))

        def commit(token: str) -> scripts.ScriptCall:
            return commit_call(keys, job.id, entry, token, "succeeded", '"late"', [])

        before = await redis.hgetall(keys.job(job.id))
        assert await scripts.run(redis, commit("token-1")) == 0
        assert await redis.hgetall(keys.job(job.id)) == before
        assert (await redis.xpending(keys.stream, GROUP))["pending"] == 1
        assert await scripts.run(redis, commit("token-2")) == 1
        assert await job.status() == JobStatus.SUCCEEDED
        assert await scripts.run(redis, commit("token-1")) == 0  # still refused after


@pytest.mark.parametrize("commit_delay", [0.0, 0.05])
async def test_a_burst_worker_runs_a_retry_due_at_once_before_it_exits(
    make_runner: Callable[..., TaskRunner], monkeypatch: pytest.MonkeyPatch, commit_delay: float
) -> None:
    # Its slot frees before Redis answers the commit that schedules the retry, and the
    # scheduler service may promote the retry before the burst worker looks: either way
    # the worker reads again before it exits. ``commit_delay`` stands for a slow commit
    # round trip (a loaded server), the window in which the old check exited.
    from taskrunner.worker import committer

    if commit_delay:
        flush = committer.Coalescer._flush

        async def slow_flush(self: committer.Coalescer, batch: Any) -> None:
            await anyio.sleep(commit_delay)
            await flush(self, batch)

        monkeypatch.setattr(committer.Coalescer, "_flush", slow_flush)
    tr = make_runner()

    @tr.task
    async def flaky(n: int) -> int:
        if current_job().attempt == 1:
            raise Retry(delay=0)
        return n

    async with tr:
        job = await flaky.enqueue(7)
        await tr.worker(concurrency=1, burst=True, handle_signals=False).run()
        assert await job.status() == JobStatus.SUCCEEDED


async def test_a_heartbeat_answered_after_its_job_committed_reports_no_lost_lease(
    make_runner: Callable[..., TaskRunner],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A heartbeat covers the jobs running when it is sent; one of them ends and commits
    # (spending its lease) before Redis answers the heartbeat, which then says 0 for it.
    # That is no lost lease: nothing is logged and nothing is cancelled.
    from taskrunner.middleware import lease

    tr = make_runner(heartbeat_interval=0.2, stale_after=1.0)
    gate, answered = anyio.Event(), anyio.Event()
    jobs: list[Job[int]] = []
    seen: list[Any] = []
    renew = lease._renew

    async def renew_after_the_commit(worker: Any, homes: Any, calls: Any) -> list[Any]:
        if gate.is_set() or not tr.lease.state(worker).leases:
            return await renew(worker, homes, calls)
        gate.set()  # the running job ends and commits while this heartbeat is on its way
        await wait_until(lambda: _succeeded(jobs[0]), 30)
        replies = await renew(worker, homes, calls)
        seen.extend(replies)
        answered.set()  # beat() handles the replies before this test's task runs again
        return replies

    monkeypatch.setattr(lease, "_renew", renew_after_the_commit)

    @tr.task
    async def waits() -> int:
        await gate.wait()
        return 1

    async with tr:
        jobs.append(await waits.enqueue())
        with caplog.at_level(logging.INFO, logger="taskrunner"):
            async with tr.worker(concurrency=1, handle_signals=False):
                with anyio.fail_after(30):
                    await answered.wait()
        assert await jobs[0].status() == JobStatus.SUCCEEDED
    assert seen[0] == 0  # the job's lease was spent by its commit
    assert not [r for r in caplog.records if "lease lost" in r.getMessage()]


async def _succeeded(job: Job[Any]) -> bool:
    return await job.status() == JobStatus.SUCCEEDED


async def test_a_lost_lease_is_reported_once_while_its_copy_stops(
    make_runner: Callable[..., TaskRunner],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    redis: Redis,
    namespace: str,
) -> None:
    # A copy told that its lease is lost may take a while to stop (a shielded clean-up,
    # a blocked loop): the heartbeats meanwhile neither renew it nor report it again
    # (each reported it: one warning per beat for one loss).
    from taskrunner.middleware import lease

    tr = make_runner(heartbeat_interval=0.1, stale_after=1.0)
    beats: list[int] = []
    renew = lease._renew

    async def counted(worker: Any, homes: Any, calls: Any) -> list[Any]:
        beats.append(len(calls))
        return await renew(worker, homes, calls)

    monkeypatch.setattr(lease, "_renew", counted)
    started, release = anyio.Event(), anyio.Event()

    @tr.task
    async def slow_to_stop() -> int:
        started.set()
        try:
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await release.wait()
        return 1

    async with tr:
        job = await slow_to_stop.enqueue()
        with caplog.at_level(logging.INFO, logger="taskrunner"):
            async with tr.worker(concurrency=1, handle_signals=False):
                with anyio.fail_after(30):
                    await started.wait()
                    key = QueueKeys(namespace, "default").job(job.id)
                    await redis.hset(key, "lease", "taken-over")

                    async def lost() -> bool:
                        return any("lease lost" in r.getMessage() for r in caplog.records)

                    await wait_until(lost, 30, interval=0.02)
                    after = len(beats)

                    async def three_more_beats() -> bool:  # while the copy stops
                        return len(beats) >= after + 3

                    await wait_until(three_more_beats, 30, interval=0.02)
                    release.set()
    assert len([r for r in caplog.records if "lease lost" in r.getMessage()]) == 1


@pytest.mark.parametrize("leave", ["error", "cancel"])
async def test_leaving_an_embedded_worker_by_an_error_or_a_cancel_stops_it_gracefully(
    make_runner: Callable[..., TaskRunner], leave: str
) -> None:
    # `async with tr.worker()` left by an exception or a cancelled scope: its running job
    # is handed back (it stayed running under a dead lease until a reclaim), and the
    # body's exception comes out as it was raised, not inside a task group's.
    tr = make_runner()
    started = anyio.Event()

    @tr.task
    async def forever() -> None:
        started.set()
        await anyio.sleep_forever()

    async with tr:
        job = await forever.enqueue()
        raised: list[BaseException] = []
        with anyio.CancelScope() as outer:
            try:
                async with tr.worker(concurrency=1, grace_period=0.1, handle_signals=False):
                    with anyio.fail_after(DEADLINE):
                        await started.wait()
                    if leave == "error":
                        raise RuntimeError("the body failed")
                    outer.cancel()  # as a timeout around the block would
                    await anyio.sleep_forever()
            except Exception as exc:
                raised.append(exc)
        assert outer.cancelled_caught == (leave == "cancel")
        assert [repr(e) for e in raised] == (
            ["RuntimeError('the body failed')"] if leave == "error" else []
        )
        info = await job.info()
        assert (info.status, info.attempts) == (JobStatus.QUEUED, 0)


async def test_one_worker_object_runs_again_after_it_stopped_and_refuses_two_runs_at_once(
    make_runner: Callable[..., TaskRunner],
) -> None:
    # a FastAPI lifespan that builds its worker once: the second TestClient started the
    # same Worker, which was still "stopping" from the first and ran nothing
    tr = make_runner()

    @tr.task
    async def double(x: int) -> int:
        return 2 * x

    async with tr:
        worker = tr.worker(concurrency=2, handle_signals=False)
        ids = []
        for x in (1, 2):
            async with worker:
                ids.append(worker.id)
                job = await double.enqueue(x)
                assert await job.result(timeout=DEADLINE) == 2 * x
                with pytest.raises(RuntimeError, match="already running"):
                    async with worker:
                        pass
        assert ids[0] != ids[1]  # a fresh consumer name for each run

        burst = tr.worker(burst=True, handle_signals=False)
        for x in (3, 4):
            job = await double.enqueue(x)
            await burst.run()
            assert await job.result(timeout=0) == 2 * x
        # a stop() between two runs, as one before the first, stops the next run as soon
        # as it starts (it used to be forgotten: this run went on until the deadline)
        assert not worker.stopping
        worker.stop()
        job = await double.enqueue(5)
        with anyio.fail_after(DEADLINE):
            await worker.run()
        assert await job.status() == JobStatus.QUEUED
        assert not worker.stopping


async def test_a_failing_drained_hook_is_logged_and_the_burst_worker_ends_as_usual(
    make_runner: Callable[..., TaskRunner], caplog: pytest.LogCaptureFixture
) -> None:
    # a middleware's broken hook stopped the burst worker with its error; a failing
    # on_commit or event handler is logged and skipped, and so is this now
    tr = make_runner()
    calls = 0

    @tr.task
    async def double(x: int) -> int:
        return 2 * x

    async def broken() -> bool:
        nonlocal calls
        calls += 1
        raise ValueError("a bug in a middleware's hook")

    caplog.set_level(logging.ERROR, logger="taskrunner")
    async with tr:
        job = await double.enqueue(4)
        worker = tr.worker(burst=True, handle_signals=False)
        worker.on_drained(broken)
        with anyio.fail_after(DEADLINE):
            await worker.run()
        assert await job.result(timeout=0) == 8
    assert calls == 1
    failed = [r for r in caplog.records if r.getMessage().startswith("drained hook ")]
    assert len(failed) == 1
    assert "broken failed" in failed[0].getMessage()
    assert failed[0].exc_info is not None
