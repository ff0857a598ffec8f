"""A job: its status, its info, the handle callers hold, and the running job's context."""

from __future__ import annotations

import base64
import contextlib
import contextvars
import json
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import anyio
from pydantic import BaseModel, ValidationError

from taskrunner.exceptions import (
    JobAborted,
    JobDeadLettered,
    JobFailed,
    JobRejected,
    TaskrunnerError,
)
from taskrunner.options import wait_seconds
from taskrunner.urls import redact

if TYPE_CHECKING:
    from taskrunner.codec import ResultCodec

R = TypeVar("R")

_PACKAGE = str(Path(__file__).resolve().parent)
_EXCERPT = 500
"""Characters of a hostile value kept in a message (the raw bytes go to ``raw``)."""


def safe_text(text: str, limit: int | None = None) -> str:
    """``text`` as valid UTF-8 (bytes that were not UTF-8, kept as lone surrogates by
    the connection, become ``\\xNN``), cut to ``limit`` characters with a note."""
    clean = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if limit is not None and len(clean) > limit:
        return f"{clean[:limit]}... ({len(clean):,} characters)"
    return clean


def raw_bytes(text: str, limit: int) -> str:
    """Base64 of ``text``'s original bytes (at most ``limit`` of them)."""
    return base64.b64encode(text.encode("utf-8", "surrogateescape")[:limit]).decode()


class JobStore(Protocol):
    """What a job handle needs from the client."""

    async def state(self, queue: str, job_id: str) -> dict[str, str]: ...

    async def field(self, queue: str, job_id: str, name: str) -> str: ...

    async def wait(
        self, queue: str, job_id: str, timeout: float | None, *, relayed: bool = False
    ) -> dict[str, str]: ...

    async def abort(self, queue: str, job_id: str) -> JobStatus: ...

    def progress(self, queue: str, job_id: str) -> AsyncIterator[Any]: ...


@contextlib.contextmanager
def deadline(timeout: float | None, what: str) -> Iterator[None]:
    """``anyio.fail_after(timeout)`` whose ``TimeoutError`` says what was not done in
    time (``what``: "job 1234 is not final"); one raised inside passes unchanged."""
    try:
        with anyio.fail_after(timeout) as scope:
            yield
    except TimeoutError:
        if scope.cancelled_caught:
            raise TimeoutError(f"{what} after {timeout:g}s") from None
        raise


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
    """The last error of a job: the remote exception's type, message and traceback.
    For a dead letter of hostile data, ``raw`` keeps the offending bytes (base64)."""

    type: str
    message: str
    traceback: str = ""
    raw: str | None = None

    @classmethod
    def from_exception(cls, exc: BaseException) -> ErrorInfo:
        """The exception's type, message and traceback, as valid text, without
        taskrunner's own frames (the task's code is what the reader needs)."""
        kind = type(exc)
        name = (
            kind.__qualname__
            if kind.__module__ == "builtins"
            else f"{kind.__module__}.{kind.__qualname__}"
        )
        try:
            message = str(exc)
        except Exception:  # noqa: BLE001 - a broken __str__ must not break the commit
            message = f"<{name} whose str() failed>"
        return cls(
            type=name, message=redact(safe_text(message)), traceback=redact(_user_traceback(exc))
        )

    @classmethod
    def parse(cls, text: str) -> ErrorInfo:
        """An error as stored; anything unreadable becomes a message of its own."""
        try:
            return cls.model_validate_json(text)
        except ValidationError:
            return cls(type="unreadable", message=safe_text(text, _EXCERPT))


def _user_traceback(exc: BaseException) -> str:
    """``traceback.format_exception`` without frames from taskrunner's own files."""
    te = traceback.TracebackException.from_exception(exc)
    for part in _chain(te):
        part.stack = traceback.StackSummary.from_list(
            [f for f in part.stack if not (f.filename or "").startswith(_PACKAGE)]
        )
    return safe_text("".join(te.format()))


def _chain(te: traceback.TracebackException) -> list[traceback.TracebackException]:
    found, seen = [], set()
    current: traceback.TracebackException | None = te
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        found.append(current)
        current = current.__cause__ or current.__context__
    return found


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
    priority: str | None = None
    """Its priority level."""
    crashes: int = 0
    """How many times a worker died while this job ran alone in it (see max_deliveries)."""
    progress: Any = None
    """The last value the task gave ``current_job().set_progress()``."""

    @classmethod
    def from_hash(cls, job_id: str, h: dict[str, str]) -> JobInfo:
        """The info in a job hash. Tolerant: a field that does not parse (anything in
        Redis may be hostile) reads as absent instead of raising."""
        error = h.get("error")
        return cls(
            id=safe_text(job_id),
            task=safe_text(h.get("task", "")),
            queue=safe_text(h.get("queue", "")),
            status=parse_status(h.get("status")),
            attempts=_int(h.get("attempts")),
            enqueued_at=_time(h.get("enqueued")) or datetime.fromtimestamp(0, UTC),
            due_at=_time(h.get("due")),
            started_at=_time(h.get("started")),
            finished_at=_time(h.get("finished")),
            error=ErrorInfo.parse(error) if error else None,
            worker=safe_text(h.get("worker") or "") or None,
            reclaims=_int(h.get("reclaims")),
            reschedules=_int(h.get("reschedules")),
            abort_requested="abort" in h,
            priority=safe_text(h["level"]) if h.get("level") else None,
            crashes=_int(h.get("crashes")),
            progress=_json(h.get("progress")),
        )


