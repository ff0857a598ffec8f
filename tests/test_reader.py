"""The reader after a "ready" event: it reads the partition that sent it, not all of
them, so a job arriving in one partition of a queue split in P costs each idle worker
one read instead of P (observed through keyspace notifications on the partitions'
``idle`` flags, which every read of a drained partition sets)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest
from conftest import wait_until
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from taskrunner import Task, TaskRunner, scripts
from taskrunner.keys import Queue, QueueKeys
from taskrunner.worker.held import Claimed
from taskrunner.worker.reader import Planned, Reader, ensure_groups
from taskrunner.worker.slots import Slots

DEADLINE = 60.0
PARTITIONS = 4


async def test_a_ready_event_reads_only_its_partition(
    make_runner: Callable[..., TaskRunner], redis: Redis, redis_url: str
) -> None:
    tr = make_runner(partitions=PARTITIONS)
    tr.max_idle_wait = 3600.0  # no fallback read of every partition during the test

    echo = echo_task(tr)

    await redis.config_set("notify-keyspace-events", "K$")
    watcher = Redis.from_url(redis_url, decode_responses=True)
    pubsub = watcher.pubsub()
    try:
        async with tr, tr.worker(concurrency=4, handle_signals=False):
            parts = [tr.client.keys("default", p) for p in range(PARTITIONS)]

            async def all_idle() -> bool:
                return bool(await redis.exists(*(k.idle for k in parts)) == PARTITIONS)

            await wait_until(all_idle, DEADLINE)  # the first read found every one drained
            marker = f"{parts[0].prefix}:marker"
            await pubsub.subscribe(
                *(f"__keyspace@0__:{k}" for k in [marker, *(p.idle for p in parts)])
            )
            jobs = [await echo.enqueue(n) for n in range(3)]
            assert [await job.result(timeout=DEADLINE) for job in jobs] == [0, 1, 2]
            homes = {(await tr.client.locate("default", job.id)).idle for job in jobs}
            await redis.set(marker, "1")  # events arrive in order: this one comes last
            touched: set[str] = set()
            async with asyncio.timeout(DEADLINE):
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                    if message is None:
                        continue
                    key = str(message["channel"]).removeprefix("__keyspace@0__:")
                    if key == marker:
                        break
                    touched.add(key)
            assert homes
            assert touched <= homes, (homes, touched)
    finally:
        await redis.config_set("notify-keyspace-events", "")
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await watcher.aclose()


class Monitor:
    """Every command clients send (MONITOR) from ``start()`` until the marker key is
    set: commands reach a MONITOR in the order the server runs them, so setting the
    marker last means everything before it was seen."""

    def __init__(self, url: str, marker: str) -> None:
        self._client = Redis.from_url(url, decode_responses=True)
        self._marker = marker
        self.commands: list[str] = []
        self._started = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen())
        await asyncio.wait_for(self._started.wait(), DEADLINE)

    async def _listen(self) -> None:
        async with self._client.monitor() as mon:
            self._started.set()
            async for event in mon.listen():
                if str(event.get("client_address", "")).startswith("lua"):
                    continue  # commands run inside scripts
                command = str(event["command"])
                if command.startswith(f"SET {self._marker}"):
                    return
                self.commands.append(command)

    async def stop(self, redis: Redis) -> list[str]:
        assert self._task is not None
        await redis.set(self._marker, "1")
        await asyncio.wait_for(self._task, DEADLINE)
        await self._client.aclose()
        return self.commands


def evalshas(commands: list[str], script: scripts.Script) -> list[str]:
    """The runs of ``script`` among ``commands``, alone or in a batch."""
    shas = (script.sha, script.batch_sha)
    return [c for c in commands if c.startswith("EVALSHA") and any(h in c for h in shas)]


def echo_task(tr: TaskRunner) -> Task[[int], int]:
    """The tests' task: returns its argument."""

    @tr.task
    async def echo(n: int) -> int:
        return n

    return echo


def idle_flag(redis: Redis, keys: QueueKeys) -> Callable[[], Awaitable[bool]]:
    """Whether the partition's idle flag is set: a worker's read found it drained."""

    async def idle() -> bool:
        return bool(await redis.exists(keys.idle))

    return idle


