"""Enqueueing: validation before any write, idempotent job ids, delays, queues, bulk."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pydantic
import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from taskrunner import (
    Call,
    ConfigurationError,
    EnqueueContext,
    Job,
    JobInfo,
    JobNotFound,
    JobStatus,
    Middleware,
    Task,
    TaskRunner,
)
from taskrunner import scripts as scripts_module
from taskrunner.client import new_job_id
from taskrunner.keys import QueueKeys
from taskrunner.middleware.base import EnqueueNext
from taskrunner.options import MAX_SECONDS
from taskrunner.worker.scheduler import parse_member

MakeRunner = Callable[..., TaskRunner]
DEADLINE = 30.0


async def xrange(redis: Redis, stream: str) -> list[tuple[str, dict[str, str]]]:
    return cast(list[tuple[str, dict[str, str]]], await redis.xrange(stream))


async def namespace_keys(redis: Redis, namespace: str) -> list[str]:
    return sorted([key async for key in redis.scan_iter(match=f"{namespace}:*", count=1000)])


@pytest.fixture
async def tr(make_runner: MakeRunner) -> AsyncIterator[TaskRunner]:
    runner = make_runner()
    async with runner:
        yield runner


def declare_add(tr: TaskRunner) -> Task[[int, int], int]:
    @tr.task
    async def add(x: int, y: int) -> int:
        return x + y

    return add


# -- validation --------------------------------------------------------------------------


async def test_wrong_argument_type_raises_validation_error_and_writes_nothing(
    tr: TaskRunner, redis: Redis, namespace: str
) -> None:
    add = declare_add(tr)
    with pytest.raises(pydantic.ValidationError):
        await add.enqueue(1, "not a number")  # type: ignore[arg-type]
    with pytest.raises(pydantic.ValidationError):
        await add.options(delay=5, job_id="fixed").enqueue("x", 2)  # type: ignore[arg-type]
    assert await namespace_keys(redis, namespace) == []


async def test_wrong_arity_raises_type_error_and_writes_nothing(
    tr: TaskRunner, redis: Redis, namespace: str
) -> None:
    add = declare_add(tr)
    with pytest.raises(TypeError):
        await add.enqueue(1)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        await add.enqueue(1, 2, 3)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        await add.enqueue(1, 2, z=3)  # type: ignore[call-arg]
    assert await namespace_keys(redis, namespace) == []


async def test_enqueue_many_validates_every_call_before_writing_any(
    tr: TaskRunner, redis: Redis, namespace: str
) -> None:
    add = declare_add(tr)
    calls = [add.call(i, i) for i in range(1500)]
    calls.append(add.call(1, "bad"))  # type: ignore[arg-type]
    with pytest.raises(pydantic.ValidationError):
        await add.enqueue_many(calls)
    assert await namespace_keys(redis, namespace) == []


# -- writing -----------------------------------------------------------------------------


async def test_enqueue_writes_a_queued_job_with_its_info(
    tr: TaskRunner, redis: Redis, namespace: str
) -> None:
    add = declare_add(tr)
    before = datetime.now(UTC)
    job = await add.enqueue(1, 2)
    assert isinstance(job, Job)
    assert not job.deduplicated
    assert job.queue == "default"
    status = await job.status()
    assert status is JobStatus.QUEUED
    expected: str = "queued"
    assert status == expected  # a str enum
    info = await job.info()
    assert isinstance(info, JobInfo)
    assert (info.id, info.task, info.queue, info.status) == (job.id, add.name, "default", "queued")
    assert info.attempts == 0
    assert before - timedelta(seconds=1) <= info.enqueued_at <= datetime.now(UTC)
    assert info.due_at is None
    assert info.started_at is None
    assert info.finished_at is None
    assert info.error is None
    keys = QueueKeys(namespace, "default")
    assert await redis.xlen(keys.stream) == 1
    entries = await xrange(redis, keys.stream)
    assert entries[0][1] == {"job": job.id}  # only what the worker needs goes in the entry
    assert set(await namespace_keys(redis, namespace)) == {keys.stream, keys.job(job.id)}


async def test_each_enqueue_creates_a_new_id(tr: TaskRunner) -> None:
    add = declare_add(tr)
    jobs = [await add.enqueue(1, 2) for _ in range(3)]
    assert len({job.id for job in jobs}) == 3
    for job in jobs:  # a random id has uuid4().hex's format
        parsed = uuid.UUID(job.id)
        assert (parsed.hex, parsed.version, parsed.variant) == (job.id, 4, uuid.RFC_4122)


async def test_same_job_id_is_idempotent_and_writes_nothing_the_second_time(
    tr: TaskRunner, redis: Redis, namespace: str
) -> None:
    add = declare_add(tr)
    first = await add.options(job_id="order-42").enqueue(1, 2)
    assert first.id == "order-42"
    assert not first.deduplicated
    keys = QueueKeys(namespace, "default")
    snapshot = {key: await redis.dump(key) for key in await namespace_keys(redis, namespace)}

    second = await add.options(job_id="order-42").enqueue(5, 6)
    assert second.id == "order-42"
    assert second.deduplicated
    assert second == first
    after = {key: await redis.dump(key) for key in await namespace_keys(redis, namespace)}
    assert after == snapshot
    assert await redis.xlen(keys.stream) == 1

    many = await add.enqueue_many([add.options(job_id="order-42").call(7, 8)])
    assert [job.deduplicated for job in many] == [True]
    assert await redis.xlen(keys.stream) == 1


async def test_a_job_id_taken_by_another_task_gives_a_handle_that_reads_that_tasks_result(
    make_runner: MakeRunner,
) -> None:
    """A job id given to two tasks names one job (ids are per queue): the second enqueue
    is deduplicated onto the first task's job, and its handle rebuilds that job's result
    (it decoded it with the second task's type: "stored result unreadable")."""
    tr = make_runner()
    add = declare_add(tr)

    @tr.task
    async def stamp(label: str) -> datetime:
        return datetime(2030, 1, 1, tzinfo=UTC)

    async with tr:
        first = await stamp.options(job_id="order-7").enqueue("charge")
        again = await add.options(job_id="order-7").enqueue(1, 2)
        [many] = await add.enqueue_many([add.options(job_id="order-7").call(3, 4)])
        assert again.deduplicated
        assert many.deduplicated
        await tr.run_until_idle()
        expected = datetime(2030, 1, 1, tzinfo=UTC)
        assert await first.result(timeout=DEADLINE) == expected
        assert await again.result(timeout=DEADLINE) == expected
        assert await many.result(timeout=DEADLINE) == expected


async def test_delay_schedules_the_job_in_the_delayed_set(
    tr: TaskRunner, redis: Redis, namespace: str
) -> None:
    add = declare_add(tr)
    before = time.time()
    job = await add.options(delay=60).enqueue(1, 2)
    by_timedelta = await add.options(delay=timedelta(minutes=2)).enqueue(1, 2)
    assert await job.status() == JobStatus.SCHEDULED
    keys = QueueKeys(namespace, "default")
    assert await redis.xlen(keys.stream) == 0
    scores = dict(
        cast(list[tuple[str, float]], await redis.zrange(keys.delayed, 0, -1, withscores=True))
    )
    assert len(scores) == 2
    due = {parse_member(member)[1]: score / 1000 for member, score in scores.items()}
    # The server keeps whole milliseconds: allow one below a fractional local time.
    assert before + 60 - 0.001 <= due[job.id] <= time.time() + 60
    assert before + 120 - 0.001 <= due[by_timedelta.id] <= time.time() + 120
    info = await job.info()
    assert info.due_at is not None
    assert abs(info.due_at.timestamp() - due[job.id]) < 0.002


async def test_the_longest_delay_stays_in_the_future_and_a_longer_one_is_refused(
    tr: TaskRunner, redis: Redis, namespace: str
) -> None:
    """The longest delay (MAX_SECONDS, about 100 years) is due that far ahead; a delay
    of 10**20 s (more milliseconds than a 64-bit integer holds) is refused where it is
    given, and nothing is written."""
    add = declare_add(tr)
    keys = QueueKeys(namespace, "default")
    with pytest.raises(ConfigurationError, match="at most"):
        await add.options(delay=1e20).enqueue(1, 2)
    assert await redis.zcard(keys.delayed) == 0
    job = await add.options(delay=MAX_SECONDS).enqueue(1, 2)
    [(_, score)] = cast(
        list[tuple[str, float]], await redis.zrange(keys.delayed, 0, -1, withscores=True)
    )
    assert score > (time.time() + MAX_SECONDS - 3600) * 1000
    assert await job.status() == JobStatus.SCHEDULED


async def test_at_schedules_for_that_time_and_a_past_time_is_due_now(
    tr: TaskRunner, redis: Redis, namespace: str
) -> None:
    add = declare_add(tr)
    when = datetime.now(UTC) + timedelta(hours=1)
    job = await add.options(at=when).enqueue(1, 2)
    info = await job.info()
    assert info.status == JobStatus.SCHEDULED
    assert info.due_at is not None
    # Sent as a delay from the producer's now; the server adds it to its own clock, so
    # the due time is `when` plus the time the enqueue took to reach Redis, never less.
    assert -0.001 <= (info.due_at - when).total_seconds() < DEADLINE  # (whole ms)

    past = await add.options(at=datetime.now(UTC) - timedelta(hours=1)).enqueue(1, 2)
    assert await past.status() == JobStatus.QUEUED
    zero = await add.options(delay=0).enqueue(1, 2)
    assert await zero.status() == JobStatus.QUEUED


async def test_queue_option_overrides_the_task_queue(
    tr: TaskRunner, redis: Redis, namespace: str
) -> None:
    @tr.task(queue="emails")
    async def send(to: str) -> None:
        return None

    default_queue = await send.enqueue("a@example.com")
    other = await send.options(queue="urgent").enqueue("b@example.com")
    assert (default_queue.queue, other.queue) == ("emails", "urgent")
    assert await redis.xlen(QueueKeys(namespace, "emails").stream) == 1
    assert await redis.xlen(QueueKeys(namespace, "urgent").stream) == 1
    assert (await other.info()).queue == "urgent"


async def test_unknown_job_raises_job_not_found(tr: TaskRunner) -> None:
    job = tr.job("nope")
    with pytest.raises(JobNotFound):
        await job.status()
    with pytest.raises(JobNotFound):
        await job.info()
    with pytest.raises(JobNotFound):
        await job.abort()


async def test_a_handle_without_a_queue_looks_in_the_default_queue_and_says_so(
    tr: TaskRunner,
) -> None:
    # tr.job(id) is a handle on the runner's default queue: a job of a task on another
    # queue is not there, and the error names the queue it was looked for in
    @tr.task(queue="emails")
    async def send(to: str) -> str:
        return to

    job = await send.enqueue("ann@example.com")
    handle = tr.job(job.id)
    assert handle.queue == "default"
    for call in (handle.status, handle.info, handle.abort, lambda: handle.result(timeout=0)):
        with pytest.raises(JobNotFound, match=f"^no job '{job.id}' in queue 'default'$") as err:
            await call()
        assert err.value.queue == "default"
    assert await tr.job(job.id, queue="emails").status() == JobStatus.QUEUED
    assert await tr.job(job.id, queue=await tr.admin.find(job.id)).status() == JobStatus.QUEUED
    with pytest.raises(JobNotFound, match=r"^no job 'nope' in queue 'emails'$"):
        await tr.admin.job("nope", queue="emails")
    with pytest.raises(JobNotFound, match=r"^no job 'nope'$"):
        await tr.admin.job("nope")


async def test_abort_before_running_finishes_the_job_as_aborted(
    tr: TaskRunner, redis: Redis, namespace: str
) -> None:
    add = declare_add(tr)
    keys = QueueKeys(namespace, "default")
    queued = await add.enqueue(1, 2)
    scheduled = await add.options(delay=60).enqueue(1, 2)
    assert await queued.abort() == JobStatus.ABORTED
    assert await scheduled.abort() == JobStatus.ABORTED
    assert await queued.status() == JobStatus.ABORTED
    assert await scheduled.status() == JobStatus.ABORTED
    assert await redis.xlen(keys.stream) == 0
    assert await redis.zcard(keys.delayed) == 0
    assert (await queued.info()).finished_at is not None
    assert await queued.abort() == JobStatus.ABORTED  # already final: unchanged


# -- enqueue_many ------------------------------------------------------------------------


class CountingRunMany:
    """Counts pipelined round trips (wraps the real ``scripts.run_many``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sizes: list[int] = []
        self._real = scripts_module.run_many
        monkeypatch.setattr(scripts_module, "run_many", self)

    async def __call__(
        self, redis: Redis, calls: Sequence[scripts_module.ScriptCall], **options: Any
    ) -> Any:
        self.sizes.append(len(calls))
        return await self._real(redis, calls, **options)


async def test_enqueue_many_keeps_order_and_sends_one_pipeline_per_batch(
    tr: TaskRunner, redis: Redis, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    add = declare_add(tr)
    counter = CountingRunMany(monkeypatch)
    jobs = await add.enqueue_many([add.options(job_id=f"j{i}").call(i, i) for i in range(2500)])
    assert counter.sizes == [1000, 1000, 500]
    assert [job.id for job in jobs] == [f"j{i}" for i in range(2500)]
    keys = QueueKeys(namespace, "default")
    entries = await xrange(redis, keys.stream)
    assert [fields["job"] for _, fields in entries] == [f"j{i}" for i in range(2500)]
    assert await add.enqueue_many([]) == []


class SendLog:
    """Records the order of three things: a batch sent (``run_many`` called), a batch
    answered (its ``run_many`` returned) and a job's script call built."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, tr: TaskRunner) -> None:
        self.events: list[str] = []
        self._run_many = scripts_module.run_many
        self._write_call = tr.client.write_call
        monkeypatch.setattr(scripts_module, "run_many", self.run_many)
        monkeypatch.setattr(tr.client, "write_call", self.write_call)

    async def run_many(
        self, redis: Redis, calls: Sequence[scripts_module.ScriptCall], **options: Any
    ) -> Any:
        self.events.append("sent")
        try:
            return await self._run_many(redis, calls, **options)
        finally:
            self.events.append("answered")

    def write_call(self, ctx: EnqueueContext) -> scripts_module.ScriptCall:
        self.events.append("built")
        return self._write_call(ctx)


async def test_enqueue_many_builds_the_next_batch_while_the_server_runs_one(
    tr: TaskRunner, redis: Redis, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    add = declare_add(tr)
    log = SendLog(monkeypatch, tr)
    jobs = await add.enqueue_many([add.options(job_id=f"o{i}").call(i, i) for i in range(2500)])
    assert [job.id for job in jobs] == [f"o{i}" for i in range(2500)]
    events = log.events
    sent = [i for i, e in enumerate(events) if e == "sent"]
    answered = [i for i, e in enumerate(events) if e == "answered"]
    assert len(sent) == len(answered) == 3
    # one batch on the server at a time: each is sent after the one before is answered
    assert sent[0] < answered[0] < sent[1] < answered[1] < sent[2] < answered[2]
    # the first batch is built before anything is sent; each later one (at least its
    # first calls) while the batch before it is on the server
    assert events[: sent[0]] == ["built"] * 1000
    for before, after in ((0, 1), (1, 2)):
        assert "built" in events[sent[before] : answered[before]]
        assert events[sent[before] : sent[after]].count("built") == (1000 if after == 1 else 500)
    entries = await xrange(redis, QueueKeys(namespace, "default").stream)
    assert [fields["job"] for _, fields in entries] == [f"o{i}" for i in range(2500)]


async def test_enqueue_many_stops_at_a_batch_that_fails(
    tr: TaskRunner, redis: Redis, namespace: str
) -> None:
    """A batch the server refuses raises; the batches after it are not sent, as when
    the batches go one by one (the ones before it stay written)."""
    add = declare_add(tr)
    await redis.set(QueueKeys(namespace, "broken").stream, "not a stream")
    calls = [add.options(job_id=f"b{i}").call(i, i) for i in range(3000)]
    calls[1500] = add.options(job_id="b1500", queue="broken").call(0, 0)
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await add.enqueue_many(calls)
    entries = await xrange(redis, QueueKeys(namespace, "default").stream)
    written = [fields["job"] for _, fields in entries]
    assert written == [f"b{i}" for i in range(2000) if i != 1500]  # batches 1 and 2
    assert not await redis.exists(QueueKeys(namespace, "default").job("b2000"))


async def test_enqueue_many_mixes_tasks_and_options(
    tr: TaskRunner, redis: Redis, namespace: str
) -> None:
    add = declare_add(tr)

    @tr.task(queue="other")
    async def shout(text: str) -> str:
        return text.upper()

    calls: list[Call[Any]] = [add.call(1, 2), shout.call("hi"), add.options(delay=60).call(3, 4)]
    jobs = await tr.enqueue_many(calls)
    assert [job.queue for job in jobs] == ["default", "other", "default"]
    statuses = [await job.status() for job in jobs]
    assert statuses == [JobStatus.QUEUED, JobStatus.QUEUED, JobStatus.SCHEDULED]
    assert await redis.xlen(QueueKeys(namespace, "other").stream) == 1


class PassThrough(Middleware):
    def __init__(self) -> None:
        self.seen: list[str] = []

    async def enqueue(self, ctx: EnqueueContext, call_next: EnqueueNext) -> Job[Any]:
        self.seen.append(ctx.job_id)
        return await call_next(ctx)


async def test_enqueue_many_through_enqueue_middleware_is_still_one_pipeline(
    make_runner: MakeRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    mw = PassThrough()
    tr = make_runner(middleware=[mw])
    add = declare_add(tr)
    async with tr:
        counter = CountingRunMany(monkeypatch)
        jobs = await add.enqueue_many([add.options(job_id=f"m{i}").call(i, i) for i in range(1200)])
        assert counter.sizes == [1000, 200]
        assert [job.id for job in jobs] == [f"m{i}" for i in range(1200)]
        assert sorted(mw.seen) == sorted(f"m{i}" for i in range(1200))
        single = await add.enqueue(1, 1)
        assert await single.status() == JobStatus.QUEUED


def test_job_ids_are_uuid4_hex_and_a_forked_child_draws_its_own() -> None:
    """Random job ids are drawn from the system in blocks; a child forked after a
    block was drawn must not hand out the parent's next ids (two producers would write
    the same job id, and the second enqueue would be taken for a duplicate)."""
    first = new_job_id()
    assert uuid.UUID(first).hex == first
    assert uuid.UUID(first).version == 4
    assert len({new_job_id() for _ in range(1000)}) == 1000
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        os.close(read)
        os.write(write, " ".join(new_job_id() for _ in range(10)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = set(pipe.read().split())
    os.waitpid(pid, 0)
    parent = {new_job_id() for _ in range(10)}
    assert len(child) == 10
    assert not child & parent
