"""What chains cost: the job hot path with chains unused and used, per job drained.

    python -m benchmarks.chain_cost                     # 10,000 jobs, 3 rounds
    python -m benchmarks.chain_cost --jobs 20000 --rounds 5
    python -m benchmarks.chain_cost --scenarios plain   # also runs against a tree
                                                        # without chains (the baseline)

It starts a private redis-server (benchmarks.run's) and measures, in one process, per
scenario and round (fresh keys, scenario order rotated each round): enqueue the jobs
(untimed), ``CONFIG RESETSTAT``, drain them with one worker at concurrency 100 and
read, per job drained: the commands Redis ran (``INFO commandstats``: every command's
``calls``, those inside scripts included, as ``total_commands_processed`` counts them),
the redis-server CPU spent in commands (the sum of every command's ``usec``), the
worker process's CPU time, and the drain rate (first task start to last completion, as
benchmarks.run's W1).

Scenarios:

* ``plain``: ``--jobs`` noop jobs (``enqueue_many``): chains unused. Run it on a tree
  without chains (``PYTHONPATH=<that tree> python benchmarks/chain_cost.py --scenarios
  plain``) for the baseline;
* ``chained``: ``--jobs / 2`` chains of two noop steps, ``noop.chain().then(after)``:
  every job is a chain step, half of them with a follow-up (the outbox write in
  commit.lua, and the relay's reads and two scripts per follow-up).

Medians over the rounds are printed; the machine is shared, so compare within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from typing import Any

import anyio
from redis.asyncio import Redis

from benchmarks.costs import Drain, flush
from benchmarks.run import redis_server
from taskrunner import TaskRunner

CONCURRENCY = 100
ENQUEUERS = 50


async def enqueue(tr: TaskRunner, scenario: str, jobs: int, drain: Drain) -> None:
    @tr.task
    async def noop() -> int:
        drain.ran()
        return 1

    @tr.task
    async def after(previous: int) -> None:
        drain.ran()

    if scenario == "plain":
        await tr.enqueue_many([noop.call() for _ in range(jobs)])
        return
    chains = iter(range(jobs // 2))

    async def producer() -> None:
        for _ in chains:
            await noop.chain().then(after).enqueue()

    async with anyio.create_task_group() as tg:
        for _ in range(ENQUEUERS):
            tg.start_soon(producer)


async def commandstats(redis: Redis) -> tuple[int, int]:
    """(calls, usec) summed over every command since the last CONFIG RESETSTAT."""
    stats: dict[str, Any] = await redis.info("commandstats")
    calls = sum(int(v["calls"]) for k, v in stats.items() if k.startswith("cmdstat_"))
    usec = sum(int(v["usec"]) for k, v in stats.items() if k.startswith("cmdstat_"))
    return calls, usec


async def hot_path(url: str, scenario: str, jobs: int) -> dict[str, float]:
    expected = jobs if scenario == "plain" else 2 * (jobs // 2)
    drain = Drain(expected)
    tr = TaskRunner(url, namespace=f"bench-chain-{uuid.uuid4().hex[:8]}")
    async with tr:
        await enqueue(tr, scenario, jobs, drain)
        admin = Redis.from_url(url, decode_responses=True)
        await admin.config_resetstat()
        cpu = time.process_time()
        async with tr.worker(concurrency=CONCURRENCY, handle_signals=False):
            with anyio.fail_after(300):
                await drain.finished.wait()
        cpu = time.process_time() - cpu
        calls, usec = await commandstats(admin)
        await admin.aclose()
    # the stats' own INFO call and the worker's start and stop are spread over the jobs
    return {
        "drain_jobs_s": drain.done / (drain.last - drain.first),
        "worker_cpu_us_job": cpu / drain.done * 1e6,
        "redis_commands_job": calls / drain.done,
        "redis_cpu_us_job": usec / drain.done,
    }


async def main(args: argparse.Namespace) -> None:
    scenarios: list[str] = args.scenarios
    with redis_server() as (url, version):
        print(
            f"redis {version}; {args.jobs} jobs per scenario; drain at concurrency "
            f"{CONCURRENCY}; {args.rounds} round(s), medians"
        )
        results: dict[str, list[dict[str, float]]] = {s: [] for s in scenarios}
        for round_ in range(args.rounds):
            shift = round_ % len(scenarios)
            for scenario in scenarios[shift:] + scenarios[:shift]:
                await flush(url)
                results[scenario].append(await hot_path(url, scenario, args.jobs))
        keys = [
            "drain_jobs_s",
            "worker_cpu_us_job",
            "redis_commands_job",
            "redis_cpu_us_job",
        ]
        print(f"{'scenario':10} " + " ".join(f"{k:>20}" for k in keys))
        for scenario in scenarios:
            values = " ".join(
                f"{statistics.median(r[k] for r in results[scenario]):20.2f}" for k in keys
            )
            print(f"{scenario:10} {values}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--scenarios", type=lambda text: text.split(","), default=["plain", "chained"]
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
