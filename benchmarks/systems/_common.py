"""Shared harness for the per-system benchmark adapters.

Every adapter module is run in its own subprocess::

    python -m benchmarks.systems.<name> <workload> <redis_url> <json-params>

and prints exactly one JSON line (``{"system": ..., "workload": ..., "metrics": {...}}``) on
stdout. This module is stdlib-only (plus optional uvloop) because it is also imported by the
peers' separate virtualenv, which does not have ``taskrunner`` installed.

Timing is taken *inside the worker process, by the task bodies themselves*: the first task to
start records ``time.perf_counter()``, every task records its completion time, and the drain
rate is ``n / (last_completion - first_start)``. Worker boot and shutdown are therefore excluded.
"""

from __future__ import annotations

import asyncio
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

    def reset(self, target: int) -> None:
        with self._lock:
            self.target = target
            self.count = 0
            self.first_start: float | None = None
            self.last_done = 0.0
            self.latencies: list[float] = []

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

    def latency(self, enqueued_at: float) -> None:
        started = time.time()
        with self._lock:
            self.latencies.append(started - enqueued_at)

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


async def _drain(system: System, n: int, params: Params) -> Metrics:
    REC.reset(n)
    started = time.perf_counter()
    await system.start_worker(params.concurrency)
    try:
        await wait_for(lambda: REC.finished, params.timeout_s, f"{n} jobs to complete")
    finally:
        await bounded(system.stop_worker(), 30)
    return {
        "drain_jobs_s": REC.drain_rate(),
        "drain_wall_s": time.perf_counter() - started,
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
    del url
    n = params.n
    metrics: Metrics = {"enqueue_bulk_jobs_s": None}
    if system.has_bulk:
        t0 = time.perf_counter()
        await system.enqueue_bulk("noop", n)
        metrics["enqueue_bulk_jobs_s"] = n / (time.perf_counter() - t0)
    else:
        metrics["enqueue_single_jobs_s"] = await _time_single(system, n)
    metrics.update(await _drain(system, n, params))
    if system.has_bulk:
        metrics["enqueue_single_jobs_s"] = await _time_single(system, n)
    return metrics


async def workload_w2(system: System, url: str, params: Params) -> Metrics:
    """I/O-bound: n tasks each awaiting asyncio.sleep(0.01); drain jobs/s."""
    del url
    await _enqueue_fast(system, "sleep", params.n)
    return await _drain(system, params.n, params)


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
    module = _module_name(system)
    cmd = [sys.executable, "-m", module, "produce", url, params.to_json()]
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.DEVNULL)
    try:
        code = await asyncio.wait_for(proc.wait(), params.timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    if code != 0:
        raise RuntimeError(f"producer exited with {code}")


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


WORKLOADS: dict[str, Callable[[System, str, Params], Coroutine[Any, Any, Metrics]]] = {
    "W1": workload_w1,
    "W2": workload_w2,
    "W3": workload_w3,
    "produce": produce,
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
        sys.exit(f"usage: python -m {_module_name(system)} W1|W2|W3 REDIS_URL [JSON]")
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
