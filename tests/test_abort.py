"""Abort: a queued or delayed job never runs; a running one is cancelled, told over
pub/sub (or, when that message is missed, by the heartbeat's reply)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, cast

import anyio
import pytest
from conftest import wait_until
from redis.asyncio import Redis

from taskrunner import JobAborted, JobStatus, TaskRunner, scripts
from taskrunner.keys import QueueKeys

MakeRunner = Callable[..., TaskRunner]
DEADLINE = 20.0


def status_is(tr: TaskRunner, job_id: str, status: JobStatus) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await tr.job(job_id).status() == status

    return check


async def test_aborted_queued_job_never_runs(make_runner: MakeRunner) -> None:
    tr = make_runner()
    ran: list[str] = []

    @tr.task
    async def work(tag: str) -> str:
        ran.append(tag)
        return tag

    async with tr:
        job = await work.enqueue("aborted")
        assert await job.abort() == JobStatus.ABORTED
        assert await job.status() == JobStatus.ABORTED
        with pytest.raises(JobAborted):
            await job.result(timeout=DEADLINE)
        async with tr.worker(handle_signals=False):
            after = await work.enqueue("after")  # behind the aborted one in the stream
            assert await after.result(timeout=DEADLINE) == "after"
        assert ran == ["after"]
        assert (await job.info()).attempts == 0


async def test_aborted_delayed_job_never_runs(make_runner: MakeRunner) -> None:
    tr = make_runner()
    ran: list[str] = []

    @tr.task
    async def work(tag: str) -> str:
        ran.append(tag)
        return tag

    async with tr, tr.worker(handle_signals=False):
        job = await work.options(delay=0.3).enqueue("aborted")
        assert await job.status() == JobStatus.SCHEDULED
        assert await job.abort() == JobStatus.ABORTED
        later = await work.options(delay=0.6).enqueue("later")  # due after the aborted one
        assert await later.result(timeout=DEADLINE) == "later"
        with pytest.raises(JobAborted):
            await job.result(timeout=DEADLINE)
        assert ran == ["later"]
        keys = QueueKeys(tr.namespace, "default")
        assert await tr.client.redis.zcard(keys.delayed) == 0


async def _run_until_aborted(
    tr: TaskRunner, abort: Callable[[str], Awaitable[object]], within: float
) -> None:
    started = anyio.Event()
    cancelled = anyio.Event()

    @tr.task
    async def forever() -> None:
        started.set()
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.set()

    async with tr, tr.worker(handle_signals=False):
        job = await forever.enqueue()
        await wait_until(status_is(tr, job.id, JobStatus.RUNNING), DEADLINE)
        await started.wait()
        await abort(job.id)
        await wait_until(status_is(tr, job.id, JobStatus.ABORTED), within)
        assert cancelled.is_set()
        with pytest.raises(JobAborted):
            await job.result(timeout=DEADLINE)
        info = await job.info()
        assert info.abort_requested
        assert (info.attempts, info.reclaims) == (1, 0)


async def test_running_job_is_cancelled_over_pubsub_before_any_heartbeat(
    make_runner: MakeRunner,
) -> None:
    # Heartbeats every 30 s: an abort seen within 10 s came over pub/sub.
    tr = make_runner(heartbeat_interval=30.0, stale_after=60.0)

    async def abort(job_id: str) -> None:
        assert await tr.job(job_id).abort() == JobStatus.RUNNING

    await _run_until_aborted(tr, abort, within=10.0)


async def test_running_job_is_cancelled_by_the_heartbeat_when_the_message_is_missed(
    make_runner: MakeRunner, redis: Redis
) -> None:
    tr = make_runner(heartbeat_interval=0.2, stale_after=1.0)

    async def abort_unheard(job_id: str) -> None:
        # The real abort script, its notice published where no worker listens.
        keys = QueueKeys(tr.namespace, "default")
        keys.events = f"{tr.namespace}:nobody-listens"
        call = scripts.abort(scripts.Env(), keys, keys.stream, job_id, 60_000, [])
        assert await scripts.run(redis, call) == "aborting"

    await _run_until_aborted(tr, abort_unheard, within=DEADLINE)


async def test_abort_of_a_job_whose_worker_died_takes_effect_when_it_is_reclaimed(
    make_runner: MakeRunner, redis: Redis
) -> None:
    """The job is running under a consumer that is gone: the abort flag waits in the job
    until a worker reclaims the entry, which then finishes it as aborted unrun."""
    tr = make_runner(heartbeat_interval=0.2, stale_after=1.0)
    ran: list[int] = []

    @tr.task
    async def work() -> None:
        ran.append(1)

    keys = QueueKeys(tr.namespace, "default")
    async with tr:
        job = await work.enqueue()
        await redis.xgroup_create(keys.stream, "taskrunner", id="0", mkstream=True)
        delivered = cast(Any, await redis.xreadgroup("taskrunner", "gone", {keys.stream: ">"}))
        entry_id = delivered[0][1][0][0]
        claim = scripts.claim(
            scripts.Env(), keys, keys.stream, job.id, "gone", entry_id, "gone:1", 5, 1 << 20
        )
        assert (await scripts.run(redis, claim))[0] == "ok"  # a worker started it, then died
        assert await job.abort() == JobStatus.RUNNING
        async with tr.worker(handle_signals=False):
            with pytest.raises(JobAborted):
                await job.result(timeout=DEADLINE)
        assert ran == []
        info = await job.info()
        assert info.reclaims == 1


@pytest.mark.parametrize("cleanup", ["returns", "raises"])
async def test_abort_of_a_task_that_swallows_its_cancellation_still_ends_aborted(
    make_runner: MakeRunner, cleanup: str
) -> None:
    """The task catches the cancellation and returns a value, or raises an error of its
    own: the abort decides the outcome (not the value, not the error)."""
    tr = make_runner(heartbeat_interval=30.0, stale_after=60.0)
    started = anyio.Event()
    cleaned: list[str] = []

    @tr.task(max_retries=0)
    async def swallow() -> str:
        started.set()
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            cleaned.append(cleanup)
            if cleanup == "raises":
                raise ValueError("cleanup failed") from None
            return "cleaned up"
        return "done"

    async with tr, tr.worker(handle_signals=False):
        job = await swallow.enqueue()
        await started.wait()
        assert await job.abort() == JobStatus.RUNNING
        with pytest.raises(JobAborted):
            await job.result(timeout=DEADLINE)
        info = await job.info()
        assert info.status == JobStatus.ABORTED
        assert info.abort_requested
        assert (info.attempts, info.reclaims) == (1, 0)
    assert cleaned == [cleanup]
