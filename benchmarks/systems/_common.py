"""Shared harness for the per-system benchmark adapters.

Every adapter module is run in its own subprocess::

    python -m benchmarks.systems.<name> <workload> <redis_url> <json-params>

and prints exactly one JSON line (``{"system": ..., "workload": ..., "metrics": {...}}``) on
stdout. This module is stdlib-only (plus optional uvloop) because it is also imported by the
peers' separate virtualenv, which does not have ``taskrunner`` installed.

Timing is taken *inside the worker process, by the task bodies themselves*: the first task to
start records ``time.perf_counter()``, every task records its completion time, and the drain
rate is ``n / (last_completion - first_start)``. Worker boot and shutdown are therefore excluded.
W4 times a fixed window between two completion counts (``Recorder.marks``); W5 reads the
worker's RSS and Redis ``INFO memory``. Helper roles run the same module in a child process:
``produce`` (W3's paced producer) and ``fill`` (W4/W5's bulk backlog filler).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import logging
import math
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Literal, Protocol
from urllib.parse import urlparse

TaskKind = Literal["noop", "sleep", "latency"]
Metrics = dict[str, float | int | str | None]

SLEEP_S = 0.01
POLL_S = 0.01
QUEUE = "bench"


# --------------------------------------------------------------------------- recording


class Recorder:
    """Thread-safe completion counter shared by all task bodies of one worker process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset(0)

    def reset(self, target: int, marks: tuple[int, ...] = ()) -> None:
        with self._lock:
            self.target = target
            self.count = 0
            self.first_start: float | None = None
            self.last_done = 0.0
            self.latencies: list[float] = []
            self._mark_at = frozenset(marks)
            self.marks: dict[int, tuple[float, float]] = {}
            """completion count -> (perf_counter, process_time) when it was reached."""

    def start(self) -> None:
        if self.first_start is None:
            with self._lock:
                if self.first_start is None:
                    self.first_start = time.perf_counter()

    def done(self) -> None:
        now = time.perf_counter()
        with self._lock:
            self.count += 1
            self.last_done = max(self.last_done, now)
            if self.count in self._mark_at:
                self.marks[self.count] = (now, time.process_time())

    def latency(self, enqueued_at: float) -> None:
        started = time.time()
        with self._lock:
            self.latencies.append(started - enqueued_at)

    def extend(self, target: int) -> None:
        """Raise the target without resetting the count (W5's second phase)."""
        with self._lock:
            self.target = target

    @property
    def finished(self) -> bool:
        return self.count >= self.target

    def drain_rate(self) -> float:
        if self.first_start is None or self.last_done <= self.first_start:
            return math.nan
        return self.count / (self.last_done - self.first_start)


REC = Recorder()


def on_noop() -> None:
    """Body of the noop task (called by every adapter's noop task)."""
    REC.start()
    REC.done()


async def on_sleep() -> None:
    """Body of the I/O-bound task: ``await asyncio.sleep(0.01)``."""
    REC.start()
    await asyncio.sleep(SLEEP_S)
    REC.done()


def on_sleep_sync() -> None:
    """Thread-based equivalent of :func:`on_sleep` for thread-pool workers (dramatiq)."""
    REC.start()
    time.sleep(SLEEP_S)
    REC.done()


def on_latency(enqueued_at: float) -> None:
    """Body of the latency task: record start time vs the enqueue timestamp argument."""
    REC.latency(enqueued_at)
    REC.done()


# --------------------------------------------------------------------------- adapter API


@dataclass(frozen=True)
class Params:
    """Workload parameters, sent by the orchestrator as a JSON object."""

    n: int = 20_000
    concurrency: int = 100
    interval_s: float = 0.005
    idle_s: float = 1.0
    timeout_s: float = 240.0
    uvloop: bool = True
    variant: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, raw: str) -> Params:
        data: dict[str, Any] = json.loads(raw) if raw else {}
        extra: dict[str, Any] = data.pop("extra", {})
        known = {k: data.pop(k) for k in list(data) if k in cls.__dataclass_fields__}
        return cls(**known, extra={**extra, **data})

    def to_json(self) -> str:
        return json.dumps({k: getattr(self, k) for k in self.__dataclass_fields__})


