"""dramatiq adapter: ``RedisBroker`` + one in-process ``dramatiq.Worker`` (= one process) with
``worker_threads=concurrency`` and ``worker_timeout=10`` ms (idle poll back-off cap; default
1000 ms), default middleware, no ``Results`` middleware (results off). dramatiq's worker is
thread-based, so the W2 task is the thread equivalent ``time.sleep(0.01)`` (releases the GIL).
dramatiq has no bulk-enqueue API (``group(...).run()`` sends messages one by one).
"""

from __future__ import annotations

import asyncio
from typing import Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from benchmarks.systems._common import (
    QUEUE,
    Params,
    TaskKind,
    main,
    on_latency,
    on_noop,
    on_sleep_sync,
)

WORKER_TIMEOUT_MS = 10


class Dramatiq:
    name: str = "dramatiq"
    packages: tuple[str, ...] = ("dramatiq", "redis", "hiredis")
    has_bulk: bool = False
    settings: str = (
        f"processes=1, threads=concurrency, worker_timeout={WORKER_TIMEOUT_MS}ms, no Results"
    )

    def __init__(self) -> None:
        self.broker: RedisBroker | None = None
        self.actors: dict[str, Any] = {}
        self.worker: dramatiq.Worker | None = None

    async def open(self, url: str, params: Params) -> None:
        broker = RedisBroker(url=url)
        dramatiq.set_broker(broker)
        self.actors = {
            "noop": dramatiq.actor(actor_name="noop", queue_name=QUEUE, broker=broker)(on_noop),
            "sleep": dramatiq.actor(actor_name="sleep", queue_name=QUEUE, broker=broker)(
                on_sleep_sync
            ),
            "latency": dramatiq.actor(actor_name="latency", queue_name=QUEUE, broker=broker)(
                on_latency
            ),
        }
        self.broker = broker

    async def close(self) -> None:
        if self.broker is not None:
            self.broker.close()

    async def enqueue(self, kind: TaskKind, enqueued_at: float = 0.0) -> None:
        args = (enqueued_at,) if kind == "latency" else ()
        self.actors[kind].send(*args)  # dramatiq's client is synchronous

    async def enqueue_bulk(self, kind: TaskKind, n: int) -> None:
        raise NotImplementedError

    async def start_worker(self, concurrency: int) -> None:
        assert self.broker is not None
        self.worker = dramatiq.Worker(
            self.broker, worker_threads=concurrency, worker_timeout=WORKER_TIMEOUT_MS
        )
        self.worker.start()

    async def stop_worker(self) -> None:
        if self.worker is not None:
            await asyncio.to_thread(self.worker.stop, 10_000)


if __name__ == "__main__":
    main(Dramatiq())
