"""The exceptions taskrunner raises.

Every error taskrunner defines derives from one root, so ``except TaskrunnerError``
catches all of them (pydantic's ``ValidationError`` for bad task arguments and the
builtin ``TimeoutError`` of ``Job.result(timeout=...)`` are deliberately left as
they are, because callers already know them)::

    TaskrunnerError
    ├── ConfigurationError        a task, option or setting is invalid (raised at declaration)
    │   └── UnknownOptionError    a task option that no middleware owns
    ├── EmbeddedRedisError        the embedded redis-server cannot be found or started
    ├── JobError                  the outcome of a job you asked about
    │   ├── JobNotFound           no job with that id (or its result expired)
    │   ├── JobFailed             the job failed for good: remote type, message, traceback
    │   ├── JobAborted            the job was aborted
    │   ├── JobRejected           a unique-job lock rejected the job when it ran
    │   └── JobDeadLettered       the job went to the dead letters
    ├── ScheduleNotFound          no cron schedule of that name (also a LookupError)
    ├── PayloadTooLarge           arguments or a result over ``max_payload`` bytes
    ├── NotReplicated             fewer replicas than ``wait_replicas`` confirmed a write
    ├── LockConflictError         a unique-job lock is held by another job
    ├── LostLease                 this worker no longer owns the job it ran
    ├── MiddlewareError           a middleware returned something it may not
    ├── TaskTimeout               a task ran past its timeout (also a TimeoutError)
    └── Retry                     raised by a task to ask for another attempt
"""

from __future__ import annotations

import functools
from datetime import timedelta
from typing import Any, cast

from taskrunner.options import signed_seconds


def _rebuilt(
    owner: type[BaseException], exc: BaseException, *args: object, **kwargs: object
) -> tuple[Any, ...]:
    """How ``copy`` and ``pickle`` remake an error of ``owner`` (or of a subclass that
    keeps its ``__init__``), whose ``__init__`` takes other arguments than its message
    (by default they call it with the message alone): call it with these arguments
    again, then restore its attributes (notes included). A subclass with an ``__init__``
    of its own is remade as Python does by default (its ``args``)."""
    if type(exc).__init__ is not owner.__init__:
        return cast(tuple[Any, ...], BaseException.__reduce__(exc))
    make = functools.partial(type(exc), **kwargs) if kwargs else type(exc)
    return (make, args, vars(exc))


class TaskrunnerError(Exception):
    """Root of every taskrunner exception."""


class ConfigurationError(TaskrunnerError, ValueError):
    """A task, option or setting is invalid; raised where it is declared."""


class UnknownOptionError(ConfigurationError, TypeError):
    """A task option that no middleware owns."""


class ScheduleNotFound(TaskrunnerError, LookupError):
    """No cron schedule of that name is declared on the runner."""


class EmbeddedRedisError(TaskrunnerError):
    """The embedded redis-server cannot be found or started."""


class JobError(TaskrunnerError):
    """Base for the outcomes of a job that are not a result."""

    def __init__(self, job_id: str, message: str) -> None:
        super().__init__(message)
        self.job_id = job_id

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuilt(JobError, self, self.job_id, str(self))


class JobNotFound(JobError):
    """No job with this id exists (it never did, or its result expired) in ``queue``,
    the queue looked in (None: every queue of the app)."""

    def __init__(self, job_id: str, queue: str | None = None) -> None:
        where = f" in queue {queue!r}" if queue is not None else ""
        super().__init__(job_id, f"no job {job_id!r}{where}")
        self.queue = queue

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuilt(JobNotFound, self, self.job_id, self.queue)


class JobFailed(JobError):
    """The job failed for good. Carries the remote exception's type, message and traceback."""

    def __init__(self, job_id: str, exc_type: str, exc_message: str, traceback: str) -> None:
        super().__init__(job_id, f"job {job_id} failed: {exc_type}: {exc_message}")
        self.exc_type = exc_type
        self.exc_message = exc_message
        self.traceback = traceback

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuilt(
            JobFailed, self, self.job_id, self.exc_type, self.exc_message, self.traceback
        )


