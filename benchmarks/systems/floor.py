"""Speed floor: a minimal raw redis-py asyncio Redis-streams queue.

Enqueue is ``XADD`` (pipelined for bulk). The consumer issues ``XREADGROUP COUNT <free slots>
BLOCK 1000``, runs each entry as an asyncio task (at most ``concurrency`` in flight) and
acknowledges completed entries in batches with one ``XACK`` per flush (variant ``ack1``: one
``XACK`` per job). No retries, no results, no serialization beyond one string field: this is
the least work a Redis-streams queue with at-least-once delivery can do.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

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

STREAM = f"floor:{QUEUE}"
GROUP = "workers"
CONSUMER = "c1"
BULK_CHUNK = 1000


class Floor:
    name: str = "floor"
    packages: tuple[str, ...] = ("redis", "hiredis")
    has_bulk: bool = True
    settings: str = "XREADGROUP COUNT=free-slots BLOCK=1000ms, batched XACK"

    def __init__(self) -> None:
        self.redis: aioredis.Redis | None = None
        self.ack_each = False
        self._tasks: list[asyncio.Task[Any]] = []
        self._consumer: _Consumer | None = None

    @property
    def r(self) -> aioredis.Redis:
        assert self.redis is not None
        return self.redis

    async def open(self, url: str, params: Params) -> None:
        self.ack_each = params.variant == "ack1"
        if self.ack_each:
            self.name = "floor_ack1"
            self.settings = "XREADGROUP COUNT=free-slots BLOCK=1000ms, one XACK per job"
        self.redis = aioredis.Redis.from_url(url, max_connections=params.concurrency + 10)
        await self._ensure_group()

    async def _ensure_group(self) -> None:
        try:
            await self.r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def close(self) -> None:
        await self.r.aclose()

    async def enqueue(self, kind: TaskKind, enqueued_at: float = 0.0) -> None:
        await self.r.xadd(STREAM, {"t": kind, "a": repr(enqueued_at)})

    async def enqueue_bulk(self, kind: TaskKind, n: int) -> None:
        await self._ensure_group()  # the harness may have flushed the database
        for start in range(0, n, BULK_CHUNK):
            async with self.r.pipeline(transaction=False) as pipe:
                for _ in range(min(BULK_CHUNK, n - start)):
                    pipe.xadd(STREAM, {"t": kind, "a": "0"})
                await pipe.execute()

    async def settled(self) -> bool:
        """Every delivered entry acknowledged (the floor keeps acked entries in the stream)."""
        pending = await self.r.xpending(STREAM, GROUP)
        return int(pending["pending"]) == 0

    async def start_worker(self, concurrency: int) -> None:
        await self._ensure_group()
        worker = _Consumer(self.r, concurrency, self.ack_each)
        self._consumer = worker
        self._tasks = [asyncio.create_task(worker.read_loop())]
        if not self.ack_each:
            self._tasks.append(asyncio.create_task(worker.ack_loop()))

    async def stop_worker(self) -> None:
        # Stop the loops by flag first (each ends after its current command), then cancel:
        # cancelling a busy loop inside a redis-py command was seen to hang for seconds.
        if self._consumer is not None:
            self._consumer.stopping = True
            self._consumer.slot_free.set()
            self._consumer.ack_ready.set()
            await asyncio.wait(self._tasks, timeout=5)
            self._consumer = None
        for task in self._tasks:
            await cancel_task(task)
        self._tasks = []


class _Consumer:
    def __init__(self, r: aioredis.Redis, concurrency: int, ack_each: bool) -> None:
        self.r = r
        self.concurrency = concurrency
        self.ack_each = ack_each
        self.in_flight: set[asyncio.Task[None]] = set()
        self.slot_free = asyncio.Event()
        self.pending_acks: list[bytes] = []
        self.ack_ready = asyncio.Event()
        self.stopping = False

    async def read_loop(self) -> None:
        while not self.stopping:
            free = self.concurrency - len(self.in_flight)
            if free <= 0:
                self.slot_free.clear()
                await self.slot_free.wait()
                continue
            reply: Any = await self.r.xreadgroup(
                GROUP, CONSUMER, {STREAM: ">"}, count=free, block=1000
            )
            for _stream, entries in reply or ():
                for entry_id, fields in entries:
                    task = asyncio.create_task(self._run(entry_id, fields))
                    self.in_flight.add(task)
                    task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self.in_flight.discard(task)
        self.slot_free.set()

    async def _run(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        kind = fields[b"t"]
        if kind == b"noop":
            on_noop()
        elif kind == b"sleep":
            await on_sleep()
        else:
            on_latency(float(fields[b"a"]))
        if self.ack_each:
            await self.r.xack(STREAM, GROUP, entry_id)
        else:
            self.pending_acks.append(entry_id)
            self.ack_ready.set()

    async def ack_loop(self) -> None:
        while not self.stopping:
            await self.ack_ready.wait()
            self.ack_ready.clear()
            ids, self.pending_acks = self.pending_acks, []
            if ids:
                await self.r.xack(STREAM, GROUP, *ids)


if __name__ == "__main__":
    main(Floor())
