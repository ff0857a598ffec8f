"""Chains and groups with real worker processes (tests/apps/chain_app.py): a worker
killed between a chain step's commit and the write of its follow-up, and a worker
killed while a group's jobs run.

Every task of the app counts its executions per job id in ``{ns}:test:chain-runs``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

import pytest
from apps.chain_app import add, double, label, runs_key, slow_square, tr
from conftest import StartWorker, subprocess_env, wait_until
from redis.asyncio import Redis

from taskrunner import JobStatus, TaskRunner
from taskrunner.keys import QueueKeys
from taskrunner.testing.plugin import TaskRunnerBinder

APP = "apps.chain_app:tr"
DEADLINE = 30.0


@pytest.fixture
def app(redis_url: str, namespace: str) -> Iterator[TaskRunner]:
    """The app's TaskRunner, on the test's Redis and namespace (as its workers)."""
    binder = TaskRunnerBinder(redis_url, namespace)
    try:
        yield binder(tr)
    finally:
        binder.restore()


async def runs(redis: Redis, namespace: str) -> dict[str, int]:
    found = cast(dict[str, str], await redis.hgetall(runs_key(namespace)))
    return {job: int(n) for job, n in found.items()}


async def test_worker_killed_after_the_commit_the_follow_up_runs_once(
    cli_workers: StartWorker, redis: Redis, redis_url: str, namespace: str, app: TaskRunner
) -> None:
    env = subprocess_env(redis_url, namespace) | {"TEST_CHAIN_KILL": "add"}
    doomed = cli_workers(APP, "--concurrency", "2", env=env)
    await doomed.ready()
    async with app:
        chain = await add.chain(1, 2).then(double).then(label, "apples").enqueue()
        assert await doomed.exited() != 0  # SIGKILLed by its own on_commit

        first, second, third = chain.jobs
        assert await first.status() == JobStatus.SUCCEEDED  # recorded before the kill
        outbox = QueueKeys(namespace, "default").outbox
        assert await redis.zrange(outbox, 0, -1) == [first.id]  # follow-up not written
        assert not await redis.exists(QueueKeys(namespace, "other").job(second.id))

        survivor = cli_workers(APP, "--concurrency", "2")
        await survivor.ready()
        assert await chain.result(timeout=DEADLINE) == "6 apples"

        assert await redis.zcard(outbox) == 0
        survivor.terminate()
        assert await survivor.exited() == 0, survivor.output()
    # each step ran once: the killed worker's step before the kill, the rest after it
    assert await runs(redis, namespace) == {first.id: 1, second.id: 1, third.id: 1}


async def test_group_results_in_order_while_a_worker_is_killed(
    cli_workers: StartWorker, app: TaskRunner
) -> None:
    # The first worker is killed while it runs some of the group's jobs (each takes
    # 1.5 s, so one seen running is still running when the kill lands), and only then
    # does the second start: it must reclaim them, however loaded the machine is.
    workers = [cli_workers(APP, "--concurrency", "4")]
    await workers[0].ready()
    async with app:
        group = await app.group([slow_square.call(i, 1.5) for i in range(16)])

        async def some_running_in_the_first() -> bool:
            infos = [await job.info() for job in group.jobs]
            return any(
                i.status == JobStatus.RUNNING and f":{workers[0].pid}:" in (i.worker or "")
                for i in infos
            )

        await wait_until(some_running_in_the_first, DEADLINE)
        workers[0].kill()
        workers.append(cli_workers(APP, "--concurrency", "8"))
        assert await group.results(timeout=DEADLINE) == [i * i for i in range(16)]
        reclaimed = [await job.info() for job in group.jobs]
        assert any(i.reclaims for i in reclaimed)  # the killed worker's jobs were taken over
        assert all(i.status == JobStatus.SUCCEEDED for i in reclaimed)
        workers[1].terminate()
        assert await workers[1].exited() == 0, workers[1].output()
