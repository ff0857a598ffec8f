"""The runner's crontab (``tr.crontab``): the schedules ``tr.cron`` declared, and what
can be done to them from the Python API (the CLI's ``taskrunner cron`` uses it too):
``list()``, ``pause(name)``, ``resume(name)``, ``trigger(name)``.

A schedule's state is one hash (``{ns}:{queue}:cron:{name}``, keys.py) in the
partition its jobs go to: partition 0, or, for a task with a unique-job ``lock``, the
partition of its lock digest (the job, its lock and the state then share one Cluster
slot, so each tick is one script in one slot).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta, tzinfo
from typing import TYPE_CHECKING, Any, cast

import pydantic

from taskrunner import scripts
from taskrunner.config import reason
from taskrunner.cron.expression import CronExpression
from taskrunner.cron.schedule import (
    CronInfo,
    CronSchedule,
    check_max_drift,
    check_schedule_name,
    info,
)
from taskrunner.exceptions import ConfigurationError, ScheduleNotFound
from taskrunner.keys import QueueKeys, check_name
from taskrunner.logs import excerpt
from taskrunner.task import Call, EnqueueOptions
from taskrunner.worker.scheduler import server_ms

if TYPE_CHECKING:
    from taskrunner.cron.host import CronHost
    from taskrunner.job import Job


class CronTab:
    """The cron schedules of one TaskRunner, by name."""

    def __init__(self, runner: CronHost) -> None:
        self._runner = runner
        self._schedules: dict[str, CronSchedule] = {}

    def __repr__(self) -> str:
        return f"CronTab({', '.join(self._schedules) or 'empty'})"

    def __iter__(self) -> Iterator[CronSchedule]:
        return iter(list(self._schedules.values()))

    def __len__(self) -> int:
        return len(self._schedules)

    def __contains__(self, name: object) -> bool:
        return name in self._schedules

    @property
    def runner(self) -> CronHost:
        return self._runner

    def get(self, name: str) -> CronSchedule:
        """The schedule named ``name`` (``ScheduleNotFound`` if none)."""
        found = self._schedules.get(name)
        if found is None:
            known = ", ".join(sorted(self._schedules)) or "none declared"
            raise ScheduleNotFound(f"no cron schedule named {name!r} (schedules: {known})")
        return found

    # -- declaring -----------------------------------------------------------------------

    def add(
        self,
        expression: str,
        call: Call[Any],
        *,
        name: str | None = None,
        tz: str | tzinfo = "UTC",
        max_drift: float | timedelta = 60.0,
    ) -> CronSchedule:
        """Declare a schedule of ``call`` (see ``TaskRunner.cron``)."""
        _check_call(call, name)
        label = name if name is not None else call.task.name
        try:
            schedule = self._build(label, expression, call, tz, max_drift)
        except ConfigurationError as exc:
            message = str(exc)
            if not message.startswith("cron schedule"):
                message = f"cron schedule {label!r}: {message}"
            raise ConfigurationError(message) from None
        self._schedules[schedule.name] = schedule
        return schedule

    def _build(
        self,
        name: str,
        expression: str,
        call: Call[Any],
        tz: str | tzinfo,
        max_drift: float | timedelta,
    ) -> CronSchedule:
        check_schedule_name(name)
        if name in self._schedules:
            raise ConfigurationError(
                f"a cron schedule named {name!r} is already declared (give this one another name=)"
            )
        _check_options(call.options)
        return CronSchedule(
            name=name,
            expression=CronExpression(expression, tz),
            task=call.task,
            args=tuple(call.args),
            kwargs=dict(call.kwargs),
            payload=self._payload(call),
            queue=check_name("queue", call.options.queue or call.task.queue),
            priority=self._priority(call),
            max_drift=check_max_drift(name, max_drift),
        )

    def _payload(self, call: Call[Any]) -> str:
        payload = _payload(call)
        size = len(payload.encode("utf-8", "surrogateescape"))
        if size > self._runner.max_payload:
            raise ConfigurationError(
                f"the arguments are {size} bytes as JSON, over max_payload "
                f"({self._runner.max_payload})"
            )
        return payload

    def _priority(self, call: Call[Any]) -> str | None:
        priority = call.options.priority or call.task.priority
        if priority is not None:
            self._runner.check_priority(priority, repr(call.task.name))
        return priority

    # -- state in Redis ------------------------------------------------------------------

    async def location(self, schedule: CronSchedule) -> QueueKeys:
        """The partition holding the schedule's state (and where its jobs go)."""
        queue = await self._runner.client.resolve(schedule.queue)
        found = self._runner.unique.partition_for(schedule.task, schedule.payload, queue.partitions)
        return queue.part(found or 0)

    async def list(self) -> list[CronInfo]:
        """Every schedule with its state: paused, next and last run (a pipelined read)."""
        schedules = list(self)
        keys = [(await self.location(s)).cron(s.name) for s in schedules]
        redis = self._runner.client.redis
        now = self._runner.clock.shift(await server_ms(redis))
        pipe = cast(Any, redis.pipeline(transaction=False))
        for key in keys:
            pipe.hgetall(key)
        replies = await pipe.execute() if keys else []
        return [
            info(schedule, state if isinstance(state, dict) else {}, now)
            for schedule, state in zip(schedules, replies, strict=True)
        ]

    async def info(self, name: str) -> CronInfo:
        """One schedule with its state."""
        schedule = self.get(name)
        return next(found for found in await self.list() if found.name == schedule.name)

    async def pause(self, name: str) -> None:
        """Pause a schedule: its ticks are skipped (not replayed on resume) until
        ``resume``; a job already enqueued or running is left alone."""
        schedule = self.get(name)
        key = (await self.location(schedule)).cron(schedule.name)
        await self._runner.client.redis.hset(key, "paused", "1")

    async def resume(self, name: str) -> None:
        """Resume a paused schedule from its next tick: the ticks that fell while it was
        paused are not run, even by workers that were away then (a schedule that is not
        paused is left alone)."""
        schedule = self.get(name)
        key = (await self.location(schedule)).cron(schedule.name)
        redis = self._runner.client.redis
        now = self._runner.clock.shift(await server_ms(redis))
        latest = schedule.expression.at_or_before(now) or 0
        await scripts.run(redis, scripts.unpause(key, latest, now))

    async def trigger(self, name: str) -> Job[Any]:
        """Enqueue the schedule's job now, outside its ticks (paused or not), under a
        new id ``cron:<name>:manual:<random>``; the schedule's ticks are unchanged."""
        schedule = self.get(name)
        options = EnqueueOptions(
            queue=schedule.queue,
            priority=schedule.priority,
            job_id=f"cron:{schedule.name}:manual:{uuid.uuid4().hex}",
        )
        call: Call[Any] = Call(schedule.task, schedule.args, schedule.kwargs, options)
        jobs = await self._runner.enqueue_many([call])
        return jobs[0]


