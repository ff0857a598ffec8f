"""Groups: jobs awaited together, results in order (``await tr.group([...])``).

A group is its jobs' handles and nothing else: no record of its own in Redis, so it
survives whatever its jobs survive (each is an ordinary job: retried, reclaimed from a
dead worker, dead-lettered), and a process that lost the handle rebuilds it from the
ids and their queue with ``Group([tr.job(i, queue) for i in ids])`` (a handle without a
queue looks in the runner's default queue).

The failure rule is the one of ``asyncio.gather(..., return_exceptions=True)``
followed by a raise: ``results()`` waits until every job is final, then returns the
results in the order of the jobs, or raises the error of the first job, in that order,
that did not succeed. ``return_exceptions=True`` puts each such error in its place
instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any, Generic, Literal, TypeVar, overload

import anyio

from taskrunner.exceptions import JobError
from taskrunner.job import Job, deadline
from taskrunner.options import wait_seconds

R = TypeVar("R")

WAITS = 100
"""Jobs of one group waited for at once (each wait is a pub/sub subscription)."""


class Group(Generic[R]):
    """Jobs awaited together: ``await group.results()`` gives their results in order."""

    __slots__ = ("jobs",)

    def __init__(self, jobs: Sequence[Job[R]]) -> None:
        self.jobs: tuple[Job[R], ...] = tuple(jobs)

    def __len__(self) -> int:
        return len(self.jobs)

    def __repr__(self) -> str:
        return f"Group({len(self.jobs)} jobs)"

    @overload
    async def results(
        self, timeout: float | timedelta | None = None, *, return_exceptions: Literal[False] = False
    ) -> list[R]: ...

    @overload
    async def results(
        self, timeout: float | timedelta | None = None, *, return_exceptions: Literal[True]
    ) -> list[R | JobError]: ...

    async def results(
        self, timeout: float | timedelta | None = None, *, return_exceptions: bool = False
    ) -> list[R] | list[R | JobError]:
        """Wait until every job is final; their results in the order of the jobs.

        Raises the error of the first job (in that order) that did not succeed
        (``JobFailed``, ``JobAborted``, ``JobRejected``, ``JobDeadLettered``,
        ``JobNotFound``), after all are final; with ``return_exceptions=True`` the
        errors are returned in their places instead. ``TimeoutError`` when ``timeout``
        (seconds or a ``timedelta``) passes first (the jobs go on)."""
        timeout = wait_seconds(timeout)
        found: list[Any] = [None] * len(self.jobs)
        limiter = anyio.CapacityLimiter(WAITS)
        look_once = timeout is not None and timeout <= 0  # as job.result(timeout=0)
        what = f"a group of {len(self.jobs)} jobs is not done"
        unfinished: list[str] = []

        async def one(index: int, job: Job[R]) -> None:
            async with limiter:
                try:
                    found[index] = await job.result(0 if look_once else None)
                except JobError as exc:
                    found[index] = exc
                except TimeoutError:  # looked once: not final
                    unfinished.append(job.id)

        with deadline(None if look_once else timeout, what):
            async with anyio.create_task_group() as tg:
                for index, job in enumerate(self.jobs):
                    tg.start_soon(one, index, job)
        if unfinished:
            raise TimeoutError(f"{what} after 0s")
        if not return_exceptions:
            for value in found:
                if isinstance(value, JobError):
                    raise value
        return found
