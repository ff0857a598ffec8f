"""A cron schedule: when (a cron expression in a time zone), what (a task with fixed
arguments), and how late a tick may still run (``max_drift``); and ``CronInfo``, what
``tr.crontab.list()``, ``taskrunner cron list`` and ``taskrunner info`` show of one."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel

from taskrunner.cron.expression import CronExpression
from taskrunner.exceptions import ConfigurationError
from taskrunner.keys import check_name
from taskrunner.options import MAX_SECONDS
from taskrunner.task import TaskDefinition

DEFAULT_MAX_DRIFT = 60.0
"""Seconds a tick may be late and still run (after a restart, a pause of every worker)."""
MIN_MAX_DRIFT = 1.0
"""A smaller ``max_drift`` would skip ticks a live worker is merely a little late for."""
FUTURE_SLACK = 60.0
"""Seconds a handled tick (a state's ``last``, a ``cron`` event) may be ahead of the
current time and still be believed (clocks differ a little); further ahead it is
hostile. tick.lua has the same bound (``FUTURE_SLACK_MS``)."""
_DIGITS = re.compile(r"[0-9]{1,18}")


def check_schedule_name(name: str) -> str:
    """A schedule's name goes into keys, job ids and events: no braces, '#' or spaces."""
    return check_name("cron schedule", name)


def check_max_drift(name: str, value: float | timedelta) -> float:
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise ConfigurationError(
            f"cron schedule {name!r}: max_drift must be seconds or a timedelta, got {value!r}"
        )
    if not MIN_MAX_DRIFT <= seconds <= MAX_SECONDS:  # also NaN and infinity
        raise ConfigurationError(
            f"cron schedule {name!r}: max_drift must be at least {MIN_MAX_DRIFT:g} second "
            f"and at most {MAX_SECONDS:.0f} (100 years), got {seconds!r}"
        )
    return float(seconds)


@dataclass(frozen=True, slots=True, eq=False)
class CronSchedule:
    """One declared schedule (``tr.cron``); its state (last tick, paused) is in Redis."""

    name: str
    expression: CronExpression
    task: TaskDefinition
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    payload: str = "{}"
    """The fixed arguments as validated JSON (checked when the schedule is declared)."""
    queue: str = "default"
    priority: str | None = None
    max_drift: float = DEFAULT_MAX_DRIFT

    def __repr__(self) -> str:
        return f"CronSchedule({self.name!r}, {self.expression.text!r}, task={self.task.name!r})"

    @property
    def max_drift_ms(self) -> int:
        return int(self.max_drift * 1000)

    def job_id(self, tick_ms: int) -> str:
        """The id of the job of one tick: ``cron:<name>:<tick, epoch seconds>``."""
        return f"cron:{self.name}:{tick_ms // 1000}"

    def next_run(self, after: datetime | float | None = None) -> datetime | None:
        """The first tick strictly after ``after`` (default: now, by this process's
        clock), as an aware datetime in the schedule's time zone."""
        if after is None:
            ms = self.expression.after(0, now=True)
        else:
            when = after.timestamp() if isinstance(after, datetime) else float(after)
            ms = self.expression.after(int(when * 1000))
        return None if ms is None else _datetime(ms, self)


def _datetime(ms: int, schedule: CronSchedule) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC).astimezone(schedule.expression.tz)


class CronInfo(BaseModel):
    """One schedule as declared, with its state in Redis."""

    name: str
    expression: str
    timezone: str
    task: str
    queue: str
    max_drift: float
    """Seconds a tick may be late and still run."""
    paused: bool
    next_run: datetime | None
    """The first tick after now by the runner's clock (None: the expression has no
    more); shown while paused too (paused ticks are skipped)."""
    last_run: datetime | None
    """The last tick whose job was written (None: none yet)."""
    last_job: str | None
    """That tick's job id (``cron:<name>:<epoch seconds>``)."""


def info(schedule: CronSchedule, state: dict[str, str], now_ms: int) -> CronInfo:
    """A schedule's ``CronInfo`` from its state hash (hostile fields read as absent)."""
    fired = plausible_tick(state.get("fired"), now_ms)
    after = max(now_ms, plausible_tick(state.get("last"), now_ms) or 0)
    upcoming = schedule.expression.after(after)
    return CronInfo(
        name=schedule.name,
        expression=schedule.expression.text,
        timezone=schedule.expression.tz_name,
        task=schedule.task.name,
        queue=schedule.queue,
        max_drift=schedule.max_drift,
        paused=state.get("paused") == "1",
        next_run=None if upcoming is None else _datetime(upcoming, schedule),
        last_run=None if fired is None else _datetime(fired, schedule),
        last_job=state.get("job") if fired is not None else None,
    )


def plausible_tick(value: object, now_ms: int) -> int | None:
    """``value`` (a state's ``last``, the tick of a ``cron`` event) as a handled tick in
    epoch ms, or None if it cannot be one: not a positive whole number in ASCII digits,
    or more than ``FUTURE_SLACK`` after ``now_ms`` (hostile: never handled by now)."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str) or not _DIGITS.fullmatch(value):
        return None
    tick = int(value)
    if not 0 < tick <= now_ms + int(FUTURE_SLACK * 1000):
        return None
    return tick
