"""One line, not a traceback, when what Redis holds breaks an operations command.

Anything in Redis may be hostile: a key of the wrong type (a string where a queue's
meta hash, a finished-job index or the dead letters belong) makes Redis answer
WRONGTYPE to the command that reads it. The operations commands (``job``, ``jobs``,
``retry``, ``abort``, ``info``, ``cron``, the dead-letter commands) read through
``data_errors()``: such an answer prints one line and exits 1, like any other
runtime failure (docs/workers.md). Errors about the URL or the credentials keep their
own line and exit code (``taskrunner.cli._common``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from redis.exceptions import ResponseError

from taskrunner.cli._common import RUNTIME_ERROR, fail, one_line


@contextmanager
def data_errors() -> Iterator[None]:
    """Turn an error answer of Redis (WRONGTYPE, a failed script) into one line, exit 1."""
    try:
        yield
    except ResponseError as exc:
        line = one_line(exc)
        if line is not None:  # credentials, database, protocol: the URL's fault
            fail(*line)
        fail(f"cannot read what Redis holds: {exc}", RUNTIME_ERROR)
