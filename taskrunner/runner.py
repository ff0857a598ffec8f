"""TaskRunner: declares tasks, holds settings and the middleware chain, owns the connection."""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import math
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta, tzinfo
from types import TracebackType
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, Unpack, cast, overload

import anyio
import pydantic

from taskrunner import deadletters, scripts
from taskrunner.admin import Admin
from taskrunner.chain import MAX_STEPS, NEXT_HEADER, ChainJob, Spec, Step
from taskrunner.chain import handles as chain_handles
from taskrunner.client import Client, new_job_id
from taskrunner.clock import Clock
from taskrunner.codec import ResultCodec
from taskrunner.config import (
    DEFAULT_DEAD_LETTER_LIMIT,
    DEFAULT_DEAD_LETTER_TTL,
    RunnerSettings,
    reason,
)
from taskrunner.connection import PoolOptions, open_connection
from taskrunner.cron.schedule import DEFAULT_MAX_DRIFT, CronSchedule
from taskrunner.cron.service import CronMiddleware
from taskrunner.cron.tab import CronTab
from taskrunner.deadletters import DeadLetters
from taskrunner.embedded import EmbeddedRedis
from taskrunner.exceptions import (
    ConfigurationError,
    JobNotFound,
    LockConflictError,
    PayloadTooLarge,
    TaskrunnerError,
    UnknownOptionError,
)
from taskrunner.group import Group
from taskrunner.job import Job
from taskrunner.keys import (
    DEFAULT_LEVEL,
    DEFAULT_NAMESPACE,
    DEFAULT_PRIORITIES,
    QueueKeys,
    check_levels,
    check_many,
    check_name,
)
from taskrunner.middleware.base import EnqueueContext, Middleware, enqueue_layers
from taskrunner.middleware.isolation import IsolationMiddleware
from taskrunner.middleware.lease import LeaseMiddleware
from taskrunner.middleware.limits import LimitsMiddleware
from taskrunner.middleware.retry import RetryMiddleware
from taskrunner.middleware.timeout import TimeoutMiddleware
from taskrunner.middleware.unique import UniqueMiddleware
from taskrunner.options import FUNCTION, MAX_SECONDS, TaskOptions
from taskrunner.task import Call, EnqueueOptions, Task, TaskDefinition
from taskrunner.typed_options import TaskOptionsDict
from taskrunner.urls import parse_url, redact
from taskrunner.worker import Worker

if TYPE_CHECKING:
    from taskrunner.testing.idle import Committed

P = ParamSpec("P")
R = TypeVar("R")
R1 = TypeVar("R1")
R2 = TypeVar("R2")
R3 = TypeVar("R3")
R4 = TypeVar("R4")
R5 = TypeVar("R5")
R6 = TypeVar("R6")

logger = logging.getLogger("taskrunner")

ENQUEUE_BATCH = 1000
"""Calls per pipeline in ``enqueue_many``."""


def _timestamp(at: datetime) -> float:
    """``at`` in seconds since the epoch; a naive ``at`` is local time, and one the
    system cannot place in local time (year 1, say) is a ConfigurationError."""
    try:
        return at.timestamp()
    except (ValueError, OverflowError, OSError) as exc:
        raise ConfigurationError(
            f"at {at.isoformat()} cannot be placed in local time ({exc}): "
            "give a timezone-aware datetime"
        ) from None


def _seconds(value: float | timedelta) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


