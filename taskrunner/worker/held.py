"""A job a worker holds: claimed under a fresh lease, waiting for a consumer or running."""

from __future__ import annotations

from dataclasses import dataclass, field

from taskrunner.keys import QueueKeys
from taskrunner.middleware.base import CancelReason


@dataclass(slots=True, eq=False)
class Claimed:
    """A stream entry this worker holds under a fresh lease, ready to run."""

    keys: QueueKeys
    stream: str
    level: str
    job_id: str
    entry_id: str
    token: str
    verdict: str
    """ok, poison, abort or toolarge (see claim.lua)."""
    task_name: str
    payload: str
    attempt: int
    locks: list[str]
    reclaims: int
    reclaimed: bool
    meta: dict[str, str]
    ready_at: float
    cancelled: CancelReason | None = None
    """Set while it waits for a consumer: its lease was lost, it was aborted, or the
    grace period ended. The consumer then commits that instead of running it."""
    settled: bool = False
    """Already committed (or dropped) by a stopping worker: consumers skip it."""
    lock_ttl_ms: int = field(default=0)
    """TTL its locks keep through a retry's wait (set by the unique-job middleware)."""

    @property
    def queue(self) -> str:
        return self.keys.queue
