"""The clock taskrunner's scripts read: the Redis server's, shifted or frozen in tests.

Every due time, lock TTL and timestamp is decided inside the Lua scripts from the
server's clock (TIME), never from a client's, so a producer or a worker whose clock
runs ahead cannot promote a job early or shorten a lock. A runner's ``Clock`` only
shifts that time (``advance``) or pins it (``freeze``), for tests of delays, retries
and cron (taskrunner.testing); it is the identity in production. Leases and
heartbeats always run on real time.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Clock:
    """ "Now" as the scripts see it: the server's clock plus ``offset_ms``, or, while
    frozen, ``frozen_ms``."""

    __slots__ = ("_listeners", "frozen_ms", "offset_ms")

    def __init__(self) -> None:
        self.offset_ms = 0
        self.frozen_ms: int | None = None
        self._listeners: list[Callable[[], None]] = []

    def listen(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Call ``fn()`` after each ``freeze``, ``unfreeze``, ``advance`` and ``reset``
        (a cron service in this process wakes up); returns what stops it."""
        self._listeners.append(fn)

        def stop() -> None:
            if fn in self._listeners:
                self._listeners.remove(fn)

        return stop

    def _changed(self) -> None:
        for fn in list(self._listeners):
            fn()

    def __repr__(self) -> str:
        if self.frozen_ms is not None:
            return f"Clock(frozen at {self.frozen_ms / 1000:.3f})"
        return f"Clock(offset {self.offset_ms / 1000:g}s)"

    @property
    def arg(self) -> str:
        """The scripts' clock argument: ``=<ms>`` (frozen) or an offset in ms."""
        return f"={self.frozen_ms}" if self.frozen_ms is not None else str(self.offset_ms)

    def now(self) -> float:
        """Epoch seconds as the scripts see them, estimated with this process's clock."""
        if self.frozen_ms is not None:
            return self.frozen_ms / 1000
        return time.time() + self.offset_ms / 1000

    def shift(self, server_ms: int) -> int:
        """``server_ms`` (the server's TIME) as the scripts see it."""
        return self.frozen_ms if self.frozen_ms is not None else server_ms + self.offset_ms

    def freeze(self, at: float | None = None) -> None:
        """Stop time at ``at`` (epoch seconds; default: now, by this process's clock)."""
        self.frozen_ms = int((time.time() if at is None else at) * 1000) + (
            self.offset_ms if at is None else 0
        )
        self._changed()

    def unfreeze(self) -> None:
        """Let time run again from where it stood (the offset keeps the jump)."""
        if self.frozen_ms is not None:
            self.offset_ms = self.frozen_ms - int(time.time() * 1000)
            self.frozen_ms = None
            self._changed()

    def advance(self, seconds: float) -> None:
        """Move time forward (frozen or not)."""
        step = round(seconds * 1000)  # int() loses a ms to float error: 1.005 s
        if self.frozen_ms is not None:
            self.frozen_ms += step
        else:
            self.offset_ms += step
        self._changed()

    def reset(self) -> None:
        self.offset_ms = 0
        self.frozen_ms = None
        self._changed()
