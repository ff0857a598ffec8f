"""Tasks: the typed wrapper ``@tr.task`` returns (``Task``; ``BoundTask`` with per-enqueue
options). What a task is and one call of it are in taskrunner.definition."""

from __future__ import annotations

from collections.abc import Awaitable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, Protocol, TypeVar

from taskrunner.chain import Chain, ChainJob
from taskrunner.definition import Call, EnqueueOptions, TaskDefinition

if TYPE_CHECKING:
    from taskrunner.job import Job

P = ParamSpec("P")
R = TypeVar("R")


class Enqueues(Protocol):
    """What a task needs of its runner: to enqueue calls (``TaskRunner.enqueue_many``)
    and chains (``TaskRunner.enqueue_chain``)."""

    async def enqueue_many(self, calls: list[Call[Any]], /) -> list[Job[Any]]: ...

    async def enqueue_chain(
        self, first: Call[Any], steps: Sequence[Call[Any]]
    ) -> ChainJob[Any]: ...


class _Enqueuer(Generic[P, R]):
    __slots__ = ("_definition", "_enqueue_options", "_runner")

    def __init__(self, runner: Enqueues, definition: TaskDefinition, opts: EnqueueOptions):
        self._runner = runner
        self._definition = definition
        self._enqueue_options = opts

    def call(self, *args: P.args, **kwargs: P.kwargs) -> Call[R]:
        """A call of this task for ``enqueue_many`` (nothing is validated or sent yet)."""
        return Call(self._definition, args, kwargs, self._enqueue_options)

    async def enqueue(self, *args: P.args, **kwargs: P.kwargs) -> Job[R]:
        """Validate the arguments, send the job, and return its handle.

        A wrong argument raises pydantic's ``ValidationError`` (or ``TypeError`` when
        it does not fit the signature) and writes nothing.
        """
        jobs = await self._runner.enqueue_many([self.call(*args, **kwargs)])
        return jobs[0]

    async def enqueue_many(self, calls: Iterable[Call[R]]) -> list[Job[R]]:
        """Enqueue many calls, one pipelined round trip per batch.

        Every call is validated before anything is written: one bad call raises and
        writes nothing. Returns the handles in the order of ``calls``.
        """
        return await self._runner.enqueue_many(list(calls))

    def chain(self, *args: P.args, **kwargs: P.kwargs) -> Chain[R]:
        """The first step of a chain (docs/chains.md): ``add.chain(1, 2).then(double)``
        runs ``double`` with ``add``'s result when it succeeds. Nothing is sent before
        ``await ....enqueue()``."""
        return Chain(self._runner, self.call(*args, **kwargs))


class BoundTask(_Enqueuer[P, R]):
    """A task with per-enqueue options (``task.options(delay=10)``)."""


class Task(_Enqueuer[P, R]):
    """A function declared with ``@tr.task``. Calling it still just runs the coroutine."""

    __slots__ = ("__wrapped__", "fn", "name", "queue")

    def __init__(self, runner: Enqueues, definition: TaskDefinition) -> None:
        super().__init__(runner, definition, EnqueueOptions())
        self.fn = definition.fn
        self.name = definition.name
        self.queue = definition.queue
        self.__wrapped__ = definition.fn

    @property
    def definition(self) -> TaskDefinition:
        return self._definition

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Awaitable[R]:
        return self.fn(*args, **kwargs)

    def options(
        self,
        *,
        delay: float | timedelta | None = None,
        at: datetime | None = None,
        job_id: str | None = None,
        queue: str | None = None,
        priority: str | None = None,
    ) -> BoundTask[P, R]:
        """Options for the next enqueue: ``delay`` seconds (or timedelta) or ``at`` a time,
        a caller-chosen ``job_id`` (enqueue is idempotent while that job exists), a
        queue, a ``priority`` level (one of the runner's ``priorities``).
        """
        opts = EnqueueOptions(delay=delay, at=at, job_id=job_id, queue=queue, priority=priority)
        return BoundTask(self._runner, self._definition, opts)

    def __repr__(self) -> str:
        return f"Task({self.name!r}, queue={self.queue!r})"


__all__ = ["BoundTask", "Call", "EnqueueOptions", "Enqueues", "Task", "TaskDefinition"]
