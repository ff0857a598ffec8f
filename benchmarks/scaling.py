"""Scaling out: drain rate and Redis CPU per job with 1, 2, 4 worker processes, on a
standalone server and on a 3-master cluster with the queue in 1, 3 and 6 partitions.

    python -m benchmarks.scaling                                   # 20,000 jobs, 3 rounds
    python -m benchmarks.scaling --jobs 10000 --rounds 1 --idle-seconds 20
    python -m benchmarks.scaling --workers 1,2,4 --partitions 1,3,6 --skip-standalone

It starts its own servers (benchmarks.run's ``find_redis_server``, loopback ports, temp
dirs, no persistence, never 6379): one standalone redis-server, and a 3-master cluster
without replicas (benchmarks.cluster; a replica adds its master's replication stream,
not script work, so a throughput benchmark needs none). For every configuration
(topology, partitions P, worker processes W) and round, on a fresh namespace:

1. **Fill.** A producer in this process (``TaskRunner(url, partitions=P)``, which records
   P in the queue's meta) pauses queue ``bench`` and enqueues ``--jobs`` no-op jobs with
   ``enqueue_many`` (spread over the P partitions by job id).
2. **Start.** W ``taskrunner worker benchmarks.scaling_app:tr --concurrency 100``
   processes; wait (deadline) until each has logged " ready: ". They read P from the
   meta, find the queue paused and wait.
3. **Drain.** ``CONFIG RESETSTAT`` and ``used_cpu_user + used_cpu_sys`` on every node,
   the workers' CPU (``/proc``), the server's ``TIME``; resume the queue (its "resume"
   event wakes every worker); poll ``ZCARD`` of each partition's ``succeeded`` index
   until all jobs are there (deadline). Then CPU again on every node and worker.
   The drain time is the last job's finish time (the ``succeeded`` index is scored by
   the server's clock) minus the ``TIME`` read just before the resume: worker boot is
   excluded, wake-up included. Every job must have succeeded (``failed`` and ``dead``
   empty), or the run fails.
4. **Idle** (``--idle-seconds``, for the largest W of each topology and P): with the
   queue drained and the workers idle, Redis CPU and commands per node per second
   (``INFO commandstats``): what idle workers cost each shard.

Reported per configuration (median over rounds): aggregate jobs/s; Redis CPU µs per job
(all nodes); worker CPU µs per job (all processes); and per shard, the share of the jobs
whose partition it owns and its CPU µs per job it owns (the number that gives one
shard's capacity: 1e6 / µs = jobs/s per Redis core). The JSON goes to
``benchmarks/results/scaling.json`` (gitignored) unless ``--json`` says otherwise.

The machine's cores are shared by the servers and the worker processes, so on a 2-core
machine more processes or shards cannot add throughput; the CPU per job is the number
that carries over to a machine where each shard has its own core.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
from redis.crc import key_slot

from benchmarks.cluster import loopback_cluster
from benchmarks.run import redis_server
from benchmarks.scaling_app import QUEUE
from taskrunner import TaskRunner
from taskrunner.keys import QueueKeys

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_JSON = HERE / "results" / "scaling.json"
CONCURRENCY = 100
READY_DEADLINE = 120.0
DRAIN_DEADLINE = 600.0
STOP_DEADLINE = 30.0
POLL_S = 0.02
TRICKLE_INTERVAL = 0.02
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Config:
    topology: str  # "standalone" or "cluster"
    partitions: int
    workers: int

    @property
    def label(self) -> str:
        return f"{self.topology} P={self.partitions} W={self.workers}"


@dataclass
class Run:
    """One measured drain."""

    jobs: int
    drain_s: float
    wall_s: float
    redis_cpu_s: dict[str, float]  # per node address
    worker_cpu_s: float
    owned: dict[str, int]  # jobs whose partition the node owns
    commands: dict[str, dict[str, int]]  # calls per command per node (scripts' inner too)
    placement: list[str]  # the node owning each partition
    idle: dict[str, dict[str, float]] = field(default_factory=dict)
    trickle: dict[str, float] = field(default_factory=dict)

    @property
    def jobs_s(self) -> float:
        return self.jobs / self.drain_s

    def redis_us_job(self) -> float:
        return sum(self.redis_cpu_s.values()) / self.jobs * 1e6

    def worker_us_job(self) -> float:
        return self.worker_cpu_s / self.jobs * 1e6

    def shard_us_owned_job(self, node: str) -> float | None:
        owned = self.owned.get(node, 0)
        return self.redis_cpu_s[node] / owned * 1e6 if owned else None


# --------------------------------------------------------------------------- servers


class Nodes:
    """Direct connections to every master (one for a standalone server)."""

    def __init__(self, addresses: list[str], cluster: bool) -> None:
        self.addresses = addresses
        self.cluster = cluster
        self.clients = {
            a: redis.Redis(host=a.split(":")[0], port=int(a.split(":")[1]), decode_responses=True)
            for a in addresses
        }
        self.url = (
            "redis+cluster://" + ",".join(addresses) if cluster else f"redis://{addresses[0]}/0"
        )
        self._slots: list[tuple[int, int, str]] = []  # (first, last, owner), cluster only

    def close(self) -> None:
        for client in self.clients.values():
            client.close()

    def cpu(self) -> dict[str, float]:
        out = {}
        for address, client in self.clients.items():
            info = client.info("cpu")
            out[address] = float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
        return out

    def resetstat(self) -> None:
        for client in self.clients.values():
            client.config_resetstat()

    def commandstats(self, field: str = "calls") -> dict[str, dict[str, int]]:
        """Calls (or ``usec``) per command since the last RESETSTAT, per node."""
        out = {}
        for address, client in self.clients.items():
            stats = client.info("commandstats")
            out[address] = {
                name.removeprefix("cmdstat_"): int(value[field])
                for name, value in stats.items()
                if isinstance(value, dict)
            }
        return out

    def flushall(self) -> None:
        for client in self.clients.values():
            client.flushall()

    def owner(self, key: str) -> str:
        """The master that owns ``key`` (the only node on a standalone server)."""
        if not self.cluster:
            return self.addresses[0]
        slot = key_slot(key.encode())
        if not self._slots:
            first = next(iter(self.clients.values()))
            slots = first.execute_command("CLUSTER SLOTS")  # type: ignore[no-untyped-call]
            for start, end, primary, *_ in slots:
                self._slots.append((int(start), int(end), f"{primary[0]}:{int(primary[1])}"))
        for start, end, owner in self._slots:
            if start <= slot <= end:
                return owner
        raise SystemExit(f"slot {slot} is not covered")

    def server_ms(self, address: str) -> int:
        seconds, micros = self.clients[address].time()
        return int(seconds) * 1000 + int(micros) // 1000


@contextlib.contextmanager
def topology(name: str) -> Iterator[Nodes]:
    if name == "standalone":
        with redis_server() as (url, _version):
            address = url.removeprefix("redis://").removesuffix("/0")
            nodes = Nodes([address], cluster=False)
            try:
                yield nodes
            finally:
                nodes.close()
    else:
        with loopback_cluster(3) as addresses:
            nodes = Nodes(addresses, cluster=True)
            try:
                yield nodes
            finally:
                nodes.close()


# --------------------------------------------------------------------------- producer


async def fill(url: str, namespace: str, partitions: int, jobs: int) -> None:
    """Pause the queue, then enqueue ``jobs`` no-op jobs in bulk."""
    tr = TaskRunner(url, queue=QUEUE, namespace=namespace, partitions=partitions)

    @tr.task(name="noop")
    async def noop() -> None: ...

    async with tr:
        await tr.pause(QUEUE)
        for start in range(0, jobs, 10_000):
            await tr.enqueue_many([noop.call() for _ in range(min(10_000, jobs - start))])


async def resume(url: str, namespace: str) -> None:
    async with TaskRunner(url, queue=QUEUE, namespace=namespace) as tr:
        await tr.resume(QUEUE)


# --------------------------------------------------------------------------- workers


class Workers:
    """W ``taskrunner worker`` processes, each in its own session, logging to a file."""

    def __init__(self, url: str, namespace: str, count: int, logs: Path) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "TASKRUNNER_REDIS_URL": url,
            "SCALING_NAMESPACE": namespace,
        }
        self.logs = [logs / f"worker-{i}.log" for i in range(count)]
        self.procs: list[subprocess.Popen[bytes]] = []
        cmd = [sys.executable, "-m", "taskrunner.cli", "worker", "benchmarks.scaling_app:tr"]
        cmd += ["--concurrency", str(CONCURRENCY), "--log-level", "info"]
        for log in self.logs:
            with log.open("wb") as out:
                self.procs.append(
                    subprocess.Popen(
                        cmd,
                        cwd=ROOT,
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_DEADLINE
        while time.monotonic() < deadline:
            for proc, log in zip(self.procs, self.logs, strict=True):
                if proc.poll() is not None:
                    raise SystemExit(f"a worker exited at start:\n{log.read_text()[-2000:]}")
            if all(" ready: " in log.read_text(errors="replace") for log in self.logs):
                return
            time.sleep(0.1)
        raise SystemExit(f"workers not ready within {READY_DEADLINE:.0f} s")

    def cpu(self) -> float:
        """User + system CPU seconds of every worker process so far."""
        total = 0
        for proc in self.procs:
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
        return total / CLOCK_TICKS

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_DEADLINE
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


# --------------------------------------------------------------------------- one run


def partition_keys(namespace: str, partitions: int) -> list[QueueKeys]:
    return [QueueKeys(namespace, QUEUE, p) for p in range(partitions)]


def succeeded(nodes: Nodes, parts: list[QueueKeys]) -> list[int]:
    return [int(nodes.clients[nodes.owner(k.succeeded)].zcard(k.succeeded)) for k in parts]


def wait_drained(nodes: Nodes, parts: list[QueueKeys], jobs: int) -> None:
    owners = [nodes.owner(k.succeeded) for k in parts]
    deadline = time.monotonic() + DRAIN_DEADLINE
    while time.monotonic() < deadline:
        done = sum(
            int(nodes.clients[o].zcard(k.succeeded)) for o, k in zip(owners, parts, strict=True)
        )
        if done >= jobs:
            return
        time.sleep(POLL_S)
    raise SystemExit(f"not drained within {DRAIN_DEADLINE:.0f} s")


def last_finish_ms(nodes: Nodes, parts: list[QueueKeys]) -> int:
    last = 0
    for keys in parts:
        top = nodes.clients[nodes.owner(keys.succeeded)].zrange(
            keys.succeeded, -1, -1, withscores=True
        )
        if top:
            last = max(last, int(top[0][1]))
    return last


def check_all_succeeded(nodes: Nodes, parts: list[QueueKeys], jobs: int) -> None:
    done = sum(succeeded(nodes, parts))
    bad = 0
    for keys in parts:
        client = nodes.clients[nodes.owner(keys.succeeded)]
        bad += int(client.zcard(keys.failed)) + int(client.zcard(keys.dead))
    if done != jobs or bad:
        raise SystemExit(f"expected {jobs} succeeded, found {done} succeeded and {bad} failed/dead")


def measure(
    nodes: Nodes, config: Config, jobs: int, idle_seconds: float, trickle_jobs: int = 0
) -> Run:
    namespace = f"scaling-{uuid.uuid4().hex[:8]}"
    parts = partition_keys(namespace, config.partitions)
    nodes.flushall()
    asyncio.run(fill(nodes.url, namespace, config.partitions, jobs))
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
        workers = Workers(nodes.url, namespace, config.workers, Path(tmp))
        try:
            workers.wait_ready()
            run = _drain(nodes, workers, namespace, parts, jobs)
            if idle_seconds > 0:
                run.idle = _idle(nodes, idle_seconds)
            if trickle_jobs > 0:
                run.trickle = _trickle(nodes, namespace, parts, jobs, trickle_jobs)
        finally:
            workers.stop()
    return run


def _drain(
    nodes: Nodes, workers: Workers, namespace: str, parts: list[QueueKeys], jobs: int
) -> Run:
    nodes.resetstat()
    cpu0, wcpu0 = nodes.cpu(), workers.cpu()
    home = nodes.owner(parts[0].succeeded)
    start_ms = nodes.server_ms(home)
    wall0 = time.monotonic()
    asyncio.run(resume(nodes.url, namespace))
    wait_drained(nodes, parts, jobs)
    wall = time.monotonic() - wall0
    cpu1, wcpu1 = nodes.cpu(), workers.cpu()
    stats = nodes.commandstats()
    check_all_succeeded(nodes, parts, jobs)
    owned: dict[str, int] = dict.fromkeys(nodes.addresses, 0)
    for keys, count in zip(parts, succeeded(nodes, parts), strict=True):
        owned[nodes.owner(keys.succeeded)] += count
    drain_ms = max(1, last_finish_ms(nodes, parts) - start_ms)
    return Run(
        jobs=jobs,
        drain_s=drain_ms / 1000,
        wall_s=wall,
        redis_cpu_s={a: cpu1[a] - cpu0[a] for a in nodes.addresses},
        worker_cpu_s=wcpu1 - wcpu0,
        owned=owned,
        commands=stats,
        placement=[nodes.owner(k.succeeded) for k in parts],
    )


def _idle(nodes: Nodes, seconds: float) -> dict[str, dict[str, float]]:
    """Per node: Redis CPU ms per second and calls per second by command, workers idle."""
    nodes.resetstat()
    cpu0 = nodes.cpu()
    time.sleep(seconds)
    cpu1 = nodes.cpu()
    stats = nodes.commandstats()
    usec = nodes.commandstats("usec")
    out = {}
    for address in nodes.addresses:
        calls = {k: v / seconds for k, v in stats[address].items() if k not in ("info", "config")}
        evalsha = stats[address].get("evalsha", 0)
        out[address] = {
            "cpu_ms_s": (cpu1[address] - cpu0[address]) * 1000 / seconds,
            "evalsha_usec_per_call": usec[address].get("evalsha", 0) / evalsha if evalsha else 0,
            **calls,
        }
    return out


async def trickle(url: str, namespace: str, count: int, interval: float) -> None:
    """Enqueue ``count`` jobs one at a time, ``interval`` seconds apart."""
    tr = TaskRunner(url, queue=QUEUE, namespace=namespace)

    @tr.task(name="noop")
    async def noop() -> None: ...

    async with tr:
        for _ in range(count):
            await noop.enqueue()
            await asyncio.sleep(interval)


def _trickle(
    nodes: Nodes, namespace: str, parts: list[QueueKeys], done: int, count: int
) -> dict[str, float]:
    """Jobs arriving one at a time into drained partitions: what each costs Redis."""
    nodes.resetstat()
    cpu0 = nodes.cpu()
    asyncio.run(trickle(nodes.url, namespace, count, TRICKLE_INTERVAL))
    wait_drained(nodes, parts, done + count)
    cpu1 = nodes.cpu()
    stats = nodes.commandstats()
    calls = {k: sum(s.get(k, 0) for s in stats.values()) for k in ("evalsha", "xreadgroup")}
    return {
        "jobs": count,
        "interval_s": TRICKLE_INTERVAL,
        "redis_us_job": sum(cpu1[a] - cpu0[a] for a in nodes.addresses) / count * 1e6,
        "evalsha_job": calls["evalsha"] / count,
        "xreadgroup_job": calls["xreadgroup"] / count,
    }


# --------------------------------------------------------------------------- report


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summary(config: Config, runs: list[Run], nodes: list[str]) -> dict[str, Any]:
    jobs = sum(r.jobs for r in runs)
    shards = []
    for i, node in enumerate(nodes):
        owned = sum(r.owned.get(node, 0) for r in runs)
        per_owned = [v for r in runs if (v := r.shard_us_owned_job(node)) is not None]
        shards.append(
            {
                "shard": i,
                "node": node,
                "share": owned / jobs,
                "us_per_owned_job": median(per_owned) if per_owned else None,
                "us_per_job": median([r.redis_cpu_s[node] / r.jobs * 1e6 for r in runs]),
            }
        )
    return {
        **asdict(config),
        "rounds": len(runs),
        "jobs_s": median([r.jobs_s for r in runs]),
        "jobs_s_range": [min(r.jobs_s for r in runs), max(r.jobs_s for r in runs)],
        "redis_us_job": median([r.redis_us_job() for r in runs]),
        "worker_us_job": median([r.worker_us_job() for r in runs]),
        "commands_job": median([_calls(r) / r.jobs for r in runs]),
        "evalsha_job": median([_calls(r, "evalsha") / r.jobs for r in runs]),
        "placement": [nodes.index(n) for n in runs[0].placement],
        "shards": shards,
    }


def _calls(run: Run, command: str | None = None) -> int:
    return sum(
        n for stats in run.commands.values() for k, n in stats.items() if command in (None, k)
    )


def print_row(row: dict[str, Any]) -> None:
    shards = "  ".join(
        f"s{s['shard']} {s['share'] * 100:3.0f}% "
        + (f"{s['us_per_owned_job']:5.1f}" if s["us_per_owned_job"] is not None else "    -")
        for s in row["shards"]
    )
    print(
        f"{row['topology']:10} {row['partitions']:>2} {row['workers']:>2} "
        f"{row['jobs_s']:>8,.0f} {row['redis_us_job']:>9.1f} {row['worker_us_job']:>9.1f} "
        f"{row['commands_job']:>7.2f}  {shards}",
        flush=True,
    )


def print_idle(config: Config, idle: dict[str, dict[str, float]]) -> None:
    for i, (node, stats) in enumerate(idle.items()):
        calls = sorted(
            ((k, v) for k, v in stats.items() if k != "cpu_ms_s" and v > 0),
            key=lambda kv: -kv[1],
        )
        calls = [(k, v) for k, v in calls if k != "evalsha_usec_per_call"]
        text = ", ".join(f"{k} {v:.1f}" for k, v in calls[:8])
        print(
            f"  idle {config.label} s{i} ({node}): {stats['cpu_ms_s']:.2f} ms CPU/s, "
            f"EVALSHA {stats['evalsha_usec_per_call']:.1f} µs/call; /s: {text}"
        )


def print_trickle(config: Config, t: dict[str, float]) -> None:
    print(
        f"  trickle {config.label}: {t['jobs']:.0f} jobs {t['interval_s'] * 1000:.0f} ms "
        f"apart: Redis {t['redis_us_job']:.0f} µs/job, EVALSHA {t['evalsha_job']:.1f}/job, "
        f"XREADGROUP {t['xreadgroup_job']:.1f}/job",
        flush=True,
    )


HEADER = (
    f"{'topology':10} {'P':>2} {'W':>2} {'jobs/s':>8} {'redis µs':>9} {'worker µs':>9} "
    f"{'cmd/job':>7}  per shard: share of jobs, Redis CPU µs per job it owns"
)


# --------------------------------------------------------------------------- CLI


def configs(args: argparse.Namespace) -> list[Config]:
    out = []
    if not args.skip_standalone:
        out += [Config("standalone", 1, w) for w in args.workers]
    if not args.skip_cluster:
        out += [Config("cluster", p, w) for p in args.partitions for w in args.workers]
    return out


def run_topology(name: str, todo: list[Config], args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with topology(name) as nodes:
        largest = max(c.workers for c in todo)
        runs: dict[Config, list[Run]] = {c: [] for c in todo}
        for round_ in range(args.rounds):
            order = todo if round_ % 2 == 0 else todo[::-1]
            for config in order:
                extra = round_ == 0 and config.workers == largest
                idle = args.idle_seconds if extra else 0
                run = measure(nodes, config, args.jobs, idle, args.trickle if extra else 0)
                runs[config].append(run)
                print(
                    f"  round {round_ + 1} {config.label}: {run.jobs_s:,.0f} jobs/s, "
                    f"Redis {run.redis_us_job():.1f} µs/job",
                    flush=True,
                )
                if run.idle:
                    print_idle(config, run.idle)
                if run.trickle:
                    print_trickle(config, run.trickle)
        for config in todo:
            row = summary(config, runs[config], nodes.addresses)
            row["idle"] = next((r.idle for r in runs[config] if r.idle), {})
            row["trickle"] = next((r.trickle for r in runs[config] if r.trickle), {})
            row["runs"] = [asdict(r) for r in runs[config]]
            results[config.label] = row
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    counts = lambda text: [int(n) for n in text.split(",") if n.strip()]  # noqa: E731
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.scaling", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--jobs", type=int, default=20_000, help="jobs per drain")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the whole matrix")
    parser.add_argument("--workers", type=counts, default=[1, 2, 4], help="e.g. 1,2,4")
    parser.add_argument("--partitions", type=counts, default=[1, 3, 6], help="cluster: 1,3,6")
    parser.add_argument(
        "--idle-seconds",
        type=float,
        default=20.0,
        help="idle window after the drain (largest W per topology and P, first round); 0: off",
    )
    parser.add_argument(
        "--trickle",
        type=int,
        default=200,
        help="then jobs enqueued one at a time, 20 ms apart, into the drained queue "
        "(largest W per topology and P, first round); 0: off",
    )
    parser.add_argument("--skip-standalone", action="store_true")
    parser.add_argument("--skip-cluster", action="store_true")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.rounds < 1 or not args.workers or not args.partitions:
        parser.error("--jobs, --rounds, --workers and --partitions must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    todo = configs(args)
    print(
        f"{args.jobs:,} no-op jobs per drain, concurrency {CONCURRENCY} per worker process, "
        f"{args.rounds} round(s), medians; {os.cpu_count()} CPUs",
        flush=True,
    )
    results: dict[str, Any] = {}
    for name in ("standalone", "cluster"):
        mine = [c for c in todo if c.topology == name]
        if mine:
            print(f"{name}:", flush=True)
            results.update(run_topology(name, mine, args))
    print(f"\n{HEADER}")
    for row in results.values():
        print_row(row)
    meta = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "jobs": args.jobs,
        "rounds": args.rounds,
        "concurrency": CONCURRENCY,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
