"""Hostile keys and fields met by the worker's scripts half way through an outcome: a
commit never stops after it settled the entry (the job ends retried, dead-lettered with
its reason, or still pending for the stale-entry reclaim: never "running" with no entry),
a claim never drops a job's only entry because of a hostile ``entry`` field, and a limit's
hostile holders or starts never make its jobs spin."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import anyio
import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from taskrunner import (
    ExecutionContext,
    JobStatus,
    Middleware,
    Outcome,
    Task,
    TaskRunner,
)
from taskrunner import scripts as lua
from taskrunner.keys import GROUP, LimitKeys
from taskrunner.middleware.base import ExecuteNext
from taskrunner.middleware.limits import limit_digest, refused_wait
from taskrunner.testing import frozen_time

MakeRunner = Callable[..., TaskRunner]
DEADLINE = 30.0


def runner_with_one(make_runner: MakeRunner, **settings: Any) -> tuple[TaskRunner, Task[[], int]]:
    """A runner on the test's Redis with one task, ``one() -> 1``."""
    tr = make_runner(**settings)

    @tr.task
    async def one() -> int:
        return 1

    return tr, one


async def fetched_and_claimed(
    tr: TaskRunner, redis: Redis, job_id: str, consumer: str, token: str
) -> tuple[str, list[Any]]:
    """Read the next entry of the job's queue as ``consumer`` and claim it under
    ``token``: the entry id and claim.lua's reply."""
    keys, env = tr.client.keys(tr.queue), tr.client.env
    fetch = lua.fetch(env, keys, [keys.stream], consumer, 1, 0)
    [(_, entry, _)] = await lua.run(redis, fetch)
    claim = lua.claim(env, keys, keys.stream, job_id, consumer, entry, token, 5, 1 << 20)
    return entry, await lua.run(redis, claim)


async def burst(tr: TaskRunner, *queues: str, deadline: float = DEADLINE) -> None:
    """Run a burst worker on ``queues`` (default: the runner's) until it exits."""
    with anyio.fail_after(deadline):
        await tr.worker(
            queues=list(queues) or None, concurrency=4, burst=True, handle_signals=False
        ).run()


async def command(redis: Redis, *args: str) -> Any:
    """A command redis-py has no typed method for (XSETID, ZADD with score text)."""
    return await cast(Any, redis).execute_command(*args)


async def pending(redis: Redis, stream: str) -> int:
    return int((await redis.xpending(stream, GROUP))["pending"])


class Decide(Middleware):
    """Ends each job's first attempt with ``outcome`` (after ``before`` ran), instead of
    running it; later attempts run."""

    def __init__(
        self,
        outcome: Outcome,
        before: Callable[[ExecutionContext], Awaitable[None]] | None = None,
    ) -> None:
        self.outcome = outcome
        self.before = before
        self.decided: set[str] = set()

    async def execute(self, ctx: ExecutionContext, call_next: ExecuteNext) -> Outcome:
        if ctx.job.id in self.decided:
            return await call_next(ctx)
        self.decided.add(ctx.job.id)
        if self.before is not None:
            await self.before(ctx)
        return self.outcome


# -- commit.lua --------------------------------------------------------------------------


async def _seq_text(redis: Redis, key: str) -> None:
    await redis.set(key, "notanumber")


async def _seq_largest(redis: Redis, key: str) -> None:
    await redis.set(key, "9223372036854775807")


async def _seq_hash(redis: Redis, key: str) -> None:
    await redis.hset(key, "x", "1")


