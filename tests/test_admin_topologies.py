"""The admin API and the dashboard on every deployment: standalone Redis, Redis Cluster
(each partition of a queue in its own slot, spread over the masters) and Sentinel.
Counts, merged listings, detail, retry, pause and resume, throughput, workers and dead
letters, through the same calls operators make (tests/topology.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from conftest import wait_until
from topology import Topology

from taskrunner import JobFailed, JobStatus, TaskRunner, current_job
from taskrunner.dashboard import dashboard

MakeRunner = Callable[..., TaskRunner]
DEADLINE = 60.0
ALL = pytest.mark.topologies("standalone", "cluster", "sentinel")


@ALL
async def test_admin_api_and_dashboard_on_each_topology(
    make_runner: MakeRunner, topology: Topology, tmp_path: Path
) -> None:
    tr = make_runner(heartbeat_interval=0.2, stale_after=30, max_retries=0, partitions=3)
    flag = tmp_path / "fixed"

    @tr.task
    async def add(x: int, y: int) -> int:
        return x + y

    @tr.task
    async def fixable() -> str:
        await current_job().set_progress({"step": 1})
        if not await anyio.Path(flag).exists():
            raise RuntimeError("not fixed yet")
        return "fixed"

    @tr.task(queue="other")
    async def ping() -> str:
        return "pong"

    async with tr:
        ok = [await add.options(priority=("high", "low")[i % 2]).enqueue(i, i) for i in range(12)]
        bad = await fixable.enqueue()
        async with tr.worker(concurrency=10, handle_signals=False) as worker:
            assert [await job.result(timeout=DEADLINE) for job in ok] == [2 * i for i in range(12)]
            with pytest.raises(JobFailed):
                await bad.result(timeout=DEADLINE)

            async def beating() -> bool:
                return any(w.id == worker.id for w in await tr.admin.workers())

            await wait_until(beating, DEADLINE)
            counts = {c.queue: c for c in await tr.admin.counts()}
            pages = await _pages(tr, status="succeeded", limit=5)
            high = await _pages(tr, status="succeeded", priority="high", limit=4)
            chart = await tr.admin.throughput(minutes=5)
            detail = await tr.admin.job(bad.id)
            page = await _dashboard_page(tr, "/")

            await tr.pause("default")
            held = await add.enqueue(20, 22)  # accepted, not run while paused
            other = await ping.enqueue()
            assert await other.result(timeout=DEADLINE) == "pong"
            assert await held.status() == JobStatus.QUEUED
            assert (await tr.admin.counts(["default"]))[0].paused_partitions == 3
            await tr.resume("default")
            assert await held.result(timeout=DEADLINE) == 42

            flag.touch()
            assert await tr.retry(bad.id)
            assert await bad.result(timeout=DEADLINE) == "fixed"
    default = counts["default"]
    assert (default.partitions, default.succeeded, default.failed) == (3, 12, 1)
    assert default.workers == 1
    seen = [j.id for p in pages for j in p]
    assert sorted(seen) == sorted(job.id for job in ok)
    assert sorted(j.id for p in high for j in p) == sorted(job.id for job in ok[::2])
    assert sum(m.succeeded for m in chart) == 12
    assert sum(m.failed for m in chart) == 1
    assert (detail.status, detail.progress) == (JobStatus.FAILED, {"step": 1})
    assert 'data-queue="default"' in page


async def _pages(tr: TaskRunner, **filters: Any) -> list[list[Any]]:
    found = []
    page = await tr.admin.jobs(queue="default", **filters)
    found.append(page.jobs)
    while page.cursor is not None:
        page = await tr.admin.jobs(queue="default", cursor=page.cursor, **filters)
        found.append(page.jobs)
    return found


async def _dashboard_page(tr: TaskRunner, path: str) -> str:
    app = dashboard(tr, poll_seconds=0)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get(path)
    assert response.status_code == 200, response.text
    return response.text


@ALL
async def test_dead_letters_from_the_admin_api_on_each_topology(
    make_runner: MakeRunner, topology: Topology
) -> None:
    producer = make_runner(partitions=2)

    @producer.task(name="ghost")
    async def ghost() -> None: ...

    consumer = make_runner(partitions=2)  # declares no "ghost"

    @consumer.task(name="known")
    async def known() -> int:
        return 1

    async with producer, consumer:
        jobs = [await ghost.enqueue() for _ in range(6)]
        async with consumer.worker(handle_signals=False):
            for job in jobs:
                with contextlib.suppress(Exception):
                    await producer.job(job.id).result(timeout=DEADLINE)
        page = await consumer.admin.dead_letters("default", limit=4)
        rest = await consumer.admin.dead_letters("default", limit=4, cursor=page.cursor)
        assert await consumer.admin.retry_dead([jobs[0].id], "default") == 1
        assert await producer.job(jobs[0].id).status() == JobStatus.QUEUED
        assert await consumer.admin.delete_dead([jobs[1].id], "default") == 1
        purged = await consumer.admin.purge_dead("default")
    listed = [j.id for j in page.jobs + rest.jobs]
    assert sorted(listed) == sorted(job.id for job in jobs)
    assert purged == 4
