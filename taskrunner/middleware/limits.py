"""Rate and concurrency limits: at most N attempts of a task running at once, at most N
starting per period, across every worker, optionally per value of some arguments.

    @tr.task(concurrency_limit=2)                      at most 2 running at once
    @tr.task(rate_limit="100/m")                       at most 100 starts in any minute
    @tr.task(rate_limit="10/s", limit_args=["account_id"])   ... per account_id

An attempt takes its slot in Redis when it starts (acquire.lua), before the task runs.
A job over a limit does not wait in a worker: the attempt ends with a *reschedule*
(same id, same attempt count, not a failed attempt; ``JobInfo.reschedules`` counts it)
and waits in the delayed set:

- over the rate limit, until the window's oldest start leaves it (plus up to 10% of
  the period, at most 1 s, of jitter): the moment a start is free again;
- over the concurrency limit, until the earliest holder's lease would expire (plus up
  to 10% jitter), and it is registered as a *waiter*: when a slot is given back
  (release.lua), the waiters that fit are woken at once (hasten.lua makes them due now;
  one refused a moment ago and still being committed is flagged, and its reschedule is
  then due at once). The lease bound only matters when a wake-up is lost (a worker died
  between giving back a slot and waking a waiter).

Every check is one script call on the limit's keys, with bounded work (the expired
entries of a window or of the holders, at most N; at most 100 waiters dropped or woken).

Slots are leases. A concurrency slot is a member of a sorted set scored by its expiry
(server time), ``stale_after`` ahead; the holder's worker renews the slots it holds every
``stale_after / 3`` (renew.lua) and gives each back when the attempt ends, whatever the
outcome (in ``finally``, shielded from cancellation). A killed worker's slots expire
``stale_after`` after its last renewal and are dropped by the next check, so they never
leak. A rate start is a member of a sorted set scored by its start time; it counts for
one period.

Keys (taskrunner.keys.LimitKeys): ``{ns}:limit:{digest}:running|starts|waiting``, where
the digest covers the task name and the canonical JSON of the ``limit_args`` values, a
set's items sorted (none: one limit for the task, whatever its queue). The hash tag is
the digest, so a limit is one Cluster slot apart from every queue's, and each limit
script touches only the limit's keys. So taking or giving back a slot is not atomic with
the job's commit. It is still safe: a slot taken by an attempt that then dies, or whose
reply was lost, is a lease that expires after ``stale_after``; giving back is idempotent
(removing a holder that is gone changes nothing); a wake-up that goes astray (the job
finished, was aborted, or was already woken) changes nothing but the job's due time, at
worst making it check again early; and a start counted for an attempt that did not run
only makes the rate limit stricter for one period.

Order in the chain: lease, isolation, limits, unique, retry, timeout, user. Inside lease
(the attempt is heartbeated, and cancelled on a lost lease, while it holds a slot) and
isolation (a suspect waiting for its worker to empty, or a job waiting while a suspect
runs alone, holds no slot meanwhile); outside unique, so a job refused by its limit has
not started: its ``until_executing`` lock stays held (duplicates are still refused
while it waits) and a ``while_executing`` lock is not taken and dropped at every check;
outside retry and timeout, so the slot spans the whole attempt including the retry
decision, a refusal is an outcome the retry policy never sees, and the timeout clock
starts when the slot is taken.
"""

from __future__ import annotations

import inspect
import logging
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Self

import anyio
from pydantic import Field, ValidationInfo, field_validator, model_validator

from taskrunner import scripts
from taskrunner.connection import REDIS_ERRORS, reachable, report, wrong_type
from taskrunner.exceptions import ConfigurationError
from taskrunner.keys import LimitKeys, QueueKeys
from taskrunner.logs import job_extra
from taskrunner.middleware.base import (
    ExecuteNext,
    ExecutionContext,
    Middleware,
    Outcome,
    WorkerPort,
)
from taskrunner.middleware.pipeline import Undo, WorkerPipelines
from taskrunner.middleware.unique import lock_digest, stored_arguments
from taskrunner.options import FUNCTION, MAX_SECONDS, TaskOptions
from taskrunner.task import TaskDefinition

logger = logging.getLogger("taskrunner.limits")

