"""What the admin API returns: plain pydantic models (``model_dump(mode="json")`` for JSON)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from taskrunner.job import JobInfo, JobStatus, safe_text


class LockInfo(BaseModel):
    """One unique-job lock the job lists in its ``locks`` field, as it is now."""

    key: str
    holder: str | None
    """The job id that holds the lock now (None: free, released or expired)."""
    ttl: float | None
    """Seconds before the lock expires (None: free, or no expiry)."""

    def held_by(self, job_id: str) -> bool:
        return self.holder == job_id


class JobDetail(JobInfo):
    """Everything about one job: its info (with ``priority`` and ``progress``) plus its
    arguments, result, headers and locks."""

    partition: int = 0
    """The partition of its queue that holds it."""
    args: Any = None
    """The arguments as stored: a JSON object keyed by parameter name (the raw text if
    it is not JSON)."""
    result: Any = None
    """The result of a succeeded job, as stored (JSON)."""
    locks: list[LockInfo] = Field(default_factory=list)
    meta: dict[str, Any] = Field(default_factory=dict)
    """The job's headers (``EnqueueContext.meta``)."""
    reruns: int = 0
    """How many times an operator ran it again (``retry``)."""
    expires_in: float | None = None
    """Seconds before the job's record expires (None: kept until it is final)."""

    @property
    def queue_wait(self) -> float | None:
        """Seconds from when it became runnable to the start of its latest attempt."""
        if self.started_at is None:
            return None
        ready = max(self.enqueued_at, self.due_at or self.enqueued_at)
        return max(0.0, (self.started_at - ready).total_seconds())

    @property
    def run_time(self) -> float | None:
        """Seconds from the start of the latest attempt to the end."""
        if self.started_at is None or self.finished_at is None:
            return None
        return max(0.0, (self.finished_at - self.started_at).total_seconds())

    @classmethod
    def from_state(
        cls, job_id: str, partition: int, h: dict[str, str], locks: list[LockInfo], ttl_ms: int
    ) -> JobDetail:
        base = info_of(job_id, h).model_dump()
        meta = stored_json(h.get("meta"))
        return cls(
            **base,
            partition=partition,
            args=stored_json(h.get("args")),
            result=stored_json(h.get("result")) if h.get("status") == JobStatus.SUCCEEDED else None,
            locks=locks,
            meta=meta if isinstance(meta, dict) else {},
            reruns=_int(h.get("reruns")),
            expires_in=ttl_ms / 1000 if ttl_ms > 0 else None,
        )


def stored_json(text: str | None) -> Any:
    """JSON read from Redis, decoded; text that does not decode (not JSON, or nested
    too deeply for the decoder: ``RecursionError``) is returned as is (never raises)."""
    if text is None or text == "":
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return safe_text(text)


def info_of(job_id: str, h: dict[str, str]) -> JobInfo:
    """``JobInfo.from_hash`` with the progress decoded by ``stored_json`` (the raw text
    when it does not decode). Raises ``TaskrunnerError`` for a hash without a valid
    status."""
    info = JobInfo.from_hash(job_id, {k: v for k, v in h.items() if k != "progress"})
    info.progress = stored_json(h.get("progress"))
    return info


def _int(text: str | None) -> int:
    try:
        return int(text or 0)
    except ValueError:
        return 0


class JobPage(BaseModel):
    """One page of a job listing, and the cursor of the next (None: the last page)."""

    jobs: list[JobInfo]
    cursor: str | None = None


class QueueCounts(BaseModel):
    """How many jobs a queue holds in each status, summed over its partitions
    (``taskrunner.counts`` for the unfinished, failed and dead jobs and the workers; the
    finished-job indexes for the rest)."""

    queue: str
    partitions: int = 1
    queued: int = 0
    running: int = 0
    """Entries workers hold: running, or read and about to start."""
    scheduled: int = 0
    succeeded: int = 0
    failed: int = 0
    aborted: int = 0
    rejected: int = 0
    dead: int = 0
    paused: bool = False
    """Some partition of the queue is paused (normally all of them are)."""
    paused_partitions: int = 0
    workers: int = 0
    """Live workers: their heartbeat is at most ``stale_after`` old."""


class MinuteCounts(BaseModel):
    """Jobs of some queues that finished in one minute (the throughput chart), counted in
    the finished-job indexes: a job counts once, at its latest finish, while its record
    lives (``result_ttl``)."""

    minute: datetime
    succeeded: int = 0
    failed: int = 0
    aborted: int = 0
    rejected: int = 0
    dead: int = 0

    @property
    def finished(self) -> int:
        return self.succeeded + self.failed + self.aborted + self.rejected + self.dead


class RunningJob(BaseModel):
    """A job a worker holds now."""

    id: str
    queue: str
    task: str
    status: JobStatus
    attempts: int
    priority: str | None = None
    started_at: datetime | None = None
    progress: Any = None


class WorkerDetail(BaseModel):
    """A worker (consumer) and the jobs it holds."""

    id: str
    queues: list[str]
    last_heartbeat: datetime | None
    """None: it holds entries but is gone from the workers set (it stopped beating long
    ago; its entries wait for a reclaim)."""
    age: float | None
    """Seconds since its last heartbeat."""
    stale: bool
    """Its heartbeat is older than ``stale_after``: crashed, stalled or cut off."""
    holding: int
    """How many stream entries it holds (running, or read and about to start)."""
    running: list[RunningJob]
    """Up to ``RUNNING_SHOWN`` of the jobs it holds."""


__all__ = [
    "JobDetail",
    "JobPage",
    "LockInfo",
    "MinuteCounts",
    "QueueCounts",
    "RunningJob",
    "WorkerDetail",
    "info_of",
    "stored_json",
]
