"""What cron costs: the job hot path without, with unused and with used cron, and the
Redis work and lateness of each tick as workers are added.

    python -m benchmarks.cron_cost                          # 20,000 jobs, 3 rounds
    python -m benchmarks.cron_cost --jobs 20000 --rounds 5 --workers 1,3,10 --seconds 10

It starts a private redis-server (benchmarks.run's) and measures, in one process:

1. **Hot path.** Per scenario and round (fresh namespace, scenario order rotated each
   round): enqueue ``--jobs`` noop jobs in bulk (``enqueue_many``, timed), 2,000 one
   awaited call at a time (timed), then drain them all with one worker at concurrency
   100, timed from the first task start to the last completion (as benchmarks.run's W1),
   with the process's CPU time and the server's commands (``total_commands_processed``
   after ``CONFIG RESETSTAT``) per job drained.
   Scenarios: ``no-cron`` (the runner's ``CronMiddleware`` taken out of its middleware:
   the core as before cron), ``unused`` (the default runner, no schedule), ``used``
   (ten schedules, one of them every second, firing during the drain).
2. **Ticks.** ``N`` workers (each its own TaskRunner and connections) run one schedule
   of every second for ``--seconds``; MONITOR counts the tick.lua calls per tick (the
   Redis work per tick), and each tick's job hash gives its lateness (``enqueued`` -
   tick time, by the server's clock).

Medians over the rounds are printed; the machine is shared, so compare within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

import anyio
from redis.asyncio import Redis

from benchmarks.costs import Drain, flush
from benchmarks.run import redis_server
from taskrunner import Task, TaskRunner, scripts
from taskrunner.cron import CronMiddleware
from taskrunner.keys import QueueKeys

SINGLE = 2_000
CONCURRENCY = 100


def runner(url: str, scenario: str, drain: Drain) -> tuple[TaskRunner, Task[[], None]]:
    tr = TaskRunner(url, namespace=f"bench-cron-{uuid.uuid4().hex[:8]}", max_retries=3)
    if scenario == "no-cron":
        tr.middleware = [mw for mw in tr.middleware if not isinstance(mw, CronMiddleware)]

    @tr.task
    async def noop() -> None:
        drain.ran()

    if scenario == "used":

        @tr.cron("* * * * * *", name="every-second")
        async def every_second() -> None: ...

        for minute in range(9):

            @tr.cron(f"{minute} * * * *", name=f"hourly-{minute}")
            async def hourly() -> None: ...

    return tr, noop


async def hot_path(url: str, scenario: str, jobs: int) -> dict[str, float]:
    drain = Drain(jobs + SINGLE)
    tr, noop = runner(url, scenario, drain)
    async with tr:
        calls = [noop.call() for _ in range(jobs)]
        started = time.perf_counter()
        await tr.enqueue_many(calls)
        bulk = jobs / (time.perf_counter() - started)
        started = time.perf_counter()
        for _ in range(SINGLE):
            await noop.enqueue()
        single = SINGLE / (time.perf_counter() - started)
        admin = Redis.from_url(url)
        await admin.config_resetstat()
        cpu = time.process_time()
        async with tr.worker(concurrency=CONCURRENCY, handle_signals=False):
            with anyio.fail_after(300):
                await drain.finished.wait()
        cpu = time.process_time() - cpu
        commands = int((await admin.info("stats"))["total_commands_processed"])
        await admin.aclose()
    return {
        "enqueue_bulk_jobs_s": bulk,
        "enqueue_single_jobs_s": single,
        "drain_jobs_s": drain.done / (drain.last - drain.first),
        "worker_cpu_us_job": cpu / drain.done * 1e6,
        "redis_commands_job": commands / drain.done,
    }


async def ticks(url: str, workers: int, seconds: float) -> dict[str, float]:
    """tick.lua calls per tick and tick lateness with ``workers`` workers."""
    namespace = f"bench-ticks-{uuid.uuid4().hex[:8]}"
    runners = []
    for _ in range(workers):
        tr = TaskRunner(url, namespace=namespace)

        @tr.cron("* * * * * *", name="every-second")
        async def every_second() -> None: ...

        runners.append(tr)
    shas = {scripts.TICK.sha, scripts.TICK.batch_sha}
    calls = 0
    async with anyio.create_task_group() as tg:
        for tr in runners:
            await tg.start(_serve, tr)
        monitor = Redis.from_url(url, decode_responses=True)
        began = time.time()
        async with monitor.monitor() as m:
            with anyio.move_on_after(seconds):
                async for command in m.listen():
                    words = str(command.get("command", "")).split()
                    if len(words) > 1 and words[0].upper() == "EVALSHA" and words[1] in shas:
                        calls += 1
        ended = time.time()
        await monitor.aclose()
        tg.cancel_scope.cancel()
    redis = Redis.from_url(url, decode_responses=True)
    keys = QueueKeys(namespace, "default")
    lateness = []
    for tick in range(int(began) + 1, int(ended)):
        enqueued = await redis.hget(keys.job(f"cron:every-second:{tick}"), "enqueued")
        if enqueued is not None:
            lateness.append(int(enqueued) - tick * 1000)
    await redis.aclose()
    fired = len(lateness)
    return {
        "ticks": fired,
        "tick_calls_per_tick": calls / max(1, int(ended) - int(began)),
        "late_ms_median": statistics.median(lateness) if lateness else -1,
        "late_ms_max": max(lateness) if lateness else -1,
    }


async def _serve(tr: TaskRunner, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
    async with tr, tr.worker(handle_signals=False):
        task_status.started()
        await anyio.sleep_forever()


def median_of(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(row[key] for row in rows)


async def main(args: argparse.Namespace) -> None:
    scenarios = ["no-cron", "unused", "used"]
    with redis_server() as (url, version):
        print(
            f"redis {version}; {args.jobs} jobs in bulk + {SINGLE} one by one; drain at "
            f"concurrency {CONCURRENCY}; {args.rounds} round(s), medians"
        )
        results: dict[str, list[dict[str, float]]] = {s: [] for s in scenarios}
        for round_ in range(args.rounds):
            order = scenarios[round_ % 3 :] + scenarios[: round_ % 3]
            for scenario in order:
                await flush(url)
                results[scenario].append(await hot_path(url, scenario, args.jobs))
        keys = [
            "enqueue_bulk_jobs_s",
            "enqueue_single_jobs_s",
            "drain_jobs_s",
            "worker_cpu_us_job",
            "redis_commands_job",
        ]
        print(f"{'scenario':10} " + " ".join(f"{k:>22}" for k in keys))
        for scenario in scenarios:
            values = " ".join(f"{median_of(results[scenario], k):22.2f}" for k in keys)
            print(f"{scenario:10} {values}")
        print(
            f"\n{'workers':>7} {'ticks':>6} {'tick.lua/tick':>14} {'late p50 ms':>12} "
            f"{'late max ms':>12}"
        )
        for count in args.workers:
            await flush(url)
            found = await ticks(url, count, args.seconds)
            print(
                f"{count:7d} {found['ticks']:6.0f} {found['tick_calls_per_tick']:14.2f} "
                f"{found['late_ms_median']:12.0f} {found['late_ms_max']:12.0f}"
            )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    workers: Callable[[str], list[int]] = lambda text: [int(n) for n in text.split(",")]  # noqa: E731
    parser.add_argument("--workers", type=workers, default=[1, 3, 10])
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
