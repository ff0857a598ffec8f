"""Isolation: a job suspected of killing its workers runs alone, so only it pays.

When a worker process dies (a segfault in a C extension, an OOM kill, ``os._exit``),
every job it ran is requeued after ``stale_after``; they cannot all be to blame. The
rule taskrunner follows:

- a job that was running in ``suspect_after`` (default 2) worker deaths or stalls is a
  *suspect*: from then on it runs alone. The worker that takes it waits until nothing
  else runs, starts nothing else meanwhile, and marks the attempt (isolate.lua);
- if its worker dies again while it runs alone, the death is charged to the job
  (``JobInfo.crashes``); a job charged ``max_deliveries`` times goes to the dead
  letters as poison (claim.lua gives that verdict before it runs again).

So an ordinary job that merely ran beside a poison job is requeued at most once or
twice and then completes, and a poison job reaches the dead letters after
``suspect_after + max_deliveries`` deaths of its workers. Every other job goes through
``run_shared``: it waits while a suspect runs alone.
"""

from __future__ import annotations

import logging

from taskrunner import scripts
from taskrunner.connection import REDIS_ERRORS
from taskrunner.exceptions import ConfigurationError, LostLease
from taskrunner.logs import job_extra
from taskrunner.middleware.base import ExecuteNext, ExecutionContext, Middleware, Outcome

logger = logging.getLogger("taskrunner.isolation")

SUSPECT_AFTER = 2


class IsolationMiddleware(Middleware):
    """Runs suspects of killing their workers alone (see the module)."""

    def __init__(self, suspect_after: int = SUSPECT_AFTER) -> None:
        if suspect_after < 1:
            raise ConfigurationError("suspect_after must be at least 1")
        self.suspect_after = suspect_after

    async def execute(self, ctx: ExecutionContext, call_next: ExecuteNext) -> Outcome:
        if ctx.job.reclaims < self.suspect_after:
            async with ctx.worker.run_shared():
                return await call_next(ctx)
        async with ctx.worker.run_alone():
            await self._mark(ctx)
            return await call_next(ctx)

    async def _mark(self, ctx: ExecutionContext) -> None:
        logger.warning(
            "job %s %s attempt %d runs alone: it was running when %d workers died or "
            "stalled; if its worker dies again now, that counts towards max_deliveries",
            ctx.job.id,
            ctx.job.task,
            ctx.job.attempt,
            ctx.job.reclaims,
            extra=job_extra(ctx.job),
        )
        call = scripts.isolate(ctx.keys, ctx.job.id, ctx.lease)
        try:
            marked = await scripts.run(ctx.worker.redis, call)
        except REDIS_ERRORS as exc:  # run it anyway; a crash now is not charged
            logger.warning(
                "job %s: could not mark it as running alone (%s)",
                ctx.job.id,
                exc,
                extra=job_extra(ctx.job),
            )
            return
        if marked != 1:
            raise LostLease(f"job {ctx.job.id}: lease lost while it waited to run alone")
