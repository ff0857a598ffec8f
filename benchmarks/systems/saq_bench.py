"""saq adapter: ``Worker(concurrency=...)``, jobs enqueued with ``ttl=-1`` (results disabled).

saq dequeues with a blocking ``BLMOVE`` per worker slot, so no polling knob is involved.
saq has no bulk-enqueue API (``Queue.map`` enqueues one by one *and* waits for results).
"""

from __future__ import annotations

import asyncio
from typing import Any

from saq import Queue, Worker

from benchmarks.systems._common import (
    QUEUE,
    Params,
    TaskKind,
    cancel_task,
    main,
    on_latency,
    on_noop,
    on_sleep,
)


async def noop(ctx: dict[str, Any]) -> None:
    on_noop()


async def sleep(ctx: dict[str, Any]) -> None:
    await on_sleep()


async def latency(ctx: dict[str, Any], *, enqueued_at: float) -> None:
    on_latency(enqueued_at)


class Saq:
    name: str = "saq"
    packages: tuple[str, ...] = ("saq", "redis", "hiredis")
    has_bulk: bool = False
    settings: str = "Worker(concurrency=concurrency), job ttl=-1 (no result kept)"

    def __init__(self) -> None:
        self.queue: Queue | None = None
        self.worker: Worker | None = None
        self.task: asyncio.Task[None] | None = None

    async def open(self, url: str, params: Params) -> None:
        self.queue = Queue.from_url(url, name=QUEUE)
        await self.queue.connect()

    async def close(self) -> None:
        if self.queue is not None:
            await self.queue.disconnect()

    async def enqueue(self, kind: TaskKind, enqueued_at: float = 0.0) -> None:
        assert self.queue is not None
        kwargs: dict[str, Any] = {"enqueued_at": enqueued_at} if kind == "latency" else {}
        await self.queue.enqueue(kind, ttl=-1, **kwargs)

    async def enqueue_bulk(self, kind: TaskKind, n: int) -> None:
        raise NotImplementedError

    async def start_worker(self, concurrency: int) -> None:
        assert self.queue is not None
        self.worker = Worker(self.queue, [noop, sleep, latency], concurrency=concurrency)
        self.task = asyncio.create_task(self.worker.start())

    async def stop_worker(self) -> None:
        if self.worker is not None:
            await self.worker.stop()
        await cancel_task(self.task)


if __name__ == "__main__":
    main(Saq())
