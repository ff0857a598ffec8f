"""taskiq adapter: taskiq-redis ``RedisStreamBroker`` (Redis streams + consumer group, acks),
no result backend (taskiq's default dummy backend: results are discarded), worker run in-process
with taskiq's ``Receiver(max_async_tasks=concurrency, max_prefetch=concurrency)``.
taskiq has no bulk-enqueue API (each ``.kiq()`` is one ``XADD``).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from taskiq.receiver import Receiver
from taskiq_redis import RedisStreamBroker

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


class Taskiq:
    name: str = "taskiq"
    packages: tuple[str, ...] = ("taskiq", "taskiq-redis", "redis", "hiredis")
    has_bulk: bool = False
    settings: str = (
        "RedisStreamBroker(xread_count=100), no result backend, "
        "Receiver(max_async_tasks=concurrency, max_prefetch=concurrency)"
    )

    def __init__(self) -> None:
        self.broker: RedisStreamBroker | None = None
        self.tasks: dict[str, Any] = {}
        self.finish = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.executor = ThreadPoolExecutor(max_workers=1)

    async def open(self, url: str, params: Params) -> None:
        broker = RedisStreamBroker(url, queue_name=QUEUE, consumer_id="0")

        @broker.task(task_name="noop")
        async def noop() -> None:
            on_noop()

        @broker.task(task_name="sleep")
        async def sleep() -> None:
            await on_sleep()

        @broker.task(task_name="latency")
        async def latency(enqueued_at: float) -> None:
            on_latency(enqueued_at)

        self.broker = broker
        self.tasks = {"noop": noop, "sleep": sleep, "latency": latency}
        await broker.startup()

    async def close(self) -> None:
        if self.broker is not None:
            await self.broker.shutdown()
        self.executor.shutdown(wait=False)

    async def enqueue(self, kind: TaskKind, enqueued_at: float = 0.0) -> None:
        args = (enqueued_at,) if kind == "latency" else ()
        await self.tasks[kind].kiq(*args)

    async def enqueue_bulk(self, kind: TaskKind, n: int) -> None:
        raise NotImplementedError

    async def start_worker(self, concurrency: int) -> None:
        assert self.broker is not None
        self.broker.is_worker_process = True
        receiver = Receiver(
            self.broker,
            executor=self.executor,
            max_async_tasks=concurrency,
            max_prefetch=concurrency,
            run_startup=False,
        )
        self.finish = asyncio.Event()
        self.task = asyncio.create_task(receiver.listen(self.finish))

    async def stop_worker(self) -> None:
        self.finish.set()
        await cancel_task(self.task)


if __name__ == "__main__":
    main(Taskiq())
