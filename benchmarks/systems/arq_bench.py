"""arq adapter: ``max_jobs=concurrency``, ``keep_result=0`` (results off), ``poll_delay=0.01``.

arq pulls job ids from a sorted set by polling; after each poll batch it sleeps ``poll_delay``
(default 0.5 s), which caps both throughput and latency, so we use a 10 ms poll (the same idle
wake-up bound as dramatiq's ``worker_timeout``). arq has no bulk-enqueue API.
"""

from __future__ import annotations

import asyncio
from typing import Any

from arq import create_pool
from arq.connections import ArqRedis, RedisSettings
from arq.worker import Worker, func

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

POLL_DELAY_S = 0.01


async def noop(ctx: dict[str, Any]) -> None:
    on_noop()


async def sleep(ctx: dict[str, Any]) -> None:
    await on_sleep()


async def latency(ctx: dict[str, Any], enqueued_at: float) -> None:
    on_latency(enqueued_at)


FUNCTIONS = [func(f, keep_result=0) for f in (noop, sleep, latency)]  # type: ignore[arg-type]


class Arq:
    name: str = "arq"
    packages: tuple[str, ...] = ("arq", "redis", "hiredis")
    has_bulk: bool = False
    settings: str = f"max_jobs=concurrency, keep_result=0, poll_delay={POLL_DELAY_S}s"

    def __init__(self) -> None:
        self.settings_obj = RedisSettings()
        self.pool: ArqRedis | None = None
        self.worker: Worker | None = None
        self.task: asyncio.Task[None] | None = None

    async def open(self, url: str, params: Params) -> None:
        self.settings_obj = RedisSettings.from_dsn(url)
        self.pool = await create_pool(self.settings_obj, default_queue_name=QUEUE)

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.aclose()

    async def enqueue(self, kind: TaskKind, enqueued_at: float = 0.0) -> None:
        assert self.pool is not None
        args = (enqueued_at,) if kind == "latency" else ()
        await self.pool.enqueue_job(kind, *args, _queue_name=QUEUE)

    async def enqueue_bulk(self, kind: TaskKind, n: int) -> None:
        raise NotImplementedError

    async def start_worker(self, concurrency: int) -> None:
        self.worker = Worker(
            functions=FUNCTIONS,
            redis_settings=self.settings_obj,
            queue_name=QUEUE,
            max_jobs=concurrency,
            keep_result=0,
            poll_delay=POLL_DELAY_S,
            handle_signals=False,
        )
        self.task = asyncio.create_task(self.worker.async_run())

    async def stop_worker(self) -> None:
        # Let in-flight job bookkeeping finish, then stop polling. (Worker.close() would cancel
        # the job tasks and re-raise their CancelledError.)
        worker = self.worker
        running = list(worker.tasks.values()) if worker is not None else []
        if running:
            await asyncio.wait(running, timeout=10)
        await cancel_task(self.task)
        if worker is not None and worker._pool is not None:
            await worker._pool.aclose()


if __name__ == "__main__":
    main(Arq())
