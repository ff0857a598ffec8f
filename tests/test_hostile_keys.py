"""Hostile values and keys of the wrong type in Redis, found by an audit: each once
crashed, stalled or misled a worker. A worker never dies of data; what it cannot use is
dead-lettered with its reason or skipped with a logged warning, and the jobs around it
run. Burst workers still exit."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import cast

import anyio
import pytest
from redis.asyncio import Redis

from taskrunner import JobStatus, TaskRunner, scripts
from taskrunner.keys import MAX_PARTITIONS, QueueKeys
from taskrunner.middleware.limits import parse_waiter

DEADLINE = 30.0
MakeRunner = Callable[..., TaskRunner]


async def burst(tr: TaskRunner, *queues: str) -> None:
    """Run a burst worker on ``queues`` (default: the runner's) until it exits."""
    with anyio.fail_after(DEADLINE):
        await tr.worker(
            queues=list(queues) or None, concurrency=4, burst=True, handle_signals=False
        ).run()


async def test_deeply_nested_headers_do_not_stop_the_worker(
    make_runner: MakeRunner, redis: Redis
) -> None:
    tr = make_runner(queue="deep")

    @tr.task
    async def add(x: int, y: int) -> int:
        return x + y

    async with tr:
        jobs = [await add.enqueue(n, 1) for n in range(4)]
        keys = tr.client.keys("deep")
        await redis.hset(keys.job(jobs[1].id), "meta", "[" * 100_000)
        await burst(tr)
        assert [await job.result(timeout=1) for job in jobs] == [1, 2, 3, 4]


@pytest.mark.parametrize("partition", ["²", "9" * 5000, "", "-1"])
def test_a_hostile_limit_waiter_member_is_malformed_not_an_error(partition: str) -> None:
    assert parse_waiter("ns", f"default\t{partition}\tjob-1") is None
    parsed = parse_waiter("ns", "default\t3\tjob-1")
    assert parsed is not None
    assert (parsed[0].prefix, parsed[1]) == (QueueKeys("ns", "default", 3).prefix, "job-1")


async def test_a_delayed_job_of_an_unknown_level_runs_in_the_default_level(
    make_runner: MakeRunner, redis: Redis
) -> None:
    tr = make_runner(queue="levels")

    @tr.task
    async def one() -> int:
        return 1

    async with tr:
        job = await one.options(delay=3600).enqueue()
        keys = tr.client.keys("levels")
        [member] = cast(list[str], await redis.zrange(keys.delayed, 0, -1))
        hostile = f"{member[:16]}:bogus:{job.id}"
        await redis.zrem(keys.delayed, member)
        await redis.zadd(keys.delayed, {hostile: 0})  # and due now
        await redis.hset(keys.job(job.id), "member", hostile)
        await burst(tr)
        assert await job.result(timeout=1) == 1
        assert await redis.exists(f"{keys.stream}:bogus") == 0


async def test_a_reclaim_turn_held_far_into_the_future_does_not_hold(
    make_runner: MakeRunner, redis: Redis
) -> None:
    tr = make_runner(queue="turns")
    async with tr:
        keys = tr.client.keys("turns")
        await redis.hset(keys.reclaim, mapping={"until": "99999999999999999", "holder": "x"})
        assert int(await scripts.run(redis, scripts.turn(keys, 2000, "me"))) == 1
        # and the turn just taken holds for its period
        assert int(await scripts.run(redis, scripts.turn(keys, 2000, "other"))) == 0


@pytest.mark.parametrize("value", ["1000000000", "1e9", str(MAX_PARTITIONS + 1), "2.5"])
async def test_a_hostile_partition_count_is_read_as_absent(
    make_runner: MakeRunner, redis: Redis, value: str
) -> None:
    tr = make_runner(queue="parts")
    async with tr:
        meta = tr.client.keys("parts").meta
        await redis.hset(meta, mapping={"partitions": value, "max_partitions": value})
        queue = await tr.client.resolve("parts", refresh=True, record=True)
        assert (queue.partitions, queue.read) == (1, 1)
        assert await redis.hgetall(meta) == {"partitions": "1", "max_partitions": "1"}


async def test_an_outbox_entry_whose_job_key_is_not_a_hash_is_dead_lettered(
    make_runner: MakeRunner, redis: Redis
) -> None:
    tr = make_runner(queue="relay")

    @tr.task
    async def inc(x: int) -> int:
        return x + 1

    async with tr:
        keys = tr.client.keys("relay")
        await redis.set(keys.job("evil"), "not a hash")
        await redis.zadd(keys.outbox, {"evil": 0})
        chain = await inc.chain(1).then(inc).enqueue()
        await burst(tr)  # exits: the hostile member does not keep it looking
        assert await chain.result(timeout=1) == 3
        assert await redis.zcard(keys.outbox) == 0
        dead = await tr.dead_letters("relay")
        assert [d.id for d in dead] == ["next-evil"]


async def test_an_entry_whose_job_key_is_not_a_hash_is_dead_lettered(
    make_runner: MakeRunner, redis: Redis
) -> None:
    tr = make_runner(queue="wrongtype")

    @tr.task
    async def one() -> int:
        return 1

    async with tr:
        keys = tr.client.keys("wrongtype")
        good = await one.enqueue()
        await redis.set(keys.job("evil"), "not a hash")
        await redis.xadd(keys.stream, {"job": "evil"})
        await burst(tr)
        assert await good.result(timeout=1) == 1
        [dead] = await tr.dead_letters("wrongtype")
        assert dead.id == "evil"
        assert "not a hash" in (dead.error.message if dead.error else "")
        assert await redis.xpending(keys.stream, "taskrunner") == {
            "pending": 0,
            "min": None,
            "max": None,
            "consumers": [],
        }


async def test_a_lock_key_of_another_type_dead_letters_the_job_instead_of_waiting(
    make_runner: MakeRunner, redis: Redis
) -> None:
    tr = make_runner(queue="locks")

    @tr.task(lock="while_executing")
    async def one() -> int:
        return 1

    async with tr:
        job = await one.enqueue()
        await redis.hset(tr.unique.lock_key(one), "x", "1")  # taken when the job runs
        await burst(tr)
        info = await job.info()
        assert info.status == JobStatus.DEAD
        assert "another type" in (info.error.message if info.error else "")


async def test_a_jobs_locks_field_naming_hostile_keys_fails_no_commit(
    make_runner: MakeRunner, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """A ``locks`` field naming a lock key of another type, or keys that are not its
    partition's locks at all: the commit releases only the job's own lock and
    touches nothing else."""
    tr = make_runner(queue="lockfield")

    @tr.task
    async def one() -> int:
        return 1

    caplog.set_level(logging.WARNING, logger="taskrunner")
    async with tr:
        keys = tr.client.keys("lockfield")
        job = await one.enqueue()  # queued: no worker runs yet
        hostile, mine = keys.lock("hostile"), keys.lock("mine")
        await redis.hset(hostile, "x", "1")
        await redis.set(mine, job.id)
        await redis.set("elsewhere", job.id)
        await redis.hset(keys.job(job.id), "locks", f"{hostile} elsewhere {keys.stream} {mine}")
        await burst(tr, "lockfield")
        info = await job.info()
        assert info.status == JobStatus.SUCCEEDED
        assert await job.result(timeout=1) == 1
        assert await redis.exists(mine) == 0
        assert await redis.get("elsewhere") == job.id
        assert await redis.hget(hostile, "x") == "1"
        assert await redis.xpending(keys.stream, "taskrunner") == {
            "pending": 0,
            "min": None,
            "max": None,
            "consumers": [],
        }
    assert "reclaimed" not in caplog.text


async def test_keys_of_another_type_do_not_stop_a_worker_or_a_burst(
    make_runner: MakeRunner, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    tr = make_runner(queue="good")

    @tr.task
    async def one() -> int:
        return 1

    @tr.task(queue="bad")
    async def two() -> int:
        return 2

    caplog.set_level(logging.WARNING, logger="taskrunner")
    async with tr:
        job = await one.enqueue()
        bad = tr.client.keys("bad")
        for key in (bad.meta, bad.delayed, bad.outbox, f"{bad.stream}:high"):
            await redis.set(key, "not what it should be")
        await burst(tr, "good", "bad")
        assert await job.result(timeout=1) == 1
    assert "WRONGTYPE" in caplog.text
