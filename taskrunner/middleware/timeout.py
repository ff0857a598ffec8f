"""Timeouts: a task that runs too long is cancelled through anyio; a failed attempt."""

from __future__ import annotations

import anyio
from pydantic import Field

from taskrunner.exceptions import TaskTimeout
from taskrunner.middleware.base import ExecuteNext, ExecutionContext, Middleware, Outcome
from taskrunner.options import OptionalSeconds, TaskOptions
from taskrunner.task import TaskDefinition


class TimeoutOptions(TaskOptions):
    timeout: OptionalSeconds = Field(default=None, gt=0)
    """Seconds (or a timedelta) an attempt may run; None uses the runner's default."""


class TimeoutMiddleware(Middleware):
    """Cancels an attempt after its timeout and raises ``TaskTimeout`` in its place.

    A task that catches the cancellation and returns (or raises another error) times
    out all the same: the chain's innermost layer lets no caught cancellation end an
    attempt (``taskrunner.worker.consumers.terminal``), so it reaches this scope."""

    Options = TimeoutOptions

    def __init__(self, default: float | None = None) -> None:
        self.default = default

    def applies_to(self, task: TaskDefinition) -> bool:
        return self.default is not None or task.options_for(TimeoutOptions).timeout is not None

    async def execute(self, ctx: ExecutionContext, call_next: ExecuteNext) -> Outcome:
        opts = self.options(ctx.task, TimeoutOptions)
        limit = self.default if opts.timeout is None else opts.timeout
        if limit is None:
            return await call_next(ctx)
        with anyio.move_on_after(limit):
            return await call_next(ctx)
        # Only reached when the deadline cancelled the attempt.
        raise TaskTimeout(f"task {ctx.job.task} exceeded its timeout of {limit:g}s")
