"""Chains and groups in one process: typed steps across queues, the failure rules, a
malformed follow-up spec, a relay repeated after a crash, validation at enqueue, and
a chain on every topology. Worker processes and SIGKILL: tests/test_chains_processes.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
from conftest import wait_until
from pydantic import ValidationError
from redis.asyncio import Redis
from redisproc import RedisProcess
from topology import Topology

from taskrunner import (
    ConfigurationError,
    JobAborted,
    JobDeadLettered,
    JobFailed,
    JobNotFound,
    JobStatus,
    LockConflictError,
    TaskRunner,
    current_job,
)
from taskrunner.keys import QueueKeys
from taskrunner.worker.relay import Relay

MakeRunner = Callable[..., TaskRunner]
DEADLINE = 30.0


class App:
    """The tests' tasks on one runner; ``ran`` lists the job ids that ran, in order."""

    def __init__(self, tr: TaskRunner) -> None:
        ran: list[str] = []
        self.ran = ran

        @tr.task
        async def add(x: int, y: int) -> int:
            ran.append(current_job().id)
            return x + y

        @tr.task(queue="other", priority="high")
        async def double(x: int) -> int:
            ran.append(current_job().id)
            return 2 * x

        @tr.task
        async def label(total: int, unit: str, *, upper: bool = False) -> str:
            ran.append(current_job().id)
            text = f"{total} {unit}"
            return text.upper() if upper else text

        @tr.task(max_retries=0)
        async def broken(x: int) -> int:
            raise ValueError(f"no {x}")

        self.add, self.double, self.label, self.broken = add, double, label, broken


async def test_a_chain_runs_its_steps_in_order_across_queues(make_runner: MakeRunner) -> None:
    tr = make_runner()
    t = App(tr)
    add, double, label = t.add, t.double, t.label
    async with tr:
        chain = await (
            add.chain(1, 2).then(double).then(label.options(delay=0.05), "m", upper=True).enqueue()
        )
        ids = [job.id for job in chain.jobs]
        assert ids == [chain.id, f"{chain.id}.1", f"{chain.id}.2"]
        assert [job.queue for job in chain.jobs] == ["default", "other", "default"]
        with pytest.raises(JobNotFound):
            await chain.jobs[1].status()  # written when the first step succeeds
        async with tr.worker(concurrency=4, handle_signals=False):
            assert await chain.result(timeout=DEADLINE) == "6 M"
        assert t.ran == ids
        second = await chain.jobs[1].info()
        assert second.task == t.double.name
        assert second.priority == "high"
        third = await chain.jobs[2].info()
        assert third.due_at is not None  # the step's delay, from the success before it
        assert await chain.jobs[0].result() == 3
        assert await chain.jobs[1].result() == 6


async def test_a_failed_step_stops_the_chain_and_its_error_is_the_chains(
    make_runner: MakeRunner, redis: Redis, namespace: str
) -> None:
    tr = make_runner()
    t = App(tr)
    add, broken, label = t.add, t.broken, t.label
    async with tr:
        chain = await add.chain(1, 2).then(broken).then(label, "m").enqueue()
        async with tr.worker(concurrency=4, handle_signals=False):
            with pytest.raises(JobFailed) as failed:
                await chain.result(timeout=DEADLINE)
        assert failed.value.job_id == chain.jobs[1].id
        assert failed.value.exc_message == "no 3"
        with pytest.raises(JobNotFound):
            await chain.jobs[2].status()
        assert await redis.zcard(QueueKeys(namespace, "default").outbox) == 0


async def test_an_aborted_first_step_starts_nothing(make_runner: MakeRunner) -> None:
    tr = make_runner()
    t = App(tr)
    add, double = t.add, t.double
    async with tr:
        chain = await add.options(delay=60).chain(1, 2).then(double).enqueue()
        assert await chain.jobs[0].abort() == JobStatus.ABORTED
        with pytest.raises(JobAborted):
            await chain.result(timeout=DEADLINE)
        with pytest.raises(JobNotFound):
            await chain.jobs[1].status()


async def test_a_chain_with_a_job_id_is_enqueued_once(make_runner: MakeRunner) -> None:
    tr = make_runner()
    t = App(tr)
    add, double = t.add, t.double
    async with tr:
        first = await add.options(job_id="order-7").chain(1, 2).then(double).enqueue()
        again = await add.options(job_id="order-7").chain(1, 2).then(double).enqueue()
        assert not first.deduplicated
        assert again.deduplicated
        assert [j.id for j in again.jobs] == ["order-7", "order-7.1"]
        async with tr.worker(concurrency=4, handle_signals=False):
            assert await again.result(timeout=DEADLINE) == 6
        assert t.ran == ["order-7", "order-7.1"]