class System(Protocol):
    """What each adapter implements. All methods run on the adapter's event loop."""

    name: str
    packages: tuple[str, ...]
    has_bulk: bool
    settings: str

    async def open(self, url: str, params: Params) -> None: ...
    async def close(self) -> None: ...
    async def enqueue(self, kind: TaskKind, enqueued_at: float = 0.0) -> None: ...
    async def enqueue_bulk(self, kind: TaskKind, n: int) -> None: ...
    async def start_worker(self, concurrency: int) -> None: ...
    async def stop_worker(self) -> None: ...


# --------------------------------------------------------------------------- redis helpers


def redis_command(url: str, *args: str, timeout: float = 10.0) -> bytes:
    """Send one RESP command with a raw socket (no client library needed) and return the reply."""
    parsed = urlparse(url)
    payload = f"*{len(args)}\r\n".encode()
    for arg in args:
        raw = arg.encode()
        payload += b"$%d\r\n%s\r\n" % (len(raw), raw)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 6379
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(payload)
        return sock.recv(65536)


def flushall(url: str) -> None:
    reply = redis_command(url, "FLUSHALL")
    if not reply.startswith(b"+OK"):
        raise RuntimeError(f"FLUSHALL failed: {reply!r}")


def redis_info(url: str, section: str, timeout: float = 10.0) -> dict[str, str]:
    """``INFO <section>`` as a dict (raw socket, reads the whole bulk reply)."""
    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 6379
    payload = b"*2\r\n$4\r\nINFO\r\n$%d\r\n%s\r\n" % (len(section), section.encode())
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(payload)
        buf = b""
        while b"\r\n" not in buf:
            buf += _recv(sock)
        header, _, body = buf.partition(b"\r\n")
        if not header.startswith(b"$"):
            raise RuntimeError(f"INFO failed: {buf[:200]!r}")
        size = int(header[1:])
        while len(body) < size:
            body += _recv(sock)
    pairs = (ln.split(":", 1) for ln in body[:size].decode().splitlines() if ":" in ln)
    return {k: v.strip() for k, v in pairs}


def _recv(sock: socket.socket) -> bytes:
    chunk = sock.recv(65536)
    if not chunk:
        raise ConnectionError("redis closed the connection")
    return chunk


def used_memory(url: str) -> int:
    """Redis ``used_memory`` in bytes."""
    return int(redis_info(url, "memory")["used_memory"])


