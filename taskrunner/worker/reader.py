"""The reader: takes new jobs from every partition of the worker's queues and claims them.

Each round asks every partition (or, with fewer free slots than partitions, the next
few in turn) for as many entries as there are free slots, with fetch.lua: highest
priority level first, in one pipelined round trip however many partitions and cluster
nodes there are (a blocking XREADGROUP cannot span partitions: they are different
slots). The entries are then claimed with claim.lua, in one more round trip, which
runs beside the next read: a round takes at most half the worker's slots (unless that
would leave a partition out), so while one half's claims (and then its jobs) run, the
other half is being read. Slots are taken
before the read, so reads in flight never ask for more than the free slots.

When every partition came back drained, the reader sleeps until a "ready" event (the
next enqueue into a drained partition publishes one), a freed slot that follows a
short read, a resubscription, or ``idle_wait`` as a fallback. A worker never polls a
queue it has just found empty.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
from anyio.abc import TaskGroup
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from taskrunner import scripts
from taskrunner.client import new_token
from taskrunner.connection import REDIS_ERRORS, reachable, report
from taskrunner.keys import GROUP, Queue, QueueKeys
from taskrunner.logs import excerpt
from taskrunner.orphans import dead_letter_entry
from taskrunner.worker.held import Claimed
from taskrunner.worker.slots import Slots

logger = logging.getLogger("taskrunner.worker")

CLAIM_BACKOFF = 0.5
"""Seconds the reader waits after a round whose claims all failed."""

Deliver = Callable[[list[Claimed]], None]


def _meta(text: str) -> dict[str, str]:
    """The job's headers (a JSON object of strings); anything else reads as none."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    if not isinstance(value, dict):
        return {}
    return {str(k): str(v) for k, v in value.items()}


def _fields(flat: Any) -> dict[str, str]:
    """A stream entry's fields from Lua's flat list (hostile entries included)."""
    if not isinstance(flat, list):
        return {}
    return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}