async def test_the_worker_a_ready_event_wakes_claims_the_job_it_names_in_its_read(
    make_runner: Callable[..., TaskRunner], redis: Redis, redis_url: str, namespace: str
) -> None:
    """An idle worker woken by an enqueue reads and claims that job in one script run
    (take.lua): no claim.lua for it, and no second read of the partition it emptied."""
    tr = make_runner()
    tr.max_idle_wait = 3600.0  # no fallback reads during the test

    echo = echo_task(tr)

    async with tr, tr.worker(concurrency=4, handle_signals=False):
        keys = tr.client.keys("default")
        idle = idle_flag(redis, keys)
        await wait_until(idle, DEADLINE)
        for n in range(3):
            monitor = Monitor(redis_url, f"{namespace}:marker")
            await monitor.start()
            job = await echo.enqueue(n)
            assert await job.result(timeout=DEADLINE) == n
            assert (await job.info()).attempts == 1
            await wait_until(idle, DEADLINE)
            commands = await monitor.stop(redis)
            assert len(evalshas(commands, scripts.TAKE)) == 1, commands
            assert evalshas(commands, scripts.CLAIM) == [], commands
            assert evalshas(commands, scripts.FETCH) == [], commands


async def test_a_ready_event_naming_another_job_or_a_hostile_one_changes_nothing(
    make_runner: Callable[..., TaskRunner], redis: Redis
) -> None:
    """The job a "ready" names is only a hint: an entry of another job is claimed by
    claim.lua as usual, a name too long for a job id is ignored, and a named job whose
    hash is not a hash fails only its own claim, not the read of the entries beside it."""
    tr = make_runner(stale_after=3600.0)  # nothing comes back through a reclaim here
    tr.max_idle_wait = 3600.0

    echo = echo_task(tr)

    async with tr, tr.worker(concurrency=4, handle_signals=False):
        keys = tr.client.keys("default")
        idle = idle_flag(redis, keys)
        await wait_until(idle, DEADLINE)
        await redis.delete(keys.idle)  # the next enqueue publishes nothing
        first = await echo.enqueue(1)
        await redis.publish(keys.events, "ready some-other-job")
        assert await first.result(timeout=DEADLINE) == 1

        await wait_until(idle, DEADLINE)
        await redis.delete(keys.idle)
        second = await echo.enqueue(2)
        await redis.publish(keys.events, "ready " + "x" * 5000)
        assert await second.result(timeout=DEADLINE) == 2

        await wait_until(idle, DEADLINE)
        await redis.delete(keys.idle)
        await redis.set(keys.job("hostile"), "not a hash")
        await redis.xadd(keys.stream, {"job": "hostile"})
        third = await echo.enqueue(3)
        await redis.publish(keys.events, "ready hostile")
        assert await third.result(timeout=DEADLINE) == 3
        assert (await third.info()).attempts == 1


ENV = scripts.Env()


async def reader_of(redis: Redis, q: Queue, delivered: list[Claimed], slots: Slots) -> Reader:
    """A worker's reader on ``q`` (its groups made), delivering into ``delivered``."""
    await ensure_groups(redis, [(q, keys) for keys in q.parts])
    return Reader(
        redis=redis, consumer="c1", queues=lambda: [q], slots=slots, env=lambda: ENV,
        deliver=delivered.extend, max_deliveries=5, max_payload=1 << 20,
        idle_wait=3600.0, aging_ms=60_000,
    )  # fmt: skip


async def enqueue_jobs(redis: Redis, q: Queue, part: int, ids: list[str]) -> None:
    keys = q.parts[part]
    calls = [scripts.enqueue(ENV, keys, j, "t", "[]", keys.default_level, 0) for j in ids]
    assert [int(r[0]) for r in await scripts.run_many(redis, calls)] == [1] * len(ids)


