"""A job: its status, its info, the handle callers hold, and the running job's context."""

from __future__ import annotations

import contextvars
import json
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pydantic import BaseModel

from taskrunner.exceptions import (
    JobAborted,
    JobDeadLettered,
    JobFailed,
    JobRejected,
    TaskrunnerError,
)

if TYPE_CHECKING:
    from taskrunner.client import Client
    from taskrunner.codec import ResultCodec

R = TypeVar("R")


class JobStatus(StrEnum):
    """Where a job is in its life. A ``str`` enum: ``status == "succeeded"`` holds."""

    SCHEDULED = "scheduled"
    """Waiting in the delayed set for its due time (first run, retry or reschedule)."""
    QUEUED = "queued"
    """In the stream, ready for a worker."""
    RUNNING = "running"
    """A worker holds its lease and runs it."""
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    """Failed for good: no retries left, or a timeout/error with retries disabled."""
    ABORTED = "aborted"
    REJECTED = "rejected"
    """A unique-job lock refused it when it came to run (``on_conflict="reject"``)."""
    DEAD = "dead"
    """In the dead letters: undecodable, unknown task, or delivered too many times."""

    @property
    def is_final(self) -> bool:
        return self in _FINAL


_FINAL = frozenset(
    {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.ABORTED, JobStatus.REJECTED, JobStatus.DEAD}
)


class ErrorInfo(BaseModel):
    """The last error of a job: the remote exception's type, message and traceback."""

    type: str
    message: str
    traceback: str = ""

    @classmethod
    def from_exception(cls, exc: BaseException) -> ErrorInfo:
        kind = type(exc)
        name = (
            kind.__qualname__
            if kind.__module__ == "builtins"
            else f"{kind.__module__}.{kind.__qualname__}"
        )
        text = "".join(traceback.format_exception(exc))
        return cls(type=name, message=str(exc), traceback=text)


class JobInfo(BaseModel):
    """Everything Redis knows about a job."""

    id: str
    task: str
    queue: str
    status: JobStatus
    attempts: int
    enqueued_at: datetime
    due_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: ErrorInfo | None = None
    worker: str | None = None
    reclaims: int = 0
    """How many times the job was taken over from a worker whose lease went stale."""
    reschedules: int = 0
    """How many times a unique-job lock sent it back to wait (not counted as attempts)."""
    abort_requested: bool = False

    @classmethod
    def from_hash(cls, job_id: str, h: dict[str, str]) -> JobInfo:
        error = h.get("error")
        return cls(
            id=job_id,
            task=h.get("task", ""),
            queue=h.get("queue", ""),
            status=JobStatus(h["status"]),
            attempts=int(h.get("attempts", 0)),
            enqueued_at=_time(h.get("enqueued")) or datetime.fromtimestamp(0, UTC),
            due_at=_time(h.get("due")),
            started_at=_time(h.get("started")),
            finished_at=_time(h.get("finished")),
            error=ErrorInfo.model_validate_json(error) if error else None,
            worker=h.get("worker") or None,
            reclaims=int(h.get("reclaims", 0)),
            reschedules=int(h.get("reschedules", 0)),
            abort_requested="abort" in h,
        )


def _time(ms: str | None) -> datetime | None:
    if not ms or ms == "0":
        return None
    return datetime.fromtimestamp(int(ms) / 1000, UTC)


class Job(Generic[R]):
    """A handle to one job. Cheap to create; every method asks Redis."""

    __slots__ = ("_client", "_codec", "_codecs", "deduplicated", "id", "queue")

    def __init__(
        self,
        client: Client,
        job_id: str,
        queue: str,
        codec: ResultCodec | None = None,
        *,
        deduplicated: bool = False,
        codecs: Callable[[str], ResultCodec | None] | None = None,
    ) -> None:
        self._client = client
        self._codec = codec
        self._codecs = codecs
        """Finds the result codec by task name when ``codec`` is not known up front."""
        self.id = job_id
        self.queue = queue
        self.deduplicated = deduplicated
        """True when enqueue wrote nothing and this handle points at an existing job."""

    def __repr__(self) -> str:
        return f"Job(id={self.id!r}, queue={self.queue!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Job) and (other.id, other.queue) == (self.id, self.queue)

    def __hash__(self) -> int:
        return hash((self.id, self.queue))

    async def status(self) -> JobStatus:
        """The job's status (JobNotFound if there is no such job)."""
        return JobStatus(await self._client.field(self.queue, self.id, "status"))

    async def info(self) -> JobInfo:
        """Everything Redis knows about the job."""
        return JobInfo.from_hash(self.id, await self._client.state(self.queue, self.id))

    async def result(self, timeout: float | None = None) -> R:
        """Wait for the job to finish and return its result.

        Raises ``TimeoutError`` when ``timeout`` seconds pass first, ``JobFailed`` when
        it failed for good, ``JobAborted``, ``JobRejected`` or ``JobDeadLettered``.
        Waiting is a pub/sub subscription, not a polling loop.
        """
        state = await self._client.wait(self.queue, self.id, timeout)
        return self._outcome(state)

    async def abort(self) -> JobStatus:
        """Abort the job: a scheduled or queued job never runs; a running one is cancelled.

        Returns the status right after the call: ``aborted``, ``running`` while the
        worker is being told (the job becomes ``aborted`` within one heartbeat
        interval), or the final status it already had.
        """
        return await self._client.abort(self.queue, self.id)

    def _outcome(self, state: dict[str, str]) -> R:
        status = state["status"]
        if status == JobStatus.SUCCEEDED:
            payload = state.get("result", "null")
            codec = self._codec
            if codec is None and self._codecs is not None:
                codec = self._codecs(state.get("task", ""))
            if codec is None:
                return json.loads(payload)  # type: ignore[no-any-return]
            return codec.decode(payload)  # type: ignore[no-any-return]
        error = ErrorInfo.model_validate_json(state["error"]) if state.get("error") else None
        if status == JobStatus.FAILED:
            assert error is not None
            raise JobFailed(self.id, error.type, error.message, error.traceback)
        if status == JobStatus.ABORTED:
            raise JobAborted(self.id)
        if status == JobStatus.REJECTED:
            raise JobRejected(self.id)
        if status == JobStatus.DEAD:
            raise JobDeadLettered(self.id, error.message if error else "unknown")
        raise TaskrunnerError(f"job {self.id} is not finished: {status}")


@dataclass(slots=True)
class JobContext:
    """What a running task can know about its job (``current_job()``)."""

    id: str
    task: str
    attempt: int
    """1 for the first attempt, 2 for the first retry, and so on."""
    queue: str
    deliveries: int = 1
    reclaimed: bool = False
    ready_at: float = 0.0
    """Epoch seconds when the job became runnable (enqueued, or due): its queue wait
    is the time from here to the start of the attempt."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free space for middleware to share per-job data."""


_current: contextvars.ContextVar[JobContext] = contextvars.ContextVar("taskrunner_job")


def current_job() -> JobContext:
    """The job the calling task is running as. RuntimeError outside a task."""
    try:
        return _current.get()
    except LookupError:
        raise RuntimeError("current_job() called outside a running task") from None


def set_current_job(ctx: JobContext) -> contextvars.Token[JobContext]:
    return _current.set(ctx)


def reset_current_job(token: contextvars.Token[JobContext]) -> None:
    _current.reset(token)


__all__ = ["ErrorInfo", "Job", "JobContext", "JobInfo", "JobStatus", "current_job"]
