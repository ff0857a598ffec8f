"""The worker: reads jobs, runs each through the middleware chain, commits the outcome.

The loop itself knows nothing of retries, locks, timeouts or heartbeats; those are
middleware. It only reads (as many entries as it has free slots), claims each entry
under a new lease, dispatches it to a pool of long-lived consumers, and commits the
outcome the chain returns, coalescing commits into pipelined round trips.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import secrets
import signal
import socket
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

import anyio
from anyio.abc import TaskGroup, TaskStatus
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from taskrunner import scripts
from taskrunner.client import now_ms
from taskrunner.coalescer import Coalescer
from taskrunner.connection import REDIS_ERRORS
from taskrunner.events import EventHandler, EventListener
from taskrunner.job import ErrorInfo, JobContext, reset_current_job, set_current_job
from taskrunner.keys import GROUP, QueueKeys
from taskrunner.middleware.base import (
    CancelReason,
    ExecutionContext,
    Outcome,
    OutcomeKind,
)
from taskrunner.scheduler import Scheduler

if TYPE_CHECKING:
    from taskrunner.runner import TaskRunner
    from taskrunner.task import TaskDefinition

logger = logging.getLogger("taskrunner.worker")

COMMIT_DEADLINE = 10.0
"""Seconds a stopping worker waits for its last commits to be answered."""
CLAIM_BACKOFF = 0.5
"""Seconds a worker waits before reading again after its claims failed."""
READ_GATHER = 0.002
"""Seconds a busy worker waits for more free slots before it reads (see _read)."""
_CANCEL_OUTCOMES = {
    CancelReason.ABORTED: Outcome(OutcomeKind.ABORTED),
    CancelReason.SHUTDOWN: Outcome(OutcomeKind.HANDBACK),
}


def _meta(text: str) -> dict[str, str]:
    """The job's headers (stored as a JSON object of strings); anything else is dropped."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    if not isinstance(value, dict):
        return {}
    return {str(k): str(v) for k, v in value.items()}


