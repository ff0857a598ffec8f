"""Cron schedules: ``@tr.cron("*/5 * * * *")`` (docs/scheduling.md).

* ``expression``: cron expressions in a time zone (cronsim), ticks in epoch ms;
* ``schedule``: ``CronSchedule`` (what ``tr.cron`` declares) and ``CronInfo``;
* ``tab``: ``CronTab`` (``tr.crontab``): list, pause, resume, trigger;
* ``service``: the per-worker ``CronService`` and the built-in ``CronMiddleware`` that
  starts it; the Lua side is ``lua/tick.lua``;
* ``host``: ``CronHost``, what cron needs of its runner (a port: no import of the runner).
"""

from taskrunner.cron.expression import CronExpression
from taskrunner.cron.schedule import DEFAULT_MAX_DRIFT, CronInfo, CronSchedule
from taskrunner.cron.service import CronMiddleware, CronService
from taskrunner.cron.tab import CronTab

__all__ = [
    "DEFAULT_MAX_DRIFT",
    "CronExpression",
    "CronInfo",
    "CronMiddleware",
    "CronSchedule",
    "CronService",
    "CronTab",
]