class Reader:
    """Fills the worker's free slots with claimed jobs; ``run()`` until stopped."""

    def __init__(
        self,
        *,
        redis: Redis,
        consumer: str,
        queues: Callable[[], Sequence[Queue]],
        slots: Slots,
        env: Callable[[], scripts.Env],
        deliver: Deliver,
        max_deliveries: int,
        max_payload: int,
        idle_wait: float,
        aging_ms: int,
    ) -> None:
        self._redis = redis
        self._consumer = consumer
        self._queues = queues
        self._slots = slots
        self._env = env
        self._deliver = deliver
        self._max_deliveries = max_deliveries
        self._max_payload = max_payload
        self._idle_wait = idle_wait
        self._aging_ms = aging_ms
        self._wake = anyio.Event()
        self._offset = 0
        self._chunk = max(1, math.ceil(slots.size / 2))
        self._paused_until = 0.0

    def wake(self) -> None:
        self._wake.set()

    def _partitions(self) -> list[tuple[Queue, QueueKeys]]:
        return [(q, keys) for q in self._queues() for keys in q.parts]

    async def run(
        self,
        stopping: Callable[[], bool],
        drained: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        """Read until ``stopping()``. In burst mode (``drained`` given), when nothing
        was found, ``drained()`` says whether to stop or to read again at once;
        otherwise the reader waits for a wake-up."""
        async with anyio.create_task_group() as claims:
            await self._read(claims, stopping, drained)

    async def _read(
        self,
        claims: TaskGroup,
        stopping: Callable[[], bool],
        drained: Callable[[], Awaitable[bool]] | None,
    ) -> None:
        unasked: set[str] = set()
        while not stopping():
            pause = self._paused_until - time.monotonic()
            if pause > 0:  # the last claims failed: back off
                await anyio.sleep(pause)
                continue
            if self._slots.readable <= 0:
                await self._slots.changed()
                continue
            parts = self._partitions()
            if not unasked:
                unasked = {keys.prefix for _, keys in parts}
            self._wake = anyio.Event()
            got, asked = await self._round(parts, claims)
            unasked -= asked
            if got or unasked or stopping():
                if got:
                    unasked = set()
                continue
            if drained is not None:
                if await drained():
                    return
                continue
            with anyio.move_on_after(self._idle_wait):
                await self._wake.wait()

    async def _round(
        self, parts: list[tuple[Queue, QueueKeys]], claims: TaskGroup
    ) -> tuple[int, set[str]]:
        """One read; its claims run in ``claims``: (entries read, partitions asked)."""
        free = self._slots.readable
        if free >= 2 * len(parts):  # half the slots, if each partition still gets one
            free = min(free, self._chunk)
        plan = self._plan(parts, free)
        self._slots.take(free)
        try:
            fetched = await self._fetch(plan)
            reachable()
        except REDIS_ERRORS as exc:
            self._slots.release(free)
            report("reading jobs", exc)
            await anyio.sleep(CLAIM_BACKOFF)
            return 0, set()
        except BaseException:
            self._slots.release(free)
            raise
        asked = {keys.prefix for _, keys, _ in plan}
        if len(fetched) > free:  # rounding up over partitions
            self._slots.take(len(fetched) - free)
        else:
            self._slots.release(free - len(fetched))
        if fetched:
            claims.start_soon(self._claim_and_deliver, fetched)
        return len(fetched), asked

    async def _claim_and_deliver(
        self, fetched: list[tuple[Queue, QueueKeys, str, str, dict[str, str]]]
    ) -> None:
        try:
            claimed = await self._claim(fetched)
        except REDIS_ERRORS as exc:
            # The entries stay pending under this consumer: requeued after stale_after.
            # Back off, or a worker whose claims fail (an OOM server refuses the
            # claims' writes, not the reads) would move the backlog into its own name.
            report("claiming jobs", exc)
            self._slots.release(len(fetched))
            self._paused_until = time.monotonic() + CLAIM_BACKOFF
            return
        except BaseException:
            self._slots.release(len(fetched))
            raise
        self._slots.release(len(fetched) - len(claimed))
        if claimed:
            self._deliver(claimed)

    def _plan(
        self, parts: list[tuple[Queue, QueueKeys]], free: int
    ) -> list[tuple[Queue, QueueKeys, int]]:
        """How many entries to ask each partition for: the free slots spread over all
        of them, or one each for the next ``free`` partitions in turn."""
        if free >= len(parts):
            each = math.ceil(free / len(parts))
            return [(q, keys, each) for q, keys in parts]
        start = self._offset % len(parts)
        self._offset += free
        chosen = [parts[(start + i) % len(parts)] for i in range(free)]
        return [(q, keys, 1) for q, keys in chosen]

    async def _fetch(
        self, plan: list[tuple[Queue, QueueKeys, int]]
    ) -> list[tuple[Queue, QueueKeys, str, str, dict[str, str]]]:
        """The entries read: (queue, partition, stream, entry id, fields)."""
        env = self._env()
        calls = [
            scripts.fetch(env, keys, q.streams(keys), self._consumer, count, self._aging_ms)
            for q, keys, count in plan
        ]
        replies = await scripts.run_many(self._redis, calls, raise_on_error=False)
        found = []
        missing_groups = []
        for (q, keys, _), reply in zip(plan, replies, strict=True):
            if isinstance(reply, ResponseError) and "NOGROUP" in str(reply):
                missing_groups.append((q, keys))
                continue
            if isinstance(reply, Exception):
                raise reply
            if not reply or reply == ["paused"]:
                continue
            streams = q.streams(keys)
            for level_index, entry_id, flat in reply:
                found.append((q, keys, streams[int(level_index) - 1], str(entry_id), _fields(flat)))
        if missing_groups:
            logger.warning(
                "consumer group missing on %s (redis restarted without persistence?); "
                "recreating it from id 0",
                ", ".join(keys.prefix for _, keys in missing_groups),
            )
            await ensure_groups(self._redis, missing_groups)
        return found

    async def _claim(
        self, fetched: list[tuple[Queue, QueueKeys, str, str, dict[str, str]]]
    ) -> list[Claimed]:
        env = self._env()
        calls, tokens = [], []
        for _, keys, stream, entry_id, fields in fetched:
            token = new_token()
            tokens.append(token)
            job_id = fields.get("job") or f"entry-{entry_id}"
            calls.append(
                scripts.claim(
                    env,
                    keys,
                    stream,
                    job_id,
                    self._consumer,
                    entry_id,
                    token,
                    self._max_deliveries,
                    self._max_payload,
                )
            )
        replies = await scripts.run_many(self._redis, calls, raise_on_error=False)
        if replies and all(isinstance(reply, Exception) for reply in replies):
            raise replies[0]  # nothing claimed: the caller backs off
        claimed = []
        for (q, keys, stream, entry_id, fields), token, reply in zip(
            fetched, tokens, replies, strict=True
        ):
            if isinstance(reply, Exception):  # this one only; it stays pending, requeued
                logger.error(
                    "could not claim stream entry %s of %s (%s)",
                    entry_id,
                    keys.prefix,
                    excerpt(str(reply)),
                )
                continue
            item = await self._claimed(q, keys, stream, entry_id, fields, token, reply)
            if item is not None:
                claimed.append(item)
        return claimed

    async def _claimed(
        self,
        q: Queue,
        keys: QueueKeys,
        stream: str,
        entry_id: str,
        fields: dict[str, str],
        token: str,
        reply: list[Any],
    ) -> Claimed | None:
        verdict = str(reply[0])
        job_id = fields.get("job") or f"entry-{entry_id}"
        if verdict in ("missing", "invalid"):
            why = "has no job" if verdict == "missing" else f"names a job with status {reply[1]!r}"
            await dead_letter_entry(
                self._redis, self._env(), keys, stream, entry_id, fields, why, fields.get("job")
            )
            return None
        if verdict == "stray":
            logger.warning(
                "stream entry %s duplicates job %s (live as entry %s); dropped it",
                entry_id,
                excerpt(job_id),
                excerpt(str(reply[1])),
            )
            return None
        if verdict in ("gone", "final"):
            return None
        level = self._level_of(q, keys, stream)
        logger.debug("claimed job %s (%s) from %s", job_id, verdict, stream)
        return Claimed(
            keys=keys,
            stream=stream,
            level=level,
            job_id=job_id,
            entry_id=entry_id,
            token=token,
            verdict=verdict,
            task_name=str(reply[1]),
            payload=str(reply[2]),
            attempt=int(reply[3]),
            locks=str(reply[4]).split(),
            reclaims=int(reply[5]),
            reclaimed=int(reply[8]) == 1,
            meta=_meta(str(reply[6])),
            ready_at=int(reply[7]) / 1000,
        )

    @staticmethod
    def _level_of(q: Queue, keys: QueueKeys, stream: str) -> str:
        for level in q.levels:
            if keys.level_stream(level) == stream:
                return level
        return keys.default_level


async def ensure_groups(redis: Redis, partitions: Sequence[tuple[Queue, QueueKeys]]) -> None:
    """Create the consumer group of every level stream of these partitions (at id 0:
    after a restart without persistence, whatever is in a stream is new)."""
    pipe = redis.pipeline(transaction=False)
    for q, keys in partitions:
        for stream in q.streams(keys):
            pipe.xgroup_create(stream, GROUP, id="0", mkstream=True)
    for reply in await pipe.execute(raise_on_error=False):
        if isinstance(reply, ResponseError) and "BUSYGROUP" in str(reply):
            continue
        if isinstance(reply, Exception):
            raise reply