async def test_a_job_claimed_in_its_read_runs_when_the_claims_beside_it_fail(
    redis: Redis, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claims of a read's other entries fail (the link drops between the two round
    trips): the job take.lua claimed is still delivered, and only the others' slots
    are freed (they stay pending, requeued after stale_after). Dropped, it would sit
    "running" until a reclaim counted an attempt it never had."""
    q = Queue(namespace, "q")
    await enqueue_jobs(redis, q, 0, ["job0", "job1"])
    delivered: list[Claimed] = []
    slots = Slots(4)
    reader = await reader_of(redis, q, delivered, slots)
    real = scripts.run_many

    async def link_drops_for_claims(client: Any, calls: Any, **kwargs: Any) -> Any:
        if calls and all(c.script is scripts.CLAIM for c in calls):
            raise RedisConnectionError("the link dropped between the take and the claims")
        return await real(client, calls, **kwargs)

    monkeypatch.setattr(scripts, "run_many", link_drops_for_claims)
    reader.wake(q.parts[0].prefix, "job0")  # what "ready job0" does
    async with anyio.create_task_group() as claims:
        got, _, _ = await reader._round([(q, q.parts[0])], claims)
    assert got == 2
    assert [item.job_id for item in delivered] == ["job0"]
    assert slots.busy == 1
    assert await redis.hget(q.parts[0].job("job1"), "status") == "queued"


async def test_a_job_claimed_in_its_read_runs_when_another_partitions_read_fails(
    redis: Redis, namespace: str
) -> None:
    """One partition's read fails (its stream key is not a stream: hostile data) beside
    a read that claimed a job: that job is delivered; without one, the hostile
    partition is skipped (and reported), not a failure of the round, so the reader goes
    on with the other partitions."""
    q = Queue(namespace, "q", partitions=2)
    await enqueue_jobs(redis, q, 0, ["job0"])
    delivered: list[Claimed] = []
    reader = await reader_of(redis, q, delivered, Slots(4))
    hostile = q.parts[1].level_stream(q.parts[1].default_level)
    await redis.delete(hostile)
    await redis.set(hostile, "not a stream")
    plan: list[Planned] = [(q, keys, 2, None) for keys in q.parts]
    reader.wake(q.parts[0].prefix, "job0")
    fetched = await reader._fetch(plan)
    assert [(item[4]["job"], item[5] is not None) for item in fetched] == [("job0", True)]
    assert [item.job_id for item in await reader._claim(fetched)] == ["job0"]

    await enqueue_jobs(redis, q, 0, ["job1"])
    fetched = await reader._fetch(plan)  # no job claimed in this read
    assert [(item[4]["job"], item[5] is None) for item in fetched] == [("job1", True)]


@pytest.mark.parametrize("length", [1024, 1025])
async def test_ready_names_the_job_unless_its_id_is_longer_than_the_limit(
    make_runner: Callable[..., TaskRunner], redis: Redis, redis_url: str, length: int
) -> None:
    """A "ready" goes to every subscribed worker: it names a job of an id up to
    READY_NAME_LIMIT bytes, and is bare for a longer one (which claim.lua then claims)."""
    tr = make_runner()

    echo = echo_task(tr)

    job_id = "x" * length
    async with tr:
        keys = tr.client.keys("default")
        watcher = Redis.from_url(redis_url, decode_responses=True)
        pubsub = watcher.pubsub()
        try:
            await pubsub.subscribe(keys.events)
            await redis.set(keys.idle, "1")  # as a worker that found the partition drained
            await echo.options(job_id=job_id).enqueue(1)
            message = None
            async with asyncio.timeout(DEADLINE):
                while message is None:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]
            await watcher.aclose()
    assert scripts.READY_NAME_LIMIT == 1024
    assert message["data"] == ("ready " + job_id if length <= 1024 else "ready")


async def test_a_slot_released_before_the_waiting_task_runs_still_wakes_it() -> None:
    """A burst worker that finds nothing to read while a job runs waits for a slot
    change in a task it starts: the job may end before that task runs. Waited for as
    ``slots.changed`` (counted only once the task ran), that release was lost and the
    worker idled 5 s before it could exit; ``watching()`` counts the waiter at once."""
    slots = Slots(4)
    slots.take(1)
    with slots.watching() as changed:
        waiting = asyncio.ensure_future(changed.wait())
        slots.finish()  # the job ends before the waiting task has run once
        with anyio.fail_after(DEADLINE):
            await waiting
    assert slots.busy == 0
