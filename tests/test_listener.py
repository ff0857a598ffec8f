"""A worker whose server refuses its event subscription (here an ACL user that may
publish but not subscribe, as some managed services set it up) keeps working: its
housekeeping is not stalled waiting for a confirmation that never comes, and it finds
new jobs with its fallback reads."""

from __future__ import annotations

import logging
import uuid

import pytest
from conftest import wait_until
from redis.asyncio import Redis
from redisproc import RedisProcess

from taskrunner import Job, JobStatus, TaskRunner
from taskrunner.worker import listener, worker

DEADLINE = 60.0


async def finished(tr: TaskRunner, jobs: list[Job[int]]) -> None:
    """Every job succeeded (read from its hash: ``result()`` listens on pub/sub, which
    this user may not)."""

    async def done() -> bool:
        infos = [await job.info() for job in jobs]
        return all(i is not None and i.status == JobStatus.SUCCEEDED for i in infos)

    await wait_until(done, DEADLINE)


async def no_subscribe_user(redis: Redis) -> tuple[str, str]:
    """An ACL user that may publish but not subscribe: (name, password)."""
    user, password = f"nochan{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    version = str((await redis.info("server"))["redis_version"])
    refused = (
        ["-subscribe", "-ssubscribe"]
        if int(version.split(".", maxsplit=1)[0]) >= 7
        else ["-subscribe"]
    )
    await redis.acl_setuser(
        user,
        enabled=True,
        passwords=[f"+{password}"],
        keys=["*"],
        channels=["*"],
        commands=["+@all", *refused],
    )
    return user, password


async def test_a_refused_subscription_stalls_neither_housekeeping_nor_jobs(
    redis_server: RedisProcess, redis: Redis, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(listener, "CONFIRM_WAIT", 0.5)
    monkeypatch.setattr(worker, "PARTITION_REFRESH", 0.2)
    user, password = await no_subscribe_user(redis)
    url = redis_server.url_for(user, password)
    try:
        tr = TaskRunner(url, namespace=namespace)
        tr.max_idle_wait = 0.2  # the fallback read interval, as tests shorten it

        @tr.task
        async def echo(n: int) -> int:
            return n

        async with tr, tr.worker(concurrency=4, handle_signals=False) as running:
            await finished(tr, [await echo.enqueue(i) for i in range(5)])
            # the housekeeping loop gets past the refused subscription: it follows a
            # raised partition count (recorded by another runner) within its passes
            wider = TaskRunner(url, namespace=namespace, partitions=3)
            async with wider:
                assert (await wider.client.resolve("default")).partitions == 3

            async def follows() -> bool:
                return running.queues[0].read == 3

            await wait_until(follows, DEADLINE)
            await finished(tr, [await echo.enqueue(i) for i in range(5, 10)])
    finally:
        await redis.acl_deluser(user)


async def test_a_worker_waits_once_for_all_its_partitions_subscriptions(
    redis_server: RedisProcess,
    redis: Redis,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The partitions are subscribed to together, under one CONFIRM_WAIT: a refused
    # subscription delays the worker's start by it once, not once per partition.
    monkeypatch.setattr(listener, "CONFIRM_WAIT", 0.5)
    user, password = await no_subscribe_user(redis)
    try:
        tr = TaskRunner(redis_server.url_for(user, password), namespace=namespace, partitions=4)

        @tr.task
        async def echo(n: int) -> int:
            return n

        with caplog.at_level(logging.WARNING, logger="taskrunner.worker"):
            async with tr, tr.worker(handle_signals=False):
                pass
        waits = [r.getMessage() for r in caplog.records if "not confirmed" in r.getMessage()]
        assert len(waits) == 1, waits
        assert all(f"{{default#{p}}}" in waits[0] for p in (1, 2, 3)), waits
    finally:
        await redis.acl_deluser(user)