def redis_cpu_s(url: str) -> float:
    """CPU seconds redis-server has used (user + sys, main thread and all)."""
    info = redis_info(url, "cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def rss_mb() -> float:
    """This process's resident set size in MiB, after a full ``gc.collect()``."""
    gc.collect()
    try:
        import psutil
    except ImportError:  # peers' venvs: /proc is enough on Linux
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    return float(psutil.Process().memory_info().rss) / 2**20


async def wait_for(predicate: Callable[[], bool], limit_s: float, what: str) -> None:
    """Poll ``predicate`` every 10 ms; raise TimeoutError after ``limit_s`` seconds."""
    deadline = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {limit_s:.0f}s waiting for {what}")
        await asyncio.sleep(POLL_S)


async def bounded(coro: Awaitable[None], limit_s: float) -> None:
    """Await ``coro`` in the *current* task (context-sensitive clients need that), bounded."""
    async with asyncio.timeout(limit_s):
        await coro


async def cancel_task(task: asyncio.Task[Any] | None, limit_s: float = 10.0) -> None:
    """Cancel ``task`` and wait (bounded) for it to finish, swallowing its outcome."""
    if task is None:
        return
    if not task.done():
        task.cancel()
    done, _ = await asyncio.wait({task}, timeout=limit_s)
    for finished in done:
        if not finished.cancelled():
            finished.exception()


# --------------------------------------------------------------------------- workloads


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(0, math.ceil(pct / 100 * len(ordered)) - 1)
    return ordered[rank]


async def _enqueue_fast(system: System, kind: TaskKind, n: int) -> None:
    """Untimed setup enqueue: bulk API if any, else 100 concurrent single enqueues at a time."""
    if system.has_bulk:
        await system.enqueue_bulk(kind, n)
        return
    for start in range(0, n, 100):
        batch = min(100, n - start)
        await asyncio.gather(*(system.enqueue(kind) for _ in range(batch)))


async def _drain(system: System, url: str, n: int, params: Params) -> Metrics:
    """Drain ``n`` queued jobs with one worker; also the worker process's CPU (% of one
    core, from its start to the last job's completion: the harness itself idles in this
    process meanwhile) and redis-server's CPU per job over the same window."""
    REC.reset(n)
    started = time.perf_counter()
    cpu0, redis0 = time.process_time(), redis_cpu_s(url)
    await system.start_worker(params.concurrency)
    try:
        await wait_for(lambda: REC.finished, params.timeout_s, f"{n} jobs to complete")
        cpu1, redis1, ended = time.process_time(), redis_cpu_s(url), time.perf_counter()
    finally:
        await bounded(system.stop_worker(), 30)
    return {
        "drain_jobs_s": REC.drain_rate(),
        "drain_wall_s": time.perf_counter() - started,
        "drain_worker_cpu_pct": 100 * (cpu1 - cpu0) / (ended - started),
        "drain_redis_cpu_us_job": (redis1 - redis0) / n * 1e6,
        "completed": REC.count,
    }


async def _time_single(system: System, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        await system.enqueue("noop")
    return n / (time.perf_counter() - t0)


async def workload_w1(system: System, url: str, params: Params) -> Metrics:
    """Throughput: timed bulk enqueue (if any) or one-at-a-time enqueue, timed drain, then (bulk
    systems) timed one-at-a-time enqueue of n more, left for the next FLUSHALL. No mid-run flush,
    so no client-side state (consumer groups, scripts) is invalidated under a live client."""
    n = params.n
    metrics: Metrics = {"enqueue_bulk_jobs_s": None}
    if system.has_bulk:
        t0 = time.perf_counter()
        await system.enqueue_bulk("noop", n)
        metrics["enqueue_bulk_jobs_s"] = n / (time.perf_counter() - t0)
    else:
        metrics["enqueue_single_jobs_s"] = await _time_single(system, n)
    metrics.update(await _drain(system, url, n, params))
    if system.has_bulk:
        metrics["enqueue_single_jobs_s"] = await _time_single(system, n)
    return metrics


async def workload_w2(system: System, url: str, params: Params) -> Metrics:
    """I/O-bound: n tasks each awaiting asyncio.sleep(0.01); drain jobs/s."""
    await _enqueue_fast(system, "sleep", params.n)
    return await _drain(system, url, params.n, params)


async def workload_w3(system: System, url: str, params: Params) -> Metrics:
    """Latency: idle worker; a producer subprocess enqueues n tasks one at a time, 5 ms apart."""
    REC.reset(params.n)
    await system.start_worker(params.concurrency)
    try:
        await asyncio.sleep(params.idle_s)
        await _run_producer(system, url, params)
        await wait_for(lambda: REC.finished, params.timeout_s, f"{params.n} latency jobs")
    finally:
        await bounded(system.stop_worker(), 30)
    lat_ms = [x * 1000 for x in REC.latencies]
    return {
        "latency_p50_ms": percentile(lat_ms, 50),
        "latency_p99_ms": percentile(lat_ms, 99),
        "latency_max_ms": max(lat_ms, default=math.nan),
        "completed": REC.count,
    }


async def _run_producer(system: System, url: str, params: Params) -> None:
    await run_helper(system, url, "produce", params)


async def run_helper(system: System, url: str, role: str, params: Params) -> Metrics:
    """Run this adapter's ``role`` (``produce``, ``fill``) in a child process, bounded by
    ``params.timeout_s``; return the metrics of the JSON line it prints."""
    module = _module_name(system)
    cmd = [sys.executable, "-m", module, role, url, params.to_json()]
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.PIPE)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), params.timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"{role} helper exited with {proc.returncode}")
    lines = [ln for ln in out.decode().splitlines() if ln.startswith("{")]
    result: Metrics = json.loads(lines[-1])["metrics"] if lines else {}
    return result


