"""Coalesces script calls from many concurrent jobs into pipelined round trips."""

from __future__ import annotations

import logging
from typing import Any

import anyio
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from taskrunner import scripts

logger = logging.getLogger("taskrunner.worker")


class _Slot:
    __slots__ = ("call", "done", "result")

    def __init__(self, call: scripts.ScriptCall) -> None:
        self.call = call
        self.done = anyio.Event()
        self.result: Any = None


class Coalescer:
    """Callers ``submit`` a script call and wait for its reply; a flusher sends what has
    gathered meanwhile as one pipeline. While one pipeline is in flight the next batch
    gathers, so a busy worker acknowledges many jobs per round trip and an idle one
    sends each at once. Connection errors are retried with backoff: a commit is never
    dropped (the scripts are safe to repeat: a repeat finds the lease already spent)."""

    def __init__(self, redis: Redis, max_batch: int = 1000) -> None:
        self._redis = redis
        self._max_batch = max_batch
        self._pending: list[_Slot] = []
        self._wakeup = anyio.Event()

    async def submit(self, call: scripts.ScriptCall) -> Any:
        slot = _Slot(call)
        self._pending.append(slot)
        self._wakeup.set()
        await slot.done.wait()
        if isinstance(slot.result, Exception):
            raise slot.result  # a script error (e.g. OOM): this caller's, not the batch's
        return slot.result

    async def run(self) -> None:
        """Flush forever; cancel it only once nothing more will be submitted."""
        while True:
            await self._wakeup.wait()
            self._wakeup = anyio.Event()
            while self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                await self._flush(batch)

    async def _flush(self, batch: list[_Slot]) -> None:
        delay = 0.05
        while True:
            try:
                calls = [slot.call for slot in batch]
                results = await scripts.run_many(self._redis, calls, raise_on_error=False)
                break
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                logger.warning(
                    "redis unavailable (%s); retrying %d commits in %.2fs", exc, len(batch), delay
                )
                await anyio.sleep(delay)
                delay = min(delay * 2, 2.0)
        for slot, result in zip(batch, results, strict=True):
            slot.result = result
            slot.done.set()
