"""What priority levels cost Redis: commands and redis-server CPU per job drained, with
the feature absent, unused and used, on one partition and on three.

    python -m benchmarks.priority_cost                      # 10,000 jobs, 3 rounds
    python -m benchmarks.priority_cost --jobs 20000 --rounds 5 --concurrency 20

It starts a private redis-server (benchmarks.run's) and, per scenario and round (fresh
namespace, scenario order rotated each round), enqueues ``--jobs`` noop jobs in bulk,
resets the server's statistics (``CONFIG RESETSTAT``), drains them with one worker at
``--concurrency``, and reads ``INFO commandstats`` and ``INFO cpu``:

- **commands per job**: every command the server ran, the ones inside scripts included
  (commandstats counts both an EVALSHA and each command it calls), divided by the jobs
  drained; also split out for the script calls (EVALSHA) and the commands the read
  path uses (XREADGROUP, XINFO GROUPS, XRANGE);
- **server CPU per job**: redis-server's own user + system CPU time (``INFO cpu``)
  over the drain, divided by the jobs drained.

Scenarios: ``one-level`` (``priorities=("default",)``: one stream per partition, the
floor), ``unused`` (the default three levels, every job at the default level),
``used`` (the jobs spread evenly over high, default and low); each on one partition,
and ``*-p3`` on three partitions of the same server (the worker then looks at every
partition before it reads: peek.lua).

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

SCENARIOS = ("one-level", "unused", "used", "one-level-p3", "unused-p3", "used-p3")
LEVELS = ("high", "default", "low")
READ_COMMANDS = ("xreadgroup", "xinfo|groups", "xrange")


def runner(url: str, scenario: str) -> TaskRunner:
    return TaskRunner(
        url,
        namespace=f"bench-prio-{uuid.uuid4().hex[:8]}",
        priorities=("default",) if scenario.startswith("one-level") else LEVELS,
        partitions=3 if scenario.endswith("-p3") else 1,
    )


async def drain(url: str, scenario: str, jobs: int, concurrency: int) -> dict[str, float]:
    done = Drain(jobs)
    tr = runner(url, scenario)

    @tr.task
    async def noop() -> None:
        done.ran()

    async with tr:
        if scenario.startswith("used"):
            calls = [noop.options(priority=LEVELS[i % 3]).call() for i in range(jobs)]
        else:
            calls = [noop.call() for _ in range(jobs)]
        await tr.enqueue_many(calls)
        admin = Redis.from_url(url, decode_responses=True)
        await admin.config_resetstat()
        cpu_before = _server_cpu(await admin.info("cpu"))
        started = time.perf_counter()
        async with tr.worker(concurrency=concurrency, handle_signals=False):
            with anyio.fail_after(600):
                await done.finished.wait()
        seconds = time.perf_counter() - started
        cpu = _server_cpu(await admin.info("cpu")) - cpu_before
        stats = await admin.info("commandstats")
        await admin.aclose()
    calls_by = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
    row = {
        "commands_job": sum(calls_by.values()) / done.done,
        "evalsha_job": calls_by.get("evalsha", 0) / done.done,
        "server_cpu_us_job": cpu / done.done * 1e6,
        "drain_jobs_s": done.done / seconds,
    }
    for name in READ_COMMANDS:
        row[name] = calls_by.get(name, 0) / done.done
    return row


def _server_cpu(info: dict[str, Any]) -> float:
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def main(args: argparse.Namespace) -> None:
    with redis_server() as (url, version):
        print(
            f"redis {version}; {args.jobs} jobs drained at concurrency {args.concurrency}; "
            f"{args.rounds} round(s), medians"
        )
        results: dict[str, list[dict[str, float]]] = {s: [] for s in SCENARIOS}
        for round_ in range(args.rounds):
            shift = round_ % len(SCENARIOS)
            for scenario in SCENARIOS[shift:] + SCENARIOS[:shift]:
                await flush(url)
                results[scenario].append(await drain(url, scenario, args.jobs, args.concurrency))
        keys = ["commands_job", "evalsha_job", *READ_COMMANDS, "server_cpu_us_job"]
        keys.append("drain_jobs_s")
        print(f"{'scenario':13} " + " ".join(f"{k:>17}" for k in keys))
        for scenario in SCENARIOS:
            rows = results[scenario]
            values = " ".join(f"{statistics.median(r[k] for r in rows):17.2f}" for k in keys)
            print(f"{scenario:13} {values}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=20)
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