class TaskRunner:
    """The application object: ``tr = TaskRunner()``, ``@tr.task``, ``async with tr``.

    The Redis URL comes from the argument, else ``TASKRUNNER_REDIS_URL``, else an
    embedded redis-server for the current directory (see ``taskrunner.embedded``).

    Built-in middleware, outermost first: lease (heartbeats, reclaim, abort), isolation
    (a suspect of killing its workers runs alone), limits (rate and concurrency limits:
    inside isolation so no job holds a slot while it waits for the run-alone gate,
    outside unique so a job over its limit has not started), unique (locks: inside
    lease so heartbeats renew them, outside retry and timeout so a lock spans the whole
    attempt and its conflicts are outcomes the retry policy never sees), retry, timeout, cron
    (no layer: it starts a worker's cron service, taskrunner.cron); then
    ``middleware`` in the order given. ``lock_ttl`` is the default time a unique-job
    lock outlives its job's due time or last heartbeat.

    Scale and flow: ``partitions`` splits each queue over N key groups (Cluster slots;
    default 1, or one per primary on a cluster; see docs/deployment.md);
    ``priorities`` names the priority levels, highest first, and ``default_priority``
    the level of jobs that name none; a worker takes higher levels first, and one take
    in ten of each worker goes to the oldest lower-level job that has waited longer
    than ``priority_aging`` seconds (docs/scheduling.md, "Priorities").

    Connections: ``max_connections`` per client (on a cluster: calls in flight across all
    nodes, and a pool of that size per node for batched script calls, so up to twice that
    per node); a caller beyond it waits up to ``pool_timeout`` seconds. ``max_payload``
    bounds a job's arguments and its result, as JSON bytes. ``wait_replicas`` (default 0):
    every enqueue waits (Redis WAIT) until that many replicas have its write, up to
    ``wait_timeout`` seconds, else raises ``NotReplicated`` (see docs/deployment.md).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        queue: str = "default",
        namespace: str = DEFAULT_NAMESPACE,
        middleware: Sequence[Middleware] = (),
        result_ttl: float | timedelta = timedelta(days=1),
        max_retries: int = 3,
        retry_delay: float | timedelta = 1.0,
        timeout: float | timedelta | None = None,
        heartbeat_interval: float | timedelta = 5.0,
        stale_after: float | timedelta = 30.0,
        socket_timeout: float | timedelta = 10.0,
        lock_ttl: float | timedelta = 600.0,
        partitions: int | None = None,
        priorities: Sequence[str] = DEFAULT_PRIORITIES,
        default_priority: str | None = None,
        priority_aging: float | timedelta = 60.0,
        max_connections: int = 100,
        pool_timeout: float | timedelta = 20.0,
        max_payload: int = 1 << 20,
        dead_letter_limit: int = DEFAULT_DEAD_LETTER_LIMIT,
        dead_letter_ttl: float | timedelta = DEFAULT_DEAD_LETTER_TTL,
        wait_replicas: int = 0,
        wait_timeout: float | timedelta = 1.0,
    ) -> None:
        if url is not None:
            parse_url(url)  # a bad URL is refused here, in one sentence, password hidden
        cfg = RunnerSettings.check(
            result_ttl=result_ttl,
            max_retries=max_retries,
            retry_delay=retry_delay,
            timeout=timeout,
            heartbeat_interval=heartbeat_interval,
            stale_after=stale_after,
            socket_timeout=socket_timeout,
            lock_ttl=lock_ttl,
            partitions=partitions,
            priority_aging=priority_aging,
            max_connections=max_connections,
            pool_timeout=pool_timeout,
            max_payload=max_payload,
            dead_letter_limit=dead_letter_limit,
            dead_letter_ttl=dead_letter_ttl,
            wait_replicas=wait_replicas,
            wait_timeout=wait_timeout,
        )
        self.url = url
        self.queue = check_name("queue", queue)
        self.namespace = check_name("namespace", namespace)
        self.result_ttl = cfg.result_ttl
        self.socket_timeout = cfg.socket_timeout
        self.dead_letter_limit = cfg.dead_letter_limit
        self.dead_letter_ttl = cfg.dead_letter_ttl
        self.max_idle_wait = 5.0
        self.partitions = cfg.partitions
        self.priorities = check_levels(priorities)
        self.default_priority = _default_level(self.priorities, default_priority)
        self.priority_aging = cfg.priority_aging
        self.max_payload = cfg.max_payload
        self.replicas = (
            (cfg.wait_replicas, int(cfg.wait_timeout * 1000)) if cfg.wait_replicas else None
        )
        self.pool_options = PoolOptions(
            max_connections=cfg.max_connections,
            pool_timeout=cfg.pool_timeout,
            socket_timeout=cfg.socket_timeout,
        )
        self.lease = LeaseMiddleware(cfg.heartbeat_interval, cfg.stale_after)
        retry = RetryMiddleware(max_retries=cfg.max_retries, retry_delay=cfg.retry_delay)
        self.unique = UniqueMiddleware(lambda: self.client, lock_ttl=cfg.lock_ttl, retry=retry)
        self.limits = LimitsMiddleware()
        self.crontab = CronTab(self)
        """The cron schedules (``tr.cron``): list, pause, resume, trigger them."""
        self.middleware: list[Middleware] = [
            self.lease,
            IsolationMiddleware(),
            self.limits,
            self.unique,
            retry,
            TimeoutMiddleware(cfg.timeout),
            CronMiddleware(self.crontab),
            *middleware,
        ]
        self._option_owners = self._collect_option_owners()
        self.registry: dict[str, TaskDefinition] = {}
        self._enqueue_cache: dict[str, list[Middleware]] = {}
        self._client: Client | None = None
        self._embedded: EmbeddedRedis | None = None
        self._entered = 0
        self.clock = Clock()
        """Shifts or freezes the server's clock as the scripts see it (tests only)."""

    def __repr__(self) -> str:
        where = redact(self.url) if self.url else "TASKRUNNER_REDIS_URL or embedded"
        return f"TaskRunner({where!r}, namespace={self.namespace!r})"

    # -- declaring tasks -----------------------------------------------------------------

    @overload
    def task(self, fn: Callable[P, Awaitable[R]], /) -> Task[P, R]: ...

    @overload
    def task(
        self,
        *,
        name: str | None = None,
        queue: str | None = None,
        priority: str | None = None,
        options: Mapping[str, object] | None = None,
        **builtin: Unpack[TaskOptionsDict],
    ) -> Callable[[Callable[P, Awaitable[R]]], Task[P, R]]: ...

    def task(
        self,
        fn: Callable[P, Awaitable[R]] | None = None,
        *,
        name: str | None = None,
        queue: str | None = None,
        priority: str | None = None,
        options: Mapping[str, object] | None = None,
        **builtin: Unpack[TaskOptionsDict],
    ) -> Task[P, R] | Callable[[Callable[P, Awaitable[R]]], Task[P, R]]:
        """Declare an async function as a task, bare (``@tr.task``) or with options.

        ``name`` defaults to the function's qualified name; ``queue`` to the runner's;
        ``priority`` (a level of the runner's ``priorities``) to its default level.
        The keyword options are those of the built-in middleware (``timeout``,
        ``max_retries``, ``retry_delay``; the unique-job options ``lock``,
        ``on_conflict``, ``lock_ttl``, ``unique_args``, ``reschedule_delay``, see
        docs/unique-jobs.md; the limits ``concurrency_limit``, ``rate_limit``,
        ``limit_args``, see docs/limits.md), typed by ``TaskOptionsDict`` so a misspelt or mistyped
        option is a static error. ``options`` takes the options of user middleware (a
        mapping, best typed by a ``TypedDict`` of the middleware's own, see
        docs/middleware.md). Every option is validated strictly (no coercion) by the
        model of the middleware that owns it when the function is decorated: an option
        no middleware owns raises ``UnknownOptionError``, a bad value or combination
        ``ConfigurationError``; either is one sentence naming the task and the option.
        """

        if name is not None and (not isinstance(name, str) or not name):
            raise ConfigurationError(f"invalid task name {name!r}: it must be a non-empty string")

        def decorate(func: Callable[P, Awaitable[R]]) -> Task[P, R]:
            task_name = name or _default_name(func)
            if not callable(func) or not _is_async(func):
                raise ConfigurationError(
                    f"task {task_name!r}: @tr.task needs an async function, got {func!r}"
                )
            given = self._merge_options(builtin, options, task_name)
            owned = self._validate_options(given, task_name, func)
            if queue is not None:
                try:
                    check_name("queue", queue)
                except ConfigurationError as exc:
                    raise ConfigurationError(f"task {task_name!r}: {exc}") from None
            if task_name in self.registry:
                raise ConfigurationError(f"a task named {task_name!r} is already declared")
            if priority is not None:
                self.check_priority(priority, task_name)
            definition = TaskDefinition(
                func, task_name, queue or self.queue, dict(owned), priority=priority
            )
            self.registry[task_name] = definition
            return Task(self, definition)

        return decorate(fn) if fn is not None else decorate

    # -- cron ----------------------------------------------------------------------------

    @overload
    def cron(
        self,
        expression: str,
        call: Call[Any],
        /,
        *,
        name: str | None = None,
        tz: str | tzinfo = "UTC",
        max_drift: float | timedelta = DEFAULT_MAX_DRIFT,
    ) -> CronSchedule: ...

    @overload
    def cron(
        self,
        expression: str,
        /,
        *,
        name: str | None = None,
        tz: str | tzinfo = "UTC",
        max_drift: float | timedelta = DEFAULT_MAX_DRIFT,
    ) -> Callable[[Callable[[], Awaitable[R]]], Task[[], R]]: ...

    def cron(
        self,
        expression: str,
        call: Call[Any] | None = None,
        /,
        *,
        name: str | None = None,
        tz: str | tzinfo = "UTC",
        max_drift: float | timedelta = DEFAULT_MAX_DRIFT,
    ) -> CronSchedule | Callable[[Callable[[], Awaitable[R]]], Task[[], R]]:
        """Run a task on a cron schedule (docs/scheduling.md).

        ``expression`` has 5 fields (minute hour day month weekday) or 6 with a leading
        seconds field, in the time zone ``tz`` (an IANA name; default UTC). Three forms:

        * ``@tr.cron("*/5 * * * *")`` on an async function without parameters declares
          it as a task (named after the function) and schedules it;
        * ``@tr.cron(...)`` above ``@tr.task(...)`` schedules that task (it must take
          no arguments: checked by mypy and pyright);
        * ``tr.cron("0 8 * * *", report.call("daily", limit=10))`` schedules a task
          with fixed arguments (``task.call`` checks them against the signature,
          statically and at once; ``task.options(queue=..., priority=...).call(...)``
          sets the queue and priority) and returns the ``CronSchedule``.

        The schedule is named ``name`` (default: the task's name; unique per runner).
        Every worker reading its queue runs it; each tick enqueues exactly one job, id
        ``cron:<name>:<tick epoch seconds>``. A tick more than ``max_drift`` seconds late
        (default 60; at least 1) is skipped. A bad expression, time zone or argument
        raises ``ConfigurationError`` here, in one sentence.
        """
        if call is not None:
            return self.crontab.add(expression, call, name=name, tz=tz, max_drift=max_drift)

        def decorate(fn: Callable[[], Awaitable[R]]) -> Task[[], R]:
            declared = not isinstance(fn, Task)
            task = self._cron_task(fn, name) if declared else cast(Task[[], R], fn)
            empty: Call[R] = Call(task.definition, (), {}, EnqueueOptions())
            try:
                self.crontab.add(expression, empty, name=name, tz=tz, max_drift=max_drift)
            except ConfigurationError:
                if declared:  # the schedule is refused: so is the task it declared
                    self.registry.pop(task.name, None)
                raise
            return task

        return decorate

    def _cron_task(self, fn: Callable[[], Awaitable[R]], name: str | None) -> Task[[], R]:
        """``@tr.cron`` on a plain function: declare it as a task first, named as
        ``@tr.task`` names it (``name`` names the schedule)."""
        label = name or _default_name(fn)
        if not callable(fn) or not _is_async(fn):
            raise ConfigurationError(
                f"cron schedule {label!r}: @tr.cron needs an async function or a task, got {fn!r}"
            )
        task_name = _default_name(fn)
        if task_name in self.registry:
            raise ConfigurationError(
                f"cron schedule {label!r}: a task named {task_name!r} is already declared"
            )
        return self.task(fn)

    def _merge_options(
        self,
        builtin: TaskOptionsDict,
        extra: Mapping[str, object] | None,
        task: str,
    ) -> dict[str, Any]:
        """The keyword options and the ``options=`` mapping as one dict (each name once)."""
        merged: dict[str, Any] = dict(builtin)
        if extra is None:
            return merged
        where = f"task {task!r}: "
        if not isinstance(extra, Mapping):
            raise ConfigurationError(
                f"{where}options= must be a mapping of option names to values, "
                f"got {type(extra).__name__}"
            )
        for option, value in extra.items():
            if option in ("name", "queue", "priority"):
                raise ConfigurationError(
                    f"{where}{option}= is a keyword of @tr.task, not an entry of options="
                )
            if option in merged:
                raise ConfigurationError(
                    f"{where}option {option!r} is given twice (as a keyword and in options=)"
                )
            merged[option] = value
        return merged

    def _collect_option_owners(self) -> dict[str, type[TaskOptions]]:
        owners: dict[str, type[TaskOptions]] = {}
        for mw in self.middleware:
            if mw.Options is None:
                continue
            for option in mw.Options.model_fields:
                if option in owners and owners[option] is not mw.Options:
                    raise ConfigurationError(f"two middleware claim the task option {option!r}")
                owners[option] = mw.Options
        return owners

    def _validate_options(
        self, options: Mapping[str, Any], task: str, fn: Callable[..., Any] | None = None
    ) -> dict[type[TaskOptions], TaskOptions]:
        """Each option validated strictly by its owner's model, grouped by model (with
        the function in the validation context: ``taskrunner.options.FUNCTION``).

        ``None`` means "not set". Errors are one sentence naming ``task`` and the option.
        """
        grouped: dict[type[TaskOptions], dict[str, Any]] = {}
        for option, value in options.items():
            model = self._option_owners.get(option)
            if model is None:
                raise UnknownOptionError(self._unknown_option(option, task))
            if value is not None:
                grouped.setdefault(model, {})[option] = value
        owned: dict[type[TaskOptions], TaskOptions] = {}
        for model, values in grouped.items():
            try:
                owned[model] = model.model_validate(
                    values, strict=True, context={FUNCTION: fn} if fn is not None else None
                )
            except pydantic.ValidationError as exc:
                raise ConfigurationError(_describe_invalid(exc, values, task)) from None
        return owned

    def _unknown_option(self, option: str, task: str) -> str:
        known = ["name", "queue", "priority", *sorted(self._option_owners)]
        close = difflib.get_close_matches(option, known, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return (
            f"task {task!r}: unknown option {option!r}{hint} "
            f"(no middleware owns it; known options: {', '.join(known)})"
        )

    def check_priority(self, level: str, task: str) -> str:
        if level not in self.priorities:
            raise ConfigurationError(
                f"task {task}: unknown priority {level!r} (levels: {', '.join(self.priorities)})"
            )
        return level

    def queues(self) -> list[str]:
        """Every queue a declared task or cron schedule uses (and the runner's default)."""
        found = {d.queue for d in self.registry.values()} | {self.queue}
        found |= {schedule.queue for schedule in self.crontab}
        return sorted(found)

    # -- connection ----------------------------------------------------------------------

    async def __aenter__(self) -> TaskRunner:
        if self._entered == 0:
            await self._connect()
        self._entered += 1
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._entered -= 1
        if self._entered == 0:
            with anyio.CancelScope(shield=True):
                await self._disconnect()

    async def _connect(self) -> None:
        url = self.url or os.environ.get("TASKRUNNER_REDIS_URL")
        if url:
            parse_url(url)  # ConfigurationError, password hidden, before redis-py sees it
        else:
            self._embedded = EmbeddedRedis()
            url = await anyio.to_thread.run_sync(self._embedded.acquire)
        try:
            connection = await open_connection(url, self.pool_options)
        except BaseException:
            self._release_embedded()
            raise
        try:
            await scripts.load_all(connection.redis)
        except BaseException:
            await connection.aclose()
            self._release_embedded()
            raise
        self._client = Client(
            connection,
            self.namespace,
            self.result_ttl,
            levels=self.priorities,
            default_level=self.default_priority,
            partitions=self.partitions,
            max_payload=self.max_payload,
            replicas=self.replicas,
        )
        self._client.clock = self.clock
        self._client.codecs = self._result_codec

    async def _disconnect(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        self._release_embedded()

    def _release_embedded(self) -> None:
        if self._embedded is not None:
            self._embedded.release()
            self._embedded = None

    @property
    def client(self) -> Client:
        if self._client is None:
            raise TaskrunnerError("not connected: use `async with tr:` first")
        return self._client

    # -- enqueueing ----------------------------------------------------------------------

    # A tuple of calls gives one typed handle per position; the Iterable overload last.
    # mypy flags tuple-vs-Iterable as overlapping: a tuple matches the tuple overloads first.
    @overload
    async def enqueue_many(self, calls: tuple[Call[R1]], /) -> tuple[Job[R1]]: ...  # type: ignore[overload-overlap]

    @overload
    async def enqueue_many(  # type: ignore[overload-overlap]
        self, calls: tuple[Call[R1], Call[R2]], /
    ) -> tuple[Job[R1], Job[R2]]: ...

    @overload
    async def enqueue_many(  # type: ignore[overload-overlap]
        self, calls: tuple[Call[R1], Call[R2], Call[R3]], /
    ) -> tuple[Job[R1], Job[R2], Job[R3]]: ...

    @overload
    async def enqueue_many(  # type: ignore[overload-overlap]
        self, calls: tuple[Call[R1], Call[R2], Call[R3], Call[R4]], /
    ) -> tuple[Job[R1], Job[R2], Job[R3], Job[R4]]: ...

    @overload
    async def enqueue_many(  # type: ignore[overload-overlap]
        self, calls: tuple[Call[R1], Call[R2], Call[R3], Call[R4], Call[R5]], /
    ) -> tuple[Job[R1], Job[R2], Job[R3], Job[R4], Job[R5]]: ...

    @overload
    async def enqueue_many(  # type: ignore[overload-overlap]
        self, calls: tuple[Call[R1], Call[R2], Call[R3], Call[R4], Call[R5], Call[R6]], /
    ) -> tuple[Job[R1], Job[R2], Job[R3], Job[R4], Job[R5], Job[R6]]: ...

    @overload
    async def enqueue_many(  # type: ignore[overload-overlap]
        self, calls: tuple[Call[R], ...], /
    ) -> tuple[Job[R], ...]: ...

    @overload
    async def enqueue_many(self, calls: Iterable[Call[R]], /) -> list[Job[R]]: ...

    async def enqueue_many(
        self, calls: Iterable[Call[Any]], /
    ) -> list[Job[Any]] | tuple[Job[Any], ...]:
        """Validate every call, then write them in pipelined batches (order kept).

        Calls of different tasks may go together. A list (any iterable but a tuple) of
        calls returns a list of handles typed by the calls' common result type; a tuple
        returns a tuple: of up to six calls, with one handle per call, each typed by its
        own task; longer, or of unknown length, typed by the common result type:
        ``a, s = await tr.enqueue_many((add.call(1, 2), send.call("x")))`` gives
        ``Job[int]`` and ``Job[Receipt]``.
        """
        jobs = await self._enqueue_all(calls)
        return tuple(jobs) if isinstance(calls, tuple) else jobs

    async def _enqueue_all(self, calls: Iterable[Call[Any]]) -> list[Job[Any]]:
        contexts = [self._context(call) for call in calls]
        return await self.client.write_batches(contexts, self._enqueue_layers, ENQUEUE_BATCH)

    async def group(self, calls: Iterable[Call[R]], /) -> Group[R]:
        """Enqueue calls (of any tasks) as a group, in one pipelined batch like
        ``enqueue_many``; ``await group.results()`` gives their results in order
        (docs/chains.md). Every call is validated before anything is written."""
        return Group(await self._enqueue_all(calls))

    async def enqueue_chain(self, first: Call[Any], steps: Sequence[Call[Any]]) -> ChainJob[Any]:
        """Validate a chain and write its first job with the rest as its follow-up spec
        (``task.chain(...).then(...).enqueue()``; docs/chains.md)."""
        if len(steps) > MAX_STEPS:
            raise ConfigurationError(
                f"a chain has at most {MAX_STEPS} steps after its first job, got {len(steps)}"
            )
        ctx = self._context(first)
        if steps:
            spec = Spec(tuple(self._step(call) for call in steps))
            ctx.follow = spec.encode()
            size = len(ctx.follow.encode())
            if size > self.max_payload:
                raise PayloadTooLarge(f"the chain after {first.task.name}", size, self.max_payload)
            ctx.meta[NEXT_HEADER] = "1"
        [job] = await self.client.write_many([ctx], self._enqueue_layers)
        if job.deduplicated and steps and job.id != first.options.job_id:
            await self._check_same_chain(first, job, ctx.follow)
        queues = [(c.options.queue or c.task.queue, c.task.codec.result) for c in steps]
        return chain_handles(self.client, job, queues)

    async def _check_same_chain(self, first: Call[Any], holder: Job[Any], follow: str) -> None:
        """A chain whose first step a unique lock deduplicated onto ``holder``: fine when
        the holder runs this same chain, else LockConflictError (nothing was written;
        a handle would wait for steps that never come)."""
        with contextlib.suppress(JobNotFound, ValueError, RecursionError):  # not this chain
            stored = await self.client.field(holder.queue, holder.id, "next")
            if stored == follow or json.loads(stored) == json.loads(follow):  # any key order
                return
        lock = self.unique.lock_key(first.task, first.args, first.kwargs, first.options.queue)
        raise LockConflictError(lock, holder.id)

    def _step(self, call: Call[Any]) -> Step:
        """One follow-up of a chain, validated now (its first argument comes later)."""
        definition, opts = call.task, call.options
        if opts.job_id is not None or opts.at is not None:
            raise TypeError(
                f"chain step {definition.name}: job_id and at are not allowed (a step's id "
                "derives from the chain's, and it runs after the step before it)"
            )
        if self.unique.applies_to(definition):
            raise ConfigurationError(
                f"chain step {definition.name}: a task with a unique lock (lock=) cannot "
                "follow another (follow-ups are written without enqueue middleware)"
            )
        param, rest = definition.codec.encode_rest(call.args, call.kwargs)
        priority = opts.priority or definition.priority
        if priority is not None:
            self.check_priority(priority, definition.name)
        delay = 0 if opts.delay is None else max(0, math.ceil(_seconds(opts.delay) * 1000))
        return Step(
            task=definition.name,
            queue=check_name("queue", opts.queue or definition.queue),
            level=priority or "",
            param=param,
            args=json.loads(rest),
            delay_ms=delay,
        )

    def _enqueue_layers(self, ctx: EnqueueContext) -> list[Middleware]:
        """The enqueue middleware of ``ctx``'s task (computed once per task)."""
        found = self._enqueue_cache.get(ctx.task.name)
        if found is None:
            found = enqueue_layers(self.middleware, ctx.task)
            self._enqueue_cache[ctx.task.name] = found
        return found

    def _context(self, call: Call[Any]) -> EnqueueContext:
        definition, opts = call.task, call.options
        payload = definition.codec.encode(call.args, call.kwargs)
        if len(payload) * 4 > self.max_payload:  # else its UTF-8 (<= 4 bytes a character) fits
            size = len(payload.encode("utf-8", "surrogateescape"))
            if size > self.max_payload:
                raise PayloadTooLarge(f"the arguments of {definition.name}", size, self.max_payload)
        priority = opts.priority or definition.priority
        if priority is not None:
            self.check_priority(priority, definition.name)
        now = self.clock.now()
        due: float | None = None
        if opts.at is not None:
            due = _timestamp(opts.at)
            if due - now > MAX_SECONDS:
                raise ConfigurationError(f"at is more than 100 years ahead: {opts.at.isoformat()}")
        elif opts.delay is not None:
            due = now + _seconds(opts.delay)
        if due is not None and due <= now:
            due = None
        return EnqueueContext(
            task=definition,
            args=call.args,
            kwargs=call.kwargs,
            payload=payload,
            job_id=opts.job_id or new_job_id(),
            queue=opts.queue or definition.queue,
            due=due,
            now=now,
            priority=priority,
            job_id_given=opts.job_id is not None,
        )

    def job(self, job_id: str, queue: str | None = None) -> Job[Any]:
        """A handle to an existing job by id, in ``queue`` (default: this runner's
        default queue; ``await tr.admin.find(job_id)`` finds a job's queue among the
        app's). Results decode by its task when declared."""
        return Job(self.client, job_id, queue or self.queue, codecs=self._result_codec)

    def _result_codec(self, task: str) -> ResultCodec | None:
        definition = self.registry.get(task)
        return definition.codec.result if definition is not None else None

    # -- dead letters (see taskrunner.deadletters) ----------------------------------------

    async def _dead_keys(self, queue: str | None) -> list[QueueKeys]:
        """The key group of every partition of ``queue`` (default: every queue)."""
        groups: list[QueueKeys] = []
        for name in [queue] if queue else self.queues():
            groups.extend((await self.client.resolve(name)).parts)
        return groups

    async def dead_letters(
        self, queue: str | None = None, *, limit: int = 100, cursor: str | None = None
    ) -> DeadLetters:
        """One page of dead-lettered jobs of ``queue`` (default: every queue of this
        app), oldest first: a list of at most ``limit`` (1 to 1000) ``JobInfo`` whose
        reason is ``error.message``, with ``.next_cursor`` to pass as ``cursor`` for the
        next page (None on the last)."""
        redis = self.client.redis
        return await deadletters.list_dead(
            redis, await self._dead_keys(queue), limit=limit, cursor=cursor
        )

    async def retry_dead(
        self, job_ids: Sequence[str] | None = None, *, all: bool = False, queue: str | None = None
    ) -> int:
        """Put dead-lettered jobs (``job_ids``, or ``all=True``) back on their queue under
        the same id with attempts reset, in bounded batches; returns how many were
        revived."""
        job_ids = check_many("job_ids", job_ids, "5c2e0d5b...") if job_ids is not None else None
        if all == bool(job_ids):
            raise ValueError("retry_dead needs either job ids or all=True (not both)")
        revived = 0
        redis, env, levels = self.client.redis, self.client.env, self.priorities
        for keys in await self._dead_keys(queue):
            if job_ids:
                revived += await deadletters.retry_ids(redis, keys, job_ids, env=env, levels=levels)
            else:
                revived += await deadletters.retry_all(redis, keys, env=env, levels=levels)
        return revived

    async def delete_dead(self, job_ids: Sequence[str], *, queue: str | None = None) -> int:
        """Remove these dead letters and their job info for good; returns how many
        were dead letters."""
        job_ids = check_many("job_ids", job_ids, "5c2e0d5b...")
        removed = 0
        for keys in await self._dead_keys(queue):
            removed += await deadletters.delete_dead(self.client.redis, keys, job_ids)
        return removed

    async def purge_dead(
        self, *, queue: str | None = None, older_than: float | timedelta | None = None
    ) -> int:
        """Remove every dead letter (or those that died more than ``older_than`` ago) and
        their job info for good, then apply the bounds; returns how many were removed."""
        age = None if older_than is None else _seconds(older_than)
        if age is not None and age < 0:
            raise ValueError(f"older_than must be 0 or more, got {age:g}")
        removed = 0
        for keys in await self._dead_keys(queue):
            removed += await deadletters.purge_dead(
                self.client.redis, keys, older_than=age, clock=self.clock
            )
        return removed + await self.trim_dead(queue)

    async def trim_dead(self, queue: str | None = None) -> int:
        """Apply ``dead_letter_ttl`` and ``dead_letter_limit`` now (workers do it
        periodically); returns how many dead letters were removed."""
        removed = 0
        for keys in await self._dead_keys(queue):
            removed += await deadletters.trim_dead(
                self.client.redis,
                keys,
                limit=self.dead_letter_limit,
                max_age=self.dead_letter_ttl,
                clock=self.clock,
            )
        return removed

    # -- operations (taskrunner.admin) ---------------------------------------------------

    @property
    def admin(self) -> Admin:
        """Operations on this runner's jobs, queues and workers: job detail, paginated
        listings, retry, abort, pause/resume, counts, throughput, workers, dead letters
        (docs/operations.md)."""
        return Admin(self)

    async def retry(self, job_id: str, queue: str | None = None) -> bool:
        """Run a failed, aborted, rejected or dead job again under the same id; see
        ``Admin.retry``."""
        return await self.admin.retry(job_id, queue)

    async def pause(self, queue: str) -> None:
        """Pause ``queue``: it keeps accepting jobs; its workers stop taking new ones."""
        await self.admin.pause(queue)

    async def resume(self, queue: str) -> None:
        """Resume a paused queue."""
        await self.admin.resume(queue)

    # -- working -------------------------------------------------------------------------

    def worker(
        self,
        *,
        queues: Sequence[str] | None = None,
        concurrency: int = 100,
        burst: bool = False,
        grace_period: float | timedelta = 30.0,
        handle_signals: bool | None = None,
        max_deliveries: int = 5,
    ) -> Worker:
        """A worker for this runner's tasks. ``await worker.run()`` runs it in the
        foreground (handling SIGINT/SIGTERM); ``async with tr.worker():`` runs it in the
        background of the caller, leaving signals to the host (e.g. uvicorn)."""
        return Worker(
            self,
            queues=queues,
            concurrency=concurrency,
            burst=burst,
            grace_period=grace_period,
            handle_signals=handle_signals,
            max_deliveries=max_deliveries,
        )

    async def run_until_idle(
        self,
        *,
        queues: Sequence[str] | None = None,
        timeout: float | timedelta = 30.0,
        concurrency: int = 10,
        raise_failures: bool = True,
    ) -> list[Committed]:
        """For tests: run a worker in this process until every job is final, and raise
        the first job that failed for good or was dead-lettered. See
        ``taskrunner.testing.run_until_idle`` and docs/testing.md."""
        from taskrunner.testing.idle import run_until_idle

        return await run_until_idle(
            self,
            queues=queues,
            timeout=timeout,
            concurrency=concurrency,
            raise_failures=raise_failures,
        )


def _describe_invalid(exc: pydantic.ValidationError, values: Mapping[str, Any], task: str) -> str:
    """One sentence for a refused option: ``task 'f': invalid option max_retries='3':
    input should be a valid integer`` (several problems are joined with ``;``)."""
    parts: list[str] = []
    for error in exc.errors(include_url=False):
        message = reason(error)
        message = message[:1].lower() + message[1:]
        option = str(error["loc"][0]) if error["loc"] else None
        if option is not None and option in values:
            parts.append(f"invalid option {option}={values[option]!r}: {message}")
        else:
            parts.append(f"invalid options: {message}")
    return f"task {task!r}: " + "; ".join(dict.fromkeys(parts))


def _default_name(fn: Callable[..., Any]) -> str:
    """A task's default name: the function's ``__qualname__``, or, for an object whose
    ``__call__`` is the coroutine function, its class's."""
    found = getattr(fn, "__qualname__", None)
    return found if isinstance(found, str) and found else type(fn).__qualname__


def _is_async(fn: Callable[..., Any]) -> bool:
    import inspect

    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004
    )


def _default_level(levels: Sequence[str], chosen: str | None) -> str:
    if chosen is not None:
        if chosen not in levels:
            raise ConfigurationError(
                f"default_priority {chosen!r} is not one of the priorities {levels!r}"
            )
        return chosen
    return DEFAULT_LEVEL if DEFAULT_LEVEL in levels else levels[len(levels) // 2]