def _module_name(system: System) -> str:
    """Importable module of the adapter (``__main__`` when run with ``python -m``)."""
    module = type(system).__module__
    if module == "__main__":
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        module = spec.name if spec is not None else module
    return module


async def produce(system: System, url: str, params: Params) -> Metrics:
    """Producer side of W3: paced one-at-a-time enqueues carrying time.time()."""
    await system.enqueue("latency", time.time())  # first one also warms the connection
    t0 = time.perf_counter()
    for i in range(params.n - 1):
        delay = t0 + i * params.interval_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await system.enqueue("latency", time.time())
    return {"sent": params.n}


# --------------------------------------------------------------------------- W4 / W5

FAR_FUTURE_S = 30 * 86_400.0
"""Delay of W4's delayed jobs: due long after the run ends, so they only sit in the set."""
FILL_BATCH = 10_000
"""Calls per bulk-enqueue call when filling a backlog (bounds the filler's memory)."""


def _chunks(total: int, size: int) -> list[int]:
    return [min(size, total - start) for start in range(0, total, size)]


async def fill(system: System, url: str, params: Params) -> Metrics:
    """Helper role (own process): enqueue ``fill_delayed`` jobs due in the far future,
    then ``fill_n`` noop jobs, in bulk batches of ``fill_batch``; time both."""
    del url
    ready, delayed = int(params.extra.get("fill_n", 0)), int(params.extra.get("fill_delayed", 0))
    batch = int(params.extra.get("fill_batch", FILL_BATCH))
    t0 = time.perf_counter()
    if delayed:
        enqueue_delayed = getattr(system, "enqueue_delayed_bulk", None)
        if enqueue_delayed is None:
            raise RuntimeError(f"{system.name} cannot enqueue delayed jobs in bulk")
        for size in _chunks(delayed, batch):
            await enqueue_delayed(size, FAR_FUTURE_S)
    t1 = time.perf_counter()
    for size in _chunks(ready, batch):
        await _enqueue_fast(system, "noop", size)
    t2 = time.perf_counter()
    return {"fill_s": t2 - t0, "fill_delayed_s": t1 - t0, "fill_ready_s": t2 - t1}


async def _fill(system: System, url: str, params: Params, ready: int, delayed: int = 0) -> Metrics:
    extra = {**params.extra, "fill_n": ready, "fill_delayed": delayed}
    result = await run_helper(system, url, "fill", dataclasses.replace(params, extra=extra))
    total, seconds = ready + delayed, float(result.get("fill_s") or math.nan)
    print(
        f"[{system.name}] filled {ready:,} ready + {delayed:,} delayed jobs in {seconds:.1f}s "
        f"({total / seconds:,.0f} jobs/s)",
        file=sys.stderr,
        flush=True,
    )
    return result


async def _wait_settled(system: System, limit_s: float) -> None:
    """After the task bodies ran: wait until the system has recorded every outcome
    (adapters with a ``settled()`` coroutine, e.g. nothing pending in the group)."""
    settled = getattr(system, "settled", None)
    if settled is None:
        return
    deadline = time.monotonic() + limit_s
    while not await settled():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{system.name}: outcomes not recorded after {limit_s:.0f}s")
        await asyncio.sleep(POLL_S)


async def workload_w4(system: System, url: str, params: Params) -> Metrics:
    """Scale: ``backlog + warmup + window`` noop jobs waiting (plus ``delayed`` jobs due in
    the far future); the worker drains ``warmup`` jobs untimed, then ``window`` jobs timed,
    so ``backlog`` jobs are still waiting when the window ends. Cost = window time / window."""
    backlog, delayed = int(params.extra.get("backlog", 10_000)), int(params.extra.get("delayed", 0))
    window, warmup = int(params.extra.get("window", 20_000)), int(params.extra.get("warmup", 2_000))
    if delayed and getattr(system, "enqueue_delayed_bulk", None) is None:
        return {"skipped": f"{system.name} has no delayed set"}
    target = warmup + window
    filled = await _fill(system, url, params, ready=backlog + target, delayed=delayed)
    redis_mb = used_memory(url) / 2**20
    gc.collect()
    REC.reset(target, marks=(warmup, target))
    cpu0 = redis_cpu_s(url)
    await system.start_worker(params.concurrency)
    try:
        await wait_for(lambda: REC.finished, params.timeout_s, f"{target} jobs")
    finally:
        await bounded(system.stop_worker(), 60)
    redis_cpu = redis_cpu_s(url) - cpu0
    (t0, c0), (t1, c1) = REC.marks[warmup], REC.marks[target]
    return {
        "us_job": (t1 - t0) / window * 1e6,
        "worker_cpu_us_job": (c1 - c0) / window * 1e6,
        "redis_cpu_us_job": redis_cpu / REC.count * 1e6,
        "backlog": backlog,
        "delayed": delayed,
        "window": window,
        "completed": REC.count,
        "redis_used_mb": redis_mb,
        **filled,
        "fill_jobs_s": (backlog + target + delayed) / float(filled["fill_s"] or math.nan),
    }