async def test_a_chain_whose_locked_first_step_is_held_by_another_job(
    make_runner: MakeRunner,
) -> None:
    """The first step's unique lock held by the same chain: deduplicated onto it, its
    handle follows it. Held by a plain job, or a chain that goes on otherwise: the
    chain is not written and enqueue raises LockConflictError (it returned a handle
    whose result waited for a step that never comes, then raised JobNotFound)."""
    tr = make_runner()
    t = App(tr)
    ran: list[int] = []

    @tr.task(lock="until_executed")
    async def fetch(order: int) -> int:
        ran.append(order)
        return order

    async with tr:
        first = await fetch.chain(7).then(t.double).enqueue()
        again = await fetch.chain(7).then(t.double).enqueue()
        assert (first.deduplicated, again.deduplicated) == (False, True)
        assert [j.id for j in again.jobs] == [j.id for j in first.jobs]
        with pytest.raises(LockConflictError) as other_chain:
            await fetch.chain(7).then(t.add, 1).enqueue()
        assert other_chain.value.holder == first.id
        plain = await fetch.enqueue(8)
        with pytest.raises(LockConflictError) as held:
            await fetch.chain(8).then(t.double).enqueue()
        assert held.value.holder == plain.id
        assert held.value.lock == tr.unique.lock_key(fetch, (8,))
        async with tr.worker(concurrency=4, handle_signals=False):
            assert await again.result(timeout=DEADLINE) == 14
            assert await plain.result(timeout=DEADLINE) == 8
        assert sorted(ran) == [7, 8]
        assert t.ran == [first.jobs[1].id]


async def test_a_malformed_follow_up_spec_is_dead_lettered_and_the_worker_goes_on(
    make_runner: MakeRunner, redis: Redis, namespace: str
) -> None:
    tr = make_runner()
    t = App(tr)
    keys = QueueKeys(namespace, "default")
    step = '{"task":"double","queue":"other","level":"nope","param":"x","args":{},"delay_ms":0}'
    hostile: dict[bytes, str] = {
        b"{not json": "not JSON",
        b"\xff\x00": "not JSON",
        b'{"v":1,"n":1,"steps":[{"task":"double"}]}': "a step has no",
        b'{"v":2,"n":1,"steps":[]}': "version 1",
        ('{"v":1,"root":null,"n":1,"steps":[' + step + "]}").encode(): "unknown priority",
    }
    async with tr:
        chains = []
        for spec in hostile:  # queued, not run yet: no worker is running
            chain = await t.add.chain(1, 2).then(t.double).enqueue()
            await redis.hset(keys.job(chain.id), "next", spec)
            chains.append(chain)
        fine = await t.add.chain(5, 5).then(t.double).enqueue()
        async with tr.worker(concurrency=4, handle_signals=False):
            for chain, reason in zip(chains, hostile.values(), strict=True):
                with pytest.raises(JobDeadLettered) as dead:
                    await chain.result(timeout=DEADLINE)
                assert dead.value.job_id == f"next-{chain.id}"
                assert reason in dead.value.reason
            assert await fine.result(timeout=DEADLINE) == 20
        letters = await tr.dead_letters("default")
        assert {info.id for info in letters} == {f"next-{c.id}" for c in chains}
        assert await redis.zcard(keys.outbox) == 0


async def test_a_relay_repeated_after_a_crash_writes_nothing_twice(
    make_runner: MakeRunner, redis: Redis, namespace: str
) -> None:
    tr = make_runner()
    t = App(tr)
    add, double = t.add, t.double
    keys = QueueKeys(namespace, "default")
    async with tr:
        chain = await add.chain(1, 2).then(double).enqueue()
        async with tr.worker(concurrency=4, handle_signals=False):
            assert await chain.result(timeout=DEADLINE) == 6
        follow = QueueKeys(namespace, "other").job(chain.jobs[1].id)
        before = await redis.hgetall(follow)
        # a relay that died after writing the follow-up, before taking the id out
        await redis.zadd(keys.outbox, {chain.id: 1})
        relay = Relay(tr.client.redis, tr.client, lambda: [keys], 5.0)
        assert await relay.relay_all() == 1
        assert await redis.zcard(keys.outbox) == 0
        assert await redis.hgetall(follow) == before  # not written again
        assert await relay.relay_all() == 0
        assert t.ran == [chain.id, chain.jobs[1].id]


async def test_a_bad_step_fails_at_enqueue_and_writes_nothing(
    make_runner: MakeRunner, redis: Redis, namespace: str
) -> None:
    tr = make_runner()
    t = App(tr)
    add, label = t.add, t.label

    @tr.task(lock="until_executed")
    async def locked(x: int) -> None: ...

    @tr.task
    async def keyword_only(*, x: int) -> None: ...

    async with tr:
        with pytest.raises(ValidationError):
            await add.chain(1, 2).then(label, ["not", "text"]).enqueue()  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            await add.chain(1, 2).then(label).enqueue()  # type: ignore[call-arg]
        with pytest.raises(TypeError, match="job_id and at"):
            await add.chain(1, 2).then(label.options(job_id="x"), "m").enqueue()
        with pytest.raises(ConfigurationError, match="unique lock"):
            await add.chain(1, 2).then(locked).enqueue()
        with pytest.raises(TypeError, match="first parameter"):
            await add.chain(1, 2).then(keyword_only).enqueue()  # type: ignore[arg-type, call-arg]
        with pytest.raises(ConfigurationError, match="priority"):
            await add.chain(1, 2).then(label.options(priority="urgent"), "m").enqueue()
    assert await redis.keys(f"{namespace}:*") == []


