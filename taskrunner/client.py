"""The client: writes jobs, reads their state, waits for them, aborts them.

It knows each queue's partitions (``resolve``: read from, and recorded in, the queue's
meta hash once per process) and where a job lives: a job id's home partition, or, for
a job placed by its lock digest under an id the caller chose, any partition (a
bounded lookup over the queue's N partitions, never a scan).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import math
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

import anyio

from taskrunner import scripts
from taskrunner.clock import Clock
from taskrunner.connection import REDIS_ERRORS, Connection, reachable, report
from taskrunner.exceptions import JobNotFound, LockConflictError, TaskrunnerError
from taskrunner.job import Job, JobStatus, deadline, parse_status
from taskrunner.keys import DEFAULT_LEVEL, MAX_PARTITIONS, Queue, QueueKeys, home_partition
from taskrunner.middleware.base import (
    EnqueueContext,
    EnqueueNext,
    Middleware,
    build_enqueue_chain,
)
from taskrunner.subscriber import Subscriber, handler

if TYPE_CHECKING:
    from taskrunner.codec import ResultCodec

logger = logging.getLogger("taskrunner")

_RETRY_WAIT = 0.5
RECHECK_FIRST = 1.0
RECHECK_MAX = 10.0
"""A waiter for a job reads it again after ``RECHECK_FIRST`` seconds without a message,
then after twice as long each time, up to ``RECHECK_MAX``. Pub/sub can lose a message
on a connection that stays up: on a cluster, a master restarted after a failover
rejoins its shard as a replica, and until the shard's new master knows it, it is sent
none of the shard's messages. A subscription made or renewed there in that window
misses what is published meanwhile, and only a read sees the job final."""
T = TypeVar("T")


def now_ms() -> int:
    """This process's clock in ms: only for durations and for logs. Due times and TTLs
    are decided by the server's clock inside the scripts."""
    return int(time.time() * 1000)


