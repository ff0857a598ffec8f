"""Dead letters: jobs that will not run again on their own, kept with the reason.

A job goes to its queue's dead letters (``{ns}:{queue}:dead``, a sorted set of job ids
scored by the time they died, in ms; the job hash stays, without expiry) when its
stream entry was delivered more than ``max_deliveries`` times (it keeps killing or
stalling its workers), when no task of its name is declared in the worker, when its
payload cannot be decoded or validated, or when a stream entry carries no job at all
(then the dead letter is ``entry-<stream id>``). The reason is the job's error message.

The store is bounded: :func:`trim_dead` removes the dead letters older than
``dead_letter_ttl`` and the oldest beyond ``dead_letter_limit`` (``TaskRunner``
settings, 30 days and 10,000 per queue by default), with their job hashes. Every
operation here works in bounded steps, so no script call holds Redis for long however
many dead letters there are: a page reads at most ``MAX_PAGE`` ids, and retry, delete,
purge and trim change at most ``BATCH`` ids per script call.

Each function takes one queue's ``QueueKeys`` (one key group, one Cluster slot), so a
caller can run it over every key group (partition) of a queue.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, cast

from redis.asyncio import Redis

from taskrunner import scripts
from taskrunner.clock import Clock
from taskrunner.job import ErrorInfo, JobInfo, JobStatus, safe_text
from taskrunner.keys import DEFAULT_PRIORITIES, QueueKeys

__all__ = [
    "BATCH",
    "DEFAULT_PAGE",
    "MAX_PAGE",
    "DeadLetters",
    "delete_dead",
    "list_dead",
    "page",
    "purge_dead",
    "retry_all",
    "retry_ids",
    "trim_dead",
]

BATCH = 100
"""Ids changed per script call by retry, delete, purge and trim (1.5 ms of server CPU
per call on average for retry, the costliest; measured in docs/reliability.md)."""
DEFAULT_PAGE = 100
"""Dead letters per page by default."""
MAX_PAGE = 1000
"""The largest page: one script call and one pipeline of that many HGETALLs."""
_ENV = scripts.Env()
"""PUBLISH and the server's clock (a runner passes its own: SPUBLISH on a cluster)."""
_NO_COUNT_RULE = 2**53
"""``keep`` for the purge script when only the age counts."""


class DeadLetters(list[JobInfo]):
    """One page of dead letters: a list of ``JobInfo`` (oldest first within each queue;
    the reason is ``info.error.message``), and ``next_cursor``, the cursor of the next
    page, or None when this is the last."""

    def __init__(self, items: Iterable[JobInfo] = (), next_cursor: str | None = None) -> None:
        super().__init__(items)
        self.next_cursor = next_cursor


# -- cursors ----------------------------------------------------------------------------