async def test_a_job_without_follow_ups_commits_as_before(make_runner: MakeRunner) -> None:
    from taskrunner import scripts

    keys = QueueKeys("ns", "q")
    plain = scripts.commit(
        scripts.Env(), keys, keys.stream, "j", "1-0", "t", "succeeded", "1", 1, 0, "default", [], 0
    )
    chained = scripts.commit(
        scripts.Env(),
        keys,
        keys.stream,
        "j",
        "1-0",
        "t",
        "succeeded",
        "1",
        1,
        0,
        "default",
        [],
        0,
        follow=True,
    )
    assert keys.outbox not in plain.keys
    assert len(plain.args) == 14
    assert chained.keys[8] == keys.outbox
    assert len(chained.args) == 15


async def test_group_waits_for_all_then_raises_the_first_failure_in_order(
    make_runner: MakeRunner,
) -> None:
    tr = make_runner()
    t = App(tr)
    add, broken = t.add, t.broken
    gate = anyio.Event()

    @tr.task
    async def held(x: int) -> int:
        await gate.wait()
        return x

    async with tr:
        group = await tr.group([add.call(1, 1), broken.call(2), held.call(3), broken.call(4)])
        assert len(group) == 4
        async with tr.worker(concurrency=8, handle_signals=False):

            async def failed_already() -> bool:
                return await group.jobs[1].status() == JobStatus.FAILED

            await wait_until(failed_already, DEADLINE)
            # broken(2) failed, held(3) cannot finish: the group waits (no early raise)
            with pytest.raises(TimeoutError):
                await group.results(timeout=0.5)
            gate.set()
            with pytest.raises(JobFailed) as first:
                await group.results(timeout=DEADLINE)
            assert first.value.job_id == group.jobs[1].id  # the first failure in order
            assert first.value.exc_message == "no 2"
            values = await group.results(return_exceptions=True)
            assert values[0] == 2
            assert values[2] == 3
            assert [type(v) for v in (values[1], values[3])] == [JobFailed, JobFailed]


@pytest.mark.topologies("standalone", "cluster", "sentinel")
async def test_a_chain_and_a_group_on_each_topology(
    make_runner: MakeRunner, topology: Topology
) -> None:
    tr = make_runner(partitions=3)
    t = App(tr)
    add, double, label = t.add, t.double, t.label
    async with tr:
        chains = [await add.chain(i, i).then(double).then(label, "x").enqueue() for i in range(6)]
        group = await tr.group([double.call(i) for i in range(12)])
        async with tr.worker(concurrency=8, handle_signals=False):
            assert [await c.result(timeout=DEADLINE) for c in chains] == [
                f"{4 * i} x" for i in range(6)
            ]
            assert await group.results(timeout=DEADLINE) == [2 * i for i in range(12)]


async def test_a_follow_up_refused_for_memory_is_written_once_memory_frees(
    tmp_path: Path,
) -> None:
    """Out of memory (maxmemory, noeviction), the step's commit still records its success
    (and its outbox entry), but the follow-up's write is refused: the relay tries again
    later instead of dead-lettering the rest of the chain."""
    with RedisProcess(tmp_path / "redis") as server:
        tr = TaskRunner(server.url, namespace="oom", retry_delay=0.01)
        admin = Redis.from_url(server.url, decode_responses=True)

        @tr.task
        async def first() -> int:
            await admin.config_set("maxmemory-policy", "noeviction")
            await admin.config_set("maxmemory", 1)  # every memory-growing first write is refused
            return 1

        @tr.task
        async def second(x: int) -> int:
            return x + 1

        async def refused_for_memory() -> bool:
            stats = await admin.info("errorstats")
            return int(stats.get("errorstat_OOM", {}).get("count", 0)) > 0

        try:
            async with tr:
                chain = await first.chain().then(second).enqueue()
                async with tr.worker():

                    async def first_succeeded() -> bool:
                        return await chain.jobs[0].status() == JobStatus.SUCCEEDED

                    await wait_until(first_succeeded)
                    await wait_until(refused_for_memory)
                    await admin.config_set("maxmemory", 0)
                    assert await chain.result(timeout=DEADLINE) == 2
        finally:
            await admin.config_set("maxmemory", 0)
            await admin.aclose()
