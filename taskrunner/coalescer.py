"""Coalesces script calls from many concurrent jobs into pipelined round trips."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import anyio
from redis.asyncio import Redis

from taskrunner import scripts
from taskrunner.connection import REDIS_ERRORS

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
        self._pending: list[tuple[scripts.ScriptCall, Callable[[Any], None]]] = []
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    def submit_nowait(self, call: scripts.ScriptCall, done: Callable[[Any], None]) -> None:
        """Queue ``call`` for the next pipeline; ``done(reply)`` gets its reply, or the
        script's error as an exception object (e.g. OOM): that caller's only."""
        self._pending.append((call, done))
        self._idle.clear()
        self._wakeup.set()

    async def submit(self, call: scripts.ScriptCall) -> Any:
        """Queue ``call`` and wait for its reply (a script error is raised)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def done(reply: Any) -> None:
            if future.done():  # its caller was cancelled; the call happened anyway
                return
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

        self.submit_nowait(call, done)
        return await future

    async def drained(self) -> None:
        """Wait until everything submitted so far has been sent and answered."""
        await self._idle.wait()

    async def run(self) -> None:
        """Flush forever; cancel it only once nothing more will be submitted."""
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                await self._flush(batch)
            self._idle.set()

    async def _flush(self, batch: list[tuple[scripts.ScriptCall, Callable[[Any], None]]]) -> None:
        delay = 0.05
        while True:
            try:
                calls = [call for call, _ in batch]
                results = await scripts.run_many(self._redis, calls, raise_on_error=False)
                break
            except REDIS_ERRORS as exc:
                logger.warning(
                    "redis unavailable (%s); retrying %d commits in %.2fs", exc, len(batch), delay
                )
                await anyio.sleep(delay)
                delay = min(delay * 2, 2.0)
        for (_, done), result in zip(batch, results, strict=True):
            done(result)
