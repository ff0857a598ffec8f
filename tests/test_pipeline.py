"""A middleware's per-worker pipeline of script calls (taskrunner.middleware.pipeline):
a call whose caller is cancelled still runs, and its ``undo`` is sent after it, even
when the caller's own compensating call went into the same pipeline ahead of it."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, cast

import anyio
import pytest
from conftest import wait_until
from redis.asyncio import Redis

from taskrunner import TaskRunner, scripts
from taskrunner.keys import LimitKeys
from taskrunner.middleware.base import WorkerPort
from taskrunner.middleware.limits import limit_digest
from taskrunner.middleware.pipeline import WorkerPipelines

DEADLINE = 10.0
LEASE_MS = 600_000
"""Slot leases that outlive the test: a slot left taken stays taken."""


class Port:
    """What WorkerPipelines uses of a worker: its Redis client and its services."""

    def __init__(self, redis: Redis, services: anyio.abc.TaskGroup) -> None:
        self.redis = redis
        self._services = services

    def spawn(self, fn: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        self._services.start_soon(fn)


async def test_a_cancelled_take_is_undone_after_it_even_behind_its_give_back(
    make_runner: Callable[..., TaskRunner], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A busy worker: one round trip in flight while the next calls gather. Gathered:
    # job X's give-back, job A's take, then A's own give-back (A was cancelled while it
    # waited). A pipeline runs the calls of one script together, at the place of the
    # first: both give-backs before A's take, which then leaves A's slot taken. The
    # undo, sent once the take's reply is in, gives it back.
    in_flight, gate = anyio.Event(), anyio.Event()
    run_many = scripts.run_many

    async def held_first(redis: Any, calls: Any, **kwargs: Any) -> list[Any]:
        replies = await run_many(redis, calls, **kwargs)
        if not in_flight.is_set():
            in_flight.set()
            await gate.wait()
        return replies

    monkeypatch.setattr(scripts, "run_many", held_first)
    tr = make_runner()
    async with tr, anyio.create_task_group() as services:
        redis, env = tr.client.redis, tr.client.env
        keys = LimitKeys(tr.namespace, limit_digest("pipelined", {}))
        port = cast(WorkerPort, Port(redis, services))
        calls = WorkerPipelines("test calls")
        calls.start(port)

        def acquire(token: str) -> scripts.ScriptCall:
            return scripts.acquire(env, keys, token, f"waiter-{token}", 10, LEASE_MS, 0, 0)

        def release(token: str) -> scripts.ScriptCall:
            return scripts.release(keys, token, 10, LEASE_MS)

        def give_back(reply: Any) -> scripts.ScriptCall | None:
            return release("A") if int(reply[0]) == 0 else None

        services.start_soon(calls.run, port, acquire("X"))
        await in_flight.wait()
        services.start_soon(calls.run, port, release("X"))
        async with anyio.create_task_group() as job_a:
            job_a.start_soon(calls.run, port, acquire("A"), give_back)
            await anyio.wait_all_tasks_blocked()
            job_a.cancel_scope.cancel()
        services.start_soon(calls.run, port, release("A"))
        await anyio.wait_all_tasks_blocked()
        gate.set()

        async def no_slot_taken() -> bool:
            return await redis.zcard(keys.running) == 0

        await wait_until(no_slot_taken, DEADLINE)
        calls.stop(port)
        services.cancel_scope.cancel()
