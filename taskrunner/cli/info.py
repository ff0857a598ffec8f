"""``taskrunner info``: what every queue holds, and which workers are alive.

Per queue, in one pipelined round trip:

* queued: entries in the stream no worker has read yet (stream length minus pending:
  commits delete their entry, so every entry left is either unread or pending);
* scheduled: members of the delayed set (delays, retries, reschedules);
* running: entries pending in the consumer group (read and held under a lease);
* failed: jobs that failed for good within the last ``result_ttl``;
* dead: jobs in the dead letters;
* workers: consumers whose heartbeat is at most ``stale_after`` old, with its age.
"""

from __future__ import annotations

import time
from typing import Any, cast

import click
from pydantic import BaseModel
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from taskrunner.cli._common import example, load_app, run_async, settings_for
from taskrunner.cli._queues import check_queue_names
from taskrunner.keys import GROUP, QueueKeys
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
    workers: list[WorkerInfo]
    stale_workers: list[WorkerInfo]
    """Consumers whose heartbeat is older than ``stale_after`` (crashed or stalled)."""


class Info(BaseModel):
    namespace: str
    queues: dict[str, QueueInfo]


@click.command(
    help="Show, per queue of APP, how many jobs are queued, scheduled, running, failed "
    "and dead-lettered, and the live workers with their last heartbeat." + example(EXAMPLE)
)
@click.argument("app")
@click.option("--queue", "-q", "queues", multiple=True, help="Queue to show (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (for scripts).")
def info(app: str, queues: tuple[str, ...], as_json: bool) -> None:
    runner = load_app(app)
    settings = settings_for({"queues": list(queues)}, runner)
    check_queue_names(settings.queues)

    async def main() -> None:
        async with runner:
            found = await gather(runner, settings.queues)
        click.echo(found.model_dump_json(indent=2) if as_json else table(found))

    run_async(main)


async def gather(runner: TaskRunner, queues: list[str]) -> Info:
    """Read the counts of every queue in one pipelined round trip."""
    redis = runner.client.redis
    keys = [runner.client.keys(q) for q in queues]
    pipe = cast(Any, redis.pipeline(transaction=False))
    now = time.time()
    for k in keys:
        pipe.xlen(k.stream)
        pipe.zcard(k.delayed)
        pipe.zcount(k.failed, int((now - runner.result_ttl) * 1000), "+inf")
        pipe.zcard(k.dead)
        pipe.zrange(k.workers, 0, -1, withscores=True)
    replies = await pipe.execute()
    result: dict[str, QueueInfo] = {}
    for index, k in enumerate(keys):
        length, scheduled, failed, dead, workers = replies[index * 5 : index * 5 + 5]
        running = await _pending(redis, k)
        live, stale = _workers(workers, now, runner.lease.stale_after)
        result[k.queue] = QueueInfo(
            queued=max(0, length - running),
            scheduled=scheduled,
            running=running,
            failed=failed,
            dead=dead,
            workers=live,
            stale_workers=stale,
        )
    return Info(namespace=runner.namespace, queues=result)


async def _pending(redis: Redis, keys: QueueKeys) -> int:
    try:
        summary = await redis.xpending(keys.stream, GROUP)
    except ResponseError as exc:  # no stream or no group yet: nothing was ever read
        if "NOGROUP" in str(exc):
            return 0
        raise
    return int(summary["pending"])


def _workers(
    entries: list[tuple[str, float]], now: float, stale_after: float
) -> tuple[list[WorkerInfo], list[WorkerInfo]]:
    live: list[WorkerInfo] = []
    stale: list[WorkerInfo] = []
    for worker_id, score in entries:
        seen = score / 1000
        found = WorkerInfo(id=worker_id, last_heartbeat=seen, age=round(max(0.0, now - seen), 3))
        (live if found.age <= stale_after else stale).append(found)
    return live, stale


COLUMNS = ("queued", "scheduled", "running", "failed", "dead")


def table(found: Info) -> str:
    """The counts as an aligned table, then one line per worker."""
    rows: list[tuple[str, ...]] = [("QUEUE", *(c.upper() for c in COLUMNS), "WORKERS")]
    for name, q in found.queues.items():
        counts = (q.queued, q.scheduled, q.running, q.failed, q.dead, len(q.workers))
        rows.append((name, *(str(n) for n in counts)))
    lines = [_align(rows)]
    workers: list[tuple[str, ...]] = [("WORKER", "QUEUE", "LAST HEARTBEAT")]
    for name, q in found.queues.items():
        workers += [(w.id, name, f"{w.age:.1f}s ago") for w in q.workers]
        workers += [(w.id, name, f"{w.age:.1f}s ago (stale)") for w in q.stale_workers]
    lines.append(_align(workers) if len(workers) > 1 else "no live workers")
    return "\n\n".join(lines)


def _align(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = []
    for row in rows:
        cells = [row[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)
