"""Listing jobs, page by page, from the structures kept per partition and status.

Each status of a queue is read from ordered sources, one per partition (and, for the
streams, per priority level), a bounded slice at a time; nothing here scans the key
space:

    queued     each level stream, after the group's last-delivered id  oldest first
    running    each level stream's pending entries (XPENDING)           oldest first
    scheduled  the delayed set                                         soonest due first
    succeeded, failed, aborted, rejected
               the finished-job index of that status                   newest first
               (members older than ``result_ttl`` are left out)
    dead       the dead letters                                        newest first

The sources of one status are merged in that order (entry ids and scores are times),
so a page of a queue with 16 partitions reads like a page of one. A listing without a
status walks the statuses in the order above; without a queue, the queues in turn.
The cursor is opaque: base64 JSON of the queue, the status and the position in each
of its sources, so pages never repeat or skip while jobs keep arriving. The job hash
is the authority: an id whose hash has another status now (or expired) is skipped.
With a task or priority filter, at most ``EXAMINE_BUDGET`` candidates are looked at
per call, so a page may hold fewer than ``limit`` jobs and still carry a cursor.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

from redis.asyncio import Redis

from taskrunner import scripts
from taskrunner.admin.models import info_of
from taskrunner.exceptions import TaskrunnerError
from taskrunner.job import ErrorInfo, JobInfo, JobStatus, safe_text
from taskrunner.keys import GROUP, Queue, QueueKeys
from taskrunner.worker.scheduler import parse_member

STATUS_ORDER = (
    JobStatus.QUEUED,
    JobStatus.RUNNING,
    JobStatus.SCHEDULED,
    JobStatus.FAILED,
    JobStatus.DEAD,
    JobStatus.SUCCEEDED,
    JobStatus.ABORTED,
    JobStatus.REJECTED,
)
MAX_LIMIT = 1000
EXAMINE_BUDGET = 5000
"""Candidates looked at per call when a filter drops most of them."""
FILTERED_READ = 500
"""Candidates read per source at a time with a filter."""
FIELDS = (
    "status",
    "task",
    "queue",
    "attempts",
    "enqueued",
    "due",
    "started",
    "finished",
    "error",
    "worker",
    "reclaims",
    "reschedules",
    "abort",
    "level",
    "crashes",
    "progress",
)


class CursorError(ValueError):
    """The cursor was not made by this listing (or by another filter)."""


def encode_cursor(queue: str, status: str, positions: dict[str, str]) -> str:
    kept = {name: at for name, at in positions.items() if at}
    raw = json.dumps([queue, status, kept], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, str, dict[str, str]]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError, RecursionError) as exc:
        raise CursorError(f"invalid cursor {cursor[:40]!r}") from exc
    if not (
        isinstance(value, list)
        and len(value) == 3
        and isinstance(value[0], str)
        and isinstance(value[1], str)
        and isinstance(value[2], dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in value[2].items())
    ):
        raise CursorError(f"invalid cursor {cursor[:40]!r}")
    return value[0], value[1], value[2]


@dataclass(frozen=True, slots=True)
class Filters:
    """What a listed job must match besides its status."""

    task: str | None = None
    priority: str | None = None
    default_level: str = "default"

    @property
    def active(self) -> bool:
        return self.task is not None or self.priority is not None

    def match(self, state: dict[str, str]) -> bool:
        if self.task is not None and state.get("task") != self.task:
            return False
        level = state.get("level") or self.default_level
        return self.priority is None or level == self.priority


@dataclass(slots=True)
class Item:
    """A candidate: its job id, where it sorts among all sources, and the position of
    its source right after it."""

    job_id: str
    order: tuple[float, float, int, int]
    after: str


@dataclass(slots=True)
class Source:
    """One ordered source of job ids: a level stream (queued, running) or a sorted set."""

    name: str
    """Its name in the cursor: ``<partition>`` or ``<partition>:<level>``."""
    keys: QueueKeys
    status: JobStatus
    key: str
    rank: int
    floor: float = float("-inf")
    """Sorted sets: the lowest score listed (finished jobs older than result_ttl)."""
    buffer: deque[Item] = field(default_factory=deque)
    more: bool = True
    read_count: int = 0

    @property
    def descending(self) -> bool:
        return self.status not in (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.SCHEDULED)


def sources(
    q: Queue, parts: Sequence[QueueKeys], status: JobStatus, filters: Filters, now_ms: int, ttl: int
) -> list[Source]:
    """The sources of one status of one queue, in a fixed order (their rank)."""
    found: list[Source] = []
    if status in (JobStatus.QUEUED, JobStatus.RUNNING):
        levels = [lv for lv in q.levels if filters.priority in (None, lv)]
        for keys in parts:
            for level in levels:
                name = f"{keys.partition}:{level}"
                found.append(Source(name, keys, status, keys.level_stream(level), len(found)))
        return found
    for keys in parts:
        key, floor = _sorted_key(keys, status, now_ms - ttl)
        found.append(Source(str(keys.partition), keys, status, key, len(found), floor))
    return found


def _sorted_key(keys: QueueKeys, status: JobStatus, floor: int) -> tuple[str, float]:
    if status == JobStatus.SCHEDULED:
        return keys.delayed, float("-inf")
    if status == JobStatus.DEAD:
        return keys.dead, float("-inf")
    index = {
        JobStatus.SUCCEEDED: keys.succeeded,
        JobStatus.FAILED: keys.failed,
        JobStatus.ABORTED: keys.aborted,
        JobStatus.REJECTED: keys.rejected,
    }
    return index[status], float(floor)


# -- reading slices of many sources in few round trips ------------------------------------


def _entry_order(entry_id: str) -> tuple[float, float]:
    ms, _, seq = entry_id.partition("-")
    try:
        return float(ms), float(seq or 0)
    except ValueError:
        return 0.0, 0.0


def _score_position(position: str) -> tuple[str, int]:
    """``"score:skip"``: resume at ``score``, past ``skip`` members that have it."""
    if not position:
        return "", 0
    score, _, skip = position.rpartition(":")
    try:
        float(score)
        return score, int(skip)
    except ValueError:
        raise CursorError(f"invalid cursor position {position!r}") from None


async def read(redis: Redis, wanted: list[tuple[Source, str, int]]) -> None:
    """Fill each source's buffer with up to ``count`` candidates after ``position``
    (three pipelined round trips at most, however many sources)."""
    unread_starts = await _unread_starts(redis, [(s, p) for s, p, _ in wanted])
    pipe = cast(Any, redis.pipeline(transaction=False))
    for source, position, count in wanted:
        if source.status == JobStatus.QUEUED:
            start = position or unread_starts[source.name]
            pipe.xrange(source.key, f"({start}", "+", count=count)
        elif source.status == JobStatus.RUNNING:
            pipe.xpending_range(source.key, GROUP, f"({position}" if position else "-", "+", count)
        else:
            _sorted_read(pipe, source, position, count)
    replies = _absent_as_none(await pipe.execute(raise_on_error=False))
    running = [
        (source, reply)
        for (source, _, _), reply in zip(wanted, replies, strict=True)
        if source.status == JobStatus.RUNNING and isinstance(reply, list)
    ]
    jobs_of = await _pending_jobs(redis, running)
    for (source, position, count), reply in zip(wanted, replies, strict=True):
        rows = reply if isinstance(reply, list) else []  # no stream or group yet: none
        if source.status == JobStatus.QUEUED:
            items = [
                _stream_item(source, entry_id, fields.get("job", "")) for entry_id, fields in rows
            ]
        elif source.status == JobStatus.RUNNING:
            ids = [str(p["message_id"]) for p in rows]
            items = [_stream_item(source, i, jobs_of.get((source.key, i), "")) for i in ids]
        else:
            items = _sorted_items(source, position, rows)
        source.buffer.extend(items)
        source.more = len(rows) == count


async def _unread_starts(redis: Redis, wanted: list[tuple[Source, str]]) -> dict[str, str]:
    """Where the unread entries of each queued source begin (its group's last-delivered
    id), for those read from their start."""
    first = [s for s, position in wanted if s.status == JobStatus.QUEUED and not position]
    if not first:
        return {}
    pipe = cast(Any, redis.pipeline(transaction=False))
    for source in first:
        pipe.xinfo_groups(source.key)
    starts = {}
    replies = _absent_as_none(await pipe.execute(raise_on_error=False))
    for source, groups in zip(first, replies, strict=True):
        starts[source.name] = "0-0"  # no stream or no group yet: every entry is unread
        for group in groups if isinstance(groups, list) else []:
            if group.get("name") == GROUP:
                starts[source.name] = str(group.get("last-delivered-id") or "0-0")
    return starts


def _absent_as_none(replies: list[Any]) -> list[Any]:
    """Replies with a missing stream or group (nothing there yet) as None; any other
    error, a key of the wrong type above all, is raised: an empty listing would hide it."""
    for reply in replies:
        if isinstance(reply, Exception) and not _absent(reply):
            raise reply
    return [None if isinstance(reply, Exception) else reply for reply in replies]


def _absent(error: Exception) -> bool:
    text = str(error)
    return text.startswith("NOGROUP") or "no such key" in text.lower()


async def _pending_jobs(
    redis: Redis, running: list[tuple[Source, list[Any]]]
) -> dict[tuple[str, str], str]:
    """The job id of each pending entry: ``{(stream, entry id): job id}``."""
    wanted = [(s.key, str(p["message_id"])) for s, rows in running for p in rows]
    if not wanted:
        return {}
    pipe = redis.pipeline(transaction=False)
    for stream, entry_id in wanted:
        pipe.xrange(stream, entry_id, entry_id)
    found = {}
    for (stream, entry_id), rows in zip(wanted, await pipe.execute(), strict=True):
        found[(stream, entry_id)] = rows[0][1].get("job", "") if rows else ""
    return found


def _stream_item(source: Source, entry_id: str, job_id: str) -> Item:
    ms, seq = _entry_order(entry_id)
    source.read_count += 1
    return Item(job_id, (ms, seq, source.rank, source.read_count), entry_id)


def _sorted_read(pipe: Any, source: Source, position: str, count: int) -> None:
    score, skip = _score_position(position)
    if source.descending:
        pipe.zrevrangebyscore(
            source.key, score or "+inf", source.floor, start=skip, num=count, withscores=True
        )
    else:
        pipe.zrangebyscore(
            source.key, score or "-inf", "+inf", start=skip, num=count, withscores=True
        )


def _sorted_items(source: Source, position: str, rows: list[tuple[str, float]]) -> list[Item]:
    score, skip = _score_position(position)
    current = float(score) if score else None
    items = []
    for member, value in rows:
        if value == current:
            skip += 1
        else:
            current, skip = value, 1
        job_id = parse_member(member)[1] if source.status == JobStatus.SCHEDULED else member
        source.read_count += 1
        order = (-value if source.descending else value, 0.0, source.rank, source.read_count)
        items.append(Item(job_id, order, f"{format(value, '.17g')}:{skip}"))
    return items


# -- job states ---------------------------------------------------------------------------


async def states(
    redis: Redis, wanted: Sequence[tuple[QueueKeys, str]], fields: Sequence[str] = FIELDS
) -> list[dict[str, str]]:
    """The listed fields of each ``(partition, job id)`` (empty for a job whose hash
    is gone; ``{UNREADABLE: reason}`` for a key that is not a hash), in one pipelined
    round trip."""
    if not wanted:
        return []
    pipe = redis.pipeline(transaction=False)
    for keys, job_id in wanted:
        pipe.hmget(keys.job(job_id), fields)
    rows: list[Any] = await pipe.execute(raise_on_error=False)
    return [_state(fields, row) for row in rows]


UNREADABLE = "\0unreadable"
"""The key of a state read from a job key that is not a hash (no field is named so)."""


def _state(fields: Sequence[str], row: Any) -> dict[str, str]:
    if isinstance(row, Exception):
        return {UNREADABLE: safe_text(str(row), 200)}
    return {f: v for f, v in zip(fields, row, strict=True) if v is not None}


def unreadable(job_id: str, queue: str, status: JobStatus, reason: str) -> JobInfo:
    """A listed job whose record cannot be read: still listed (and removable), with
    ``reason`` as its error."""
    return JobInfo(
        id=safe_text(job_id, 200),
        task="",
        queue=queue,
        status=status,
        attempts=0,
        enqueued_at=datetime.fromtimestamp(0, UTC),
        error=ErrorInfo(type="taskrunner.UnreadableJob", message=f"unreadable job: {reason}"),
    )


def to_info(
    job_id: str, state: dict[str, str], status: JobStatus | None = None, queue: str = ""
) -> JobInfo | None:
    """A listed job's info; None when it has no status (never raises). A record that
    cannot be read is described by its error when ``status`` (the listing's) is given."""
    reason = state.get(UNREADABLE)
    if reason is None and state.get("status"):
        try:
            return info_of(job_id, state)
        except (TaskrunnerError, ValueError, KeyError) as exc:
            reason = safe_text(str(exc), 200)
    if reason is None or status is None:
        return None
    return unreadable(job_id, queue, status, reason)


# -- one status of one queue, merged over its sources ---------------------------------------


class Merge:
    """Reads the sources of one status from their positions and takes their candidates
    in merged order until the page is full, the budget is spent, or they run out."""

    def __init__(self, redis: Redis, sources: list[Source], positions: dict[str, str]) -> None:
        unknown = set(positions) - {s.name for s in sources}
        if unknown:
            raise CursorError("the cursor belongs to another queue, status or filter")
        self.redis = redis
        self.sources = sources
        self.positions = {s.name: positions.get(s.name, "") for s in sources}

    async def run(
        self, found: list[JobInfo], limit: int, filters: Filters, budget: list[int]
    ) -> bool:
        """Append to ``found``; True when every source is exhausted."""
        while len(found) < limit and budget[0] > 0:
            count = limit - len(found)
            if filters.active:
                count = max(count, FILTERED_READ)
            empty = [s for s in self.sources if not s.buffer and s.more]
            if empty:
                await read(self.redis, [(s, self.positions[s.name], count) for s in empty])
            batch = self._pop(count)
            if not batch:
                return True
            taken = await self._take(batch, found, limit, filters, budget)
            if taken < len(batch):
                return False
        return not any(s.buffer or s.more for s in self.sources)

    def _pop(self, count: int) -> list[tuple[Source, Item]]:
        """Up to ``count`` candidates in merged order, stopping where a source that has
        more must be read again before the next one can be chosen."""
        batch: list[tuple[Source, Item]] = []
        while len(batch) < count:
            ready = [s for s in self.sources if s.buffer]
            if not ready or any(not s.buffer and s.more for s in self.sources):
                break
            best = min(ready, key=lambda s: s.buffer[0].order)
            batch.append((best, best.buffer.popleft()))
        return batch

    async def _take(
        self,
        batch: list[tuple[Source, Item]],
        found: list[JobInfo],
        limit: int,
        filters: Filters,
        budget: list[int],
    ) -> int:
        """Check each candidate against its job hash, in order; returns how many were
        looked at (the rest are left for the next page)."""
        found_states = await self._states(batch, filters)
        for index, ((source, item), state) in enumerate(zip(batch, found_states, strict=True)):
            budget[0] -= 1
            self.positions[source.name] = item.after
            if item.job_id and _listed(state, source.status) and filters.match(state):
                info = to_info(item.job_id, state, source.status, source.keys.queue)
                if info is not None:
                    found.append(info)
            if len(found) >= limit or budget[0] <= 0:
                return index + 1
        return len(batch)

    async def _states(
        self, batch: list[tuple[Source, Item]], filters: Filters
    ) -> list[dict[str, str]]:
        """Each candidate's listed fields; with a filter, the server picks the matches
        first (match.lua) and only theirs are read (the others read as empty)."""
        wanted = [(s.keys, item.job_id) for s, item in batch]
        if not filters.active:
            return await states(self.redis, wanted)
        matching = await _matching(self.redis, batch, filters)
        found: list[dict[str, str]] = [{} for _ in batch]
        full = await states(self.redis, [wanted[i] for i in matching])
        for i, state in zip(matching, full, strict=True):
            found[i] = state
        return found


async def _matching(redis: Redis, batch: list[tuple[Source, Item]], filters: Filters) -> list[int]:
    """The positions in ``batch`` of the candidates that match (one script call per
    partition, in one round trip)."""
    by_part: dict[str, list[int]] = {}
    for index, (source, item) in enumerate(batch):
        if item.job_id:
            by_part.setdefault(source.keys.prefix, []).append(index)
    calls = []
    for positions in by_part.values():
        source = batch[positions[0]][0]
        ids = [batch[i][1].job_id for i in positions]
        status = source.status.value
        calls.append(
            scripts.match(source.keys, ids, status, filters.task or "", filters.priority or "")
        )
    replies = await scripts.run_many(redis, calls, raise_on_error=False)
    found: list[int] = []
    for positions, reply in zip(by_part.values(), replies, strict=True):
        if isinstance(reply, Exception):  # a job key that is not a hash: judge here
            found += await _matching_here(redis, [batch[i] for i in positions], positions, filters)
        else:
            found += [positions[int(p) - 1] for p in reply]
    return sorted(found)


async def _matching_here(
    redis: Redis, batch: list[tuple[Source, Item]], positions: list[int], filters: Filters
) -> list[int]:
    """``_matching`` of one partition decided here (when its script call failed)."""
    found = await states(redis, [(s.keys, item.job_id) for s, item in batch])
    return [
        index
        for index, (source, _), state in zip(positions, batch, found, strict=True)
        if state.get("status") == source.status.value and filters.match(state)
    ]


def _listed(state: dict[str, str], status: JobStatus) -> bool:
    """Whether a candidate's state belongs on this listing: its record has this status
    now, or it cannot be read at all (shown with the reason rather than hidden)."""
    return UNREADABLE in state or state.get("status") == status.value


# -- a page over queues and statuses --------------------------------------------------------


@dataclass(slots=True)
class Group:
    """One status of one queue, with its sources."""

    queue: str
    status: JobStatus
    sources: list[Source]


async def page(
    redis: Redis, groups: list[Group], filters: Filters, limit: int, cursor: str | None
) -> tuple[list[JobInfo], str | None]:
    """One page over ``groups`` in order, from ``cursor``; the jobs and the next cursor."""
    start, positions = _start(groups, cursor)
    found: list[JobInfo] = []
    budget = [EXAMINE_BUDGET if filters.active else limit + EXAMINE_BUDGET]
    for index in range(start, len(groups)):
        group = groups[index]
        merge = Merge(redis, group.sources, positions if index == start else {})
        exhausted = await merge.run(found, limit, filters, budget)
        if not exhausted:
            return found, encode_cursor(group.queue, group.status.value, merge.positions)
        if len(found) >= limit or budget[0] <= 0:
            following = groups[index + 1] if index + 1 < len(groups) else None
            if following is None:
                return found, None
            return found, encode_cursor(following.queue, following.status.value, {})
    return found, None


def _start(groups: list[Group], cursor: str | None) -> tuple[int, dict[str, str]]:
    if not cursor:
        return 0, {}
    queue, status, positions = decode_cursor(cursor)
    for index, group in enumerate(groups):
        if group.queue == queue and group.status.value == status:
            return index, positions
    raise CursorError("the cursor belongs to another queue or status filter")