class Client:
    """Job reads and writes against one Redis deployment, within one key namespace."""

    def __init__(
        self,
        connection: Connection,
        namespace: str,
        result_ttl: float,
        *,
        levels: Sequence[str] = ("high", DEFAULT_LEVEL, "low"),
        default_level: str = DEFAULT_LEVEL,
        partitions: int | None = None,
        max_payload: int = 1 << 20,
        replicas: scripts.Replicas | None = None,
    ) -> None:
        self.connection = connection
        self.replicas = replicas
        """WAIT for ``(replicas, timeout_ms)`` after every enqueue (``wait_replicas``)."""
        self.redis = connection.redis
        self.namespace = namespace
        self.result_ttl_ms = int(result_ttl * 1000)
        self.levels = tuple(levels)
        self.default_level = default_level
        self.partitions = partitions
        self.max_payload = max_payload
        self.clock = Clock()
        self.codecs: Callable[[str], ResultCodec | None] = _no_codec
        """A task's result codec by its name (the runner's tasks): how the handle of a
        deduplicated enqueue reads the existing job, which may be another task's."""
        self._queues: dict[str, Queue] = {}
        self._closed = False
        self._subscriber: Subscriber | None = None
        self._subscriber_task: asyncio.Task[None] | None = None
        self._env = scripts.Env()

    @property
    def env(self) -> scripts.Env:
        """What every script call shares: how to publish, and the clock (made again
        only when either changed)."""
        publish, clock = self.connection.publish_command, self.clock.arg
        env = self._env
        if env.publish != publish or env.clock != clock:
            env = self._env = scripts.Env(publish=publish, clock=clock)
        return env

    # -- queues and partitions -----------------------------------------------------

    def default_partitions(self) -> int:
        """Partitions of a queue nobody configured: 1, or one per primary on a cluster."""
        if not self.connection.cluster:
            return 1
        return min(MAX_PARTITIONS, max(1, len(cast(Any, self.redis).get_primaries())))

    async def resolve(self, name: str, *, refresh: bool = False, record: bool = False) -> Queue:
        """The queue ``name`` with its partitions, as recorded in Redis (or configured,
        or the default). Workers ``record`` what they use; so does a runner configured
        with an explicit ``partitions``."""
        found = self._queues.get(name)
        if found is not None and not refresh:
            return found
        probe = QueueKeys(self.namespace, name, default_level=self.default_level)
        call = scripts.partitions(
            probe.meta, self.partitions or 0, self.default_partitions(), record=record
        )
        current, most = (int(v) for v in await scripts.run(self.redis, call))
        if self.partitions and current != self.partitions:
            logger.warning(
                "queue %s: this runner sets partitions=%d but %d is recorded",
                name,
                self.partitions,
                current,
            )
        found = Queue(
            self.namespace,
            name,
            self.levels,
            self.default_level,
            partitions=current,
            read=most,
        )
        self._queues[name] = found
        return found

    def cached(self, name: str) -> Queue:
        """A queue already resolved (see ``resolve``)."""
        found = self._queues.get(name)
        if found is None:
            raise TaskrunnerError(f"queue {name!r} is not resolved yet")
        return found

    def keys(self, queue: str, partition: int = 0) -> QueueKeys:
        """One partition's keys (partition 0 when the queue has not been resolved)."""
        found = self._queues.get(queue)
        if found is not None and partition < len(found.parts):
            return found.parts[partition]
        return QueueKeys(self.namespace, queue, partition, default_level=self.default_level)

    async def locate(self, queue: str, job_id: str) -> QueueKeys:
        """The partition holding job ``job_id`` (JobNotFound if none does)."""
        self._check_open()
        q = await self.resolve(queue)
        home = q.for_id(job_id)
        if q.read == 1:
            return home
        if await self.redis.exists(home.job(job_id)):
            return home
        pipe = self.redis.pipeline(transaction=False)
        for part in q.parts:
            pipe.exists(part.job(job_id))
        for part, found in zip(q.parts, await pipe.execute(), strict=True):
            if found:
                return part
        raise JobNotFound(job_id, queue)

    @staticmethod
    def id_for(partition: int, partitions: int) -> str:
        """A new random job id whose home is ``partition`` (N tries on average)."""
        while True:
            job_id = new_job_id()
            if home_partition(job_id, partitions) == partition:
                return job_id

    # -- writing ---------------------------------------------------------------------

    def write_call(self, ctx: EnqueueContext) -> scripts.ScriptCall:
        q = self.cached(ctx.queue)
        partition = (
            ctx.partition if ctx.partition is not None else home_partition(ctx.job_id, q.partitions)
        )
        # Round the delay up: a job must never become runnable before it is due.
        delay_ms = max(0, math.ceil((ctx.due - ctx.now) * 1000)) if ctx.due is not None else 0
        return scripts.enqueue(
            self.env,
            q.part(partition),
            ctx.job_id,
            ctx.task.name,
            ctx.payload,
            ctx.priority or self.default_level,
            delay_ms,
            ctx.locks,
            json.dumps(ctx.meta, separators=(",", ":")) if ctx.meta else "",
            ctx.follow,
        )

    def job_from_reply(self, ctx: EnqueueContext, reply: Sequence[Any]) -> Job[Any]:
        """Interpret the enqueue script's reply (see enqueue.lua)."""
        code = int(reply[0])
        if code == 2:
            raise LockConflictError(str(reply[2]), str(reply[1]))
        if code == 0:  # an existing job, perhaps of another task (one job_id given to two)
            return Job(self, ctx.job_id, ctx.queue, deduplicated=True, codecs=self.codecs)
        return Job(self, ctx.job_id, ctx.queue, ctx.task.codec.result)

    async def write(self, ctx: EnqueueContext) -> Job[Any]:
        """The innermost enqueue layer: one atomic write."""
        if self.replicas is not None:
            [reply] = await scripts.run_many(
                self.redis, [self.write_call(ctx)], replicas=self.replicas
            )
            return self.job_from_reply(ctx, reply)
        return self.job_from_reply(ctx, await scripts.run(self.redis, self.write_call(ctx)))

    async def write_batches(
        self,
        contexts: Sequence[EnqueueContext],
        layers: Callable[[EnqueueContext], Sequence[Middleware]],
        size: int,
    ) -> list[Job[Any]]:
        """Write many jobs in pipelines of ``size`` calls, in order, each through the
        enqueue middleware ``layers(ctx)`` gives for it. Without middleware, the batches
        overlap the client's work with the server's (``_overlapped``)."""
        await self._resolve_queues(contexts)
        batches = [contexts[start : start + size] for start in range(0, len(contexts), size)]
        if len(batches) > 1 and not any(layers(ctx) for ctx in contexts):
            return await self._overlapped(batches)
        jobs: list[Job[Any]] = []
        for batch in batches:
            jobs.extend(await self.write_many(batch, layers))
        return jobs

    async def _overlapped(self, batches: list[Sequence[EnqueueContext]]) -> list[Job[Any]]:
        """Send each batch once the one before it is answered (one connection at a time,
        so the calls are written in their order), and while the server runs it, build
        the next batch's script calls and pipeline, and the handles of the one before.
        A batch that fails raises before the next one is sent, as when they go one by
        one. Their queues are resolved already (``write_batches``)."""
        jobs: list[Job[Any]] = []
        answered: list[tuple[EnqueueContext, Any]] = []
        running: tuple[Sequence[EnqueueContext], asyncio.Task[list[Any]]] | None = None
        try:
            for batch in batches:
                calls, handles = await self._built(batch, answered)
                jobs.extend(handles)
                await asyncio.sleep(0)
                prepared = scripts.prepare(calls)  # grouped and laid out: only sent below
                answered = await _answers(running)
                sent = scripts.run_many(
                    self.redis, calls, replicas=self.replicas, prepared=prepared
                )
                running = batch, asyncio.ensure_future(sent)
            jobs.extend(self.job_from_reply(c, r) for c, r in answered)
            jobs.extend(self.job_from_reply(c, r) for c, r in await _answers(running))
        finally:
            if running is not None:
                _drop(running[1])
        return jobs

    async def _built(
        self, batch: Sequence[EnqueueContext], answered: list[tuple[EnqueueContext, Any]]
    ) -> tuple[list[scripts.ScriptCall], list[Job[Any]]]:
        """The batch's script calls, and the handles of the ``answered`` one, made in
        steps that let the batch in flight go out meanwhile (its send takes a few turns
        of the event loop)."""
        calls: list[scripts.ScriptCall] = []
        handles: list[Job[Any]] = []
        for start in range(0, len(batch), _BUILD_STEP):
            await asyncio.sleep(0)
            if start == 0:
                handles = [self.job_from_reply(c, r) for c, r in answered]
            calls.extend(self.write_call(ctx) for ctx in batch[start : start + _BUILD_STEP])
        return calls, handles

    async def _resolve_queues(self, contexts: Sequence[EnqueueContext]) -> None:
        """Resolve every queue these jobs go to that is not resolved yet."""
        for name in {ctx.queue for ctx in contexts}:
            if name not in self._queues:
                await self.resolve(name)

    async def write_many(
        self,
        contexts: Sequence[EnqueueContext],
        layers: Callable[[EnqueueContext], Sequence[Middleware]],
    ) -> list[Job[Any]]:
        """Write many jobs in one pipeline, each through the enqueue middleware
        ``layers(ctx)`` gives for it (none: the write is built directly)."""
        await self._resolve_queues(contexts)
        if not any(layers(ctx) for ctx in contexts):
            if len(contexts) == 1:
                return [await self.write(contexts[0])]
            replies = await scripts.run_many(
                self.redis, [self.write_call(c) for c in contexts], replicas=self.replicas
            )
            return [self.job_from_reply(c, r) for c, r in zip(contexts, replies, strict=True)]
        return await _EnqueueBatch(self, len(contexts)).run(contexts, layers)

    # -- reading -------------------------------------------------------------------

    async def state(self, queue: str, job_id: str) -> dict[str, str]:
        keys = await self.locate(queue, job_id)
        state = cast(dict[str, str], await self.redis.hgetall(keys.job(job_id)))
        if not state:
            raise JobNotFound(job_id, queue)
        return state

    async def field(self, queue: str, job_id: str, name: str) -> str:
        keys = await self.locate(queue, job_id)
        value = cast(str | None, await self.redis.hget(keys.job(job_id), name))
        if value is None:
            raise JobNotFound(job_id, queue)
        return value

    def subscriber(self) -> Subscriber:
        """The process's pub/sub (started on first use, stopped by ``aclose``)."""
        self._check_open()
        if self._subscriber is None:
            self._subscriber = Subscriber(self.connection)
            self._subscriber_task = asyncio.get_running_loop().create_task(
                self._subscriber.run(), name="taskrunner-pubsub"
            )
        return self._subscriber

    async def wait(
        self, queue: str, job_id: str, timeout: float | None, *, relayed: bool = False
    ) -> dict[str, str]:
        """Wait until the job is final and return its state. Subscribes to its done
        channel, then marks it watched and reads it (watch.lua), so either the read or
        the message sees the final status. Redis outages and dead connections are
        ridden out (re-reading after each resubscription) until ``timeout``, and a
        message lost on a live connection by a re-read (``RECHECK_MAX``).
        ``relayed``: a chain step that succeeded is waited for until its follow-up
        is written too (its ``relayed`` field)."""
        if timeout is not None and timeout <= 0:  # no time to wait: look once
            state = await self._watch(await self.locate(queue, job_id), job_id)
            if parse_status(state["status"]).is_final and (not relayed or _relayed(state)):
                return state
        with deadline(timeout, f"job {job_id} is not final"):
            keys = await self._retrying(lambda: self.locate(queue, job_id))
            return await self._wait(keys, job_id, relayed=relayed)

    async def _wait(self, keys: QueueKeys, job_id: str, *, relayed: bool) -> dict[str, str]:
        wake = asyncio.Event()
        listener = handler(lambda data: wake.set(), wake.set)
        channel = keys.done(job_id)
        subscriber = self.subscriber()
        recheck = RECHECK_FIRST
        try:  # a wait cancelled while it subscribes leaves nothing subscribed
            await subscriber.subscribe(channel, listener)
            while True:
                wake.clear()
                state = await self._retrying(lambda: self._watch(keys, job_id))
                if parse_status(state["status"]).is_final and (not relayed or _relayed(state)):
                    return state
                recheck = await _woken(wake, recheck)
        finally:
            subscriber.unsubscribe(channel, listener)

    async def _watch(self, keys: QueueKeys, job_id: str) -> dict[str, str]:
        reply = await scripts.run(self.redis, scripts.watch(keys, job_id))
        if not reply:
            raise JobNotFound(job_id, keys.queue)
        names = ("status", "task", "result", "error", "progress", "next", "relayed")
        return {n: str(v) for n, v in zip(names, reply, strict=True) if v is not None}

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        while True:
            try:
                result = await call()
            except REDIS_ERRORS as exc:
                report("waiting for a job", exc)
                await anyio.sleep(_RETRY_WAIT)
                continue
            reachable()
            return result

    async def progress(self, queue: str, job_id: str) -> AsyncIterator[Any]:
        """Each new progress value of a job, until it is final. Redis outages are ridden
        out, from the first lookup on, as ``wait`` does."""
        keys = await self._retrying(lambda: self.locate(queue, job_id))
        wake = asyncio.Event()
        listener = handler(lambda data: wake.set(), wake.set)
        channel = keys.done(job_id)
        subscriber = self.subscriber()
        last: str | None = None
        recheck = RECHECK_FIRST
        try:  # a follower cancelled while it subscribes leaves nothing subscribed
            await subscriber.subscribe(channel, listener)
            while True:
                wake.clear()
                state = await self._retrying(lambda: self._watch(keys, job_id))
                value = state.get("progress")
                if value is not None and value != last:
                    last = value
                    yield _json_or_none(value)
                if parse_status(state["status"]).is_final:
                    return
                recheck = await _woken(wake, recheck)
        finally:
            subscriber.unsubscribe(channel, listener)

    async def abort(self, queue: str, job_id: str) -> JobStatus:
        keys = await self.locate(queue, job_id)
        locks, level = cast(
            list[str | None], await self.redis.hmget(keys.job(job_id), ["locks", "level"])
        )
        stream = keys.level_stream(level or self.default_level)
        call = scripts.abort(
            self.env, keys, stream, job_id, self.result_ttl_ms, keys.own_locks(locks)
        )
        reply = str(await scripts.run(self.redis, call))
        if reply == "missing":
            raise JobNotFound(job_id, queue)
        return JobStatus.RUNNING if reply == "aborting" else parse_status(reply)

    def _check_open(self) -> None:
        """A job handle outlives its runner's ``async with`` block: used after it, it
        raises instead of opening connections (and a pub/sub task) nobody closes."""
        if self._closed:
            raise TaskrunnerError(
                "the runner this job handle came from was closed (its `async with tr:` "
                "ended): open the runner again and get the job again with "
                "tr.job(job.id, job.queue)"
            )

    async def aclose(self) -> None:
        self._closed = True
        task, self._subscriber_task = self._subscriber_task, None
        self._subscriber = None
        if task is not None:
            task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.gather(task, return_exceptions=True)
        await self.connection.aclose()