def _check_call(call: object, name: str | None) -> None:
    """``tr.cron(expression, call)`` takes a call: ``task.call(...)``, not the task."""
    if isinstance(call, Call):
        return
    label = name or getattr(call, "name", None)  # a task's
    which = f"cron schedule {label!r}: " if isinstance(label, str) else ""
    raise ConfigurationError(
        f"{which}tr.cron(expression, call) takes a call such as task.call(...) (with the "
        f"task's arguments), got {excerpt(repr(call), 100)}; a task without arguments can "
        "also be scheduled with @tr.cron(expression) above it"
    )


def _check_options(options: EnqueueOptions) -> None:
    given = [n for n in ("delay", "at", "job_id") if getattr(options, n) is not None]
    if given:
        raise ConfigurationError(
            f"{', '.join(given)} cannot be set on a cron schedule's call "
            "(each tick is enqueued at its time, under its own id)"
        )


def _payload(call: Call[Any]) -> str:
    """The fixed arguments, validated against the task's signature now."""
    try:
        return call.task.codec.encode(tuple(call.args), dict(call.kwargs))
    except TypeError as exc:
        raise ConfigurationError(
            f"the arguments do not fit task {call.task.name!r}: {exc} (a task that takes "
            "arguments is scheduled with tr.cron(expression, task.call(...)))"
        ) from None
    except pydantic.ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or 'arguments'}: {_lower(reason(error, {}))}"
            for error in exc.errors(include_url=False)
        )
        raise ConfigurationError(
            f"the arguments do not fit task {call.task.name!r}: {problems}"
        ) from None


def _lower(text: str) -> str:
    return text[:1].lower() + text[1:]