class JobAborted(JobError):
    """The job was aborted before it finished."""

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id, f"job {job_id} was aborted")

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuilt(JobAborted, self, self.job_id)


class JobRejected(JobError):
    """A unique-job lock rejected the job when it came to run."""

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id, f"job {job_id} was rejected by its unique lock")

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuilt(JobRejected, self, self.job_id)


class JobDeadLettered(JobError):
    """The job went to the dead letters; ``reason`` says why."""

    def __init__(self, job_id: str, reason: str) -> None:
        super().__init__(job_id, f"job {job_id} was dead-lettered: {reason}")
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuilt(JobDeadLettered, self, self.job_id, self.reason)


class PayloadTooLarge(TaskrunnerError, ValueError):
    """A job's arguments (at enqueue: nothing is written) or its result (the attempt
    fails) are larger than the runner's ``max_payload``; or a progress value is larger
    than 64 KiB (``set_progress`` raises it; nothing is stored)."""

    def __init__(self, what: str, size: int, limit: int, *, setting: str = "max_payload") -> None:
        fix = "" if setting != "max_payload" else ", or raise max_payload"
        super().__init__(
            f"{what} is {size:,} bytes as JSON, over {setting} ({limit:,} bytes); "
            f"pass a reference (a key, a URL) instead of the data{fix}"
        )
        self.what = what
        self.size = size
        self.limit = limit
        self.setting = setting

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuilt(
            PayloadTooLarge, self, self.what, self.size, self.limit, setting=self.setting
        )


class NotReplicated(TaskrunnerError):
    """An enqueue reached the master, but fewer replicas than ``wait_replicas``
    confirmed it within ``wait_timeout``: a failover now could lose it. The job was
    written; enqueue again under the same ``job_id`` to be sure (enqueue is idempotent
    on a job id)."""

    def __init__(self, wanted: int, confirmed: object, timeout_ms: int) -> None:
        super().__init__(
            f"the write was confirmed by {confirmed} of {wanted} replica(s) within "
            f"{timeout_ms} ms (wait_replicas)"
        )
        self.wanted = wanted
        self.confirmed = confirmed
        self.timeout_ms = timeout_ms

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuilt(NotReplicated, self, self.wanted, self.confirmed, self.timeout_ms)


class MiddlewareError(TaskrunnerError):
    """A middleware broke the chain's contract (e.g. returned None instead of an
    Outcome). The attempt fails with this error, under the retry policy."""


class LockConflictError(TaskrunnerError):
    """A unique-job lock is held by another job (``holder``)."""

    def __init__(self, lock: str, holder: str) -> None:
        super().__init__(f"unique lock {lock} is held by job {holder}")
        self.lock = lock
        self.holder = holder

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuilt(LockConflictError, self, self.lock, self.holder)


class LostLease(TaskrunnerError):
    """This worker's lease on a job was taken over; it must not commit anything."""


class Retry(TaskrunnerError):  # a request, not an error: named like arq's and Celery's
    """Raise inside a task to ask for another attempt, after ``delay`` seconds if given.

    The attempt counts towards ``max_retries``; when none are left the job fails for good.
    """

    def __init__(self, delay: float | timedelta | None = None) -> None:
        super().__init__("retry requested")
        try:
            self.delay = signed_seconds(delay)
        except ValueError as exc:
            raise ConfigurationError(f"Retry(delay=...) {exc}") from None

    def __reduce__(self) -> tuple[type[Retry], tuple[float | None]]:
        return (type(self), (self.delay,))  # copies and pickles are made from the delay


class TaskTimeout(TaskrunnerError, TimeoutError):
    """A task ran longer than its ``timeout``; counts as a failed attempt."""
