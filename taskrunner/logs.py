"""Logging: structured fields on job records, one line per Redis outage, JSON output.

Every record about a job carries ``extra`` fields ``job_id``, ``task``, ``queue`` and
``attempt`` (``job_extra``), so a JSON formatter or a log pipeline can filter by them.
``JsonFormatter`` writes one JSON object per line with those fields; the CLI selects it
with ``--log-format json`` (``TASKRUNNER_LOG_FORMAT=json``). Both formatters hide the
password of any Redis URL in a line.

Under uvicorn (an embedded worker in a FastAPI app), ``log_through_uvicorn()`` sends
taskrunner's records to uvicorn's handlers; ``taskrunner.fastapi.lifespan`` does it.

``Outage`` turns a stream of connection failures from several loops into one WARNING
when Redis goes away and one INFO line when it is back.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from typing import Any, ClassVar

from taskrunner.job import JobContext, safe_text
from taskrunner.urls import redact

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

JOB_FIELDS = ("job_id", "task", "queue", "attempt")
_EXCERPT = 200


def job_extra(job: JobContext) -> dict[str, Any]:
    """The structured fields of a job's log records."""
    return {"job_id": job.id, "task": job.task, "queue": job.queue, "attempt": job.attempt}


def excerpt(value: object, limit: int = _EXCERPT) -> str:
    """A bounded, printable excerpt of a value that may be hostile or huge."""
    text = value if isinstance(value, str) else repr(value)
    return safe_text(text, limit)


class Outage:
    """Rate-limits connection warnings: one WARNING when Redis has been unreachable for
    ``confirm`` seconds (whichever loop notices; a single failed call on a connection
    that a restart closed is a blip, logged at DEBUG), one INFO when a call succeeds
    again, nothing in between. One instance per process (``Outage.shared``)."""

    _instances: ClassVar[dict[str, Outage]] = {}

    def __init__(self, logger: logging.Logger, what: str = "redis", confirm: float = 1.0) -> None:
        self._logger = logger
        self._what = what
        self._confirm = confirm
        self._since: float | None = None
        self._warned = False
        self._count = 0

    @classmethod
    def shared(cls, what: str = "redis") -> Outage:
        found = cls._instances.get(what)
        if found is None:
            found = cls._instances[what] = cls(logging.getLogger("taskrunner"), what)
        return found

    @property
    def active(self) -> bool:
        return self._warned

    def failed(self, where: str, exc: BaseException) -> None:
        now = time.monotonic()
        self._count += 1
        if self._since is None:
            self._since = now
        if self._warned:
            return
        if now - self._since < self._confirm:
            self._logger.debug(
                "%s call failed in %s (%s: %s)", self._what, where, type(exc).__name__, exc
            )
            return
        self._warned = True
        self._logger.warning(
            "%s unavailable (%s: %s, in %s); retrying until it is back",
            self._what,
            type(exc).__name__,
            excerpt(str(exc)),
            where,
        )

    def ok(self) -> None:
        if self._since is None:
            return
        if self._warned:
            self._logger.info(
                "%s reachable again after %.1fs (%d failed calls meanwhile)",
                self._what,
                time.monotonic() - self._since,
                self._count,
            )
        self._since = None
        self._warned = False
        self._count = 0


class TextFormatter(logging.Formatter):
    """``TEXT_FORMAT`` lines, with passwords of Redis URLs hidden."""

    def __init__(self, fmt: str = TEXT_FORMAT) -> None:
        super().__init__(fmt)

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the job fields when the
    record has them, and the formatted exception if any (passwords of Redis URLs
    hidden)."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(self._json(record))

    def _json(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in JOB_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class Throttle:
    """Logs a recurring warning at most once per ``period`` seconds per key."""

    def __init__(self, logger: logging.Logger, period: float = 60.0) -> None:
        self._logger = logger
        self._period = period
        self._last: dict[str, float] = {}

    def warning(self, key: str, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -self._period) >= self._period:
            self._last[key] = now
            if len(self._last) > 1000:  # bounded: forget the oldest keys
                for old in sorted(self._last, key=self._last.__getitem__)[:500]:
                    del self._last[old]
            self._logger.warning(message, *args)


def setup(level: str = "info", fmt: str = "text") -> None:
    """Log to stderr at ``level`` as ``text`` or ``json`` lines (the CLI's setup)."""
    logging.basicConfig(level=level.upper())
    logging.getLogger().setLevel(level.upper())  # basicConfig keeps a level set before
    formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter)


def log_through_uvicorn(level: int | None = None) -> bool:
    """Send taskrunner's records to uvicorn's handlers (those of the ``uvicorn`` logger,
    which ``uvicorn.error`` uses), when uvicorn configured logging and nothing else did:
    under ``uvicorn app:app`` the root logger has no handler, so an embedded worker's
    lines would be lost (INFO) or printed bare (WARNING). True when it did. ``level``
    defaults to uvicorn's."""
    source = logging.getLogger("uvicorn")
    target = logging.getLogger("taskrunner")
    if target.handlers or logging.getLogger().handlers or not source.handlers:
        return False
    for handler in source.handlers:
        target.addHandler(handler)
    target.setLevel(level if level is not None else source.getEffectiveLevel())
    target.propagate = False
    return True
