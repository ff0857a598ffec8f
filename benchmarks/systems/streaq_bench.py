"""streaq adapter: ``Worker(concurrency=..., prefetch=concurrency)``, tasks ``ttl=0`` (no
result stored) and ``silent=True`` (no per-task log line). Bulk: ``Worker.enqueue_many``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from streaq import Worker

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


def _build(url: str, concurrency: int) -> tuple[Worker[Any], dict[str, Any]]:
    worker: Worker[Any] = Worker(
        redis_url=url,
        queue_name=QUEUE,
        concurrency=concurrency,
        prefetch=concurrency,
        handle_signals=False,
    )

    @worker.task(name="noop", ttl=0, silent=True)
    async def noop() -> None:
        on_noop()

    @worker.task(name="sleep", ttl=0, silent=True)
    async def sleep() -> None:
        await on_sleep()

    @worker.task(name="latency", ttl=0, silent=True)
    async def latency(enqueued_at: float) -> None:
        on_latency(enqueued_at)

    return worker, {"noop": noop, "sleep": sleep, "latency": latency}


class Streaq:
    name: str = "streaq"
    packages: tuple[str, ...] = ("streaq", "coredis")
    has_bulk: bool = True
    settings: str = "Worker(concurrency, prefetch=concurrency), task ttl=0, silent=True"

    def __init__(self) -> None:
        self.url = ""
        self.client: Worker[Any] | None = None
        self.worker: Worker[Any] | None = None
        self.tasks: dict[str, Any] = {}
        self.task: asyncio.Task[None] | None = None
        self._ctx: Any = None

    async def open(self, url: str, params: Params) -> None:
        self.url, self.worker = url, None
        self.client, self.tasks = _build(url, params.concurrency)
        self._ctx = self.client.__asynccontextmanager__()
        await self._ctx.__aenter__()

    async def close(self) -> None:
        if self._ctx is not None:
            await self._ctx.__aexit__(None, None, None)

    async def enqueue(self, kind: TaskKind, enqueued_at: float = 0.0) -> None:
        args = (enqueued_at,) if kind == "latency" else ()
        await self.tasks[kind].enqueue(*args)

    async def enqueue_bulk(self, kind: TaskKind, n: int) -> None:
        assert self.client is not None
        await self.client.enqueue_many([self.tasks[kind].enqueue() for _ in range(n)])

    async def start_worker(self, concurrency: int) -> None:
        # A separate Worker object runs the jobs, so the enqueuing client keeps its own
        # connection/context (exiting run_async() tears down the Worker's Redis context).
        self.worker, _ = _build(self.url, concurrency)
        self.task = asyncio.create_task(self.worker.run_async())

    async def stop_worker(self) -> None:
        await cancel_task(self.task)


if __name__ == "__main__":
    main(Streaq())