def encode_cursor(queue: str, job_id: str, score: int) -> str:
    """An opaque cursor: after ``job_id`` (dead at ``score`` ms) of ``queue``."""
    raw = json.dumps([queue, job_id, score], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, str, int]:
    """``(queue, job_id, score)``; raises ``ValueError`` for a cursor we did not make."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        queue, job_id, score = json.loads(raw)
        valid = isinstance(queue, str) and isinstance(job_id, str) and isinstance(score, int)
    except (ValueError, TypeError, binascii.Error, RecursionError):
        valid = False
    if not valid:
        raise ValueError(f"invalid dead-letter cursor {cursor[:40]!r}")
    return queue, job_id, score


# -- listing ----------------------------------------------------------------------------


async def page(
    redis: Redis, keys: QueueKeys, *, limit: int, after: tuple[str, int] | None = None
) -> list[tuple[str, int]]:
    """Up to ``limit`` (at most ``MAX_PAGE`` + 1, so a caller can tell whether another
    page follows) dead letters of one key group as ``(job_id, died_at_ms)``, oldest
    first, after the ``(job_id, died_at_ms)`` cursor."""
    count = max(1, min(limit, MAX_PAGE + 1))
    after_id, after_score = after if after is not None else ("", 0)
    flat = await scripts.run(redis, scripts.page(keys, after_id, after_score, count))
    return [(str(flat[i]), _score_ms(flat[i + 1])) for i in range(0, len(flat), 2)]


_SCORE_LIMIT = 2**63
"""Where an infinite score is clamped to in a cursor (beyond any real time in ms)."""


def _score_ms(score: str | float) -> int:
    """A dead letter's score as whole ms; a hostile infinite one is clamped to
    ``±_SCORE_LIMIT`` (a page resuming from there may repeat it, never skip one)."""
    value = float(score)
    if math.isinf(value):
        return _SCORE_LIMIT if value > 0 else -_SCORE_LIMIT
    return int(value)


async def infos(redis: Redis, keys: QueueKeys, job_ids: Sequence[str]) -> list[JobInfo]:
    """The ``JobInfo`` of these dead letters (one pipelined round trip); a job hash that
    is gone is skipped, one that cannot be read (or whose key is not a hash) is
    described by its error."""
    pipe = redis.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.hgetall(keys.job(job_id))
    states: list[Any] = await pipe.execute(raise_on_error=False)
    return [
        _info(job_id, keys.queue, state)
        for job_id, state in zip(job_ids, states, strict=True)
        if state
    ]


def _info(job_id: str, queue: str, state: dict[str, str] | Exception) -> JobInfo:
    if isinstance(state, Exception):  # a job key that is not a hash
        return _unreadable(job_id, queue, "", state)
    try:
        return JobInfo.from_hash(job_id, state)
    except Exception as exc:  # noqa: BLE001 - hostile bytes: still listed, still removable
        return _unreadable(job_id, queue, state.get("task", ""), exc)


def _unreadable(job_id: str, queue: str, task: str, exc: Exception) -> JobInfo:
    return JobInfo(
        id=safe_text(job_id, 200),
        task=safe_text(task, 200),
        queue=queue,
        status=JobStatus.DEAD,
        attempts=0,
        enqueued_at=datetime.fromtimestamp(0, UTC),
        error=ErrorInfo(
            type="taskrunner.UnreadableJob",
            message=f"unreadable job: {type(exc).__name__}: {safe_text(str(exc), 200)}",
        ),
    )


async def list_dead(
    redis: Redis,
    key_groups: Sequence[QueueKeys],
    *,
    limit: int = DEFAULT_PAGE,
    cursor: str | None = None,
) -> DeadLetters:
    """One page of at most ``limit`` dead letters over ``key_groups`` in order (a page
    may span groups), and the cursor of the next page.

    Raises:
        ValueError: ``limit`` is not from 1 to ``MAX_PAGE``, or ``cursor`` is not one
            this function returned for these key groups.
    """
    if not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit must be from 1 to {MAX_PAGE}, got {limit}")
    start, after = _resume(key_groups, cursor)
    found = DeadLetters()
    for keys in key_groups[start:]:
        rows = await page(redis, keys, limit=limit - len(found) + 1, after=after)
        after = None
        more = len(rows) > limit - len(found)
        rows = rows[: limit - len(found)]
        found.extend(await infos(redis, keys, [job_id for job_id, _ in rows]))
        if more:
            last_id, last_score = rows[-1]
            found.next_cursor = encode_cursor(_group_name(keys), last_id, last_score)
            return found
        if len(found) >= limit:
            found.next_cursor = _next_group_cursor(key_groups, keys)
            return found
    return found


def _group_name(keys: QueueKeys) -> str:
    return keys.dead


def _resume(
    key_groups: Sequence[QueueKeys], cursor: str | None
) -> tuple[int, tuple[str, int] | None]:
    if cursor is None:
        return 0, None
    group, job_id, score = decode_cursor(cursor)
    names = [_group_name(keys) for keys in key_groups]
    if group not in names:
        raise ValueError(f"the dead-letter cursor {cursor[:40]!r} is for another queue")
    return names.index(group), ((job_id, score) if job_id else None)


def _next_group_cursor(key_groups: Sequence[QueueKeys], current: QueueKeys) -> str | None:
    """A cursor at the start of the group after ``current`` (None after the last)."""
    index = list(key_groups).index(current)
    if index + 1 >= len(key_groups):
        return None
    return encode_cursor(_group_name(key_groups[index + 1]), "", 0)


# -- retry ------------------------------------------------------------------------------


async def retry_ids(
    redis: Redis,
    keys: QueueKeys,
    job_ids: Sequence[str],
    *,
    env: scripts.Env = _ENV,
    levels: Sequence[str] = DEFAULT_PRIORITIES,
) -> int:
    """Put these dead letters of one key group back on their queue (same id, attempts
    reset), each into its own priority level's stream (``levels``: the runner's),
    ``BATCH`` per script call; returns how many were dead letters here."""
    revived = 0
    for start in range(0, len(job_ids), BATCH):
        chunk, _ = await _by_type(redis, keys, job_ids[start : start + BATCH])
        calls = [scripts.revive(env, keys, i, levels) for i in chunk]
        replies = await scripts.run_many(redis, calls)
        revived += sum(int(r) for r in replies)
    return revived


async def retry_all(
    redis: Redis,
    keys: QueueKeys,
    *,
    env: scripts.Env = _ENV,
    levels: Sequence[str] = DEFAULT_PRIORITIES,
) -> int:
    """Put every dead letter of one key group back on its queue, ``BATCH`` per script
    call. Jobs that die again meanwhile are not retried twice: only the ids that were
    dead letters when the call began are taken."""
    last = cast(list[tuple[str, float]], await redis.zrange(keys.dead, -1, -1, withscores=True))
    if not last:
        return 0
    bound, budget = float(last[0][1]), int(await redis.zcard(keys.dead))
    revived = 0
    while budget > 0:
        ids = await _oldest(redis, keys, max_score=bound, count=min(BATCH, budget))
        if not ids:
            break
        budget -= len(ids)
        revived += await retry_ids(redis, keys, ids, env=env, levels=levels)
    return revived


async def _oldest(redis: Redis, keys: QueueKeys, *, max_score: float, count: int) -> list[str]:
    found = await redis.zrangebyscore(keys.dead, "-inf", max_score, start=0, num=count)
    return [str(job_id) for job_id in found]


# -- delete, purge, trim ----------------------------------------------------------------


async def delete_dead(redis: Redis, keys: QueueKeys, job_ids: Sequence[str]) -> int:
    """Remove these dead letters of one key group and their job hashes, ``BATCH`` per
    script call; returns how many were dead letters here."""
    removed = 0
    for start in range(0, len(job_ids), BATCH):
        removed += await _purge(redis, keys, job_ids[start : start + BATCH], 0, -1)
    return removed


async def _by_type(
    redis: Redis, keys: QueueKeys, job_ids: Sequence[str]
) -> tuple[list[str], list[str]]:
    """These ids split by their job key: a hash or none (the scripts take those), and
    any other type (hostile: the scripts would fail on it)."""
    # HEXISTS, not TYPE: the documented ACL user runs only the commands taskrunner needs
    pipe = redis.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.hexists(keys.job(job_id), "status")
    found = await pipe.execute(raise_on_error=False)
    pairs = list(zip(job_ids, found, strict=True))
    usable = [i for i, reply in pairs if not isinstance(reply, Exception)]
    hostile = [i for i, reply in pairs if isinstance(reply, Exception)]
    return usable, hostile


async def _purge(
    redis: Redis, keys: QueueKeys, job_ids: Sequence[str], cutoff_ms: float, keep: int
) -> int:
    """purge.lua over these ids; a dead letter whose job key is not a hash leaves the
    dead letters here (its key, which is no job of ours, is left alone)."""
    usable, hostile = await _by_type(redis, keys, job_ids)
    removed = int(await redis.zrem(keys.dead, *hostile)) if hostile else 0
    if usable:
        # a hostile infinite score makes the cutoff infinite: sent as "inf" (Lua reads it)
        cutoff = int(cutoff_ms) if math.isfinite(cutoff_ms) else cast(int, cutoff_ms)
        removed += int(await scripts.run(redis, scripts.purge(keys, usable, cutoff, keep)))
    return removed


async def purge_dead(
    redis: Redis,
    keys: QueueKeys,
    *,
    older_than: float | None = None,
    max_batches: int | None = None,
    clock: Clock | None = None,
) -> int:
    """Remove every dead letter of one key group (or those that died more than
    ``older_than`` seconds ago, by Redis's clock) with their job hashes, ``BATCH`` per
    script call, at most ``max_batches`` calls (None: all). Dead letters that arrive
    meanwhile are left alone."""
    if older_than is None:
        last = cast(list[tuple[str, float]], await redis.zrange(keys.dead, -1, -1, withscores=True))
        if not last:
            return 0
        cutoff = float(last[0][1])
    else:
        cutoff = float(await redis_now_ms(redis, clock) - int(older_than * 1000))
    return await _remove_oldest(
        redis, keys, cutoff_ms=cutoff, keep=_NO_COUNT_RULE, max_batches=max_batches
    )


async def trim_dead(
    redis: Redis,
    keys: QueueKeys,
    *,
    limit: int,
    max_age: float,
    max_batches: int | None = None,
    clock: Clock | None = None,
) -> int:
    """Apply the dead-letter bounds to one key group: remove the dead letters that died
    more than ``max_age`` seconds ago (by Redis's clock) and the oldest beyond ``limit``,
    with their job hashes, ``BATCH`` per script call, at most ``max_batches`` calls
    (None: until within bounds). Ages are judged by the server's clock as the runner's
    ``clock`` sees it (the identity in production). Returns how many were removed.

    Cheap when there is nothing to do (``TIME``, ``ZCARD`` and one ``ZRANGE`` of one
    id): call it from a periodic housekeeping pass (a worker's, once a minute or so)
    and after operations that add many dead letters."""
    cutoff = await redis_now_ms(redis, clock) - int(max_age * 1000)
    return await _remove_oldest(redis, keys, cutoff_ms=cutoff, keep=limit, max_batches=max_batches)


async def _remove_oldest(
    redis: Redis, keys: QueueKeys, *, cutoff_ms: float, keep: int, max_batches: int | None = None
) -> int:
    """Remove, oldest first, the dead letters that died at or before ``cutoff_ms`` or
    that exceed ``keep``; stop when a batch removes nothing."""
    removed = 0
    batches = 0
    while max_batches is None or batches < max_batches:
        excess = max(0, int(await redis.zcard(keys.dead)) - keep)
        ids = await _oldest(redis, keys, max_score=cutoff_ms, count=BATCH)
        if excess > len(ids):
            rows = await redis.zrange(keys.dead, 0, min(excess, BATCH) - 1)
            ids = [str(job_id) for job_id in rows]
        if not ids:
            break
        done = await _purge(redis, keys, ids, cutoff_ms, keep)
        removed += done
        batches += 1
        if done == 0:
            break
    return removed


async def redis_now_ms(redis: Redis, clock: Clock | None = None) -> int:
    """The server's clock in ms (ages are judged by it), shifted or frozen by ``clock``."""
    seconds, micros = await redis.time()
    server_ms = int(seconds) * 1000 + int(micros) // 1000
    return clock.shift(server_ms) if clock is not None else server_ms
