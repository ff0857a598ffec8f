"""taskrunner adapter (placeholder written against the intended public API; the lead fills in
any gaps). Bulk enqueue: ``enqueue_many``. Worker: ``tr.worker(concurrency=..., burst=...)``.
"""

from __future__ import annotations

import asyncio
from typing import Any

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
from taskrunner import TaskRunner


class Taskrunner:
    name: str = "taskrunner"
    packages: tuple[str, ...] = ("taskrunner", "redis", "hiredis")
    has_bulk: bool = True
    settings: str = "tr.worker(concurrency=concurrency)"

    def __init__(self) -> None:
        self.tr: Any = None
        self.tasks: dict[str, Any] = {}
        self.task: asyncio.Task[None] | None = None

    async def open(self, url: str, params: Params) -> None:
        tr = TaskRunner(url, queue=QUEUE)

        @tr.task
        async def noop() -> None:
            on_noop()

        @tr.task
        async def sleep() -> None:
            await on_sleep()

        @tr.task
        async def latency(enqueued_at: float) -> None:
            on_latency(enqueued_at)

        self.tr = tr
        self.tasks = {"noop": noop, "sleep": sleep, "latency": latency}
        await tr.__aenter__()

    async def close(self) -> None:
        if self.tr is not None:
            await self.tr.__aexit__(None, None, None)

    async def enqueue(self, kind: TaskKind, enqueued_at: float = 0.0) -> None:
        args = (enqueued_at,) if kind == "latency" else ()
        await self.tasks[kind].enqueue(*args)

    async def enqueue_bulk(self, kind: TaskKind, n: int) -> None:
        task = self.tasks[kind]
        await task.enqueue_many([task.call() for _ in range(n)])

    async def start_worker(self, concurrency: int) -> None:
        # Not burst: W3 needs an idle worker; the harness stops it once all jobs are done.
        worker = self.tr.worker(concurrency=concurrency, burst=False)
        self.task = asyncio.create_task(worker.run())

    async def stop_worker(self) -> None:
        await cancel_task(self.task)


if __name__ == "__main__":
    main(Taskrunner())