MAX_LIMIT = 100_000
"""The largest ``concurrency_limit`` and rate count: a limit's sorted sets hold up to
this many members, and a check may drop that many expired ones."""
MIN_WAIT = 0.05
"""Seconds a refused job waits at least (so that nothing spins)."""
MAX_RATE_JITTER = 1.0
"""Seconds of jitter added at most to a rate-limited job's wait."""
RELEASE_DEADLINE = 5.0
"""Seconds a slot's give-back may take (Redis away): after that it expires instead."""
WAKE_ROUNDS = 3
"""Rounds of wake-ups after a release, when woken waiters turned out to be gone."""
_RETRY_AFTER_REDIS_ERROR = 1.0
_PERIODS = {"s": 1_000, "m": 60_000, "h": 3_600_000}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*([smh])\s*$")
_RATE_FORM = (
    "it must be a count, '/' and a period of s, m or h, optionally with a number "
    "(e.g. '100/m', '5/s', '10/30s')"
)


@dataclass(frozen=True, slots=True)
class Rate:
    """A parsed ``rate_limit``: at most ``count`` starts in any ``period_ms``."""

    count: int
    period_ms: int

    @classmethod
    def parse(cls, text: str) -> Rate:
        """``"100/m"`` -> Rate(100, 60000); ValueError for anything else."""
        found = _RATE.match(text)
        if found is None:
            raise ValueError(_RATE_FORM)
        count, multiple, unit = int(found[1]), int(found[2] or 1), found[3]
        if not 1 <= count <= MAX_LIMIT:
            raise ValueError(f"its count must be from 1 to {MAX_LIMIT:,}, got {count}")
        if multiple < 1:
            raise ValueError("its period must be at least 1 " + unit)
        period_ms = multiple * _PERIODS[unit]
        if period_ms > MAX_SECONDS * 1000:
            raise ValueError(f"its period must be at most {MAX_SECONDS:.0f} seconds (100 years)")
        return cls(count, period_ms)


