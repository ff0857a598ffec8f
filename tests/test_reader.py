"""The reader after a "ready" event: it reads the partition that sent it, not all of
them, so a job arriving in one partition of a queue split in P costs each idle worker
one read instead of P (observed through keyspace notifications on the partitions'
``idle`` flags, which every read of a drained partition sets)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from conftest import wait_until
from redis.asyncio import Redis

from taskrunner import TaskRunner

DEADLINE = 60.0
PARTITIONS = 4


async def test_a_ready_event_reads_only_its_partition(
    make_runner: Callable[..., TaskRunner], redis: Redis, redis_url: str
) -> None:
    tr = make_runner(partitions=PARTITIONS)
    tr.max_idle_wait = 3600.0  # no fallback read of every partition during the test

    @tr.task
    async def echo(n: int) -> int:
        return n

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
