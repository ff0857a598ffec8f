"""Priority levels with real worker processes (tests/apps/priorities_app.py): a worker
takes a ready job of a higher level before any lower one still waiting, whether the
job was just enqueued, reclaimed from a killed worker or promoted from the delayed
set; a lower level is not starved by a steady stream of higher jobs (one take in ten
goes to a job that waited longer than ``priority_aging``); and the level is chosen
per task or per call, an unknown one failing at enqueue with nothing written.

Every ordering check frees exactly one slot of a saturated worker (each gated job
waits for a key of its own) and looks at what started in it: no timing involved."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import pytest
from apps import priorities_app
from apps.priorities_app import gate_key, parse_starts, starts_key
from conftest import StartWorker, wait_until
from topology import Topology

from taskrunner import ConfigurationError, JobStatus, Task, TaskRunner
from taskrunner.worker import order
from taskrunner.worker.order import AGED_SHARE

APP = "apps.priorities_app:tr"
DEADLINE = 60.0
Work = Task[[str, bool, float], str]


def app_runner(
    redis_url: str, namespace: str, partitions: int | None = None
) -> tuple[TaskRunner, Work]:
    tr = priorities_app.runner(redis_url, namespace, partitions)
    return tr, priorities_app.declare(tr)


async def stream_jobs(tr: TaskRunner, level: str) -> list[str]:
    """The job ids in one level's stream of the default queue's partition 0."""
    entries = await tr.client.redis.xrange(tr.client.keys("default").level_stream(level))
    return [str(fields["job"]) for _, fields in cast(list[tuple[str, dict[str, str]]], entries)]


async def starts(tr: TaskRunner) -> list[dict[str, Any]]:
    return parse_starts(await tr.client.redis.lrange(starts_key(tr.namespace), 0, -1))


async def wait_starts(tr: TaskRunner, count: int) -> list[dict[str, Any]]:
    """The starts recorded, once there are at least ``count``."""

    async def enough() -> bool:
        return len(await starts(tr)) >= count

    await wait_until(enough, DEADLINE)
    return await starts(tr)


async def open_gate(tr: TaskRunner, name: str) -> None:
    await tr.client.redis.set(gate_key(tr.namespace, name), "1")


async def saturate(
    tr: TaskRunner, work: Work, lows: int, slots: int, before: int = 0
) -> list[dict[str, Any]]:
    """Enqueue ``lows`` gated low jobs and wait until the workers run ``slots`` of them
    (every free slot; ``before`` jobs started already); the rest wait in the queue."""
    await tr.enqueue_many([work.call(f"low-{i}", True, 0.0) for i in range(lows)])
    running = (await wait_starts(tr, before + slots))[before:]
    assert [s["level"] for s in running] == ["low"] * slots
    return running


@pytest.mark.topologies("standalone", "cluster", "sentinel")
async def test_a_high_job_enqueued_behind_1000_low_ones_starts_before_any_waiting_low_one(
    cli_workers: StartWorker, redis_url: str, namespace: str, topology: Topology
) -> None:
    # The default partitions: one on standalone and Sentinel, one per master (3) on the
    # cluster, where the worker chooses across partitions (peek.lua).
    await cli_workers(APP, "--concurrency", "2").ready()
    tr, work = app_runner(redis_url, namespace)
    async with tr:
        running = await saturate(tr, work, 1000, 2)
        high = await work.options(priority="high").enqueue("high", False, 0.0)
        await open_gate(tr, running[0]["name"])  # one slot frees: the high job takes it
        assert await high.result(timeout=DEADLINE) == "high"
        found = await wait_starts(tr, 4)  # the slot the high job leaves takes a low one

    assert found[2]["name"] == "high"
    assert found[2]["level"] == "high"
    assert found[3]["level"] == "low"
    assert len({s["name"] for s in found}) == len(found)


async def test_a_high_job_goes_first_across_the_partitions_of_a_standalone_queue(
    cli_workers: StartWorker, redis_url: str, namespace: str
) -> None:
    await cli_workers(APP, "--concurrency", "2", env={"PRIO_PARTITIONS": "4"}).ready()
    tr, work = app_runner(redis_url, namespace, partitions=4)
    async with tr:
        assert (await tr.client.resolve("default")).partitions == 4
        running = await saturate(tr, work, 200, 2)
        highs = await tr.enqueue_many(
            [work.options(priority="high").call(f"high-{i}", False, 0.0) for i in range(8)]
        )
        await open_gate(tr, running[0]["name"])
        for job in highs:
            await job.result(timeout=DEADLINE)
        found = await wait_starts(tr, 11)

    # The eight highs (spread over the partitions) ran in the freed slot, one after the
    # other, before the low job that took the slot after them.
    assert [s["level"] for s in found[2:10]] == ["high"] * 8
    assert found[10]["level"] == "low"


async def test_a_reclaimed_high_job_is_taken_before_waiting_low_ones(
    cli_workers: StartWorker, redis_url: str, namespace: str
) -> None:
    env = {"PRIO_STALE_AFTER": "2.0", "PRIO_HEARTBEAT": "0.3"}
    victim = cli_workers(APP, "--concurrency", "1", env=env)
    await victim.ready()
    tr, work = app_runner(redis_url, namespace)
    async with tr:
        high = await work.options(priority="high").enqueue("high", True, 0.0)
        [first] = await wait_starts(tr, 1)
        assert (first["name"], first["attempt"]) == ("high", 1)

        survivor = cli_workers(APP, "--concurrency", "1", env=env)
        await survivor.ready()
        assert [s["name"] for s in await saturate(tr, work, 50, 1, before=1)] == ["low-0"]
        victim.kill()

        async def requeued() -> bool:  # by the survivor, after stale_after
            info = await high.info()
            return info.reclaims == 1 and info.status == JobStatus.QUEUED

        await wait_until(requeued, DEADLINE)
        await open_gate(tr, "high")
        await open_gate(tr, "low-0")  # the survivor's one slot frees
        assert await high.result(timeout=DEADLINE) == "high"
        found = await wait_starts(tr, 4)

    assert [(s["name"], s["attempt"]) for s in found[:3]] == [
        ("high", 1),
        ("low-0", 1),
        ("high", 2),
    ]
    assert found[3]["level"] == "low"


async def test_a_delayed_high_job_promoted_from_the_delayed_set_is_taken_before_waiting_lows(
    cli_workers: StartWorker, redis_url: str, namespace: str
) -> None:
    await cli_workers(APP, "--concurrency", "1").ready()
    tr, work = app_runner(redis_url, namespace)
    async with tr:
        await saturate(tr, work, 50, 1)
        high = await work.options(priority="high", delay=0.2).enqueue("high", False, 0.0)

        async def promoted() -> bool:  # by the worker's scheduler, once due
            return await high.status() == JobStatus.QUEUED

        await wait_until(promoted, DEADLINE)
        await open_gate(tr, "low-0")
        assert await high.result(timeout=DEADLINE) == "high"
        found = await wait_starts(tr, 3)

    assert [s["name"] for s in found[:2]] == ["low-0", "high"]
    assert found[2]["level"] == "low"


async def test_a_low_job_waiting_longer_than_priority_aging_is_not_starved_by_high_ones(
    cli_workers: StartWorker, redis_url: str, namespace: str
) -> None:
    # One slot, 200 high jobs of at least 20 ms each (4 s in all), and one low job
    # enqueued first: it has waited priority_aging (0.3 s) long before the highs run
    # out, and is then taken within AGED_SHARE takes (the rule's guarantee).
    await cli_workers(APP, "--concurrency", "1", env={"PRIO_AGING": "0.3"}).ready()
    tr, work = app_runner(redis_url, namespace)
    async with tr:
        blocker = await work.options(priority="high").enqueue("blocker", True, 0.0)
        await wait_starts(tr, 1)
        low = await work.enqueue("low", False, 0.0)
        highs = await tr.enqueue_many(
            [work.options(priority="high").call(f"high-{i}", False, 0.02) for i in range(200)]
        )
        await open_gate(tr, "blocker")
        await blocker.result(timeout=DEADLINE)
        assert await low.result(timeout=DEADLINE) == "low"
        for job in highs:
            await job.result(timeout=DEADLINE)
        entry = str(await tr.client.redis.hget(tr.client.keys("default").job(low.id), "entry"))
        found = await starts(tr)

    aged_at = int(entry.partition("-")[0]) + 300  # the server's clock
    names = [s["name"] for s in found]
    position = names.index("low")
    # Highs were still waiting when the low one ran: it jumped the queue ...
    assert any(name.startswith("high-") for name in names[position + 1 :])
    # ... within AGED_SHARE takes of having aged: at most AGED_SHARE - 1 later ones, and
    # the one whose read and start straddle the moment it aged.
    after_aging = [s for s in found[:position] if s["ms"] > aged_at]
    assert len(after_aging) <= AGED_SHARE


async def test_aged_low_jobs_get_one_take_in_ten_and_the_high_ones_the_rest(
    cli_workers: StartWorker, redis_url: str, namespace: str
) -> None:
    # 30 low jobs wait until they all have aged (priority_aging 0.3 s, server clock)
    # behind a gated job; then 40 high jobs come. Any AGED_SHARE consecutive takes hold
    # one reserved take: the aged lows get those, oldest first, and the highs the rest.
    await cli_workers(APP, "--concurrency", "1", env={"PRIO_AGING": "0.3"}).ready()
    tr, work = app_runner(redis_url, namespace)
    async with tr:
        await work.options(priority="high").enqueue("blocker", True, 0.0)
        await wait_starts(tr, 1)
        lows = await tr.enqueue_many([work.call(f"low-{i}", False, 0.0) for i in range(30)])
        last = str(await tr.client.redis.hget(tr.client.keys("default").job(lows[-1].id), "entry"))

        async def aged() -> bool:
            seconds, micros = await tr.client.redis.time()
            now = int(seconds) * 1000 + int(micros) // 1000
            return now > int(last.partition("-")[0]) + 300

        await wait_until(aged, DEADLINE)
        highs = await tr.enqueue_many(
            [work.options(priority="high").call(f"high-{i}", False, 0.0) for i in range(40)]
        )
        await open_gate(tr, "blocker")
        for job in [*highs, *lows]:
            await job.result(timeout=DEADLINE)
        found = [s["name"] for s in await starts(tr)][1:]

    window = found[: 2 * AGED_SHARE]
    assert [name for name in window if name.startswith("low-")] == ["low-0", "low-1"]
    assert len(found) == 70


def test_bad_priorities_are_refused_where_the_runner_is_made() -> None:
    cases: list[tuple[object, str]] = [
        # a string is a sequence too: "abc" was taken as the levels a, b and c
        ("abc", "must be a sequence of level names, highest first, e.g. ('high', 'default'"),
        ("high", "got the string 'high'"),  # was "priority levels must be unique" ('h' twice)
        ((), "at least one level"),
        (("high", "high"), "must be unique"),
        (("a:b",), "invalid priority level 'a:b'"),
    ]
    for priorities, expected in cases:
        with pytest.raises(ConfigurationError) as caught:
            TaskRunner("redis://localhost:1/0", priorities=priorities)  # type: ignore[arg-type]
        assert expected in str(caught.value)
    assert TaskRunner("redis://localhost:1/0", priorities=["a", "b"]).priorities == ("a", "b")


async def test_the_level_comes_from_the_task_or_the_call_and_an_unknown_one_writes_nothing(
    make_runner: Callable[..., TaskRunner], redis_url: str, namespace: str
) -> None:
    tr = make_runner()

    @tr.task(priority="low")
    async def chore() -> None:
        pass

    @tr.task
    async def plain() -> None:
        pass

    with pytest.raises(ConfigurationError, match="unknown priority 'urgent'"):

        @tr.task(priority="urgent")
        async def never() -> None:
            pass

    async with tr:
        redis = tr.client.redis
        by_task = await chore.enqueue()
        by_call = await chore.options(priority="high").enqueue()
        default = await plain.enqueue()
        levels = {job.id: (await job.info()).priority for job in (by_task, by_call, default)}
        streams = {level: await stream_jobs(tr, level) for level in tr.priorities}
        before = sorted(await redis.keys(f"{namespace}:*"))
        with pytest.raises(ConfigurationError, match="unknown priority 'urgent'"):
            await plain.options(priority="urgent").enqueue()
        with pytest.raises(ConfigurationError, match="unknown priority 'urgent'"):
            await tr.enqueue_many([plain.call(), plain.options(priority="urgent").call()])
        after = sorted(await redis.keys(f"{namespace}:*"))

    assert levels == {by_task.id: "low", by_call.id: "high", default.id: "default"}
    assert streams == {"high": [by_call.id], "default": [default.id], "low": [by_task.id]}
    assert after == before


async def test_a_revived_dead_letter_goes_back_to_its_own_level(
    make_runner: Callable[..., TaskRunner],
) -> None:
    producer, worker_app = make_runner(), make_runner()

    @producer.task(name="ghost", priority="high")
    async def ghost() -> None:  # no worker declares it: it is dead-lettered
        pass

    async with producer:
        job = await ghost.enqueue()
        async with worker_app:
            await worker_app.worker(concurrency=1, burst=True, handle_signals=False).run()
        assert await job.status() == JobStatus.DEAD
        assert await producer.retry_dead(all=True) == 1
        high, default = await stream_jobs(producer, "high"), await stream_jobs(producer, "default")
        info = await job.info()

    assert (high, default) == ([job.id], [])
    assert (info.status, info.priority) == (JobStatus.QUEUED, "high")


def test_the_choice_across_partitions_is_level_then_age_with_one_take_in_ten_aged() -> None:
    # What a worker reading several partitions takes (taskrunner.worker.order), from
    # what peek.lua saw: partition 0 has lows that waited 90 s and 80 s, partition 1
    # highs of 5 s and 1 s and a default of 70 s; priority_aging is 60 s.
    seen = [
        *order.unread_of(0, 100_000, [[], [], ["10000-0", "20000-0"]]),
        *order.unread_of(1, 100_000, [["95000-0", "99000-0"], ["30000-0"], []]),
    ]
    turns = order.Turns()
    turns.took(8)  # the next two takes are the 9th and the 10th: the 10th is reserved
    chosen = order.choose(seen, 4, 60_000, turns)
    assert [(u.partition, u.level, u.entry_id) for u in chosen] == [
        (1, 0, "95000-0"),  # highest level, oldest first
        (0, 2, "10000-0"),  # the reserved take: the oldest aged job of a lower level
        (1, 0, "99000-0"),
        (1, 1, "30000-0"),  # then the next level (aged, but by rule 1 here)
    ]
    assert order.caps(chosen, 2, 3) == [[0, 0, 1], [2, 1, 0]]
    assert order.choose(seen, 9, 60_000, order.Turns()) == sorted(
        seen, key=lambda u: (u.level, -u.age_ms)
    )  # no reserved take among the first 9: strict order


def test_the_partitions_of_one_server_are_taken_in_the_order_their_entries_were_written() -> None:
    # peek.lua reads the server's clock once per partition's script run: here the second
    # partition was looked at 2 ms after the first, on the same server. Its second entry,
    # written 1 ms after the first partition's second one, still goes after it (against
    # each look's own instant it looked 1 ms older, and was taken first).
    nows = order.one_clock([100_000, 100_002], ["", ""])
    seen = [
        *order.unread_of(0, nows[0], [["99990-0", "99995-0"]]),
        *order.unread_of(1, nows[1], [["99993-0", "99996-0"]]),
    ]
    chosen = order.choose(seen, 3, 60_000, order.Turns())
    assert [(u.partition, u.entry_id) for u in chosen] == [
        (0, "99990-0"),
        (1, "99993-0"),
        (0, "99995-0"),
    ]
    # Cluster nodes have clocks of their own: each node's partitions share its latest.
    assert order.one_clock([100_000, 100_002, 50_000], ["n1", "n1", "n2"]) == [
        100_002,
        100_002,
        50_000,
    ]