def _no_codec(task: str) -> ResultCodec | None:
    """No task is known: a result is read as plain JSON."""
    return None


async def _woken(wake: asyncio.Event, recheck: float) -> float:
    """Wait for a message (``wake``), or ``recheck`` seconds at most (RECHECK_MAX): the
    bound of the next wait."""
    with anyio.move_on_after(recheck):
        await wake.wait()
    return min(2 * recheck, RECHECK_MAX)


def _relayed(state: dict[str, str]) -> bool:
    """Whether nothing more will happen to a final job: it did not succeed, has no
    follow-ups, or its follow-up was written (or dead-lettered) by the relay."""
    return state["status"] != JobStatus.SUCCEEDED or "next" not in state or "relayed" in state


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # deep nesting: RecursionError
        return None


_V4_CLEAR = ~((0xC000 << 48) | (0xF000 << 64))
_V4_SET = (0x8000 << 48) | (4 << 76)


_ID_BATCH = 256
_random_ids: list[int] = []
"""128-bit random numbers for job ids, drawn ``_ID_BATCH`` at a time (one read of the
system's random source per id made an id cost 2.0 µs, 0.8 with these); emptied in a forked
child, which must not hand out its parent's ids."""
os.register_at_fork(after_in_child=_random_ids.clear)


def new_job_id() -> str:
    """A new random job id: what ``uuid.uuid4().hex`` gives (122 random bits, version 4,
    RFC 4122 variant), without building a ``UUID`` on the enqueue path."""
    while True:
        try:
            bits = _random_ids.pop()
        except IndexError:  # (another thread may take the last one between check and pop)
            raw = os.urandom(16 * _ID_BATCH)
            _random_ids.extend(int.from_bytes(raw[i : i + 16]) for i in range(0, len(raw), 16))
            continue
        return f"{bits & _V4_CLEAR | _V4_SET:032x}"


