"""A worker's consumer slots, and the gate that lets one job run alone.

``free`` slots bound how many jobs the worker reads. A job's slot frees when its task
ends, while its outcome is still on its way to Redis, so the next read overlaps the
commits' round trip instead of waiting for it; at most ``size`` outcomes may be
unanswered beyond that (reads pause while more are), which bounds what a slow Redis
lets pile up in memory. A job may ask to run alone (a
suspect of killing its worker, see ``taskrunner.middleware.isolation``): it waits until
no other job runs, no new job starts while it waits or runs, and the reader reads
nothing meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager


class Slots:
    def __init__(self, size: int) -> None:
        self.size = size
        self.free = size
        self.committing = 0
        self._shared = 0
        self._alone_wanted = 0
        self._alone = False
        self._changed = asyncio.Event()
        self._waiters = 0
        """Callers of ``changed()`` waiting now (with none, a change needs no new event)."""

    @property
    def busy(self) -> int:
        return self.size - self.free

    @property
    def isolating(self) -> bool:
        """A job runs alone, or waits to."""
        return self._alone or self._alone_wanted > 0

    @property
    def readable(self) -> int:
        """Slots the reader may fill now (none while a job runs or waits to run alone)."""
        if self._alone or self._alone_wanted:
            return 0
        return max(0, self.free - max(0, self.committing - self.size))

    def take(self, n: int) -> None:
        self.free -= n

    def release(self, n: int = 1) -> None:
        if n:
            self.free += n
            self._notify()

    def finish(self) -> None:
        """A job's task ended: its slot frees, its outcome waits for Redis' answer."""
        self.committing += 1
        self.release(1)

    def recorded(self) -> None:
        """Redis answered one outcome (see ``finish``)."""
        self.committing -= 1
        if self.committing >= self.size:
            self._notify()

    def poke(self) -> None:
        """Wake whoever waits for a change (e.g. the reader, when the worker stops)."""
        self._notify()

    def _notify(self) -> None:
        if self._waiters:
            self._changed.set()
            self._changed = asyncio.Event()

    async def changed(self) -> None:
        """Wait for the next release or gate change."""
        with self.watching() as event:
            await event.wait()

    @contextmanager
    def watching(self) -> Iterator[asyncio.Event]:
        """The event the next release or gate change sets, counted as waited for from
        now on: a change between this call and the wait (in a task that starts later)
        is not lost."""
        self._waiters += 1
        try:
            yield self._changed
        finally:
            self._waiters -= 1

    @asynccontextmanager
    async def alone(self) -> AsyncIterator[None]:
        self._alone_wanted += 1
        try:
            while self._shared or self._alone:
                await self.changed()
        finally:
            self._alone_wanted -= 1
        self._alone = True
        try:
            yield
        finally:
            self._alone = False
            self._notify()

    def shared(self) -> _Shared:
        """Run beside other jobs: waits while a job runs alone or waits to."""
        return _Shared(self)


class _Shared:
    """``Slots.shared()``: a plain async context manager (it is entered once per job, so
    it avoids the generator machinery of ``asynccontextmanager``)."""

    __slots__ = ("_slots",)

    def __init__(self, slots: Slots) -> None:
        self._slots = slots

    async def __aenter__(self) -> None:
        slots = self._slots
        while slots._alone or slots._alone_wanted:
            await slots.changed()
        slots._shared += 1

    async def __aexit__(self, *exc_info: object) -> None:
        slots = self._slots
        slots._shared -= 1
        if not slots._shared:
            slots._notify()
