"""Rate and concurrency limits with three real worker processes (``taskrunner worker``):
the limits hold across all of them, a limited task does not hold up the rest of its
queue, a killed worker's slot comes back after ``stale_after``, and keyed limits are
independent per key. The tasks (tests/apps/limits_app.py) record when they start and
end; the checks run on those records."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import pytest
from apps import limits_app
from apps.limits_app import Tasks, declare, events_key, gate_key, parse_events
from conftest import StartWorker, wait_until
from workerproc import CliWorker

from taskrunner import TaskRunner
from taskrunner.keys import LimitKeys
from taskrunner.middleware.limits import limit_digest

APP = "apps.limits_app:tr"
DEADLINE = 60.0


async def start_workers(start: StartWorker, count: int, *args: str, **env: str) -> list[CliWorker]:
    workers = [start(APP, "--concurrency", "4", *args, env=env) for _ in range(count)]
    for worker in workers:
        await worker.ready()
    return workers


async def events(tr: TaskRunner, task: str | None = None) -> list[dict[str, Any]]:
    raw = await tr.client.redis.lrange(events_key(tr.namespace), 0, -1)
    found = parse_events(raw)
    return [e for e in found if task is None or e["task"] == task]


def intervals(found: Sequence[dict[str, Any]]) -> list[tuple[float, float]]:
    """(start, end) of every run (by job and attempt) that recorded both."""
    starts = {(e["job"], e["attempt"]): e["t"] for e in found if e["kind"] == "start"}
    ends = {(e["job"], e["attempt"]): e["t"] for e in found if e["kind"] == "end"}
    return [(starts[run], ends[run]) for run in starts if run in ends]


def max_overlap(spans: Sequence[tuple[float, float]]) -> int:
    """The most spans running at one instant (an end before a start at equal times)."""
    points = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    running = peak = 0
    for _, step in points:
        running += step
        peak = max(peak, running)
    return peak


async def holders(tr: TaskRunner, task: str, values: dict[str, Any]) -> int:
    keys = LimitKeys(tr.namespace, limit_digest(task, values))
    return int(await tr.client.redis.zcard(keys.running))


def app_runner(redis_url: str, namespace: str) -> tuple[TaskRunner, Tasks]:
    tr = limits_app.runner(redis_url, namespace)
    return tr, declare(tr)


@pytest.mark.topologies("standalone", "cluster", "sentinel")
async def test_a_concurrency_limit_holds_across_three_worker_processes(
    cli_workers: StartWorker, redis_url: str, namespace: str
) -> None:
    # One slot per worker: two runs at once (the first waits for a second to start, see
    # limits_app.held) are two processes, so the limit is shown to hold across them.
    await start_workers(cli_workers, 3, "--concurrency", "1")
    tr, tasks = app_runner(redis_url, namespace)
    async with tr:
        jobs = await tr.enqueue_many([tasks.held.call(i, 0.15) for i in range(16)])
        assert [await job.result(timeout=DEADLINE) for job in jobs] == list(range(16))
        infos = [await job.info() for job in jobs]
        found = await events(tr, "held")
        assert await holders(tr, "held", {}) == 0  # every slot was given back

    spans = intervals(found)
    assert len(spans) == 16
    assert max_overlap(spans) <= limits_app.HELD_LIMIT
    assert len({e["pid"] for e in found}) >= 2  # several workers ran them
    # Jobs over the limit waited in the delayed set: rescheduled, never a failed attempt.
    assert all(info.attempts == 1 for info in infos)
    assert sum(info.reschedules for info in infos) > 0


async def test_a_rate_limit_holds_across_three_worker_processes(
    cli_workers: StartWorker, redis_url: str, namespace: str
) -> None:
    await start_workers(cli_workers, 3)
    tr, tasks = app_runner(redis_url, namespace)
    count, period = limits_app.PACED_RATE
    async with tr:
        jobs = await tr.enqueue_many([tasks.paced.call(i) for i in range(3 * count)])
        assert [await job.result(timeout=DEADLINE) for job in jobs] == list(range(3 * count))
        infos = [await job.info() for job in jobs]
        bodies = {e["job"]: e["t"] for e in await events(tr, "paced")}

    assert len(bodies) == 3 * count
    # Each start (the slot taken in Redis) lies between the claim of the attempt that ran
    # (JobInfo.started_at, the server's clock) and the start of the task body (this host's
    # clock, the same clock). At most `count` starts in any window of `period` means
    # any count + 1 starts span at least the period, so any count + 1 jobs must span at
    # least the period from their earliest claim to their latest body start.
    spans = [(info.started_at.timestamp(), bodies[info.id]) for info in infos if info.started_at]
    assert len(spans) == 3 * count
    assert shortest_span(spans, count + 1) >= period
    assert all(info.attempts == 1 for info in infos)
    assert sum(info.reschedules for info in infos) >= count  # the later windows waited


def shortest_span(spans: Sequence[tuple[float, float]], size: int) -> float:
    """The least ``max(end) - min(start)`` over every ``size`` of the (start, end) spans:
    for each span as the earliest start, the ``size`` ends it must wait for at least."""
    best = float("inf")
    for start, _ in spans:
        ends = sorted(end for s, end in spans if s >= start)
        if len(ends) >= size:
            best = min(best, ends[size - 1] - start)
    return best


async def test_a_limited_task_does_not_hold_up_other_tasks_of_its_queue(
    cli_workers: StartWorker, redis_url: str, namespace: str
) -> None:
    # 6 consumers in all; 12 jobs of a task limited to 1 at a time come first.
    await start_workers(cli_workers, 3, "--concurrency", "2")
    tr, tasks = app_runner(redis_url, namespace)
    async with tr:
        gated = await tr.enqueue_many([tasks.gated.call(i, "main") for i in range(12)])
        plain = await tr.enqueue_many([tasks.plain.call(i) for i in range(12)])
        for job in plain:  # while the one gated job that runs holds its slot
            assert await job.result(timeout=DEADLINE) in range(12)
        running = [e for e in await events(tr, "gated") if e["kind"] == "start"]
        assert len(running) == 1

        await tr.client.redis.set(gate_key(namespace), "1")
        assert sorted([await job.result(timeout=DEADLINE) for job in gated]) == list(range(12))
        found = await events(tr, "gated")
    assert max_overlap(intervals(found)) == 1


async def test_a_killed_workers_slot_comes_back_after_stale_after(
    cli_workers: StartWorker, redis_url: str, namespace: str
) -> None:
    stale_after = limits_app.STALE_AFTER
    [first] = await start_workers(cli_workers, 1)
    tr, tasks = app_runner(redis_url, namespace)
    async with tr:
        held = await tasks.gated.enqueue(1, "k")

        async def started() -> bool:
            return bool(await events(tr, "gated"))

        await wait_until(started, DEADLINE)
        killed_at = time.time()
        first.kill()  # SIGKILL while its job holds the only slot of key "k"
        await tr.client.redis.set(gate_key(namespace), "1")
        after = await tasks.gated.enqueue(2, "k")
        await start_workers(cli_workers, 2)

        assert await after.result(timeout=DEADLINE) == 2
        assert await held.result(timeout=DEADLINE) == 1  # reclaimed, run again
        found = await events(tr, "gated")
        assert await holders(tr, "gated", {"account": "k"}) == 0

    later = [e["t"] for e in found if e["kind"] == "start"][1:]
    assert len(later) == 2
    # The dead worker's slot held for at least 2/3 of stale_after after its last
    # renewal (renewals run every stale_after / 3), then expired: nothing leaked.
    assert min(later) >= killed_at + stale_after / 2
    assert max_overlap(intervals(found)) == 1


@pytest.mark.topologies("standalone", "cluster", "sentinel")
async def test_keyed_limits_are_independent_per_key(
    cli_workers: StartWorker, redis_url: str, namespace: str
) -> None:
    await start_workers(cli_workers, 3)
    tr, tasks = app_runner(redis_url, namespace)
    async with tr:
        jobs = await tr.enqueue_many(
            [tasks.gated.call(i, account) for i, account in enumerate("aabb")]
        )

        async def both_keys_run() -> bool:
            keys = {e["key"] for e in await events(tr, "gated") if e["kind"] == "start"}
            return keys == {"a", "b"}

        await wait_until(both_keys_run, DEADLINE)  # one of each key at once
        starts = [e for e in await events(tr, "gated") if e["kind"] == "start"]
        assert sorted(e["key"] for e in starts) == ["a", "b"]  # not a second one of a key

        await tr.client.redis.set(gate_key(namespace), "1")
        assert [await job.result(timeout=DEADLINE) for job in jobs] == [0, 1, 2, 3]
        found = await events(tr, "gated")
    for key in "ab":
        assert max_overlap(intervals([e for e in found if e["key"] == key])) == 1
    assert max_overlap(intervals(found)) == 2