class LimitOptions(TaskOptions):
    """The limit options of a task (all None: no limit)."""

    concurrency_limit: int | None = Field(default=None, ge=1, le=MAX_LIMIT)
    """At most this many attempts of the task (per ``limit_args`` value) run at once,
    across every worker."""
    rate_limit: str | None = None
    """At most N attempts start in any period: ``"N/s"``, ``"N/m"``, ``"N/h"``, or with a
    number of units (``"10/30s"``)."""
    limit_args: list[str] | None = None
    """Names of parameters: each combination of their values has limits of its own
    (``["account_id"]``). None: one limit for the whole task."""

    @field_validator("rate_limit")
    @classmethod
    def _rate_form(cls, value: str | None) -> str | None:
        if value is not None:
            Rate.parse(value)
        return value

    @field_validator("limit_args")
    @classmethod
    def _parameters(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("it must name at least one parameter (or leave it out)")
        if len(set(value)) != len(value):
            raise ValueError("it names a parameter twice")
        fn = (info.context or {}).get(FUNCTION)
        if fn is not None:
            names = list(inspect.signature(fn).parameters)
            unknown = [name for name in value if name not in names]
            if unknown:
                raise ValueError(
                    f"the function has no parameter {unknown[0]!r} "
                    f"(its parameters: {', '.join(names) or 'none'})"
                )
        return value

    @model_validator(mode="after")
    def _combination(self) -> Self:
        if self.limit_args is not None and self.concurrency_limit is None and not self.rate_limit:
            raise ValueError(
                "limit_args only applies with a limit: also set concurrency_limit= or rate_limit="
            )
        return self

    @property
    def rate(self) -> Rate | None:
        return Rate.parse(self.rate_limit) if self.rate_limit else None


@dataclass(frozen=True, slots=True)
class _Limit:
    """A task's limits, parsed once."""

    concurrency: int
    rate: Rate | None
    args: tuple[str, ...]
    digest: str | None
    """The digest when the limit is not keyed by arguments (computed once)."""
    keys: dict[str, LimitKeys] = field(default_factory=dict)
    """Its keys by namespace, when it is not keyed by arguments."""


def limit_digest(task_name: str, values: dict[str, Any]) -> str:
    """The digest naming a limit: the task name and the canonical JSON of the values of
    its ``limit_args`` by name (``{}`` when the limit is the task's as a whole)."""
    return lock_digest(task_name, values)


def waiter_member(keys: QueueKeys, job_id: str) -> str:
    """How a job waiting for a slot is recorded: ``queue<TAB>partition<TAB>job id`` (a
    queue name has no whitespace; a job id may, so it comes last)."""
    return f"{keys.queue}\t{keys.partition}\t{job_id}"


def parse_waiter(namespace: str, member: str) -> tuple[QueueKeys, str] | None:
    """The partition and job id of a waiter member; None for anything malformed."""
    queue, _, rest = member.partition("\t")
    partition, _, job_id = rest.partition("\t")
    # isdigit() is true of '²' and of 5,000 digits, which int() refuses
    if not (partition.isascii() and partition.isdigit() and len(partition) <= 4 and job_id):
        return None
    try:
        return QueueKeys(namespace, queue, int(partition)), job_id
    except ConfigurationError:
        return None


class _WorkerLimits:
    """One worker's limit state: the slots it holds."""

    def __init__(self) -> None:
        self.held: dict[str, str] = {}
        """Concurrency slots held: lease token -> the limit's holders key."""


class LimitsMiddleware(Middleware):
    """Takes, renews and gives back limit slots (see the module)."""

    Options = LimitOptions

    def __init__(self) -> None:
        self._limits: dict[str, _Limit] = {}
        self._workers: dict[WorkerPort, _WorkerLimits] = {}
        self._calls = WorkerPipelines("limit calls")
        """Takes and give-backs of concurrent jobs go in one pipeline (batched per limit)."""

    def applies_to(self, task: TaskDefinition) -> bool:
        opts = task.options_for(LimitOptions)
        return opts.concurrency_limit is not None or opts.rate_limit is not None

    def limit(self, task: TaskDefinition) -> _Limit:
        """``task``'s limits, parsed once."""
        found = self._limits.get(task.name)
        if found is None:
            opts = task.options_for(LimitOptions)
            args = tuple(opts.limit_args or ())
            found = self._limits[task.name] = _Limit(
                concurrency=opts.concurrency_limit or 0,
                rate=opts.rate,
                args=args,
                digest=None if args else limit_digest(task.name, {}),
            )
        return found

    def keys(self, ctx: ExecutionContext, limit: _Limit) -> LimitKeys:
        """The keys of the limit this attempt falls under."""
        namespace = ctx.keys.namespace
        if limit.digest is not None:
            found = limit.keys.get(namespace)
            if found is None:
                found = limit.keys[namespace] = LimitKeys(namespace, limit.digest)
            return found
        # validated JSON keyed by parameter name, with its sets in a fixed order (the
        # stored JSON lists a set's items in the order of the process that enqueued it)
        stored = stored_arguments(ctx.task, ctx.payload)
        values = {name: stored.get(name) for name in limit.args}
        return LimitKeys(namespace, limit_digest(ctx.task.name, values))

    # -- the attempt -------------------------------------------------------------------

    async def execute(self, ctx: ExecutionContext, call_next: ExecuteNext) -> Outcome:
        limit = self.limit(ctx.task)
        keys = self.keys(ctx, limit)
        state = self._workers.get(ctx.worker)
        answered = False
        try:
            refused = await self._acquire(ctx, limit, keys)
            answered = True
        finally:
            if not answered and limit.concurrency:  # cancelled while taking: give back
                await self._release(ctx, limit, keys, wake=False)
        if refused is not None:
            return refused
        if not limit.concurrency:
            return await call_next(ctx)
        held = state.held if state is not None else {}
        held[ctx.lease] = keys.running
        try:
            return await call_next(ctx)
        finally:
            held.pop(ctx.lease, None)
            await self._release(ctx, limit, keys)

    async def _acquire(
        self, ctx: ExecutionContext, limit: _Limit, keys: LimitKeys
    ) -> Outcome | None:
        """Take the slot: None when taken, else the reschedule to wait with."""
        rate = limit.rate
        call = scripts.acquire(
            ctx.worker.env,
            keys,
            ctx.lease,
            waiter_member(ctx.keys, ctx.job.id),
            limit.concurrency,
            _ms(ctx.worker.stale_after),
            rate.count if rate else 0,
            rate.period_ms if rate else 0,
        )
        try:
            reply = await self._calls.run(ctx.worker, call, _give_back(ctx, limit, keys))
        except REDIS_ERRORS as exc:  # a refused call (a worker's pipeline rides outages)
            if limit.concurrency:  # the reply may be what was lost: give back at once
                await self._release(ctx, limit, keys, wake=False)
            if wrong_type(exc):  # hostile data: rescheduling would not mend it
                return Outcome.dead(f"a key of its limits holds another type of value ({exc})")
            logger.warning(
                "job %s %s attempt %d: cannot check its limits (%s); rescheduled",
                ctx.job.id,
                ctx.job.task,
                ctx.job.attempt,
                exc,
                extra=job_extra(ctx.job),
            )
            return Outcome.reschedule(time.time() + _RETRY_AFTER_REDIS_ERROR)
        code, wait_ms = int(reply[0]), int(reply[1])
        if code == 0:
            if reply[2]:
                await self._wake(ctx, limit, keys, _texts(reply[2]))
            return None
        return self._refused(ctx, limit, code, wait_ms / 1000)

    def _refused(self, ctx: ExecutionContext, limit: _Limit, code: int, wait: float) -> Outcome:
        rate = limit.rate
        period = rate.period_ms / 1000 if rate else 0.0
        wait = refused_wait(code, wait, ctx.worker.stale_after, period)
        if code == 1:
            which = f"concurrency limit {limit.concurrency}"
            wait *= random.uniform(1.0, 1.1)
        else:
            assert rate is not None
            which = f"rate limit {rate.count} per {period:g}s"
            wait += random.uniform(0.0, min(MAX_RATE_JITTER, rate.period_ms / 10_000))
        wait = max(MIN_WAIT, wait)
        logger.debug(
            "job %s %s attempt %d: %s reached; waits up to %.3fs in the delayed set",
            ctx.job.id,
            ctx.job.task,
            ctx.job.attempt,
            which,
            wait,
            extra=job_extra(ctx.job),
        )
        return Outcome.reschedule(time.time() + wait)

    async def _release(
        self,
        ctx: ExecutionContext,
        limit: _Limit,
        keys: LimitKeys,
        *,
        wake: bool = True,
    ) -> None:
        """Give the slot back (shielded from cancellation, bounded in time: a slot that
        cannot be given back expires after stale_after); wake the waiters that fit."""
        call = scripts.release(keys, ctx.lease, limit.concurrency, _ms(ctx.worker.stale_after))
        problem = f"no answer within {RELEASE_DEADLINE:g}s"
        with anyio.CancelScope(shield=True, deadline=anyio.current_time() + RELEASE_DEADLINE):
            try:
                waiters = await self._calls.run(ctx.worker, call)
            except REDIS_ERRORS as exc:
                problem = str(exc)
            else:
                if wake and waiters:
                    await self._wake(ctx, limit, keys, _texts(waiters))
                return
        logger.warning(
            "job %s %s attempt %d: could not give back its concurrency slot (%s); "
            "it expires in %gs",
            ctx.job.id,
            ctx.job.task,
            ctx.job.attempt,
            problem,
            ctx.worker.stale_after,
            extra=job_extra(ctx.job),
        )

    async def _wake(
        self, ctx: ExecutionContext, limit: _Limit, keys: LimitKeys, waiters: list[str]
    ) -> None:
        """Make waiting jobs due now, one per free slot; pick others for those that are
        gone (a few rounds at most). A failure only delays them (to their lease bound)."""
        worker = ctx.worker
        try:
            for round_ in range(WAKE_ROUNDS):
                woken = await _hasten(worker, ctx.keys.namespace, waiters)
                if woken >= len(waiters) or round_ == WAKE_ROUNDS - 1:
                    return
                call = scripts.release(keys, "", limit.concurrency, _ms(worker.stale_after))
                waiters = _texts(await scripts.run(worker.redis, call))
                if not waiters:
                    return
        except REDIS_ERRORS as exc:
            logger.warning(
                "job %s %s: could not wake the jobs waiting for its limit (%s); "
                "they check again within %gs",
                ctx.job.id,
                ctx.job.task,
                exc,
                worker.stale_after,
                extra=job_extra(ctx.job),
            )

    # -- the worker's services ---------------------------------------------------------

    async def on_worker_start(self, worker: WorkerPort) -> None:
        self._workers[worker] = _WorkerLimits()
        self._calls.start(worker)
        worker.spawn(lambda: self._renewals(worker))

    async def on_worker_stop(self, worker: WorkerPort) -> None:
        self._workers.pop(worker, None)
        self._calls.stop(worker)

    async def _renewals(self, worker: WorkerPort) -> None:
        while True:
            await anyio.sleep(worker.stale_after / 3)
            try:
                if await self.renew(worker) is not None:
                    reachable()  # only a call that was made says Redis answers
            except REDIS_ERRORS as exc:
                report("limit slot renewals", exc)
            except Exception:  # hostile data or a bug: keep renewing
                logger.exception("limit slot renewals: unexpected error; retrying")

    async def renew(self, worker: WorkerPort) -> int | None:
        """Renew every concurrency slot ``worker`` holds: one script call per limit, in
        one pipeline. Returns how many slots were renewed (None: it held none)."""
        state = self._workers.get(worker)
        if state is None or not state.held:
            return None
        held = state.held
        by_key: dict[str, list[str]] = {}
        for token, running in list(held.items()):
            by_key.setdefault(running, []).append(token)
        lease_ms = _ms(worker.stale_after)
        calls = [scripts.renew(key, lease_ms, tokens) for key, tokens in by_key.items()]
        replies = await scripts.run_many(worker.redis, calls, raise_on_error=False)
        renewed = 0
        for (key, tokens), reply in zip(by_key.items(), replies, strict=True):
            if isinstance(reply, Exception):
                logger.warning("could not renew the slots of limit %s: %s", key, reply)
                continue
            lost = set(_texts(reply)) & set(held)
            renewed += len(tokens) - len(lost)
            if lost:
                logger.warning(
                    "%d concurrency slot(s) of limit %s expired while their jobs ran (the "
                    "worker stalled for stale_after); those jobs run on without one",
                    len(lost),
                    key,
                )
                for token in lost:
                    held.pop(token, None)
        return renewed


def refused_wait(code: int, wait: float, stale_after: float, period: float) -> float:
    """The seconds a refused job waits before its jitter: ``wait`` as acquire.lua said
    (``code`` 1: a concurrency slot, 2: the rate window), at most a lease
    (``stale_after``) or a rate ``period``; anything outside 0 to that bound (negative,
    NaN, infinite: what hostile scores make of it) is the bound."""
    bound = stale_after if code == 1 else period
    if not 0.0 <= wait <= bound:  # false for NaN too
        return bound
    return wait


def _give_back(ctx: ExecutionContext, limit: _Limit, keys: LimitKeys) -> Undo | None:
    """What reverses a take whose attempt was cancelled before the reply: the give-back
    of the slot it took, sent after the take (the attempt's own give-back, sent at once,
    may go in the take's pipeline, where the calls of one script run together)."""
    if not limit.concurrency:
        return None

    def undo(reply: Any) -> scripts.ScriptCall | None:
        if int(reply[0]) != 0:
            return None  # refused: nothing taken
        return scripts.release(keys, ctx.lease, limit.concurrency, _ms(ctx.worker.stale_after))

    return undo


async def _hasten(worker: WorkerPort, namespace: str, waiters: Sequence[str]) -> int:
    """Wake these waiters (hasten.lua); how many were still waiting."""
    calls = [
        scripts.hasten(worker.env, *found)
        for member in waiters
        if (found := parse_waiter(namespace, member)) is not None
    ]
    replies = await scripts.run_many(worker.redis, calls, raise_on_error=False)
    return sum(1 for reply in replies if reply == 1)


def _texts(reply: Any) -> list[str]:
    return [str(item) for item in reply] if isinstance(reply, list) else []


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


__all__ = ["LimitOptions", "LimitsMiddleware", "Rate", "limit_digest"]