async def workload_w5(system: System, url: str, params: Params) -> Metrics:
    """Memory: Redis bytes per queued job (``small`` jobs queued) and per finished job
    (after draining them, results kept where the system keeps them); the worker's RSS once
    ``small`` jobs are done and once ``large`` are done (idle, queue empty, after gc)."""
    small, large = int(params.extra.get("small", 10_000)), int(params.extra.get("large", 200_000))
    base = used_memory(url)
    await _fill(system, url, params, ready=small)
    queued = used_memory(url)
    REC.reset(small)
    await system.start_worker(params.concurrency)
    try:
        await wait_for(lambda: REC.finished, params.timeout_s, f"{small} jobs")
        await _wait_settled(system, 60)
        finished = used_memory(url)
        rss_small = rss_mb()
        REC.extend(large)
        await _fill(system, url, params, ready=large - small)
        await wait_for(lambda: REC.finished, params.timeout_s, f"{large} jobs")
        await _wait_settled(system, 60)
        rss_large = rss_mb()
    finally:
        await bounded(system.stop_worker(), 60)
    keeps = bool(getattr(system, "stores_results", False))
    return {
        "rss_small_mb": rss_small,
        "rss_large_mb": rss_large,
        "rss_growth_mb": rss_large - rss_small,
        "redis_bytes_queued_job": (queued - base) / small,
        "redis_bytes_finished_job": (finished - base) / small if keeps else None,
        "small": small,
        "large": large,
        "completed": REC.count,
    }


WORKLOADS: dict[str, Callable[[System, str, Params], Coroutine[Any, Any, Metrics]]] = {
    "W1": workload_w1,
    "W2": workload_w2,
    "W3": workload_w3,
    "W4": workload_w4,
    "W5": workload_w5,
    "produce": produce,
    "fill": fill,
}


# --------------------------------------------------------------------------- entry point


def versions(packages: tuple[str, ...]) -> dict[str, str]:
    found: dict[str, str] = {}
    for pkg in packages:
        try:
            found[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            found[pkg] = "missing"
    return found


def _loop_factory(use_uvloop: bool) -> tuple[Callable[[], asyncio.AbstractEventLoop] | None, str]:
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            return None, "asyncio"
        return uvloop.new_event_loop, "uvloop"
    return None, "asyncio"


async def _run(system: System, workload: str, url: str, params: Params) -> Metrics:
    await system.open(url, params)
    try:
        return await WORKLOADS[workload](system, url, params)
    finally:
        await bounded(system.close(), 30)


def main(system: System, argv: list[str] | None = None) -> None:
    """Entry point used by every adapter's ``if __name__ == "__main__"`` block."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2 or args[0] not in WORKLOADS:
        sys.exit(f"usage: python -m {_module_name(system)} W1..W5 REDIS_URL [JSON]")
    workload, url = args[0], args[1]
    params = Params.from_json(args[2] if len(args) > 2 else "")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    factory, loop_name = _loop_factory(params.uvloop)
    with asyncio.Runner(loop_factory=factory) as runner:
        metrics = runner.run(_run(system, workload, url, params))
    out = {
        "system": system.name,
        "workload": workload,
        "metrics": metrics,
        "versions": versions(system.packages),
        "loop": loop_name,
        "settings": system.settings,
        "pid": os.getpid(),
    }
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
