"""The reader: takes new jobs from every partition of the worker's queues and claims them.

Each round reads as many entries as there are free slots, in the order of the
priority fairness rule (taskrunner.worker.order): of one partition with fetch.lua
alone; of several (a blocking XREADGROUP cannot span partitions: they are different
slots), after a look at the unread entries of all of them (peek.lua), so a job of a
higher level in any partition goes before a lower one in another. Each step is one
pipelined round trip however many partitions and cluster nodes there are. The entries
are then claimed with claim.lua, in one more round trip, except the job a "ready"
event named: the read it wakes claims it in the same script run (take.lua). A round
takes at most half the
worker's slots (unless that would leave a partition without one), and after a full
read the claims run beside the next read, so while one half's claims (and then its
jobs) run, the other half is being read. A read that found the partitions drained
claims at once instead: no read follows it, and its jobs start one task hop sooner.
Slots are taken before the read, so reads in flight never ask for more than the free
slots.

When every partition came back drained, or the one partition's read got fewer entries
than it asked for (fetch.lua marked it idle in that run), the reader sleeps until a
"ready" event (the next enqueue into a drained partition publishes one), a
resubscription, or
``idle_wait`` as a fallback. A worker never polls a queue it has just found empty.
After a "ready", it reads only the partitions that sent one (adding those that send
one meanwhile) until they are drained: a job arriving in one partition of a queue
split in P costs each idle worker one read, not P. The fallback and every other
wake-up read all partitions.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import anyio
from anyio.abc import TaskGroup
from redis.asyncio import Redis, RedisCluster
from redis.exceptions import ResponseError, SlotNotCoveredError

from taskrunner import scripts
from taskrunner.connection import REDIS_ERRORS, reachable, report, wrong_type
from taskrunner.keys import GROUP, Queue, QueueKeys
from taskrunner.logs import excerpt
from taskrunner.orphans import dead_letter_entry
from taskrunner.worker import order
from taskrunner.worker.held import Claimed
from taskrunner.worker.slots import Slots

logger = logging.getLogger("taskrunner.worker")

CLAIM_BACKOFF = 0.5
"""Seconds the reader waits after a round whose claims all failed."""

Deliver = Callable[[list[Claimed]], None]
Planned = tuple[Queue, QueueKeys, int, list[int] | None]
"""A partition to read: how many entries, and at most how many of each level (None:
any, in fetch.lua's order)."""
Taken = tuple[str, list[Any]]
"""An entry claimed in its read (take.lua): the lease token and claim.lua's reply."""
Fetched = tuple[Queue, QueueKeys, str, str, dict[str, str], Taken | None]


def _meta(text: str) -> dict[str, str]:
    """The job's headers (a JSON object of strings); anything else reads as none."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # deep nesting: RecursionError
        return {}
    if not isinstance(value, dict):
        return {}
    return {str(k): str(v) for k, v in value.items()}


def _any_taken(fetched: list[Fetched]) -> bool:
    """Whether any of these entries was claimed in its read (take.lua)."""
    return any(item[5] is not None for item in fetched)


def new_tokens(n: int) -> list[str]:
    """``n`` lease tokens of 128 random bits each (``client.new_token``'s), from one
    read of the system's random source instead of one per token."""
    text = os.urandom(16 * n).hex()
    return [text[i : i + 32] for i in range(0, 32 * n, 32)]


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
        self._woken: set[str] = set()
        self._hints: dict[str, str] = {}
        """The job the last "ready" of a partition named, until the partition's next read."""
        self._wake_all = False
        self._chunk = max(1, math.ceil(slots.size / 2))
        self._paused_until = 0.0
        self._turns = order.Turns()

    def wake(self, partition: str | None = None, job: str = "") -> None:
        """Read again now: that partition (a "ready" from it, naming ``job``, which the
        read then claims too if it reads it), or all of them."""
        if partition is None:
            self._wake_all = True
        else:
            self._woken.add(partition)
            if job and len(job) <= scripts.READY_NAME_LIMIT:  # longer: not a write script's
                self._hints[partition] = job
        self._wake.set()

    def _woken_now(self, only: set[str] | None) -> set[str] | None:
        """The partitions to read next: ``only`` (None: all) with the wake-ups since."""
        woken, everything = self._woken, self._wake_all
        self._woken, self._wake_all = set(), False
        if everything or only is None:
            return None
        return only | woken

    async def _idle(self) -> set[str] | None:
        """Wait for a wake-up (unless one came meanwhile): the partitions to read next."""
        if not self._woken and not self._wake_all:
            with anyio.move_on_after(self._idle_wait) as waited:
                await self._wake.wait()
            if waited.cancelled_caught:  # the fallback: read everything
                self._woken_now(None)
                return None
        return self._woken_now(set()) or None

    async def until_woken_or(self, other: Callable[[], Awaitable[object]]) -> None:
        """Wait until ``other()`` returns, a wake-up comes (a "ready": a job to read,
        also while every job that runs waits for it), or the fallback wait passes."""
        if self._woken or self._wake_all or self._wake.is_set():
            return
        wake = self._wake
        with anyio.move_on_after(self._idle_wait):
            async with anyio.create_task_group() as tg:

                async def first(wait: Callable[[], Awaitable[object]]) -> None:
                    await wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(first, other)
                tg.start_soon(first, wake.wait)

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
        only: set[str] | None = None  # the partitions that sent "ready" (None: all)
        while not stopping():
            pause = self._paused_until - time.monotonic()
            if pause > 0:  # the last claims failed: back off
                await anyio.sleep(pause)
                continue
            if self._slots.readable <= 0:
                await self._slots.changed()
                continue
            only = self._woken_now(only)
            parts = self._partitions()
            if only is not None:
                parts = [(q, keys) for q, keys in parts if keys.prefix in only] or parts
            if not unasked:
                unasked = {keys.prefix for _, keys in parts}
            self._wake = anyio.Event()
            got, asked, emptied = await self._round(parts, claims)
            unasked -= asked
            if got:
                unasked = set()
            if (got and not (emptied and drained is None)) or unasked or stopping():
                continue
            only = None
            if drained is not None:
                if await drained():
                    return
                continue
            only = await self._idle()

    async def _round(
        self, parts: list[tuple[Queue, QueueKeys]], claims: TaskGroup
    ) -> tuple[int, set[str], bool]:
        """One read; its claims run in ``claims``: (entries read, partitions asked,
        whether the read emptied its one partition: fetch.lua read fewer entries than
        asked for with every level open, so it marked the partition idle and the next
        enqueue into it publishes "ready"; reading it again at once would find nothing)."""
        free = self._slots.readable
        if free >= 2 * len(parts):  # half the slots, if each partition still gets one
            free = min(free, self._chunk)
        self._slots.take(free)
        try:
            plan = await self._plan(parts, free)
            fetched = await self._fetch(plan)
            reachable()
        except REDIS_ERRORS as exc:
            self._slots.release(free)
            report("reading jobs", exc)
            await anyio.sleep(CLAIM_BACKOFF)
            return 0, set(), False
        except BaseException:
            self._slots.release(free)
            raise
        if len(fetched) > free:  # a take.lua repeated after a lost reply: a full read and
            self._slots.take(len(fetched) - free)  # the job its first run claimed
        else:
            self._slots.release(free - len(fetched))
        if len(parts) > 1 and plan and not fetched:
            return 0, set(), False  # another worker read what we saw first: look again
        asked = {keys.prefix for _, keys in parts}
        if len(fetched) >= free:  # a full read: the next one overlaps these claims
            claims.start_soon(self._claim_and_deliver, fetched)
        elif fetched:  # drained: no read follows, so claim now (one task hop sooner)
            await self._claim_and_deliver(fetched)
        return len(fetched), asked, len(parts) == 1 and len(fetched) < free

    async def _claim_and_deliver(self, fetched: list[Fetched]) -> None:
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

    async def _plan(self, parts: list[tuple[Queue, QueueKeys]], free: int) -> list[Planned]:
        """What to read of each partition: of one, ``free`` entries in fetch.lua's
        order; of several, the entries chosen after a look at all (``_peek``)."""
        if len(parts) == 1:
            q, keys = parts[0]
            return [(q, keys, free, None)]
        return await self._peek(parts, free)

    async def _fetch(self, plan: list[Planned]) -> list[Fetched]:
        """The entries read: (queue, partition, stream, entry id, fields, and its claim
        when the read made it: the job a "ready" named)."""
        env = self._env()
        calls = []
        tokens = []
        for q, keys, count, caps in plan:
            aged = 0 if caps is not None else self._turns.reserved(count)
            streams = q.streams(keys)
            call = scripts.fetch(
                env, keys, streams, self._consumer, count, self._aging_ms, aged, caps
            )
            hint, token = self._hints.pop(keys.prefix, None), ""
            if hint is not None:  # a "ready" named a job of this partition: claim it too
                token = new_tokens(1)[0]
                call = scripts.take(
                    call, keys, hint, token, self._max_deliveries, self._max_payload
                )
            calls.append(call)
            tokens.append(token)
        replies = await scripts.run_many(self._redis, calls, raise_on_error=False)
        found: list[Fetched] = []
        missing_groups = []
        failed: list[Exception] = []
        for (q, keys, _, _), token, reply in zip(plan, tokens, replies, strict=True):
            if isinstance(reply, ResponseError) and "NOGROUP" in str(reply):
                missing_groups.append((q, keys))
                continue
            if wrong_type(reply):  # hostile: this partition cannot be read; the rest can
                report(f"reading jobs of {keys.prefix}", reply)
                continue
            if isinstance(reply, Exception):
                failed.append(reply)
                continue
            if not reply or reply == ["paused"]:
                continue
            streams = q.streams(keys)
            for level_index, entry_id, flat, *taken in reply:
                stream = streams[int(level_index) - 1]
                took = (token, taken[0]) if taken else None
                found.append((q, keys, stream, str(entry_id), _fields(flat), took))
        self._turns.took(len(found))
        return await self._after_read(found, failed, missing_groups)

    async def _after_read(
        self,
        found: list[Fetched],
        failed: list[Exception],
        missing_groups: list[tuple[Queue, QueueKeys]],
    ) -> list[Fetched]:
        """Recreate missing groups; raise the first failure of a partition's read, unless
        a job was claimed in its read: that job runs whatever failed beside it (dropped,
        it would sit "running" until a reclaim counted an attempt it never had)."""
        try:
            if failed:
                raise failed[0]
            await self._recreate(missing_groups)
        except REDIS_ERRORS as exc:
            if not _any_taken(found):
                raise  # the round fails: what was read is requeued after stale_after
            return self._only_taken(found, "reading jobs", exc)
        return found

    def _only_taken(self, fetched: list[Fetched], where: str, exc: Exception) -> list[Fetched]:
        """After a failure beside jobs claimed in their read: report it, back off, and
        keep those jobs (the other entries stay pending: requeued after stale_after)."""
        report(where, exc)
        self._paused_until = time.monotonic() + CLAIM_BACKOFF
        return [item for item in fetched if item[5] is not None]

    async def _peek(self, parts: list[tuple[Queue, QueueKeys]], free: int) -> list[Planned]:
        """With several partitions: look at the unread entries of each and plan the
        reads by the fairness rule (taskrunner.worker.order)."""
        env = self._env()
        heads = self._turns.reserved(free) > 0
        calls = [scripts.peek(env, keys, q.streams(keys), free, heads=heads) for q, keys in parts]
        replies = await scripts.run_many(self._redis, calls, raise_on_error=False)
        seen: list[tuple[int, int, list[list[str]]]] = []  # (partition, now, ids per level)
        missing_groups = []
        for index, ((q, keys), reply) in enumerate(zip(parts, replies, strict=True)):
            if wrong_type(reply):  # hostile: this partition cannot be read; the rest can
                report(f"reading jobs of {keys.prefix}", reply)
                continue
            if isinstance(reply, Exception):
                raise reply
            if reply == ["nogroup"]:
                missing_groups.append((q, keys))
            elif reply and reply != ["paused"]:
                seen.append((index, int(reply[0]), [list(r) for r in reply[1:]]))
        await self._recreate(missing_groups)
        nows = order.one_clock(
            [now for _, now, _ in seen], [self._server_of(parts[i][1]) for i, _, _ in seen]
        )
        unread = [
            item
            for (index, _, levels), now in zip(seen, nows, strict=True)
            for item in order.unread_of(index, now, levels)
        ]
        chosen = order.choose(unread, free, self._aging_ms, self._turns)
        counts = order.caps(chosen, len(parts), max(len(q.levels) for q, _ in parts))
        return [
            (q, keys, sum(counts[i]), counts[i][: len(q.levels)])
            for i, (q, keys) in enumerate(parts)
            if sum(counts[i])
        ]

    def _server_of(self, keys: QueueKeys) -> str:
        """The server (its clock) that answers for a partition: "" for the one server of
        a standalone or Sentinel deployment, the node's name on a Cluster (while a slot
        is not covered, the partition counts as a server of its own)."""
        if not isinstance(self._redis, RedisCluster):
            return ""
        try:
            node = self._redis.get_node_from_key(keys.idle)
        except SlotNotCoveredError:
            return keys.prefix
        return node.name if node is not None else keys.prefix

    async def _recreate(self, missing_groups: list[tuple[Queue, QueueKeys]]) -> None:
        if missing_groups:
            logger.warning(
                "consumer group missing on %s (redis restarted without persistence?); "
                "recreating it from id 0",
                ", ".join(keys.prefix for _, keys in missing_groups),
            )
            await ensure_groups(self._redis, missing_groups)

    async def _claim(self, fetched: list[Fetched]) -> list[Claimed]:
        """Claim the entries read (those claimed in their read already are not claimed
        again): the jobs to run."""
        env = self._env()
        calls = []
        left = [item for item in fetched if item[5] is None]
        tokens = new_tokens(len(left))
        for (_, keys, stream, entry_id, fields, _), token in zip(left, tokens, strict=True):
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
        try:
            replies = await scripts.run_many(self._redis, calls, raise_on_error=False)
        except REDIS_ERRORS as exc:
            if not _any_taken(fetched):
                raise  # nothing claimed: the caller backs off
            replies = [exc] * len(calls)
        if calls and all(isinstance(r, Exception) for r in replies):
            if not _any_taken(fetched):
                raise replies[0]  # nothing claimed: the caller backs off
            fetched = self._only_taken(fetched, "claiming jobs", replies[0])
            tokens, replies = [], []
        return await self._outcomes(fetched, iter(zip(tokens, replies, strict=True)))

    async def _outcomes(
        self, fetched: list[Fetched], answers: Iterator[tuple[str, Any]]
    ) -> list[Claimed]:
        """The jobs to run of the entries read, from each one's claim (made in its read,
        else the next of ``answers``)."""
        claimed = []
        for q, keys, stream, entry_id, fields, taken in fetched:
            token, reply = taken or next(answers)
            if isinstance(reply, Exception):  # this one only; it stays pending, requeued
                logger.error(
                    "could not claim stream entry %s of %s (%s)",
                    entry_id,
                    keys.prefix,
                    excerpt(str(reply)),
                )
                continue
            if str(reply[0]) in ("missing", "invalid", "wrongtype"):
                try:
                    await self._dead_letter(keys, stream, entry_id, fields, reply)
                except REDIS_ERRORS as exc:  # it stays pending: dead-lettered after a reclaim
                    report("dead-lettering an entry", exc)
                continue
            item = self._claimed(q, keys, stream, entry_id, fields, token, reply)
            if item is not None:
                claimed.append(item)
        return claimed

    async def _dead_letter(
        self,
        keys: QueueKeys,
        stream: str,
        entry_id: str,
        fields: dict[str, str],
        reply: list[Any],
    ) -> None:
        """An entry claim.lua found no runnable job for ("missing", "invalid",
        "wrongtype")."""
        verdict = str(reply[0])
        why = {
            "missing": "has no job",
            "wrongtype": "names a job whose key is not a hash",
        }.get(verdict) or f"names a job with status {reply[1]!r}"
        await dead_letter_entry(
            self._redis, self._env(), keys, stream, entry_id, fields, why, fields.get("job")
        )

    def _claimed(
        self,
        q: Queue,
        keys: QueueKeys,
        stream: str,
        entry_id: str,
        fields: dict[str, str],
        token: str,
        reply: list[Any],
    ) -> Claimed | None:
        """The held job of a claim's reply (None: nothing to run)."""
        verdict = str(reply[0])
        job_id = fields.get("job") or f"entry-{entry_id}"
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
            locks=keys.own_locks(str(reply[4])),
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
        if wrong_type(reply):  # hostile: that stream's key holds another type
            report("creating a consumer group", reply)  # its reads fail and are reported
            continue
        if isinstance(reply, Exception):
            raise reply
