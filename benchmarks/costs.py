"""Helpers shared by the feature-cost benchmarks (cron_cost, chain_cost, priority_cost):
the drain clock the task bodies tick, and a flush of the private server between runs."""

from __future__ import annotations

import asyncio
import time

from redis.asyncio import Redis


class Drain:
    """Timestamps of the task bodies: first start, last completion, count."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.first = 0.0
        self.last = 0.0
        self.done = 0
        self.finished = asyncio.Event()

    def ran(self) -> None:
        now = time.perf_counter()
        if not self.first:
            self.first = now
        self.last = now
        self.done += 1
        if self.done >= self.expected:
            self.finished.set()


async def flush(url: str) -> None:
    """Empty the benchmark's private server (never a user's)."""
    redis = Redis.from_url(url)
    await redis.flushall()
    await redis.aclose()
