"""Hot-path cost of rate/concurrency limits, progress, unique locks and delays, with
each feature unused and used.

    python -m benchmarks.limits_progress                       # every scenario, 5 rounds
    python -m benchmarks.limits_progress --only plain --rounds 9 --json /tmp/out.json

Starts its own redis-server (as ``benchmarks.run`` does). Every scenario drains
``--jobs`` no-op jobs (enqueued in bulk first) with an in-process worker at concurrency
100, timed inside the task bodies from the first start to the last completion (so worker
boot is excluded), in a fresh namespace; the scenarios take turns round after round, so
the machine's load falls on all of them alike. The table gives, per job, the median and
range of wall microseconds, jobs per second, and the median CPU microseconds of this
process (worker and producer) and of the Redis server (``INFO cpu``, worker start and
stop included): CPU time is what a shared, loaded machine distorts least.

Scenarios: ``plain`` (no limit, no progress: the features unused), ``concurrency``
(``concurrency_limit`` never reached), ``rate`` (``rate_limit`` never reached), ``keyed``
(both, keyed by an argument that differs per job), ``progress`` (one ``set_progress``
per job), ``unique`` (``lock="until_executed"`` keyed by an argument that differs per
job: each job takes and frees its own lock), ``delayed`` (every job enqueued with a 1 ms
delay, so it goes through the delayed set and is promoted by the worker). Besides the
drain, the Redis CPU of the bulk enqueue is reported per job (``enqueue µs``). Two
micro-benchmarks time sequential round trips: ``set_progress`` alone, and a
limit's take + give back (``acquire.lua`` + ``release.lua``).

``plain`` uses only the public API present before these features, so it can run against
another checkout for comparison: ``PYTHONPATH=/path/to/other python -m
benchmarks.limits_progress --only plain``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from benchmarks.run import redis_server
from taskrunner import Task, TaskRunner, current_job

SCENARIOS = ("plain", "concurrency", "rate", "keyed", "progress", "unique", "delayed")
MICRO = ("set_progress", "acquire_release")


@dataclass
class Clock:
    """First start and last completion of one drain, recorded by the task bodies."""

    first: float | None = None
    last: float = 0.0
    first_cpu: float = 0.0
    last_cpu: float = 0.0
    done: int = 0
    finished: anyio.Event = field(default_factory=anyio.Event)
    target: int = 0

    def start(self) -> None:
        if self.first is None:
            self.first = time.perf_counter()
            self.first_cpu = time.process_time()

    def end(self) -> None:
        self.last = time.perf_counter()
        self.last_cpu = time.process_time()
        self.done += 1
        if self.done == self.target:
            self.finished.set()


def declare(tr: TaskRunner, scenario: str, clock: Clock) -> Task[[int], None]:
    """The scenario's no-op task on ``tr``."""
    options: dict[str, dict[str, object]] = {
        "plain": {},
        "concurrency": {"concurrency_limit": 100_000},
        "rate": {"rate_limit": "100000/s"},
        "keyed": {"concurrency_limit": 100_000, "rate_limit": "100000/s", "limit_args": ["i"]},
        "progress": {},
        "unique": {"lock": "until_executed", "unique_args": lambda i: [i]},
        "delayed": {},
    }
    report = scenario == "progress"

    @tr.task(name=f"noop_{scenario}", options=options[scenario])
    async def noop(i: int) -> None:
        clock.start()
        if report:
            await current_job().set_progress(0.5)
        clock.end()

    return noop


@dataclass
class Sample:
    """Per job: wall seconds, this process's CPU seconds, the Redis server's CPU seconds."""

    wall: float
    cpu: float
    server: float
    enqueue_server: float = float("nan")


async def server_cpu(tr: TaskRunner) -> float:
    info = await tr.client.redis.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def drain(url: str, scenario: str, jobs: int) -> Sample:
    """The cost per job of one drain of ``jobs`` jobs."""
    tr = TaskRunner(url, namespace=f"bench-{uuid.uuid4().hex[:8]}", max_retries=0)
    clock = Clock(target=jobs)
    noop = declare(tr, scenario, clock)
    sender = noop.options(delay=0.001) if scenario == "delayed" else noop
    async with tr:
        began = await server_cpu(tr)
        for start in range(0, jobs, 10_000):
            await tr.enqueue_many([sender.call(i) for i in range(start, min(jobs, start + 10_000))])
        before = await server_cpu(tr)
        async with tr.worker(concurrency=100, handle_signals=False):
            with anyio.fail_after(300):
                await clock.finished.wait()
        after = await server_cpu(tr)  # includes the worker's start and stop
        await tr.client.redis.flushdb()
    assert clock.first is not None
    return Sample(
        (clock.last - clock.first) / jobs,
        (clock.last_cpu - clock.first_cpu) / jobs,
        (after - before) / jobs,
        (before - began) / jobs,
    )


