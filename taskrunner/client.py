"""The client: writes jobs, reads their state, waits for them, aborts them."""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import anyio
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from taskrunner import scripts
from taskrunner.exceptions import JobNotFound, LockConflictError
from taskrunner.job import Job, JobStatus
from taskrunner.keys import QueueKeys
from taskrunner.middleware.base import (
    EnqueueContext,
    EnqueueNext,
    Middleware,
    build_enqueue_chain,
)

logger = logging.getLogger("taskrunner")


def now_ms() -> int:
    return int(time.time() * 1000)


class Client:
    """Job reads and writes against one Redis, within one key namespace."""

    def __init__(self, redis: Redis, namespace: str, result_ttl: float) -> None:
        self.redis = redis
        self.namespace = namespace
        self.result_ttl_ms = int(result_ttl * 1000)
        self._keys: dict[str, QueueKeys] = {}

    def keys(self, queue: str) -> QueueKeys:
        found = self._keys.get(queue)
        if found is None:
            found = self._keys[queue] = QueueKeys(self.namespace, queue)
        return found

    # -- writing -----------------------------------------------------------------

    def write_call(self, ctx: EnqueueContext) -> scripts.ScriptCall:
        # Round the due time up: a job must never become runnable before it is due.
        due_ms = math.ceil(ctx.due * 1000) if ctx.due is not None else 0
        return scripts.enqueue(
            self.keys(ctx.queue),
            ctx.job_id,
            ctx.task.name,
            ctx.payload,
            int(ctx.now * 1000),
            due_ms,
            ctx.locks,
            json.dumps(ctx.meta, separators=(",", ":")) if ctx.meta else "",
        )

    def job_from_reply(self, ctx: EnqueueContext, reply: Sequence[Any]) -> Job[Any]:
        """Interpret the enqueue script's reply (see enqueue.lua)."""
        code = int(reply[0])
        if code == 2:
            raise LockConflictError(str(reply[2]), str(reply[1]))
        return Job(self, ctx.job_id, ctx.queue, ctx.task.codec.result, deduplicated=code == 0)

    async def write(self, ctx: EnqueueContext) -> Job[Any]:
        """The innermost enqueue layer: one atomic write."""
        return self.job_from_reply(ctx, await scripts.run(self.redis, self.write_call(ctx)))

    async def write_many(
        self,
        contexts: Sequence[EnqueueContext],
        layers: Callable[[EnqueueContext], Sequence[Middleware]],
    ) -> list[Job[Any]]:
        """Write many jobs in one pipeline, each through the enqueue middleware
        ``layers(ctx)`` gives for it (none: the write is built directly)."""
        if not any(layers(ctx) for ctx in contexts):
            if len(contexts) == 1:
                return [await self.write(contexts[0])]
            replies = await scripts.run_many(self.redis, [self.write_call(c) for c in contexts])
            return [self.job_from_reply(c, r) for c, r in zip(contexts, replies, strict=True)]
        return await _EnqueueBatch(self, len(contexts)).run(contexts, layers)

    # -- reading -------------------------------------------------------------------

    async def state(self, queue: str, job_id: str) -> dict[str, str]:
        state = cast(dict[str, str], await self.redis.hgetall(self.keys(queue).job(job_id)))
        if not state:
            raise JobNotFound(job_id)
        return state

    async def field(self, queue: str, job_id: str, name: str) -> str:
        value = cast(str | None, await self.redis.hget(self.keys(queue).job(job_id), name))
        if value is None:
            raise JobNotFound(job_id)
        return value

    async def wait(self, queue: str, job_id: str, timeout: float | None) -> dict[str, str]:
        """Wait until the job is final and return its state (subscribe, then check).
        A lost connection (a Redis restart) is retried until the timeout."""
        with anyio.fail_after(timeout):
            while True:
                try:
                    return await self._wait_once(queue, job_id)
                except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                    logger.warning("waiting for job %s: redis unavailable (%s)", job_id, exc)
                    await anyio.sleep(0.5)

    async def _wait_once(self, queue: str, job_id: str) -> dict[str, str]:
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self.keys(queue).done(job_id))
            while True:
                state = await self.state(queue, job_id)
                if JobStatus(state["status"]).is_final:
                    return state
                await pubsub.get_message(timeout=None)
        finally:
            with anyio.CancelScope(shield=True):  # close it even on timeout or cancel
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def abort(self, queue: str, job_id: str) -> JobStatus:
        keys = self.keys(queue)
        locks = await self.field(queue, job_id, "locks")
        call = scripts.abort(keys, job_id, now_ms(), self.result_ttl_ms, locks.split())
        reply = str(await scripts.run(self.redis, call))
        if reply == "missing":
            raise JobNotFound(job_id)
        return JobStatus.RUNNING if reply == "aborting" else JobStatus(reply)


_wrote: contextvars.ContextVar[list[bool]] = contextvars.ContextVar("taskrunner_wrote")
"""Whether the enqueue chain running in this task has reached the write."""


class _EnqueueBatch:
    """Runs each context through the enqueue chain concurrently; the chains' writes are
    collected and sent in one pipeline once every chain has either written or left."""

    def __init__(self, client: Client, size: int) -> None:
        self._client = client
        self._undecided = size
        self._calls: list[scripts.ScriptCall] = []
        self._replies: list[Any] = []
        self._arrived = asyncio.Event()
        self._flushed = asyncio.Event()
        self._chains: dict[tuple[int, ...], EnqueueNext] = {}

    def _chain(self, layers: Sequence[Middleware]) -> EnqueueNext:
        key = tuple(id(mw) for mw in layers)
        found = self._chains.get(key)
        if found is None:
            found = self._chains[key] = build_enqueue_chain(layers, self.write)
        return found

    async def run(
        self,
        contexts: Sequence[EnqueueContext],
        layers: Callable[[EnqueueContext], Sequence[Middleware]],
    ) -> list[Job[Any]]:
        jobs: list[Job[Any] | None] = [None] * len(contexts)
        errors: list[Exception] = []

        async def one(index: int, ctx: EnqueueContext) -> None:
            wrote = _wrote.set([False])  # this chain's own flag (each task has a context)
            try:
                jobs[index] = await self._chain(layers(ctx))(ctx)
            except Exception as exc:  # noqa: BLE001 - re-raised below, not in an ExceptionGroup
                errors.append(exc)
            finally:
                if not _wrote.get()[0]:
                    self._decided()
                _wrote.reset(wrote)

        async with anyio.create_task_group() as tg:
            for index, ctx in enumerate(contexts):
                tg.start_soon(one, index, ctx)
            await self._arrived.wait()
            self._replies = await scripts.run_many(self._client.redis, self._calls)
            self._flushed.set()
        if errors:
            raise errors[0]
        return [job for job in jobs if job is not None]

    async def write(self, ctx: EnqueueContext) -> Job[Any]:
        flag = _wrote.get()
        if flag[0]:
            raise RuntimeError("an enqueue middleware called call_next twice for one job")
        flag[0] = True
        index = len(self._calls)
        self._calls.append(self._client.write_call(ctx))
        self._decided()
        await self._flushed.wait()
        return self._client.job_from_reply(ctx, self._replies[index])

    def _decided(self) -> None:
        self._undecided -= 1
        if self._undecided == 0:
            self._arrived.set()
