"""taskrunner adapter, in the configuration the issue's targets are stated for.

* One worker process: ``tr.worker(concurrency=..., burst=False, handle_signals=False)``,
  run in an anyio task group inside a background task and stopped with ``worker.stop()``
  (stop reading, let running jobs finish, hand the rest back). Burst mode is not used: W3
  needs an idle worker and W4 stops with a backlog still waiting, so every workload stops
  the worker the same way, once the harness has seen the jobs it measures complete.
* Results stored (the runner's default ``result_ttl``, one day), retries on
  (``max_retries=3``), heartbeats on (default interval and staleness), and the unique-lock
  middleware in the chain (the benchmark tasks declare no ``lock=``, so they pass through
  it). The settings string in the JSON lists the chain as it was measured.
* Bulk enqueue: ``noop.enqueue_many([noop.call() for _ in range(n)])``; delayed bulk (W4):
  ``noop.options(delay=...).enqueue_many(...)``. uvloop when installed (harness default).
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import anyio

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
from taskrunner.keys import GROUP

MAX_RETRIES = 3
STOP_LIMIT_S = 20.0
"""Bound on ``worker.stop()`` taking effect before the worker task is cancelled (the
benchmark's jobs end in milliseconds; the harness bounds the whole stop at 30 s)."""


def _chain(tr: TaskRunner) -> list[str]:
    return [type(mw).__name__ for mw in tr.middleware]


class Taskrunner:
    name: str = "taskrunner"
    packages: tuple[str, ...] = ("taskrunner", "redis", "hiredis", "pydantic", "anyio")
    has_bulk: bool = True
    stores_results: bool = True
    settings: str = ""

    def __init__(self) -> None:
        self.tr: Any = None
        self.tasks: dict[str, Any] = {}
        self.worker: Any = None
        self.task: asyncio.Task[None] | None = None

    async def open(self, url: str, params: Params) -> None:
        del params
        tr = TaskRunner(url, queue=QUEUE, max_retries=MAX_RETRIES)

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
        chain = _chain(tr)
        if "UniqueMiddleware" not in chain:
            # TODO(issue 6): the unique-lock middleware must be in the measured chain; the
            #   runner builds it itself once taskrunner/middleware/unique.py has landed.
            print("taskrunner: UniqueMiddleware is not in the chain", file=sys.stderr)
        self.settings = (
            f"tr.worker(concurrency=N, burst=False, handle_signals=False); "
            f"result_ttl={tr.result_ttl:g}s, max_retries={MAX_RETRIES}, "
            f"heartbeat={tr.lease.heartbeat_interval:g}s; chain: {' > '.join(chain)}"
        )
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

    async def enqueue_delayed_bulk(self, n: int, delay_s: float) -> None:
        bound = self.tasks["noop"].options(delay=delay_s)
        await bound.enqueue_many([bound.call() for _ in range(n)])

    async def settled(self) -> bool:
        """Every claimed entry committed (acked) and nothing left in the stream."""
        stream = self.tr.client.keys(QUEUE).stream
        pending = await self.tr.client.redis.xpending(stream, GROUP)
        return int(pending["pending"]) == 0 and int(await self.tr.client.redis.xlen(stream)) == 0

    async def start_worker(self, concurrency: int) -> None:
        self.worker = self.tr.worker(concurrency=concurrency, burst=False, handle_signals=False)
        self.task = asyncio.create_task(self._serve(self.worker))

    @staticmethod
    async def _serve(worker: Any) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)

    async def stop_worker(self) -> None:
        if self.worker is None or self.task is None:
            return
        self.worker.stop()
        done, _ = await asyncio.wait({self.task}, timeout=STOP_LIMIT_S)
        if not done:
            print("taskrunner: worker.stop() did not finish; cancelling", file=sys.stderr)
        elif not self.task.cancelled() and self.task.exception() is not None:
            print(f"taskrunner: worker failed: {self.task.exception()!r}", file=sys.stderr)
        await cancel_task(self.task)
        self.worker, self.task = None, None


if __name__ == "__main__":
    main(Taskrunner())
