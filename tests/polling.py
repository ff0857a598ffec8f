"""Wait for a condition with a deadline, from synchronous fixture code (conftest's
``wait_until`` is the async twin for tests)."""

from __future__ import annotations

import time
from collections.abc import Callable

import redis

# What a node that is starting, stopping or failing over answers with.
TRANSIENT: tuple[type[Exception], ...] = (OSError, redis.RedisError)


class NotReadyError(AssertionError):
    """A condition did not hold before its deadline; the message says what was seen last."""


def poll_until(
    condition: Callable[[], bool],
    timeout: float,
    what: str,
    *,
    interval: float = 0.02,
    details: Callable[[], str] | None = None,
    transient: tuple[type[Exception], ...] = TRANSIENT,
) -> None:
    """Call ``condition`` until it returns True or ``timeout`` seconds pass (then raise).

    A ``transient`` exception from ``condition`` counts as "not yet" (a node still
    starting refuses connections) and is reported if the deadline passes.
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            if condition():
                return
            last_error = None
        except transient as exc:
            last_error = exc
        if time.monotonic() > deadline:
            seen = _safe(details)
            error = f"; last error: {last_error!r}" if last_error is not None else ""
            raise NotReadyError(f"{what}: not within {timeout:g}s{error}\n{seen}".rstrip())
        time.sleep(interval)


def _safe(details: Callable[[], str] | None) -> str:
    if details is None:
        return ""
    try:
        return details()
    except TRANSIENT as exc:
        return f"(no details: {exc!r})"
