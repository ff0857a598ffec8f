"""Retries: any exception (or ``raise Retry(delay=...)``) schedules another attempt."""

from __future__ import annotations

import logging
import random
import time

from pydantic import Field

from taskrunner.exceptions import Retry
from taskrunner.job import ErrorInfo, safe_text
from taskrunner.logs import job_extra
from taskrunner.middleware.base import ExecuteNext, ExecutionContext, Middleware, Outcome
from taskrunner.options import OptionalSeconds, TaskOptions

logger = logging.getLogger("taskrunner.retry")


class RetryOptions(TaskOptions):
    max_retries: int | None = Field(default=None, ge=0)
    """Retries after the first attempt (0 disables); None uses the runner's default."""
    retry_delay: OptionalSeconds = Field(default=None, ge=0)
    """Base of the exponential backoff in seconds; None uses the runner's default."""


class RetryMiddleware(Middleware):
    """Turns a failed attempt into a retry through the delayed set while retries are left.

    Backoff: ``retry_delay * 2 ** (attempt - 1)``, capped at ``max_delay``, with equal
    jitter (the delay is drawn from its upper half). ``Retry(delay=...)`` overrides it.
    """

    Options = RetryOptions

    def __init__(self, max_retries: int = 3, retry_delay: float = 1.0, max_delay: float = 300.0):
        self.max_retries = max_retries
        self.retry_delay = retry_delay
        self.max_delay = max_delay

    async def execute(self, ctx: ExecutionContext, call_next: ExecuteNext) -> Outcome:
        try:
            return await call_next(ctx)
        except Exception as exc:
            opts = self.options(ctx.task, RetryOptions)
            limit = self.max_retries if opts.max_retries is None else opts.max_retries
            if ctx.job.attempt > limit:
                raise
            delay = self.backoff(ctx.job.attempt, opts)
            if isinstance(exc, Retry) and exc.delay is not None:
                delay = max(0.0, float(exc.delay))  # a delay in the past: at once
            logger.warning(
                "job %s %s attempt %d failed (%s: %s); retry %d of %d in %.3fs",
                ctx.job.id,
                ctx.job.task,
                ctx.job.attempt,
                type(exc).__name__,
                safe_text(str(exc), 500),
                ctx.job.attempt,
                limit,
                delay,
                extra=job_extra(ctx.job),
            )
            return Outcome.retry(time.time() + delay, ErrorInfo.from_exception(exc))

    def backoff(self, attempt: int, opts: RetryOptions) -> float:
        base = self.retry_delay if opts.retry_delay is None else opts.retry_delay
        delay: float = min(self.max_delay, base * 2.0 ** (attempt - 1))
        return delay / 2 + random.uniform(0, delay / 2)
