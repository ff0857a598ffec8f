"""Cron schedules: a function every 10 seconds, a task with fixed arguments every
morning in Paris, and a locked task that never overlaps itself.

Run a worker (it runs the schedules; start as many as you like: each tick still
enqueues one job)::

    taskrunner worker examples.cron:tr

In a second shell: list the schedules, pause and resume one, then watch a tick run
and trigger a job by hand::

    taskrunner cron list examples.cron:tr
    taskrunner cron pause examples.cron:tr heartbeat
    taskrunner cron resume examples.cron:tr heartbeat
    python -m examples.cron
"""

from __future__ import annotations

import time
from datetime import timedelta

import anyio

from taskrunner import TaskRunner

tr = TaskRunner(namespace="examples-cron")


@tr.cron("*/10 * * * * *")  # six fields: the first is seconds
async def heartbeat() -> str:
    """A function without parameters becomes a task named after it, and is scheduled."""
    return "alive"


@tr.task
async def report(kind: str, recipients: list[str]) -> int:
    return len(recipients)


# Fixed arguments go through report.call(...): mypy and pyright check them against
# report's signature. A tick may be up to an hour late (a long deploy) and still run.
tr.cron(
    "0 8 * * 1-5",
    report.call("daily", ["ops@example.com"]),
    name="weekday-report",
    tz="Europe/Paris",
    max_drift=timedelta(hours=1),
)


@tr.cron("*/5 * * * *")
@tr.task(lock="until_executed")  # a tick whose previous run is not done is skipped
async def rebuild_index() -> None:
    await anyio.sleep(1)


async def main() -> None:
    async with tr:
        for info in await tr.crontab.list():
            print(f"{info.name:16} {info.expression:14} next {info.next_run}")
        info = await tr.crontab.info("heartbeat")
        assert info.next_run is not None
        tick = info.next_run.timestamp()
        job = tr.job(tr.crontab.get("heartbeat").job_id(int(tick * 1000)))
        await anyio.sleep(max(0.0, tick - time.time()) + 1)  # a worker fires it by then
        print(job.id, "->", await job.result(timeout=10))
        manual = await tr.crontab.trigger("weekday-report")  # now, outside its ticks
        print(manual.id, "->", await manual.result(timeout=10))


if __name__ == "__main__":
    anyio.run(main)