def new_token() -> str:
    """A lease token: 128 random bits."""
    return secrets.token_hex(16)


_WROTE: contextvars.ContextVar[list[bool]] = contextvars.ContextVar("taskrunner_wrote")
"""Whether the enqueue chain running in this task has reached the write."""


_BUILD_STEP = 100
"""Calls built between two turns of the event loop in ``Client._built``."""


def _drop(task: asyncio.Task[Any]) -> None:
    """Cancel a batch still in flight (a no-op once answered); its error, if it has one,
    counts as seen: the caller is already raising another."""
    task.cancel()
    task.add_done_callback(lambda done: done.cancelled() or done.exception())


async def _answers(
    running: tuple[Sequence[EnqueueContext], asyncio.Task[list[Any]]] | None,
) -> list[tuple[EnqueueContext, Any]]:
    """Each context of a batch in flight with its reply, once answered (none: [])."""
    if running is None:
        return []
    batch, sent = running
    return list(zip(batch, await sent, strict=True))


class _NotSent(Exception):
    """A job's write was not sent: another chain of its pipeline raised."""


class _EnqueueBatch:
    """Runs each context through the enqueue chain concurrently; the chains' writes are
    collected and sent in one pipeline once every chain has either written or left. If
    a chain raised (a middleware's error), none is sent and its error is raised."""

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
            wrote = _WROTE.set([False])  # this chain's own flag (each task has a context)
            try:
                jobs[index] = await self._chain(layers(ctx))(ctx)
            except Exception as exc:  # noqa: BLE001 - re-raised below, not in an ExceptionGroup
                errors.append(exc)
            finally:
                if not _WROTE.get()[0]:
                    self._decided()
                _WROTE.reset(wrote)

        failure: Exception | None = None
        async with anyio.create_task_group() as tg:
            for index, ctx in enumerate(contexts):
                tg.start_soon(one, index, ctx)
            await self._arrived.wait()
            if not errors:  # a chain that raised stops the whole pipeline: none is sent
                try:
                    self._replies = await scripts.run_many(
                        self._client.redis, self._calls, replicas=self._client.replicas
                    )
                except Exception as exc:  # noqa: BLE001 - raised below, as itself
                    failure = exc  # (raised here, it would come out in an ExceptionGroup)
            self._flushed.set()
        if failure is not None:
            raise failure
        if errors:
            raise errors[0]
        return [job for job in jobs if job is not None]

    async def write(self, ctx: EnqueueContext) -> Job[Any]:
        flag = _WROTE.get()
        if flag[0]:
            raise RuntimeError("an enqueue middleware called call_next twice for one job")
        # A middleware may have moved the job to a queue not resolved yet; and a write
        # that cannot be built raises before this chain counts as written, so the
        # batch's other chains are not left waiting for it.
        await self._client.resolve(ctx.queue)
        call = self._client.write_call(ctx)
        flag[0] = True
        index = len(self._calls)
        self._calls.append(call)
        self._decided()
        await self._flushed.wait()
        if index >= len(self._replies):
            raise _NotSent(ctx.job_id)
        return self._client.job_from_reply(ctx, self._replies[index])

    def _decided(self) -> None:
        self._undecided -= 1
        if self._undecided == 0:
            self._arrived.set()
