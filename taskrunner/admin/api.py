"""The admin API: see and steer jobs, queues and workers (``tr.admin``).

Every read comes from structures kept for it (see ``listing`` and ``stats``), never
from scanning the key space, so each call costs the same with a million jobs; a
queue's partitions are read together and summed or merged. Every change is one atomic
script per partition: ``retry`` is rerun.lua, ``abort`` is abort.lua (``Job.abort``),
``pause``/``resume`` is pause.lua on every partition of the queue (fetch.lua then reads
nothing from it; its workers are told); dead letters are deleted and purged by
``taskrunner.deadletters`` (bounded batches, per partition).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, cast

from redis.exceptions import ResponseError

from taskrunner import deadletters, scripts
from taskrunner.admin import listing, scope, stats, workers
from taskrunner.admin.models import (
    JobDetail,
    JobPage,
    LockInfo,
    MinuteCounts,
    QueueCounts,
    WorkerDetail,
)
from taskrunner.client import Client
from taskrunner.exceptions import JobNotFound, TaskrunnerError
from taskrunner.job import JobStatus, safe_text
from taskrunner.keys import Queue, QueueKeys, check_many, check_name

if TYPE_CHECKING:
    from taskrunner.job import Job
    from taskrunner.middleware.lease import LeaseMiddleware


class Runner(Protocol):
    """What the admin API needs of a TaskRunner."""

    priorities: tuple[str, ...]
    lease: LeaseMiddleware

    @property
    def client(self) -> Client: ...

    def queues(self) -> list[str]: ...

    def job(self, job_id: str, queue: str | None = None) -> Job[Any]: ...


DEFAULT_LIMIT = 50
MAX_LOCKS = 100
"""Locks of one job shown at most (its ``locks`` field may be hostile)."""


def _lock(key: str, holder: Any, ttl: Any) -> LockInfo:
    """A lock as read (a key that is not a string reads as free, its expiry kept)."""
    return LockInfo(
        key=safe_text(key, 200),
        holder=safe_text(holder, 200) if isinstance(holder, str) else None,
        ttl=ttl / 1000 if isinstance(ttl, int) and ttl > 0 else None,
    )


class Admin:
    """Operations on a TaskRunner's jobs and queues (the runner must be open:
    ``async with tr:``). ``queues`` default to the runner's (every queue its tasks
    use); any other valid queue name may be given."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    @property
    def _client(self) -> Client:
        return self.runner.client

    def _names(self, queues: Sequence[str] | None) -> list[str]:
        names = check_many("queues", queues, "emails") if queues is not None else []
        return [check_name("queue", q) for q in names or self.runner.queues()]

    async def _queues(self, queues: Sequence[str] | None) -> list[Queue]:
        return [await scope.queue(self._client, name) for name in self._names(queues)]

    # -- one job --------------------------------------------------------------------------

    async def find(self, job_id: str, queues: Sequence[str] | None = None) -> str | None:
        """The queue that holds job ``job_id`` (looked for in ``queues``), or None."""
        keys = await scope.locate(self._client, self._names(queues), job_id)
        return keys.queue if keys is not None else None

    async def _locate(self, job_id: str, queue: str | None) -> QueueKeys:
        keys = await scope.locate(self._client, self._names([queue] if queue else None), job_id)
        if keys is None:
            raise JobNotFound(job_id, queue)
        return keys

    async def job(self, job_id: str, queue: str | None = None) -> JobDetail:
        """Everything about one job: status, priority, timings, attempts, arguments,
        result or error with traceback, progress, and who holds each of its unique
        locks now. Raises ``JobNotFound``."""
        keys = await self._locate(job_id, queue)
        pipe = self._client.redis.pipeline(transaction=False)
        pipe.hgetall(keys.job(job_id))
        pipe.pttl(keys.job(job_id))
        state, ttl = cast(tuple[Any, Any], tuple(await pipe.execute(raise_on_error=False)))
        if isinstance(state, Exception):  # a job key that is not a hash
            raise TaskrunnerError(f"job {job_id}: its record cannot be read: {state}")
        if not state.get("status"):
            raise JobNotFound(job_id)
        locks = await self._locks(state.get("locks", "").split()[:MAX_LOCKS])
        return JobDetail.from_state(job_id, keys.partition, state, locks, int(ttl))

    async def _locks(self, lock_keys: list[str]) -> list[LockInfo]:
        if not lock_keys:
            return []
        pipe = self._client.redis.pipeline(transaction=False)
        for key in lock_keys:
            pipe.get(key)
            pipe.pttl(key)
        replies = await pipe.execute(raise_on_error=False)
        return [_lock(key, replies[2 * i], replies[2 * i + 1]) for i, key in enumerate(lock_keys)]

    async def retry(self, job_id: str, queue: str | None = None) -> bool:
        """Run a failed, aborted, rejected or dead job again under the same id: back in
        its own priority level's stream, attempts counted from zero. True when queued
        again; False when its status does not allow it (succeeded, or still scheduled,
        queued or running). Raises ``JobNotFound``."""
        keys = await self._locate(job_id, queue)
        return await self._rerun(keys, job_id)

    async def _rerun(self, keys: QueueKeys, job_id: str, *, dead_only: bool = False) -> bool:
        client = self._client
        q = await scope.queue(client, keys.queue)
        try:
            status, level = cast(
                list[str | None], await client.redis.hmget(keys.job(job_id), ["status", "level"])
            )
        except ResponseError as exc:  # a job key that is not a hash: nothing to run
            raise TaskrunnerError(f"job {job_id}: its record cannot be read: {exc}") from None
        if dead_only and status != JobStatus.DEAD:
            return False
        stream = keys.level_stream(scope.level_or_default(client, q, level))
        call = scripts.rerun(client.env, keys, stream, job_id)
        reply = cast(list[Any], await scripts.run(client.redis, call))
        if reply[1] == "missing":
            raise JobNotFound(job_id)
        return int(reply[0]) == 1

    async def abort(self, job_id: str, queue: str | None = None) -> JobStatus:
        """Abort a job (``Job.abort``): the status right after the call."""
        keys = await self._locate(job_id, queue)
        return await self.runner.job(job_id, keys.queue).abort()

    # -- listing --------------------------------------------------------------------------

    async def jobs(
        self,
        *,
        queue: str | None = None,
        status: JobStatus | str | None = None,
        task: str | None = None,
        priority: str | None = None,
        limit: int = DEFAULT_LIMIT,
        cursor: str | None = None,
    ) -> JobPage:
        """One page of jobs, filtered by queue, status, task and priority level; pass
        the returned ``cursor`` to get the next page (with the same filters). Raises
        ``ValueError`` for a bad status, limit or cursor (``CursorError``). See
        ``taskrunner.admin.listing``."""
        if not _whole(limit) or not 1 <= limit <= listing.MAX_LIMIT:
            raise ValueError(
                f"limit must be a whole number between 1 and {listing.MAX_LIMIT}, got {limit!r}"
            )
        statuses = [JobStatus(status)] if status is not None else list(listing.STATUS_ORDER)
        if priority is not None and priority not in self.runner.priorities:
            raise ValueError(
                f"unknown priority {priority!r} (levels: {', '.join(self.runner.priorities)})"
            )
        client = self._client
        filters = listing.Filters(task, priority, client.default_level)
        now, ttl = scope.now_ms(client), client.result_ttl_ms
        groups = []
        for q in await self._queues([queue] if queue else None):
            parts = scope.partitions(client, q)
            for s in statuses:
                sources = listing.sources(q, parts, s, filters, now, ttl)
                groups.append(listing.Group(q.name, s, sources))
        found, after = await listing.page(client.redis, groups, filters, limit, cursor)
        return JobPage(jobs=found, cursor=after)

    # -- queues ---------------------------------------------------------------------------

    async def counts(self, queues: Sequence[str] | None = None) -> list[QueueCounts]:
        """Jobs per status (summed over the partitions), paused or not, and live
        workers, for each queue."""
        return await stats.counts(
            self._client, await self._queues(queues), self.runner.lease.stale_after
        )

    async def throughput(
        self, queues: Sequence[str] | None = None, minutes: int = stats.MINUTES
    ) -> list[MinuteCounts]:
        """Jobs finished per minute over the last ``minutes`` (at most 60), summed over
        ``queues``, oldest first."""
        if not _whole(minutes):
            raise ValueError(f"minutes must be a whole number (1 to 60), got {minutes!r}")
        return await stats.throughput(self._client, await self._queues(queues), minutes)

    async def pause(self, queue: str) -> None:
        """Pause ``queue``: it keeps accepting jobs, and its workers stop taking new ones
        (jobs they hold run on). Every partition is paused."""
        await self._pause(queue, paused=True)

    async def resume(self, queue: str) -> None:
        """Resume a paused queue (every partition)."""
        await self._pause(queue, paused=False)

    async def _pause(self, queue: str, *, paused: bool) -> None:
        client = self._client
        q = await scope.queue(client, queue)
        calls = [scripts.pause(client.env, k, paused=paused) for k in scope.partitions(client, q)]
        await scripts.run_many(client.redis, calls)

    async def paused(self, queues: Sequence[str] | None = None) -> set[str]:
        """The queues among ``queues`` with a paused partition."""
        return {c.queue for c in await self.counts(queues) if c.paused}

    # -- workers --------------------------------------------------------------------------

    async def workers(self, queues: Sequence[str] | None = None) -> list[WorkerDetail]:
        """Workers seen on ``queues`` (live and stale), the jobs each holds, and their
        last heartbeat."""
        return await workers.workers(
            self._client, await self._queues(queues), self.runner.lease.stale_after
        )

    # -- dead letters ---------------------------------------------------------------------

    async def dead_letters(
        self, queue: str | None = None, *, limit: int = DEFAULT_LIMIT, cursor: str | None = None
    ) -> JobPage:
        """One page of dead-lettered jobs, newest first (the reason is each one's
        ``error.message``)."""
        return await self.jobs(queue=queue, status=JobStatus.DEAD, limit=limit, cursor=cursor)

    async def _dead(self, job_ids: Sequence[str], queue: str) -> list[tuple[QueueKeys, str]]:
        """Where each of these jobs of ``queue`` lives (those found)."""
        found = []
        for job_id in check_many("job_ids", job_ids, "5c2e0d5b..."):
            keys = await scope.locate(self._client, [check_name("queue", queue)], job_id)
            if keys is not None:
                found.append((keys, job_id))
        return found

    async def retry_dead(self, job_ids: Sequence[str], queue: str) -> int:
        """Run these dead letters of ``queue`` again (as ``retry``); how many."""
        found = await self._dead(job_ids, queue)
        return sum([await self._rerun(keys, job_id, dead_only=True) for keys, job_id in found])

    async def delete_dead(self, job_ids: Sequence[str], queue: str) -> int:
        """Delete these dead letters of ``queue`` (and their jobs); how many."""
        by_part: dict[str, tuple[QueueKeys, list[str]]] = {}
        for keys, job_id in await self._dead(job_ids, queue):
            by_part.setdefault(keys.prefix, (keys, []))[1].append(job_id)
        deleted = 0
        for keys, ids in by_part.values():
            deleted += await deadletters.delete_dead(self._client.redis, keys, ids)
        return deleted

    async def purge_dead(self, queue: str) -> int:
        """Delete every dead letter of ``queue`` (every partition; those that arrive
        meanwhile are left); how many."""
        client = self._client
        q = await scope.queue(client, queue)
        deleted = 0
        for keys in scope.partitions(client, q):
            deleted += await deadletters.purge_dead(client.redis, keys, clock=client.clock)
        return deleted


def _whole(value: object) -> bool:
    """Whether ``value`` is an int and not a bool (``True`` is an int to Python)."""
    return isinstance(value, int) and not isinstance(value, bool)