def parse_status(text: str | None) -> JobStatus:
    """A stored status; ``TaskrunnerError`` for anything else (hostile data)."""
    try:
        return JobStatus(text or "")
    except ValueError:
        shown = safe_text(text or "", 50)
        raise TaskrunnerError(f"the job hash has no valid status ({shown!r})") from None


def _int(text: str | None) -> int:
    try:
        return int(text or 0)
    except ValueError:
        return 0


def _json(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # not JSON, or nested too deeply to decode
        return None


def _time(ms: str | None) -> datetime | None:
    if not ms or ms == "0":
        return None
    try:
        return datetime.fromtimestamp(int(float(ms)) / 1000, UTC)
    except (ValueError, OverflowError, OSError):
        return None


class Job(Generic[R]):
    """A handle to one job. Cheap to create; every method asks Redis."""

    __slots__ = ("_client", "_codec", "_codecs", "deduplicated", "id", "queue")

    def __init__(
        self,
        client: JobStore,
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
        return parse_status(await self._client.field(self.queue, self.id, "status"))

    async def info(self) -> JobInfo:
        """Everything Redis knows about the job."""
        return JobInfo.from_hash(self.id, await self._client.state(self.queue, self.id))

    async def result(self, timeout: float | timedelta | None = None) -> R:
        """Wait for the job to finish and return its result.

        Raises ``TimeoutError`` when ``timeout`` (seconds or a ``timedelta``; 0: look
        once) passes first, ``JobFailed`` when it failed for good, ``JobAborted``,
        ``JobRejected`` or ``JobDeadLettered``.
        Waiting is a pub/sub subscription, not a polling loop; without a message the
        job is read again after 1 s, then at doubling intervals up to every 10 s.
        """
        state = await self._client.wait(self.queue, self.id, wait_seconds(timeout))
        return self._outcome(state)

    def progress(self) -> AsyncIterator[Any]:
        """Follow the job's progress live: each new value the task sets with
        ``current_job().set_progress()``; ends when the job is final."""
        return self._client.progress(self.queue, self.id)

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
            try:
                if codec is None:
                    return json.loads(payload)  # type: ignore[no-any-return]
                return codec.decode(payload)  # type: ignore[no-any-return]
            except (ValueError, RecursionError) as exc:  # hostile: not JSON, too deep
                reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                message = f"job {self.id}: stored result unreadable: {reason}"
                raise TaskrunnerError(message) from exc
        error = ErrorInfo.parse(state["error"]) if state.get("error") else None
        if status == JobStatus.FAILED:
            if error is None:  # a hash without its error (hostile, or written by hand)
                raise JobFailed(self.id, "unknown", "no error was recorded", "")
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
    """1 + how many times the job was taken over from a worker that stopped
    heartbeating (``reclaims``)."""
    reclaimed: bool = False
    """This attempt took the job over from a worker that stopped heartbeating."""
    reclaims: int = 0
    priority: str = ""
    ready_at: float = 0.0
    """Epoch seconds when the job became runnable (enqueued, or due): its queue wait
    is the time from here to the start of the attempt."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free space for middleware to share per-job data."""
    reporter: Callable[[Any], Awaitable[bool]] | None = field(default=None, repr=False)
    """How ``set_progress`` reaches Redis (set by the worker)."""

    async def set_progress(self, value: Any) -> bool:
        """Store the job's progress, replacing the last value: any JSON value, commonly
        a float from 0 to 1 or a small dict (or anything pydantic serialises to JSON: a
        model, a datetime; it is read back as JSON), at most 64 KiB as JSON. Readable as
        ``(await job.info()).progress`` and followed live by ``async for p in
        job.progress()``. One script call, in the worker's commit pipeline (during a
        Redis outage it waits, as the job's commit would); no effect on the outcome.

        Returns True when stored, False when this copy of the job lost its lease (it
        was taken over by another worker): a stale copy never overwrites the progress
        of the attempt that replaced it. Raises ``TypeError`` for a value that is not
        JSON-serialisable (NaN and infinities included) and ``PayloadTooLarge`` over
        64 KiB; nothing is stored then."""
        if self.reporter is None:
            raise RuntimeError("set_progress() needs a job run by a worker")
        return await self.reporter(value)


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