@pytest.mark.parametrize("spoil", [_seq_text, _seq_largest, _seq_hash])
async def test_a_retry_is_scheduled_whatever_the_seq_key_holds(
    make_runner: MakeRunner,
    redis: Redis,
    spoil: Callable[[Redis, str], Awaitable[None]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    tr = make_runner(queue="seq")
    tries: list[int] = []

    @tr.task(max_retries=2)
    async def flaky() -> int:
        tries.append(1)
        if len(tries) == 1:
            raise RuntimeError("first attempt fails")
        return len(tries)

    caplog.set_level(logging.ERROR, logger="taskrunner")
    async with tr:
        keys = tr.client.keys("seq")
        await spoil(redis, keys.seq)
        job = await flaky.enqueue()
        async with tr.worker(concurrency=4, handle_signals=False):
            assert await job.result(timeout=DEADLINE) == 2
        info = await job.info()
        assert (info.status, info.attempts) == (JobStatus.SUCCEEDED, 2)
        assert await pending(redis, keys.stream) == 0
    assert "could not be recorded" not in caplog.text


async def test_a_retry_whose_delayed_set_is_of_another_type_is_dead_lettered(
    make_runner: MakeRunner, redis: Redis
) -> None:
    tr = make_runner(queue="delayed")

    @tr.task(max_retries=2)
    async def fails() -> None:
        raise RuntimeError("fails")

    async with tr:
        keys = tr.client.keys("delayed")
        job = await fails.enqueue()
        await redis.set(keys.delayed, "not a sorted set")
        await burst(tr)
        info = await job.info()
        assert info.status == JobStatus.DEAD
        message = info.error.message if info.error else ""
        assert "its retry cannot be scheduled" in message
        assert keys.delayed in message
        assert [d.id for d in await tr.dead_letters("delayed")] == [job.id]
        assert await pending(redis, keys.stream) == 0


async def test_a_job_that_dies_while_the_dead_letters_are_hostile_is_recorded_dead(
    make_runner: MakeRunner, redis: Redis
) -> None:
    """Recorded dead with its reason, settled, in no dead set, its hash expiring after
    result_ttl. Left pending instead (an earlier version), the stale-entry reclaim ran
    the task again at every pass and counted each as a worker's death."""
    tr, one = runner_with_one(
        make_runner, queue="dead", middleware=[Decide(Outcome.dead("no way"))], result_ttl=600
    )

    async with tr:
        keys = tr.client.keys("dead")
        job = await one.enqueue()
        await redis.set(keys.dead, "not a sorted set")
        await burst(tr)
        info = await job.info()
        assert info.status == JobStatus.DEAD
        assert info.attempts == 1
        assert "no way" in (info.error.message if info.error else "")
        assert await pending(redis, keys.stream) == 0
        assert 0 < await redis.pttl(keys.job(job.id)) <= 600_000
        assert await redis.get(keys.dead) == "not a sorted set"


async def test_hostile_counts_do_not_stop_a_reschedule(
    make_runner: MakeRunner, redis: Redis
) -> None:
    async def spoil(ctx: ExecutionContext) -> None:
        await redis.hset(ctx.keys.job(ctx.job.id), mapping={"reschedules": "nan", "attempts": "x"})

    refuse = Decide(Outcome.reschedule(time.time() + 3600), spoil)
    tr, one = runner_with_one(make_runner, queue="counts", middleware=[refuse])

    async with tr:
        keys = tr.client.keys("counts")
        job = await one.enqueue()
        await burst(tr)  # the job waits an hour in the delayed set: the burst exits
        stored = await redis.hmget(keys.job(job.id), ["status", "reschedules", "attempts"])
        assert stored == ["scheduled", "1", "0"]
        assert await redis.zcard(keys.delayed) == 1
        assert await pending(redis, keys.stream) == 0


async def test_a_hand_back_to_a_stream_that_takes_no_entry_is_dead_lettered(
    make_runner: MakeRunner, redis: Redis
) -> None:
    tr, one = runner_with_one(make_runner, queue="handback")

    async with tr:
        keys = tr.client.keys("handback")
        env = tr.client.env
        job = await one.enqueue()
        await redis.xgroup_create(keys.stream, GROUP, id="0", mkstream=True)
        entry, reply = await fetched_and_claimed(tr, redis, job.id, "me", "tok")
        assert reply[0] == "ok"
        # the stream's last id becomes the largest there is: XADD '*' fails
        last = "18446744073709551615-18446744073709551615"
        await command(redis, "XSETID", keys.stream, last)
        handback = lua.commit(
            env, keys, keys.stream, job.id, entry, "tok", "handback", "", 60_000, 0, "", [], 0
        )
        assert await lua.run(redis, handback) == 1
        info = await job.info()
        assert info.status == JobStatus.DEAD
        assert "it cannot be handed back" in (info.error.message if info.error else "")
        assert [d.id for d in await tr.dead_letters("handback")] == [job.id]
        assert await pending(redis, keys.stream) == 0


async def test_a_chain_step_whose_outbox_is_hostile_is_dead_lettered_with_its_result(
    make_runner: MakeRunner, redis: Redis
) -> None:
    tr = make_runner(queue="outbox")

    @tr.task
    async def inc(x: int) -> int:
        return x + 1

    async with tr:
        keys = tr.client.keys("outbox")
        await redis.set(keys.outbox, "not a sorted set")
        chain = await inc.chain(1).then(inc).enqueue()
        await burst(tr)
        [dead] = await tr.dead_letters("outbox")
        assert "its follow-up cannot be recorded" in (dead.error.message if dead.error else "")
        assert await redis.hget(keys.job(dead.id), "result") == "2"
        assert await redis.ttl(keys.job(dead.id)) == -1
        assert await pending(redis, keys.stream) == 0
        with pytest.raises(Exception, match="follow-up cannot be recorded"):
            await chain.result(timeout=1)


# -- claim.lua and take.lua --------------------------------------------------------------


@pytest.mark.parametrize("entry", ["junk", "1-1", "99999999999999999999-0", ""])
async def test_a_hostile_entry_field_does_not_drop_the_jobs_only_entry(
    make_runner: MakeRunner, redis: Redis, entry: str, caplog: pytest.LogCaptureFixture
) -> None:
    tr, one = runner_with_one(make_runner, queue="entry")

    caplog.set_level(logging.WARNING, logger="taskrunner")
    async with tr:
        keys = tr.client.keys("entry")
        job = await one.enqueue()
        await redis.hset(keys.job(job.id), "entry", entry)
        await burst(tr)
        assert await job.result(timeout=1) == 1
        assert await pending(redis, keys.stream) == 0
    assert "duplicates job" not in caplog.text


async def test_an_entry_field_naming_a_settled_entry_does_not_drop_the_live_one(
    make_runner: MakeRunner, redis: Redis
) -> None:
    """The entry the hash names is the job's own kind ({job: id}) and exists, but was read
    and acknowledged already: it is not the job's live entry."""
    tr, one = runner_with_one(make_runner, queue="settled")

    async with tr:
        keys = tr.client.keys("settled")
        await redis.xgroup_create(keys.stream, GROUP, id="0", mkstream=True)
        old = await redis.xadd(keys.stream, {"job": "fixed"})
        await redis.xreadgroup(GROUP, "someone", {keys.stream: ">"}, count=1)
        await redis.xack(keys.stream, GROUP, old)
        job = await one.options(job_id="fixed").enqueue()
        await redis.hset(keys.job(job.id), "entry", old)
        await burst(tr)
        assert await job.result(timeout=1) == 1


async def test_a_true_duplicate_entry_is_still_dropped(
    make_runner: MakeRunner, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    tr = make_runner(queue="dup")
    runs: list[int] = []

    @tr.task
    async def one() -> int:
        runs.append(1)
        return 1

    caplog.set_level(logging.WARNING, logger="taskrunner")
    async with tr:
        keys = tr.client.keys("dup")
        duplicate = cast(
            str, await redis.xadd(keys.stream, {"job": "fixed"})
        )  # read before the live one
        job = await one.options(job_id="fixed").enqueue()
        await burst(tr)
        assert await job.result(timeout=1) == 1
        assert await redis.xrange(keys.stream) == []
    assert runs == [1]
    assert f"stream entry {duplicate} duplicates job fixed" in caplog.text


async def test_take_claims_the_named_job_despite_a_hostile_entry_field(
    make_runner: MakeRunner, redis: Redis
) -> None:
    tr, one = runner_with_one(make_runner, queue="take")

    async with tr:
        keys = tr.client.keys("take")
        job = await one.enqueue()
        await redis.hset(keys.job(job.id), "entry", "junk")
        await redis.xgroup_create(keys.stream, GROUP, id="0", mkstream=True)
        fetched = lua.fetch(tr.client.env, keys, [keys.stream], "me", 10, 0)
        call = lua.take(fetched, keys, job.id, "tok", 5, 1 << 20)
        reply: list[Any] = await lua.run(redis, call)
        [(_, entry, fields, claimed)] = reply
        assert fields == ["job", job.id]
        assert claimed[0] == "ok"
        assert await redis.hmget(keys.job(job.id), ["status", "entry"]) == ["running", entry]


# -- acquire.lua -------------------------------------------------------------------------


@pytest.mark.parametrize("score", ["inf", "1e20"])
@pytest.mark.parametrize(
    ("option", "held"), [({"concurrency_limit": 2}, "running"), ({"rate_limit": "2/h"}, "starts")]
)
async def test_hostile_limit_holders_and_starts_are_dropped_not_waited_for(
    make_runner: MakeRunner, redis: Redis, score: str, option: dict[str, Any], held: str
) -> None:
    tr = make_runner(queue="limit")

    @tr.task(name="limited", **option)
    async def limited() -> int:
        return 1

    async with tr:
        keys = LimitKeys(tr.namespace, limit_digest("limited", {}))
        await command(redis, "ZADD", getattr(keys, held), score, "t1", score, "t2")
        job = await limited.enqueue()
        # before, the job was rescheduled every 50 ms for ever: the burst never ended
        await burst(tr, deadline=10)
        assert await job.result(timeout=1) == 1
        assert (await job.info()).reschedules == 0
        assert not {"t1", "t2"} & set(await redis.zrange(getattr(keys, held), 0, -1))


async def test_the_wait_acquire_returns_is_clamped_to_the_lease(redis: Redis) -> None:
    """A holder more than a day (or a hundred leases) ahead is dropped; one within that
    stays (its worker's lease may be longer than the checking worker's), and the wait
    the check returns is at most two of the checker's leases."""
    keys = LimitKeys("clamp", "d")
    await redis.delete(keys.running)
    now = int(time.time() * 1000)
    await redis.zadd(keys.running, {"a": now + 2 * 86_400_000})
    call = lua.acquire(lua.Env(), keys, "me", "q\t0\tj", 1, 1000, 0, 0)
    code, wait_ms = (await lua.run(redis, call))[:2]
    assert (code, wait_ms) == (0, 0)  # the holder two days ahead was dropped
    await redis.delete(keys.running)
    await redis.zadd(keys.running, {"b": now + 10 * 3_600_000})
    call = lua.acquire(lua.Env(), keys, "other", "q\t0\tk", 1, 1000, 0, 0)
    code, wait_ms = (await lua.run(redis, call))[:2]
    assert code == 1  # ten hours ahead: kept
    assert 0 < int(wait_ms) <= 2000


async def test_a_holder_of_a_worker_with_a_longer_lease_keeps_its_slot(redis: Redis) -> None:
    """Workers sharing a limit with stale_after 120 s and 30 s: the longer lease's holder
    is no hostile score to the shorter one's check (a first version dropped holders
    more than two of the checker's leases ahead, admitting a second job at limit 1)."""
    keys = LimitKeys("mixed", "d")
    await redis.delete(keys.running)
    long_lease = lua.acquire(lua.Env(), keys, "long", "q\t0\tj", 1, 120_000, 0, 0)
    assert (await lua.run(redis, long_lease))[0] == 0
    short_lease = lua.acquire(lua.Env(), keys, "short", "q\t0\tk", 1, 30_000, 0, 0)
    assert (await lua.run(redis, short_lease))[0] == 1
    assert await redis.zrange(keys.running, 0, -1) == ["long"]


@pytest.mark.parametrize("wait", [math.nan, math.inf, -math.inf, 1e300, -5.0, -9.2e15])
@pytest.mark.parametrize("code", [1, 2])
def test_a_wait_that_is_no_time_becomes_the_bound(code: int, wait: float) -> None:
    got = refused_wait(code, wait, 30.0, 60.0)
    bound = 30.0 if code == 1 else 60.0
    assert got == bound


def test_a_wait_within_its_bound_is_kept() -> None:
    assert refused_wait(1, 2.5, 30.0, 60.0) == 2.5
    assert refused_wait(2, 59.0, 30.0, 60.0) == 59.0
    assert refused_wait(1, 0.0, 30.0, 60.0) == 0.0


async def test_a_due_job_whose_stream_takes_no_entry_waits_in_the_delayed_set(
    make_runner: MakeRunner, redis: Redis
) -> None:
    """promote.lua removed the member, then its XADD failed: the job stayed "scheduled"
    with no member and no entry, lost. Now the member goes back, a minute later."""
    tr, one = runner_with_one(make_runner, queue="promote")

    async with tr, frozen_time(tr) as clock:
        keys = tr.client.keys("promote")
        job = await one.options(delay=10).enqueue()
        stream = keys.stream
        await redis.delete(stream)
        await redis.set(stream, "not a stream")
        await clock.advance(11)
        await burst(tr, "promote")
        info = await job.info()
        assert info.status == JobStatus.SCHEDULED
        [(_, score)] = cast(
            list[tuple[str, float]], await redis.zrange(keys.delayed, 0, -1, withscores=True)
        )
        assert score == pytest.approx((clock.now() + 60) * 1000, abs=2000)
        await redis.delete(stream)  # mended: the job runs a minute later
        await clock.advance(61)
        await tr.run_until_idle()
        assert await job.result(timeout=DEADLINE) == 1


async def test_an_orphan_entry_whose_dead_letters_are_hostile_stays_pending(
    make_runner: MakeRunner, redis: Redis
) -> None:
    """orphan.lua marked the job dead, then failed on the dead set's ZADD: a "dead" job
    in no dead set. Now it writes nothing and the entry stays pending."""
    tr = make_runner(queue="orphan")
    async with tr:
        keys = tr.client.keys("orphan")
        await redis.xgroup_create(keys.stream, GROUP, id="0", mkstream=True)
        await redis.xadd(keys.stream, {"job": "nosuchjob"})
        await redis.set(keys.dead, "not a sorted set")
        await burst(tr, "orphan")
        assert await redis.exists(keys.job("nosuchjob")) == 0
        assert await pending(redis, keys.stream) == 1  # the stale reclaim tries again


async def test_an_enqueue_that_fails_on_a_hostile_key_leaves_no_lock_behind(
    make_runner: MakeRunner, redis: Redis
) -> None:
    """enqueue.lua wrote a unique job's lock before the stream entry: with a stream of
    another type the enqueue failed with the lock held, and every enqueue of that job
    until the lock expired was "deduplicated" onto a job that does not exist."""
    tr = make_runner(queue="locked")

    @tr.task(lock="until_executed")
    async def once(x: int) -> int:
        return x

    async with tr:
        keys = tr.client.keys("locked")
        await redis.set(keys.stream, "not a stream")
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await once.enqueue(1)
        assert [k async for k in redis.scan_iter(match=f"{keys.prefix}:lock:*")] == []
        await redis.delete(keys.stream)
        job = await once.enqueue(1)  # mended: a new job, not a duplicate of none
        assert not job.deduplicated
        assert await job.status() == JobStatus.QUEUED


async def test_a_delayed_enqueue_takes_sequence_zero_when_seq_is_hostile(
    make_runner: MakeRunner, redis: Redis
) -> None:
    tr = make_runner(queue="seq")

    @tr.task(lock="until_executed")
    async def once(x: int) -> int:
        return x

    async with tr:
        keys = tr.client.keys("seq")
        await redis.set(keys.seq, "notanumber")
        job = await once.options(delay=60).enqueue(1)
        assert await job.status() == JobStatus.SCHEDULED
        [member] = cast(list[str], await redis.zrange(keys.delayed, 0, -1))
        assert member.startswith("0000000000000000:")


async def test_an_entry_field_naming_the_entry_without_its_sequence_is_not_a_live_copy(
    make_runner: MakeRunner, redis: Redis
) -> None:
    """'1796123746213' is a range to XRANGE and XPENDING: it found the entry read itself,
    pending, and dropped the job's only entry as a duplicate of itself."""
    tr, one = runner_with_one(make_runner, queue="ranged")

    async with tr:
        keys = tr.client.keys("ranged")
        job = await one.enqueue()
        live = cast(str, await redis.hget(keys.job(job.id), "entry"))
        await redis.hset(keys.job(job.id), "entry", live.split("-")[0])
        await burst(tr)
        assert await job.result(timeout=1) == 1


async def test_a_duplicate_entry_with_extra_fields_does_not_take_a_running_jobs_lease(
    make_runner: MakeRunner, redis: Redis
) -> None:
    """A claims the job and runs it; a hand-written entry {job: X, extra: y} read by B is
    a duplicate of the live, pending entry: B must not claim it (two runs at once, A's
    commit refused)."""
    tr, one = runner_with_one(make_runner, queue="twice")

    async with tr:
        keys = tr.client.keys("twice")
        job = await one.enqueue()
        await redis.xgroup_create(keys.stream, GROUP, id="0", mkstream=True)
        entry, reply = await fetched_and_claimed(tr, redis, job.id, "A", "tokA")
        assert reply[0] == "ok"
        await redis.xadd(keys.stream, {"job": job.id, "extra": "y"})
        _, reply = await fetched_and_claimed(tr, redis, job.id, "B", "tokB")
        assert reply == ["stray", entry]
        assert await redis.hget(keys.job(job.id), "lease") == "tokA"