def _cancelling() -> bool:
    """Whether the current task has a cancellation pending (anyio cancels through it)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


@dataclass(slots=True)
class Claimed:
    """A stream entry this worker holds under a fresh lease, ready to run."""

    keys: QueueKeys
    job_id: str
    entry_id: str
    token: str
    verdict: str
    task_name: str
    payload: str
    attempt: int
    locks: list[str]
    deliveries: int
    reclaimed: bool
    meta: dict[str, str]
    ready_at: float
    cancelled: CancelReason | None = None
    """Set while it waits for a consumer: its lease was lost, it was aborted, or the
    grace period ended. The consumer then commits that instead of running it."""
    settled: bool = False
    """Already committed (or dropped) by a stopping worker: consumers skip it."""


class Worker:
    """Runs jobs from one or more queues. ``await worker.run()`` in the foreground, or
    ``async with worker:`` to run it in the background of the caller (embedded)."""

    def __init__(
        self,
        runner: TaskRunner,
        *,
        queues: Sequence[str] | None = None,
        concurrency: int = 100,
        burst: bool = False,
        grace_period: float = 30.0,
        handle_signals: bool | None = None,
        max_deliveries: int = 5,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.runner = runner
        self.queues = list(queues) if queues else runner.queues()
        self.concurrency = concurrency
        self.burst = burst
        self.grace_period = grace_period
        self.handle_signals = handle_signals
        """None (default): SIGINT/SIGTERM stop ``run()``; ``async with`` leaves them alone."""
        self.max_deliveries = max_deliveries
        self.id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.keys: dict[str, QueueKeys] = {}
        self.running: dict[str, ExecutionContext] = {}
        self.waiting: dict[str, Claimed] = {}
        """Claimed jobs not started yet, by lease token (heartbeated like running ones)."""
        self._free = concurrency
        self._slot_freed = asyncio.Event()
        self._stopping = anyio.Event()
        self._seq = 0
        self._handlers: list[tuple[str, EventHandler]] = []
        self._services: TaskGroup | None = None
        self._reader_scope: anyio.CancelScope | None = None
        self._reader_id: int | None = None
        self._background: TaskGroup | None = None
        self.redis: Redis
        self._coalescer: Coalescer
        self.scheduler: Scheduler
        self._queue: asyncio.Queue[Claimed | None]

    # -- public lifecycle ---------------------------------------------------------------

    async def run(self) -> None:
        """Run until stopped (a signal, ``stop()``) or, in burst mode, until drained."""
        async with self.runner, anyio.create_task_group() as tg:
            if self.handle_signals is not False:
                tg.start_soon(self._signals, tg.cancel_scope)
            await self._serve()
            tg.cancel_scope.cancel()

    async def __aenter__(self) -> Worker:
        self._background = anyio.create_task_group()
        await self._background.__aenter__()
        try:
            if self.handle_signals:  # embedded: only when asked for explicitly
                self._background.start_soon(self._signals, self._background.cancel_scope)
            await self._background.start(self._serve_started)
        except BaseException as exc:  # close the task group, then report the real error
            await self._close_after_failed_start(exc)
            raise
        return self

    async def _close_after_failed_start(self, exc: BaseException) -> None:
        assert self._background is not None
        try:
            await self._background.__aexit__(type(exc), exc, exc.__traceback__)
        except BaseExceptionGroup as group:  # the start-up error, wrapped by the task group
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        self.stop()
        assert self._background is not None
        return await self._background.__aexit__(et, e, tb)

    def stop(self) -> None:
        """Stop reading, let running jobs finish within the grace period, then hand
        the rest back to the queue."""
        self._stopping.set()
        if self._reader_scope is not None:
            self._reader_scope.cancel()
            if self._services is not None:
                self._services.start_soon(self._unblock_reader)

    async def _unblock_reader(self) -> None:
        """End a blocking read at once (CLIENT UNBLOCK: it returns nothing), until the
        reader has noticed the stop. The read itself is never cancelled (see ``_read``)."""
        while self._reader_scope is not None and self._reader_id is not None:
            try:
                await self.redis.client_unblock(self._reader_id)
            except REDIS_ERRORS:
                return
            await anyio.sleep(0.05)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    # -- hooks for middleware ------------------------------------------------------------

    def spawn(self, fn: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        """Run a background service (heartbeats, reclaim timer) until the worker stops."""
        assert self._services is not None, "spawn() is for on_worker_start hooks"
        self._services.start_soon(fn)

    def on_event(self, kind: str, handler: EventHandler) -> None:
        """Call ``handler(queue, argument)`` for each ``kind`` message on a queue's events."""
        self._handlers.append((kind, handler))

    @property
    def free_slots(self) -> int:
        return self._free

    async def submit(self, keys: QueueKeys, entries: Sequence[tuple[str, dict[str, str]]]) -> None:
        """Claim stream entries this consumer holds and hand them to the consumers.
        The caller must not pass more entries than ``free_slots``."""
        if not entries:
            return
        self._free -= len(entries)
        try:
            claimed = await self._claim(keys, entries)
        except REDIS_ERRORS as exc:
            # The entries stay pending under this consumer: reclaimed after stale_after.
            # Back off before the next read, or a worker whose claims fail (an OOM
            # server refuses the claim's writes, not the read) would keep moving the
            # whole backlog into its own pending list.
            logger.warning(
                "could not claim %d entries (%s); they will be reclaimed", len(entries), exc
            )
            self._release(len(entries))
            await anyio.sleep(CLAIM_BACKOFF)
            return
        except BaseException:
            self._release(len(entries))
            raise
        self._release(len(entries) - len(claimed))
        for item in claimed:
            if self.stopping:  # claimed while stopping (a reclaim in flight): give it back
                self._commit(item, None, Outcome(OutcomeKind.HANDBACK))
                continue
            self.waiting[item.token] = item
            self._queue.put_nowait(item)

    def next_token(self) -> str:
        self._seq += 1
        return f"{self.id}:{self._seq}"

    # -- serving -------------------------------------------------------------------------

    async def _serve_started(self, *, task_status: TaskStatus[None]) -> None:
        async with self.runner:
            await self._serve(task_status)
        if self.handle_signals:
            assert self._background is not None
            self._background.cancel_scope.cancel()  # ends the signal watcher

    async def _serve(self, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        self.redis = self.runner.client.redis
        self._coalescer = Coalescer(self.redis)
        self.keys = {q: self.runner.client.keys(q) for q in self.queues}
        self.scheduler = Scheduler(self.redis, list(self.keys.values()), self.runner.max_idle_wait)
        blocking = self.runner.blocking_connection()
        try:
            await self._ensure_groups()
            await self._warn_if_evicting()
            async with anyio.create_task_group() as services:
                self._services = services
                services.start_soon(self._coalescer.run)
                services.start_soon(self.scheduler.run)
                for mw in self.runner.middleware:
                    await mw.on_worker_start(self)
                services.start_soon(self._listener().run)  # with the hooks' handlers
                await self._consume(blocking, task_status)
                await self._await_commits()
                for mw in reversed(self.runner.middleware):
                    await mw.on_worker_stop(self)
                services.cancel_scope.cancel()
            await self._leave_groups()
        finally:
            with anyio.CancelScope(shield=True):  # close it even when cancelled
                await blocking.aclose()
        logger.info("worker %s stopped", self.id)

    async def _consume(self, blocking: Redis, task_status: TaskStatus[None]) -> None:
        # asyncio primitives on the hot path: redis-py's client ties us to asyncio anyway,
        # and asyncio.Queue/Event/futures cost a tenth of anyio's memory streams and events.
        self._queue = asyncio.Queue()
        async with anyio.create_task_group() as jobs:
            for _ in range(self.concurrency):
                jobs.start_soon(self._consumer)
            logger.info(
                "worker %s ready: queues %s, concurrency %d",
                self.id,
                ",".join(self.queues),
                self.concurrency,
            )
            task_status.started()
            await self._read(blocking)
            self._stopping.set()  # also after a burst: nothing new is taken from here on
            await self._drain()
            for _ in range(self.concurrency):
                self._queue.put_nowait(None)  # each consumer ends after what is queued

    async def _drain(self) -> None:
        self._hand_back_waiting()  # not started yet: another worker can take them now
        with anyio.move_on_after(self.grace_period):
            while self.running or self._free < self.concurrency:
                await self._slot_event()
        self._hand_back_waiting()
        for ctx in list(self.running.values()):
            ctx.cancel(CancelReason.SHUTDOWN)

    def _hand_back_waiting(self) -> None:
        """Settle every claimed job that no consumer has started, now (the consumers may
        all be busy for the whole grace period): hand it back, or record its abort."""
        for item in list(self.waiting.values()):
            if item.cancelled is None:  # a lost lease or an abort stays what it is
                item.cancelled = CancelReason.SHUTDOWN
            item.settled = True
            del self.waiting[item.token]
            outcome = _CANCEL_OUTCOMES.get(item.cancelled)
            if outcome is None:
                self._release(1)
            else:
                self._commit(item, self.runner.registry.get(item.task_name), outcome)

    async def _free_slots_to_read(self) -> None:
        """Wait for a free slot; when only a few are free, wait up to ``READ_GATHER``
        seconds for more, so one read (and one claim) serves many jobs under load
        while an idle worker still reads at once."""
        while self._free <= 0:
            await self._slot_event()
        wanted = max(1, self.concurrency // 4)
        if self._free < wanted:
            with anyio.move_on_after(READ_GATHER):
                while self._free < wanted:
                    await self._slot_event()

    async def _slot_event(self) -> None:
        await self._slot_freed.wait()

    def _release(self, n: int) -> None:
        if n:
            self._free += n
            self._slot_freed.set()
            self._slot_freed = asyncio.Event()

    # -- reading and claiming ------------------------------------------------------------

    async def _read(self, blocking: Redis) -> None:
        streams = {k.stream: ">" for k in self.keys.values()}
        by_stream = {k.stream: k for k in self.keys.values()}
        block_ms = self.runner.block_ms
        try:
            with anyio.CancelScope() as scope:
                self._reader_scope = scope
                while not self._stopping.is_set():
                    await anyio.lowlevel.checkpoint()  # the read below is shielded
                    await self._free_slots_to_read()
                    # A read in flight is finished, never cancelled: the server may have
                    # delivered entries to this consumer already, and a lost reply would
                    # strand them in the pending list until they went stale. stop()
                    # unblocks it instead.
                    with anyio.CancelScope(shield=True):
                        if self._reader_id is None:  # (re)connected: stop() unblocks by id
                            self._reader_id = await self._client_id(blocking)
                        reply = await self._xreadgroup(blocking, streams, block_ms)
                        for stream, entries in reply:
                            await self.submit(by_stream[stream], entries)
                    if not reply and self.burst and await self._burst_done():
                        break
        finally:
            self._reader_scope = None

    async def _xreadgroup(
        self, blocking: Redis, streams: dict[str, str], block_ms: int
    ) -> list[tuple[str, list[tuple[str, dict[str, str]]]]]:
        try:
            reply = await blocking.xreadgroup(
                GROUP,
                self.id,
                streams,  # type: ignore[arg-type]
                # COUNT applies per stream: split the free slots between the queues
                # (a few more than free can arrive; they wait, heartbeated, in `waiting`).
                count=max(1, self._free // len(streams)),
                block=None if self.burst else block_ms,
            )
        except REDIS_ERRORS as exc:
            await self._read_failed(exc)
            return []
        return cast(list[tuple[str, list[tuple[str, dict[str, str]]]]], reply or [])

    @staticmethod
    async def _client_id(blocking: Redis) -> int | None:
        try:
            return int(await blocking.client_id())
        except REDIS_ERRORS:
            return None

    async def _read_failed(self, exc: Exception) -> None:
        """A failed read: recreate a missing group (a restart without persistence) at
        once; anything else (server away, failing over, loading) backs off and retries."""
        self._reader_id = None  # a reconnect gives the blocking connection a new id
        if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
            logger.warning("consumer group missing (redis restarted?); recreating it from id 0")
            with contextlib.suppress(*REDIS_ERRORS):
                await self._ensure_groups()
                return
        else:
            logger.warning("redis unavailable while reading (%s); retrying", exc)
        await anyio.sleep(0.5)

    async def _burst_done(self) -> bool:
        """In burst mode: stop when nothing runs, nothing is ready and nothing is due."""
        if self.running or self._free < self.concurrency:
            await self._slot_event()
            return False
        return not await self.scheduler.promote_due()

    async def _claim(
        self, keys: QueueKeys, entries: Sequence[tuple[str, dict[str, str]]]
    ) -> list[Claimed]:
        now = now_ms()
        calls, ids, tokens = [], [], []
        for entry_id, fields in entries:
            job_id = fields.get("job") or f"entry-{entry_id}"
            token = self.next_token()
            ids.append(job_id)
            tokens.append(token)
            calls.append(
                scripts.claim(keys, job_id, self.id, entry_id, token, now, self.max_deliveries)
            )
        replies = await scripts.run_many(self.redis, calls, raise_on_error=False)
        if replies and all(isinstance(reply, Exception) for reply in replies):
            raise replies[0]  # nothing claimed: the caller backs off
        claimed = []
        for (entry_id, fields), job_id, token, reply in zip(
            entries, ids, tokens, replies, strict=True
        ):
            if isinstance(reply, Exception):  # this one only; it stays pending, reclaimed
                logger.error("could not claim stream entry %s (%s)", entry_id, reply)
                continue
            item = self._claimed(keys, job_id, entry_id, token, reply, fields)
            if item is not None:
                claimed.append(item)
        return claimed

    def _claimed(
        self,
        keys: QueueKeys,
        job_id: str,
        entry_id: str,
        token: str,
        reply: list[Any],
        fields: dict[str, str],
    ) -> Claimed | None:
        verdict = str(reply[0])
        if verdict == "missing":
            logger.error("stream entry %s has no job (%r); dead-lettering it", entry_id, fields)
            self.spawn(lambda: self._dead_letter_orphan(keys, entry_id, fields))
            return None
        if verdict == "stray":
            logger.warning(
                "stream entry %s duplicates job %s (live as entry %s); dropped it",
                entry_id,
                job_id,
                reply[1],
            )
            return None
        if verdict in ("gone", "final"):
            return None
        return Claimed(
            keys=keys,
            job_id=job_id,
            entry_id=entry_id,
            token=token,
            verdict=verdict,
            task_name=str(reply[1]),
            payload=str(reply[2]),
            attempt=int(reply[3]),
            locks=str(reply[4]).split(),
            deliveries=int(reply[5]),
            reclaimed=reply[6] == 1,
            meta=_meta(str(reply[7])),
            ready_at=int(reply[8]) / 1000,
        )

    async def _dead_letter_orphan(
        self, keys: QueueKeys, entry_id: str, fields: dict[str, str]
    ) -> None:
        """Dead-letter an entry without a job and acknowledge it (orphan.lua: one step;
        the entry stays pending until then, so if this fails it is reclaimed and tried
        again)."""
        reason = f"stream entry {entry_id} has no job: {fields!r}"
        error = ErrorInfo(type="DeadLetter", message=reason).model_dump_json()
        call = scripts.orphan(
            keys, entry_id, f"entry-{entry_id}", fields.get("task", ""), now_ms(), error
        )
        try:
            await scripts.run(self.redis, call)
        except REDIS_ERRORS as exc:
            logger.warning("could not dead-letter stream entry %s (%s)", entry_id, exc)

    # -- running -------------------------------------------------------------------------

    async def _consumer(self) -> None:
        """One of ``concurrency`` long-lived consumers: runs claimed jobs one at a time."""
        while (item := await self._queue.get()) is not None:
            if item.settled:
                continue
            self.waiting.pop(item.token, None)
            task = self.runner.registry.get(item.task_name)
            try:
                outcome = await self._run(item, task)
                if outcome is not None:  # the slot is freed once the commit is answered
                    self._commit(item, task, outcome)
                    continue
            except Exception:  # a bug: keep the worker alive; the entry stays pending
                logger.exception(
                    "job %s %s: internal error; it will be reclaimed",
                    item.job_id,
                    item.task_name,
                )
            self._release(1)

    async def _run(self, item: Claimed, task: TaskDefinition | None) -> Outcome | None:
        """The outcome to commit for a claimed job (None: commit nothing)."""
        if item.cancelled is not None:  # while it waited: commit that, do not run it
            return _CANCEL_OUTCOMES.get(item.cancelled)
        if item.verdict == "poison":
            reason = f"delivered {item.deliveries} times (max_deliveries={self.max_deliveries})"
            return Outcome.dead(reason)
        if item.verdict == "abort":
            return Outcome(OutcomeKind.ABORTED)
        if task is None:
            return Outcome.dead(f"unknown task {item.task_name!r}")
        try:
            args, kwargs = task.codec.decode(item.payload)
        except Exception as exc:  # noqa: BLE001 - any bad payload goes to the dead letters
            return Outcome.dead(f"undecodable arguments: {exc}")
        return await self._execute(item, task, args, kwargs)

    async def _execute(
        self, item: Claimed, task: TaskDefinition, args: list[Any], kwargs: dict[str, Any]
    ) -> Outcome | None:
        reason: list[CancelReason] = []
        outcome: Outcome | None = None
        with anyio.CancelScope() as scope:

            def cancel(why: CancelReason) -> None:
                reason.append(why)
                scope.cancel()

            job = JobContext(
                id=item.job_id,
                task=item.task_name,
                attempt=item.attempt,
                queue=item.keys.queue,
                deliveries=item.deliveries,
                reclaimed=item.reclaimed,
                ready_at=item.ready_at,
            )
            ctx = ExecutionContext(
                job=job,
                task=task,
                args=args,
                kwargs=kwargs,
                worker=self,
                entry_id=item.entry_id,
                lease=item.token,
                locks=item.locks,
                cancel=cancel,
                payload=item.payload,
                meta=item.meta,
            )
            self.running[item.job_id] = ctx
            token = set_current_job(job)
            started = time.perf_counter()
            logger.info("job %s %s attempt %d started", job.id, job.task, job.attempt)
            try:
                outcome = await self.runner.execute_chain(task)(ctx)
            except Exception as exc:  # noqa: BLE001 - the task's own error is its outcome
                outcome = Outcome.failed(ErrorInfo.from_exception(exc))
            except asyncio.CancelledError as exc:
                if scope.cancel_called or _cancelling():
                    raise  # a real cancellation: this job's (abort, lease, shutdown) or ours
                # The task's own code let a CancelledError out (it awaited something
                # cancelled elsewhere): that is the job failing, not the worker stopping.
                outcome = Outcome.failed(ErrorInfo.from_exception(exc))
            finally:
                reset_current_job(token)
                if self.running.get(item.job_id) is ctx:  # a re-claimed copy may replace it
                    del self.running[item.job_id]
        if outcome is None or scope.cancelled_caught:  # a late cancel keeps a real outcome
            why = reason[0] if reason else CancelReason.SHUTDOWN
            outcome = _CANCEL_OUTCOMES.get(why)
        logger.info(
            "job %s %s attempt %d %s in %.3fs",
            item.job_id,
            item.task_name,
            item.attempt,
            outcome.kind if outcome else "lost its lease",
            time.perf_counter() - started,
        )
        return outcome

    def _commit(self, item: Claimed, task: TaskDefinition | None, outcome: Outcome) -> None:
        """Send the outcome through the coalesced pipeline; its slot is freed (and the
        result logged) when the reply comes back, without holding up the consumer."""
        payload = self._payload(item, task, outcome)
        if isinstance(payload, Outcome):
            outcome, payload = payload, self._payload(item, task, payload)
        due = math.ceil(outcome.due * 1000) if outcome.due is not None else 0
        call = scripts.commit(
            item.keys,
            item.job_id,
            item.entry_id,
            item.token,
            outcome.kind,
            now_ms(),
            str(payload),
            self.runner.client.result_ttl_ms,
            due,
            item.locks,
        )
        self._coalescer.submit_nowait(call, lambda reply: self._committed(item, outcome, reply))

    def _committed(self, item: Claimed, outcome: Outcome, reply: Any) -> None:
        self._release(1)
        if reply == 1:
            self._observe(item, outcome)
        if isinstance(reply, Exception):
            logger.error(
                "job %s %s attempt %d: its %s could not be recorded (%s); it will be reclaimed",
                item.job_id,
                item.task_name,
                item.attempt,
                outcome.kind,
                reply,
            )
        elif reply != 1:
            logger.warning(
                "job %s %s attempt %d lost its lease; its %s was not recorded",
                item.job_id,
                item.task_name,
                item.attempt,
                outcome.kind,
            )
        elif outcome.kind in (OutcomeKind.RETRY, OutcomeKind.RESCHEDULE):
            self.scheduler.wake()

    def _observe(self, item: Claimed, outcome: Outcome) -> None:
        job = JobContext(
            id=item.job_id,
            task=item.task_name,
            attempt=item.attempt,
            queue=item.keys.queue,
            deliveries=item.deliveries,
            reclaimed=item.reclaimed,
            ready_at=item.ready_at,
        )
        for mw in self.runner.middleware:
            try:
                mw.on_commit(job, outcome)
            except Exception:
                logger.exception("middleware %s: on_commit failed", type(mw).__name__)

    @staticmethod
    def _payload(item: Claimed, task: TaskDefinition | None, outcome: Outcome) -> str | Outcome:
        if outcome.kind == OutcomeKind.SUCCEEDED and task is not None:
            try:
                return task.codec.result.encode(outcome.result)
            except Exception as exc:
                logger.exception(
                    "job %s %s: result cannot be serialised", item.job_id, item.task_name
                )
                return Outcome.failed(ErrorInfo.from_exception(exc))
        return outcome.error.model_dump_json() if outcome.error else ""

    # -- setup ---------------------------------------------------------------------------

    def _listener(self) -> EventListener:
        listener = EventListener(self.redis, list(self.keys.values()), self.scheduler.wake)
        listener.on("due", lambda queue, argument: self.scheduler.wake())
        for kind, handler in self._handlers:
            listener.on(kind, handler)
        return listener

    async def _await_commits(self) -> None:
        """Every outcome recorded before the worker stops; if Redis stays away longer
        than ``COMMIT_DEADLINE``, give up: those entries are reclaimed after stale_after."""
        with anyio.move_on_after(COMMIT_DEADLINE) as scope:
            await self._coalescer.drained()
        if scope.cancelled_caught:
            logger.error(
                "worker %s: %d outcome(s) not recorded before stopping (redis unavailable); "
                "their jobs will be reclaimed",
                self.id,
                self.concurrency - self._free,
            )

    async def _leave_groups(self) -> None:
        """Remove this consumer from each queue's group when it holds nothing, so the
        groups do not collect one dead consumer per worker process ever started. (A
        consumer still holding entries stays: deleting it would drop them.)"""
        calls = [scripts.leave(keys, self.id) for keys in self.keys.values()]
        try:
            await scripts.run_many(self.redis, calls, raise_on_error=False)
        except REDIS_ERRORS as exc:
            logger.warning("could not leave the consumer groups: %s", exc)

    async def _ensure_groups(self) -> None:
        for keys in self.keys.values():
            try:
                await self.redis.xgroup_create(keys.stream, GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def _warn_if_evicting(self) -> None:
        try:
            policy = (await self.redis.config_get("maxmemory-policy")).get("maxmemory-policy")
        except ResponseError:  # CONFIG is disabled on some managed servers
            return
        if policy and policy != "noeviction":
            logger.warning(
                "redis maxmemory-policy is %s: the server may evict job state under memory "
                "pressure; set it to noeviction",
                policy,
            )

    async def _signals(self, scope: anyio.CancelScope) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                if self._stopping.is_set():
                    logger.warning("second signal: exiting now")
                    scope.cancel()
                    return
                logger.info(
                    "received %s: stopping gracefully (grace period %.1fs)",
                    signal.Signals(signum).name,
                    self.grace_period,
                )
                self.stop()
