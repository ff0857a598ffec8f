"""``taskrunner info``: what every queue holds, and which workers are alive.

The counts of every queue, summed over its partitions and priority levels, come from
``taskrunner.counts`` in one pipelined round trip (queued, scheduled, running,
failed, dead, and whether it is paused; see there how each is computed); a
partitioned queue also shows each partition's counts (``#0``, ``#1``, ... under it);
workers are the consumers whose heartbeat is at most ``stale_after`` old, with its
age, and the stale ones apart.
"""

from __future__ import annotations

import time

import click
from pydantic import BaseModel

from taskrunner.cli._common import example, load_app, run_async, settings_for
from taskrunner.cli._data import data_errors
from taskrunner.cli._queues import check_queue_names
from taskrunner.cli.cron import table as cron_table
from taskrunner.counts import queue_counts, resolve
from taskrunner.cron.schedule import CronInfo
from taskrunner.runner import TaskRunner

EXAMPLE = """
taskrunner info examples.quickstart:tr
taskrunner info examples.quickstart:tr --json | jq .queues.default.queued
"""


class WorkerInfo(BaseModel):
    id: str
    last_heartbeat: float
    """Unix time, in seconds."""
    age: float
    """Seconds since the last heartbeat."""


class QueueInfo(BaseModel):
    queued: int
    scheduled: int
    running: int
    failed: int
    dead: int
    partitions: list[dict[str, int]]
    """The same counts per partition (one entry on a queue that is not partitioned)."""
    paused: bool
    """Whether its workers take no new jobs (``taskrunner queue pause``; a partition)."""
    paused_partitions: int
    """How many of its partitions are paused (all of them after a ``queue pause``)."""
    workers: list[WorkerInfo]
    stale_workers: list[WorkerInfo]
    """Consumers whose heartbeat is older than ``stale_after`` (crashed or stalled)."""


class Info(BaseModel):
    namespace: str
    queues: dict[str, QueueInfo]
    cron: list[CronInfo] = []
    """The app's cron schedules: next and last run, paused (``taskrunner cron``)."""


@click.command(
    help="Show, per queue of APP, how many jobs are queued, scheduled, running, failed "
    "and dead-lettered, whether it is paused, the live workers with their last heartbeat, "
    "and the cron schedules with their next run." + example(EXAMPLE)
)
@click.argument("app")
@click.option(
    "--queue",
    "-q",
    "queues",
    multiple=True,
    help="Queue to show (repeatable; -q a,b is -q a -q b). [default: every queue of the app]",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (for scripts).")
def info(app: str, queues: tuple[str, ...], as_json: bool) -> None:
    runner = load_app(app)
    settings = settings_for({"queues": list(queues)}, runner)
    check_queue_names(settings.queues)

    async def main() -> None:
        async with runner:
            with data_errors():
                found = await gather(runner, settings.queues)
        click.echo(found.model_dump_json(indent=2) if as_json else table(found))

    run_async(main)


async def gather(runner: TaskRunner, queues: list[str]) -> Info:
    """Read the counts of every queue in one pipelined round trip (``taskrunner.counts``)."""
    found_queues = await resolve(runner.client, queues)
    counts = await queue_counts(
        runner.client.redis,
        found_queues,
        now=runner.clock.now(),
        result_ttl=runner.result_ttl,
    )
    now = time.time()  # heartbeats are on real time
    result: dict[str, QueueInfo] = {}
    for found in counts:
        live, stale = _workers(found.workers, now, runner.lease.stale_after)
        result[found.queue] = QueueInfo(
            **found.by_status(),
            partitions=found.partitions,
            paused=found.paused_partitions > 0,
            paused_partitions=found.paused_partitions,
            workers=live,
            stale_workers=stale,
        )
    schedules = [i for i in await runner.crontab.list() if i.queue in result]
    return Info(namespace=runner.namespace, queues=result, cron=schedules)


def _workers(
    entries: list[tuple[str, float]], now: float, stale_after: float
) -> tuple[list[WorkerInfo], list[WorkerInfo]]:
    live: list[WorkerInfo] = []
    stale: list[WorkerInfo] = []
    for worker_id, seen in entries:
        found = WorkerInfo(id=worker_id, last_heartbeat=seen, age=round(max(0.0, now - seen), 3))
        (live if found.age <= stale_after else stale).append(found)
    return live, stale


COLUMNS = ("queued", "scheduled", "running", "failed", "dead")


def table(found: Info) -> str:
    """The counts as an aligned table, then one line per worker."""
    rows: list[tuple[str, ...]] = [("QUEUE", *(c.upper() for c in COLUMNS), "WORKERS")]
    for name, q in found.queues.items():
        counts = (q.queued, q.scheduled, q.running, q.failed, q.dead, len(q.workers))
        rows.append((name + _paused(q), *(str(n) for n in counts)))
        if len(q.partitions) > 1:  # each partition's share, indented under the queue
            for index, part in enumerate(q.partitions):
                cells = (str(part[c]) for c in COLUMNS)
                rows.append((f"  #{index}", *cells, ""))
    lines = [_align(rows)]
    workers: list[tuple[str, ...]] = [("WORKER", "QUEUE", "LAST HEARTBEAT")]
    for name, q in found.queues.items():
        workers += [(w.id, name, f"{w.age:.1f}s ago") for w in q.workers]
        workers += [(w.id, name, f"{w.age:.1f}s ago (stale)") for w in q.stale_workers]
    lines.append(_align(workers) if len(workers) > 1 else "no live workers")
    if found.cron:
        lines.append(cron_table(found.cron))
    return "\n\n".join(lines)


def _paused(q: QueueInfo) -> str:
    """`` (paused)`` after a paused queue's name; `` (paused 1/4)`` when only some of
    its partitions are (an interrupted pause: pause it again)."""
    if not q.paused:
        return ""
    if q.paused_partitions < len(q.partitions):
        return f" (paused {q.paused_partitions}/{len(q.partitions)})"
    return " (paused)"


def _align(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = []
    for row in rows:
        cells = [row[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)