async def micro(url: str, name: str, calls: int) -> Sample:
    """Seconds per call of ``name``, sequential round trips."""
    began = time.process_time()
    if name == "set_progress":
        wall = await _progress_calls(url, calls)
    else:
        wall = await _limit_calls(url, calls)
    return Sample(wall, (time.process_time() - began) / calls, float("nan"))


async def _progress_calls(url: str, calls: int) -> float:
    tr = TaskRunner(url, namespace=f"bench-{uuid.uuid4().hex[:8]}", max_retries=0)

    @tr.task(name="reporter")
    async def reporter(n: int) -> float:
        job = current_job()
        began = time.perf_counter()
        for k in range(n):
            await job.set_progress({"done": k, "total": n})
        return (time.perf_counter() - began) / n

    async with tr, tr.worker(handle_signals=False):
        job = await reporter.enqueue(calls)
        per_call = await job.result(timeout=300)
        await tr.client.redis.flushdb()
    return per_call


async def _limit_calls(url: str, calls: int) -> float:
    from taskrunner import scripts
    from taskrunner.keys import LimitKeys
    from taskrunner.middleware.limits import limit_digest

    tr = TaskRunner(url, namespace=f"bench-{uuid.uuid4().hex[:8]}")
    async with tr:
        redis, env = tr.client.redis, tr.client.env
        keys = LimitKeys(tr.namespace, limit_digest("bench", {}))
        began = time.perf_counter()
        for k in range(calls):
            token = f"t{k}"
            await scripts.run(
                redis, scripts.acquire(env, keys, token, "[]", 100, 30_000, 100_000, 1000)
            )
            await scripts.run(redis, scripts.release(keys, token, 100, 30_000))
        per_call = (time.perf_counter() - began) / calls
        await tr.client.redis.flushdb()
    return per_call


def summary(samples: list[Sample]) -> dict[str, float]:
    walls = [s.wall for s in samples]
    return {
        "median_us": statistics.median(walls) * 1e6,
        "min_us": min(walls) * 1e6,
        "max_us": max(walls) * 1e6,
        "jobs_per_s": 1 / statistics.median(walls),
        "cpu_us": statistics.median(s.cpu for s in samples) * 1e6,
        "server_cpu_us": statistics.median(s.server for s in samples) * 1e6,
        "enqueue_server_cpu_us": statistics.median(s.enqueue_server for s in samples) * 1e6,
    }


async def run(args: argparse.Namespace, url: str) -> dict[str, dict[str, float]]:
    chosen = [s for s in (*SCENARIOS, *MICRO) if s in args.only]
    samples: dict[str, list[Sample]] = {name: [] for name in chosen}
    for _ in range(args.rounds):
        for name in chosen:
            if name in SCENARIOS:
                samples[name].append(await drain(url, name, args.jobs))
            else:
                samples[name].append(await micro(url, name, args.calls))
    return {name: summary(values) for name, values in samples.items()}


def print_table(results: dict[str, dict[str, float]], rounds: int) -> None:
    print(
        f"{'scenario':<16} {'wall us/job (median [min-max])':>32} {'jobs/s':>8} "
        f"{'cpu us':>8} {'redis us':>9} {'enqueue us':>11}   ({rounds} rounds; per call for micros)"
    )
    for name, stat in results.items():
        spread = f"{stat['median_us']:.1f} [{stat['min_us']:.1f}-{stat['max_us']:.1f}]"
        print(
            f"{name:<16} {spread:>32} {stat['jobs_per_s']:>8,.0f} "
            f"{stat['cpu_us']:>8.1f} {stat['server_cpu_us']:>9.1f} "
            f"{stat['enqueue_server_cpu_us']:>11.1f}"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join((*SCENARIOS, *MICRO)))
    parser.add_argument("--jobs", type=int, default=2000, help="jobs per drain")
    parser.add_argument("--calls", type=int, default=2000, help="calls per micro-benchmark")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args(argv)
    args.only = set(args.only.split(","))
    unknown = args.only - {*SCENARIOS, *MICRO}
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None, backend: Callable[..., Any] = anyio.run) -> None:
    args = parse_args(argv)
    try:
        import uvloop  # noqa: F401

        options: dict[str, Any] = {"use_uvloop": True}
    except ImportError:
        options = {}
    with redis_server() as (url, version):
        results = backend(run, args, url, backend_options=options)
    print(f"redis {version}; {args.jobs} jobs per drain, {args.calls} calls per micro")
    print_table(results, args.rounds)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
