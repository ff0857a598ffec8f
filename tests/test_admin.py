"""The admin API (``tr.admin``) on a real redis-server with a real in-process worker:
job detail, paginated listings merged over partitions and priority levels, retry,
abort, pause and resume, counts, throughput, workers and dead letters; and the Lua
writes behind them."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import anyio
import pytest
from conftest import wait_until
from redis.asyncio import Redis

from taskrunner import (
    ConfigurationError,
    JobFailed,
    JobInfo,
    JobNotFound,
    JobStatus,
    TaskRunner,
    Worker,
    current_job,
    scripts,
)
from taskrunner.admin import CursorError, JobPage
from taskrunner.admin.workers import MAX_WORKERS
from taskrunner.client import now_ms
from taskrunner.keys import Queue, QueueKeys
from taskrunner.task import Task

MakeRunner = Callable[..., TaskRunner]
DEADLINE = 20.0


@asynccontextmanager
async def running(tr: TaskRunner, **kwargs: Any) -> AsyncIterator[Worker]:
    async with tr, tr.worker(handle_signals=False, **kwargs) as worker:
        yield worker


async def final(tr: TaskRunner, job_id: str, queue: str = "default") -> JobStatus:
    status = JobStatus.QUEUED

    async def done() -> bool:
        nonlocal status
        status = await tr.job(job_id, queue).status()
        return status.is_final

    await wait_until(done, DEADLINE)
    return status


def build(make_runner: MakeRunner, **kwargs: Any) -> TaskRunner:
    kwargs.setdefault("heartbeat_interval", 0.1)
    kwargs.setdefault("stale_after", 30)
    kwargs.setdefault("max_retries", 0)
    tr = make_runner(**kwargs)

    @tr.task(name="add")
    async def add(x: int, y: int) -> int:
        return x + y

    @tr.task(name="fixable")
    async def fixable(flag: str) -> str:
        if not await anyio.Path(flag).exists():
            raise RuntimeError(f"not fixed yet: {flag}")
        return "fixed"

    @tr.task(name="hold", timeout=3600, lock="until_executed")
    async def hold(seconds: float, marker: str = "") -> float:
        await current_job().set_progress({"done": 3, "of": 10})
        if marker:
            await anyio.Path(marker).touch()
        await anyio.sleep(seconds)
        return seconds

    @tr.task(name="send_email", queue="emails")
    async def send_email(to: str) -> str:
        return f"sent to {to}"

    return tr


async def _enqueue(
    tr: TaskRunner,
    task: str,
    delay: float | None = None,
    priority: str | None = None,
    **kwargs: Any,
) -> str:
    """Enqueue by name (the tasks live inside ``build``), returning the job id."""
    handle: Task[..., Any] = Task(tr, tr.registry[task])
    return (await handle.options(delay=delay, priority=priority).enqueue(**kwargs)).id


async def _part(tr: TaskRunner, job_id: str, queue: str = "default") -> QueueKeys:
    return await tr.client.locate(queue, job_id)


# -- one job --------------------------------------------------------------------------------


async def test_job_detail_of_a_succeeded_job_has_arguments_result_timings_and_priority(
    make_runner: MakeRunner,
) -> None:
    tr = build(make_runner)
    async with running(tr):
        handle = await _enqueue(tr, "add", priority="high", x=2, y=3)
        assert await final(tr, handle) == JobStatus.SUCCEEDED
        detail = await tr.admin.job(handle)
    assert detail.status == JobStatus.SUCCEEDED
    assert (detail.task, detail.priority, detail.partition) == ("add", "high", 0)
    assert detail.args == {"x": 2, "y": 3}
    assert detail.result == 5
    assert detail.attempts == 1
    assert detail.error is None
    assert detail.started_at is not None
    assert detail.finished_at is not None
    assert detail.run_time is not None
    assert detail.run_time >= 0
    assert detail.queue_wait is not None
    assert detail.queue_wait >= 0
    assert detail.expires_in is not None
    assert 0 < detail.expires_in <= 86400


async def test_job_detail_of_a_failed_job_has_the_error_and_traceback(
    make_runner: MakeRunner, tmp_path: Path
) -> None:
    tr = build(make_runner)
    async with running(tr):
        job_id = await _enqueue(tr, "fixable", flag=str(tmp_path / "flag"))
        assert await final(tr, job_id) == JobStatus.FAILED
        detail = await tr.admin.job(job_id)
    assert detail.error is not None
    assert detail.error.type == "RuntimeError"
    assert "not fixed yet" in detail.error.message
    assert "Traceback" in detail.error.traceback
    assert detail.result is None


async def test_job_detail_shows_the_tasks_progress_and_the_lock_holder(
    make_runner: MakeRunner, tmp_path: Path
) -> None:
    tr = build(make_runner)
    marker = tmp_path / "started"
    async with running(tr):
        job_id = await _enqueue(tr, "hold", seconds=60, marker=str(marker))
        await wait_until(lambda: anyio.Path(marker).exists(), DEADLINE)
        detail = await tr.admin.job(job_id)
        assert detail.status == JobStatus.RUNNING
        assert detail.progress == {"done": 3, "of": 10}  # set by the task itself
        assert len(detail.locks) == 1
        assert detail.locks[0].holder == job_id
        assert detail.locks[0].ttl is not None
        assert detail.locks[0].ttl > 0
        assert await tr.admin.abort(job_id) == JobStatus.RUNNING
        assert await final(tr, job_id) == JobStatus.ABORTED
        after = await tr.admin.job(job_id)
    assert after.locks[0].holder is None  # released when it ended


async def test_job_is_found_in_any_queue_and_partition_and_missing_ones_raise(
    make_runner: MakeRunner,
) -> None:
    tr = build(make_runner, partitions=4)
    async with tr:
        ids = [await _enqueue(tr, "send_email", to=f"{i}@example.com") for i in range(12)]
        parts = {(await _part(tr, i, "emails")).partition for i in ids}
        assert len(parts) > 1  # spread over the partitions
        for job_id in ids:
            assert await tr.admin.find(job_id) == "emails"
            detail = await tr.admin.job(job_id)
            assert (detail.queue, detail.status) == ("emails", JobStatus.QUEUED)
            assert detail.partition == (await _part(tr, job_id, "emails")).partition
        with pytest.raises(JobNotFound):
            await tr.admin.job("no-such-job")
        with pytest.raises(JobNotFound):
            await tr.admin.retry("no-such-job")


async def test_a_hostile_job_hash_does_not_break_the_detail(
    make_runner: MakeRunner, redis: Redis
) -> None:
    tr = build(make_runner)
    key = QueueKeys(tr.namespace, "default").job("odd")
    await redis.hset(
        key,
        mapping={"status": "failed", "args": "{not json", "progress": "50%", "meta": "[1]"},
    )
    await redis.hset(key, mapping={"locks": "nope:lock", "enqueued": "1", "level": "\x00"})
    async with tr:
        detail = await tr.admin.job("odd")
    assert detail.args == "{not json"
    assert detail.progress == "50%"
    assert detail.meta == {}
    assert detail.locks[0].holder is None


# -- retry and abort ------------------------------------------------------------------------


async def test_retry_puts_a_failed_job_back_under_the_same_id_and_it_succeeds(
    make_runner: MakeRunner, tmp_path: Path, redis: Redis
) -> None:
    tr = build(make_runner)
    flag = tmp_path / "flag"
    keys = QueueKeys(tr.namespace, "default")
    async with running(tr):
        job_id = await _enqueue(tr, "fixable", flag=str(flag))
        assert await final(tr, job_id) == JobStatus.FAILED
        assert await redis.zscore(keys.failed, job_id) is not None
        flag.touch()
        assert await tr.retry(job_id) is True
        assert await final(tr, job_id) == JobStatus.SUCCEEDED
        assert await tr.job(job_id).result() == "fixed"
        detail = await tr.admin.job(job_id)
    assert detail.attempts == 1
    assert detail.reruns == 1
    assert await redis.zscore(keys.failed, job_id) is None
    assert await redis.zscore(keys.succeeded, job_id) is not None


async def test_retry_goes_back_to_the_jobs_own_level_and_partition_and_clears_its_history(
    make_runner: MakeRunner, redis: Redis
) -> None:
    tr = build(make_runner, partitions=3)
    async with tr:
        job_id = await _enqueue(tr, "add", priority="low", x=1, y=1)
        keys = await _part(tr, job_id)
        assert await tr.admin.abort(job_id) == JobStatus.ABORTED
        await redis.hset(
            keys.job(job_id),
            mapping={"crashes": 2, "reclaims": 3, "alone": "x", "reclaimed": "1", "progress": "1"},
        )
        await redis.set(keys.idle, "1")  # its workers found the partition drained
        tr.clock.freeze()
        assert await tr.retry(job_id) is True
        state = await redis.hgetall(keys.job(job_id))
        low = cast(list[tuple[str, dict[str, str]]], await redis.xrange(keys.level_stream("low")))
        assert [fields["job"] for _, fields in low] == [job_id]
        assert not await redis.exists(keys.stream)  # not the default level's
        assert not await redis.exists(keys.idle)  # its workers were woken
        assert await redis.ttl(keys.job(job_id)) == -1
    assert state["status"] == "queued"
    assert state["entry"] == low[0][0]
    assert int(state["due"]) == tr.clock.frozen_ms  # the server clock, as the scripts see it
    assert (state["attempts"], state["reruns"], state["level"]) == ("0", "1", "low")
    for gone in ("crashes", "reclaims", "alone", "reclaimed", "progress", "finished", "abort"):
        assert gone not in state


async def test_retry_refuses_live_and_succeeded_jobs(make_runner: MakeRunner) -> None:
    tr = build(make_runner)
    async with tr:
        queued = await _enqueue(tr, "add", x=1, y=1)
        assert await tr.admin.retry(queued) is False
        assert await tr.job(queued).status() == JobStatus.QUEUED
    async with running(tr):
        assert await final(tr, queued) == JobStatus.SUCCEEDED
        assert await tr.admin.retry(queued) is False


async def test_retry_of_an_aborted_job_and_of_a_dead_letter(
    make_runner: MakeRunner, redis: Redis
) -> None:
    tr = build(make_runner)
    keys = QueueKeys(tr.namespace, "default")
    async with tr:
        aborted = await _enqueue(tr, "add", x=1, y=2)
        assert await tr.admin.abort(aborted) == JobStatus.ABORTED
        assert await redis.zscore(keys.aborted, aborted) is not None
        dead = await _enqueue(tr, "add", x=3, y=4)
        await redis.hset(keys.job(dead), "status", "dead")  # as the worker leaves it
        entry = await redis.hget(keys.job(dead), "entry")
        await redis.xdel(keys.stream, str(entry))
        await redis.zadd(keys.dead, {dead: now_ms()})
        assert await tr.admin.retry(aborted) is True
        assert await tr.admin.retry(dead) is True
    async with running(tr):
        assert await tr.job(aborted).result(timeout=DEADLINE) == 3
        assert await tr.job(dead).result(timeout=DEADLINE) == 7
    assert await redis.zscore(keys.aborted, aborted) is None
    assert await redis.zscore(keys.dead, dead) is None


def _newest_first(jobs: list[JobInfo]) -> bool:
    times = [j.finished_at for j in jobs]
    return all(a is not None and b is not None and a >= b for a, b in itertools.pairwise(times))


# -- listing --------------------------------------------------------------------------------


async def collect(tr: TaskRunner, limit: int, **filters: str) -> list[JobPage]:
    pages = [await tr.admin.jobs(limit=limit, **filters)]
    while pages[-1].cursor is not None:
        page = await tr.admin.jobs(limit=limit, cursor=pages[-1].cursor, **filters)
        pages.append(page)
    return pages


async def test_listing_pages_through_every_status_without_repeats(
    make_runner: MakeRunner, tmp_path: Path
) -> None:
    tr = build(make_runner)
    async with running(tr):
        succeeded = [await _enqueue(tr, "add", x=i, y=i) for i in range(7)]
        failed = [await _enqueue(tr, "fixable", flag=str(tmp_path / "x")) for _ in range(5)]
        for job_id in succeeded + failed:
            await final(tr, job_id)
    async with tr:
        queued = [await _enqueue(tr, "add", x=0, y=i) for i in range(4)]
        pages = await collect(tr, 3, queue="default")
        by_status = await collect(tr, 2, queue="default", status="failed")
        newest_first = (await tr.admin.jobs(queue="default", status="succeeded", limit=7)).jobs
    seen = [job.id for page in pages for job in page.jobs]
    assert sorted(seen) == sorted(succeeded + failed + queued)
    assert len(seen) == len(set(seen))
    assert all(len(page.jobs) <= 3 for page in pages)
    listed_failed = [j for p in by_status for j in p.jobs]
    assert sorted(j.id for j in listed_failed) == sorted(failed)
    assert _newest_first(listed_failed)
    assert _newest_first(newest_first)
    assert sorted(j.id for j in newest_first) == sorted(succeeded)
    assert [j.id for j in pages[0].jobs] == queued[:3]  # queued first, oldest first


async def test_listing_merges_partitions_and_levels_in_order_across_small_pages(
    make_runner: MakeRunner,
) -> None:
    tr = build(make_runner, partitions=4)
    levels = ["high", "default", "low"]
    async with tr:
        queued = [await _enqueue(tr, "add", priority=levels[i % 3], x=i, y=0) for i in range(20)]
        parts = {(await _part(tr, i)).partition for i in queued}
        entries = {i: await tr.client.field("default", i, "entry") for i in queued}
        pages = await collect(tr, 3, queue="default", status="queued")
        low = await collect(tr, 2, queue="default", status="queued", priority="low")
    async with running(tr):
        for job_id in queued:
            await final(tr, job_id)
    async with tr:
        done = await collect(tr, 4, queue="default", status="succeeded")
        counts = (await tr.admin.counts(["default"]))[0]
    assert len(parts) > 1
    seen = [j.id for p in pages for j in p.jobs]
    assert sorted(seen) == sorted(queued)
    assert len(seen) == len(set(seen))
    entry_ms = [int(entries[i].split("-")[0]) for i in seen]
    assert entry_ms == sorted(entry_ms)  # one order over every partition and level
    assert {j.priority for p in pages for j in p.jobs} == set(levels)
    low_seen = [j.id for p in low for j in p.jobs]
    assert sorted(low_seen) == sorted(queued[2::3])
    low_ms = [int(entries[i].split("-")[0]) for i in low_seen]
    assert low_ms == sorted(low_ms)
    assert {j.priority for p in low for j in p.jobs} == {"low"}
    finished = [j for p in done for j in p.jobs]
    assert sorted(j.id for j in finished) == sorted(queued)
    assert _newest_first(finished)
    assert (counts.partitions, counts.succeeded, counts.queued) == (4, 20, 0)


async def test_listing_by_task_and_ties_of_one_millisecond(
    make_runner: MakeRunner, redis: Redis
) -> None:
    tr = build(make_runner)
    keys = QueueKeys(tr.namespace, "default")
    ids = [f"j{i:03d}" for i in range(30)]
    when = now_ms()
    for index, job_id in enumerate(ids):  # thirty jobs finished in the same millisecond
        task = "add" if index % 3 else "fixable"
        await redis.hset(
            keys.job(job_id),
            mapping={"status": "succeeded", "task": task, "queue": "default", "enqueued": when},
        )
        await redis.zadd(keys.succeeded, {job_id: when})
    async with tr:
        pages = await collect(tr, 4, status="succeeded", queue="default")
        only_fixable = await collect(tr, 4, status="succeeded", queue="default", task="fixable")
    seen = [j.id for p in pages for j in p.jobs]
    assert sorted(seen) == ids
    assert len(seen) == len(set(seen))
    fixable = [j.id for p in only_fixable for j in p.jobs]
    assert sorted(fixable) == ids[::3]
    assert {j.task for p in only_fixable for j in p.jobs} == {"fixable"}


async def test_listing_skips_index_members_whose_job_moved_on_or_expired(
    make_runner: MakeRunner, redis: Redis
) -> None:
    tr = build(make_runner, result_ttl=60)
    keys = QueueKeys(tr.namespace, "default")
    await redis.zadd(keys.failed, {"gone": now_ms(), "requeued": now_ms()})
    await redis.zadd(keys.failed, {"expired": now_ms() - 120_000})
    await redis.hset(keys.job("requeued"), mapping={"status": "queued", "enqueued": 1})
    await redis.hset(keys.job("expired"), mapping={"status": "failed", "enqueued": 1})
    async with tr:
        page = await tr.admin.jobs(queue="default", status="failed")
        counts = (await tr.admin.counts(["default"]))[0]
    assert page.jobs == []
    assert page.cursor is None
    assert counts.failed == 2  # the index within result_ttl; the listing checks each hash


async def test_bad_listing_arguments_raise_value_errors(make_runner: MakeRunner) -> None:
    tr = build(make_runner)
    async with tr:
        with pytest.raises(ValueError, match="limit"):
            await tr.admin.jobs(limit=0)
        with pytest.raises(ValueError, match="nope"):
            await tr.admin.jobs(status="nope")
        with pytest.raises(ValueError, match="priority"):
            await tr.admin.jobs(priority="urgent")
        with pytest.raises(CursorError):
            await tr.admin.jobs(cursor="garbage!")
        await _enqueue(tr, "add", x=1, y=1)
        await _enqueue(tr, "add", x=1, y=2)
        page = await tr.admin.jobs(queue="default", status="queued", limit=1)
        assert page.cursor is not None
        with pytest.raises(CursorError):  # a cursor of another filter
            await tr.admin.jobs(queue="default", status="failed", cursor=page.cursor)
        with pytest.raises(CursorError):  # of another priority filter
            await tr.admin.jobs(
                queue="default", status="queued", priority="low", cursor=page.cursor
            )


async def test_running_and_scheduled_jobs_are_listed_and_workers_hold_them(
    make_runner: MakeRunner, tmp_path: Path
) -> None:
    tr = build(make_runner, partitions=2)
    marker = tmp_path / "started"
    async with running(tr, grace_period=0.1) as worker:
        held = await _enqueue(tr, "hold", seconds=60, marker=str(marker))
        await wait_until(lambda: anyio.Path(marker).exists(), DEADLINE)
        later = await _enqueue(tr, "add", delay=3600, priority="low", x=1, y=2)
        run_page = await tr.admin.jobs(queue="default", status="running")
        sched_page = await tr.admin.jobs(queue="default", status="scheduled")

        async def seen() -> bool:  # after the worker's first heartbeat
            return any(w.id == worker.id for w in await tr.admin.workers())

        await wait_until(seen, DEADLINE)
        found = next(w for w in await tr.admin.workers() if w.id == worker.id)
        worker.stop()
    assert [j.id for j in run_page.jobs] == [held]
    assert run_page.jobs[0].progress == {"done": 3, "of": 10}
    assert [(j.id, j.priority) for j in sched_page.jobs] == [(later, "low")]
    assert [r.id for r in found.running] == [held]
    assert found.running[0].progress == {"done": 3, "of": 10}
    assert found.holding == 1
    assert sorted(found.queues) == ["default", "emails"]
    assert not found.stale
    assert found.age is not None
    assert found.age < 30


async def test_a_consumer_that_left_the_workers_set_is_listed_with_what_it_holds(
    make_runner: MakeRunner, redis: Redis
) -> None:
    tr = build(make_runner)
    keys = QueueKeys(tr.namespace, "default")
    async with tr:
        job_id = await _enqueue(tr, "add", x=1, y=1)
        await redis.xgroup_create(keys.stream, "taskrunner", "0")
        await redis.xreadgroup("taskrunner", "host:1:gone", {keys.stream: ">"})
        found = await tr.admin.workers()
    assert [(w.id, w.stale, w.last_heartbeat, w.holding) for w in found] == [
        ("host:1:gone", True, None, 1)
    ]
    assert [r.id for r in found[0].running] == [job_id]


async def test_gone_consumers_beyond_the_workers_limit_are_not_listed(
    make_runner: MakeRunner, redis: Redis
) -> None:
    tr = build(make_runner)
    keys = QueueKeys(tr.namespace, "default")
    ghosts = MAX_WORKERS + 50
    async with tr:
        ids = [await _enqueue(tr, "add", x=i, y=1) for i in range(ghosts)]
        await redis.xgroup_create(keys.stream, "taskrunner", "0")
        for i in range(ghosts):  # each holds one entry, none beats
            await redis.xreadgroup("taskrunner", f"host:{i}:gone", {keys.stream: ">"}, count=1)
        found = await tr.admin.workers(["default"])
    assert len(found) == MAX_WORKERS
    assert all(w.stale and w.holding == 1 and len(w.running) == 1 for w in found)
    assert {w.running[0].id for w in found} <= set(ids)


# -- queues: counts, throughput, pause ------------------------------------------------------


async def test_counts_and_throughput_follow_the_outcomes(
    make_runner: MakeRunner, tmp_path: Path
) -> None:
    tr = build(make_runner, partitions=3)
    async with running(tr):
        ok = [await _enqueue(tr, "add", x=i, y=1) for i in range(6)]
        bad = [await _enqueue(tr, "fixable", flag=str(tmp_path / "no")) for _ in range(2)]
        for job_id in ok + bad:
            await final(tr, job_id)

        async def heartbeat_seen() -> bool:
            return (await tr.admin.counts(["default"]))[0].workers == 1

        await wait_until(heartbeat_seen, DEADLINE)
        counts = {c.queue: c for c in await tr.admin.counts()}
        chart = await tr.admin.throughput()
        short = await tr.admin.throughput(["emails"], minutes=5)
    default = counts["default"]
    assert (default.succeeded, default.failed, default.queued, default.running) == (6, 2, 0, 0)
    assert default.workers == 1
    assert default.partitions == 3
    assert counts["emails"].succeeded == 0
    assert len(chart) == 60
    assert sum(m.succeeded for m in chart) == 6
    assert sum(m.failed for m in chart) == 2
    assert sum(m.finished for m in chart) == 8
    assert chart[-1].minute.timestamp() == (time.time() // 60) * 60
    assert len(short) == 5
    assert sum(m.finished for m in short) == 0


async def test_throughput_counts_each_job_in_the_minute_it_finished_by_the_server_clock(
    make_runner: MakeRunner,
) -> None:
    tr = build(make_runner)
    async with running(tr):
        tr.clock.freeze()
        first = await _enqueue(tr, "add", x=1, y=1)
        await final(tr, first)
        tr.clock.advance(180)  # three minutes later, as the scripts see it
        second = await _enqueue(tr, "add", x=1, y=2)
        await final(tr, second)
        chart = await tr.admin.throughput(minutes=10)
    assert [m.succeeded for m in chart][-4:] == [1, 0, 0, 1]
    assert chart[-1].minute.timestamp() == (tr.clock.now() // 60) * 60


async def test_paused_queue_accepts_jobs_and_its_worker_takes_none_until_resumed(
    make_runner: MakeRunner, redis: Redis
) -> None:
    tr = build(make_runner, partitions=3)
    async with running(tr):
        await tr.pause("default")
        queue = await tr.client.resolve("default")
        assert [await redis.exists(k.paused) for k in queue.parts] == [1, 1, 1]
        held = [await _enqueue(tr, "add", x=i, y=2) for i in range(6)]  # accepted while paused
        assert len({(await _part(tr, i)).partition for i in held}) > 1
        other = await _enqueue(tr, "send_email", to="b@example.com")
        assert await tr.job(other, "emails").result(timeout=DEADLINE) == "sent to b@example.com"
        for job_id in held:  # the worker read the other queue meanwhile, and none of these
            assert await tr.job(job_id).status() == JobStatus.QUEUED
        counts = await tr.admin.counts(["default", "emails"])
        assert [(c.paused, c.paused_partitions, c.queued) for c in counts] == [
            (True, 3, 6),
            (False, 0, 0),
        ]
        await tr.resume("default")
        assert [await tr.job(i).result(timeout=DEADLINE) for i in held] == [2, 3, 4, 5, 6, 7]
        assert await tr.admin.paused() == set()


async def test_a_worker_started_on_a_paused_queue_waits_for_the_resume(
    make_runner: MakeRunner,
) -> None:
    tr = build(make_runner)
    async with tr:
        await tr.pause("default")
        await tr.pause("default")  # idempotent
        job_id = await _enqueue(tr, "add", x=2, y=2)
        async with tr.worker(handle_signals=False):
            other = await _enqueue(tr, "send_email", to="c@example.com")
            assert await tr.job(other, "emails").result(timeout=DEADLINE) == "sent to c@example.com"
            assert await tr.job(job_id).status() == JobStatus.QUEUED
            assert await tr.admin.paused() == {"default"}
            await tr.resume("default")
            assert await tr.job(job_id).result(timeout=DEADLINE) == 4


async def test_pause_covers_the_partitions_this_runner_is_configured_for(
    make_runner: MakeRunner, redis: Redis
) -> None:
    recorded = build(make_runner, partitions=2)
    async with recorded:
        await recorded.client.resolve("default", record=True)  # as its workers record it
    wider = build(make_runner, partitions=4)
    async with wider:
        await wider.pause("default")
    paused = [await redis.exists(QueueKeys(wider.namespace, "default", p).paused) for p in range(4)]
    assert paused == [1, 1, 1, 1]


# -- dead letters ---------------------------------------------------------------------------


async def test_dead_letters_page_retry_delete_and_purge(
    make_runner: MakeRunner, redis: Redis
) -> None:
    tr = build(make_runner)
    keys = QueueKeys(tr.namespace, "default")
    ids = [f"dead{i}" for i in range(7)]
    for index, job_id in enumerate(ids):
        await redis.hset(
            keys.job(job_id),
            mapping={"status": "dead", "task": "add", "enqueued": 1, "error": _error("poison")},
        )
        await redis.zadd(keys.dead, {job_id: 1000 + index})
    await redis.hset(keys.job("failed1"), mapping={"status": "failed", "task": "add"})
    async with tr:
        page = await tr.admin.dead_letters("default", limit=5)
        assert [j.id for j in page.jobs] == ids[::-1][:5]
        assert page.jobs[0].error is not None
        assert page.jobs[0].error.message == "poison"
        assert await tr.admin.retry_dead(["dead6", "failed1", "nope"], "default") == 1
        assert await tr.job("dead6").status() == JobStatus.QUEUED
        assert await tr.job("failed1").status() == JobStatus.FAILED  # not a dead letter
        assert await tr.admin.delete_dead(["dead0", "nope"], "default") == 1
        assert not await redis.exists(keys.job("dead0"))
        assert await tr.admin.purge_dead("default") == 5
        assert await redis.zcard(keys.dead) == 0
        assert not await redis.exists(keys.job("dead5"))
        assert await redis.exists(keys.job("dead6"))  # revived: no longer a dead letter


async def test_a_string_given_for_queues_or_job_ids_is_refused_not_read_as_its_letters(
    make_runner: MakeRunner, redis: Redis
) -> None:
    tr = build(make_runner)
    keys = QueueKeys(tr.namespace, "default")
    for job_id in ("a", "b"):  # "ab" read as letters would name both
        await redis.hset(keys.job(job_id), mapping={"status": "dead", "task": "add"})
        await redis.zadd(keys.dead, {job_id: 1000})
    async with tr:
        calls = [
            tr.admin.counts("default"),
            tr.admin.throughput("default"),
            tr.admin.workers("default"),
            tr.admin.paused("default"),
            tr.admin.find("a", "default"),
            tr.admin.delete_dead("ab", "default"),
            tr.admin.retry_dead("ab", "default"),
            tr.delete_dead("ab"),
            tr.retry_dead("ab"),
        ]
        for call in calls:
            with pytest.raises(ConfigurationError, match="got the string"):
                await call
        assert await redis.zcard(keys.dead) == 2
        assert await tr.admin.find("a", ["default"]) == "default"
        assert [c.queue for c in await tr.admin.counts(["default"])] == ["default"]


async def test_a_limit_or_a_number_of_minutes_that_is_no_whole_number_is_refused(
    make_runner: MakeRunner,
) -> None:
    # limit=True listed one job; minutes=1.5 failed inside with a TypeError
    tr = build(make_runner)
    async with tr:
        for limit in (True, 1.5, "10"):
            with pytest.raises(ValueError, match="limit must be a whole number between 1 and"):
                await tr.admin.jobs(limit=cast(Any, limit))
        for minutes in (True, 1.5, "5"):
            with pytest.raises(ValueError, match="minutes must be a whole number"):
                await tr.admin.throughput(minutes=cast(Any, minutes))
        assert len(await tr.admin.throughput(minutes=5)) == 5


def _error(message: str) -> str:
    return json.dumps({"type": "DeadLetter", "message": message, "traceback": ""})


# -- the Lua writes behind the indexes ------------------------------------------------------


async def test_commits_index_each_final_status_and_trim_it_by_result_ttl_in_steps(
    make_runner: MakeRunner, redis: Redis, tmp_path: Path
) -> None:
    tr = build(make_runner, result_ttl=3600)
    keys = QueueKeys(tr.namespace, "default")
    tr.clock.freeze()
    assert tr.clock.frozen_ms is not None
    tr.clock.frozen_ms -= tr.clock.frozen_ms % 32  # a commit at a multiple of 32 ms trims
    old = tr.clock.frozen_ms - 2 * 3600 * 1000
    ancient = {f"ancient{i:05d}": old + i for i in range(scripts.TRIM_MAX + 250)}
    await redis.zadd(keys.succeeded, ancient)
    for index in (keys.aborted, keys.rejected):
        await redis.zadd(index, {"ancient": old})
    async with running(tr):
        ok = await _enqueue(tr, "add", x=1, y=1)
        bad = await _enqueue(tr, "fixable", flag=str(tmp_path / "none"))
        await final(tr, ok)
        await final(tr, bad)
        aborted = await _enqueue(tr, "add", delay=60, x=1, y=1)
        assert await tr.admin.abort(aborted) == JobStatus.ABORTED
    succeeded = await redis.zrange(keys.succeeded, 0, -1, withscores=True)
    assert succeeded[-1] == (ok, tr.clock.frozen_ms)
    # at most TRIM_MAX stale members leave per trim: the oldest first, the rest next time
    assert [m for m, _ in succeeded[:-1]] == sorted(ancient)[scripts.TRIM_MAX :]
    assert await redis.zrange(keys.failed, 0, -1) == [bad]
    assert await redis.zrange(keys.aborted, 0, -1) == [aborted]
    assert await redis.zrange(keys.rejected, 0, -1) == ["ancient"]  # no rejection trimmed it


async def test_a_rejected_job_is_indexed_counted_and_listed(
    make_runner: MakeRunner, tmp_path: Path, redis: Redis
) -> None:
    tr = build(make_runner)
    marker = tmp_path / "started"

    @tr.task(name="guarded", lock="while_executing", unique_args=lambda *args, **kwargs: "one")
    async def guarded(seconds: float, marker: str = "") -> None:
        if marker:
            await anyio.Path(marker).touch()
        await anyio.sleep(seconds)

    keys = QueueKeys(tr.namespace, "default")
    async with running(tr):
        holder = await _enqueue(tr, "guarded", seconds=60, marker=str(marker))
        await wait_until(lambda: anyio.Path(marker).exists(), DEADLINE)
        refused = await _enqueue(tr, "guarded", seconds=0)
        assert await final(tr, refused) == JobStatus.REJECTED
        page = await tr.admin.jobs(queue="default", status="rejected")
        counts = (await tr.admin.counts(["default"]))[0]
        chart = await tr.admin.throughput(["default"], minutes=2)
        await tr.admin.abort(holder)
        await final(tr, holder)
    assert await redis.zrange(keys.rejected, 0, -1) == [refused]
    assert [j.id for j in page.jobs] == [refused]
    assert counts.rejected == 1
    assert sum(m.rejected for m in chart) == 1


async def test_failed_job_counts_in_its_minute(make_runner: MakeRunner, tmp_path: Path) -> None:
    tr = build(make_runner)
    async with running(tr):
        job_id = await _enqueue(tr, "fixable", flag=str(tmp_path / "none"))
        with pytest.raises(JobFailed):
            await tr.job(job_id).result(timeout=DEADLINE)
        chart = await tr.admin.throughput(minutes=5)
    assert len(chart) == 5
    assert sum(m.failed for m in chart) == 1


def test_queue_keys_name_each_finished_index() -> None:
    keys = QueueKeys("ns", "q", 2)
    assert keys.finished("succeeded") == "ns:{q#2}:succeeded"
    assert keys.finished("rejected") == "ns:{q#2}:rejected"
    for outcome in ("aborted", "retry", "reschedule", "handback"):
        assert keys.finished(outcome) == "ns:{q#2}:aborted"
    assert Queue("ns", "q", partitions=2).parts[1].succeeded == "ns:{q#1}:succeeded"


async def test_hostile_entries_members_and_hashes_leave_the_reads_standing(
    make_runner: MakeRunner, redis: Redis
) -> None:
    tr = build(make_runner)
    keys = QueueKeys(tr.namespace, "default")
    good = "good"
    await redis.hset(keys.job(good), mapping={"status": "queued", "task": "add", "enqueued": 1})
    await redis.xadd(keys.stream, {"not-job": "x"})  # an entry without a job
    await redis.xadd(keys.stream, {"job": good})
    await redis.zadd(keys.delayed, {"garbage": 1, "0000000000000001:low:": 2})
    await redis.zadd(keys.succeeded, {"odd": now_ms()})
    hostile: dict[Any, float] = {b"\xff\xfe": now_ms()}  # a member that is not UTF-8
    await redis.zadd(keys.succeeded, hostile)
    await redis.hset(
        keys.job("odd"),
        mapping={"status": "succeeded", "attempts": "many", "enqueued": "soon", "level": "{x}"},
    )
    async with tr:
        queued = await tr.admin.jobs(queue="default", status="queued")
        scheduled = await tr.admin.jobs(queue="default", status="scheduled")
        done = await tr.admin.jobs(queue="default", status="succeeded")
        everything = await collect(tr, 2, queue="default")
        counts = (await tr.admin.counts(["default"]))[0]
        chart = await tr.admin.throughput(["default"], minutes=1)
        workers = await tr.admin.workers()
        odd = await tr.admin.job("odd")
    assert [j.id for j in queued.jobs] == [good]
    assert scheduled.jobs == []
    assert [(j.id, j.attempts) for j in done.jobs] == [("odd", 0)]
    assert sorted(j.id for p in everything for j in p.jobs) == [good, "odd"]
    assert (counts.queued, counts.scheduled, counts.succeeded) == (2, 2, 2)
    assert chart[-1].succeeded == 2
    assert workers == []
    assert (odd.priority, odd.attempts) == ("{x}", 0)
