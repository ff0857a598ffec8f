"""Coalesces script calls from many concurrent jobs into pipelined round trips."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import anyio
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from taskrunner import scripts

logger = logging.getLogger("taskrunner.worker")


class Coalescer:
    """Callers ``submit`` a script call and wait for its reply; a flusher sends what has
    gathered meanwhile as one pipeline. While one pipeline is in flight the next batch
    gathers, so a busy worker acknowledges many jobs per round trip and an idle one
    sends each at once. Connection errors are retried with backoff: a commit is never
    dropped (the scripts are safe to repeat: a repeat finds the lease already spent)."""

    def __init__(self, redis: Redis, max_batch: int = 1000) -> None:
        self._redis = redis
        self._max_batch = max_batch
        self._pending: list[tuple[scripts.ScriptCall, asyncio.Future[Any]]] = []
        self._wakeup = asyncio.Event()

    async def submit(self, call: scripts.ScriptCall) -> Any:
        """Queue ``call`` for the next pipeline and wait for its reply. A script error
        (e.g. OOM) is raised to its caller only, not to the rest of the batch."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((call, future))
        self._wakeup.set()
        return await future

    async def run(self) -> None:
        """Flush forever; cancel it only once nothing more will be submitted."""
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                await self._flush(batch)

    async def _flush(self, batch: list[tuple[scripts.ScriptCall, asyncio.Future[Any]]]) -> None:
        delay = 0.05
        while True:
            try:
                calls = [call for call, _ in batch]
                results = await scripts.run_many(self._redis, calls, raise_on_error=False)
                break
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                logger.warning(
                    "redis unavailable (%s); retrying %d commits in %.2fs", exc, len(batch), delay
                )
                await anyio.sleep(delay)
                delay = min(delay * 2, 2.0)
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():  # its caller was cancelled; the commit happened anyway
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)
