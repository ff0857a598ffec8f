"""Redis's own work per job, in instructions counted by valgrind: a measure that does
not move when a shared machine's other tenants do.

    python -m benchmarks.server_work                    # 2,000 jobs, 3 rounds
    python -m benchmarks.server_work --jobs 5000 --rounds 1

CPU time of redis-server (``INFO cpu``) and ``commandstats`` wall time swing by ±30%
between identical runs on a shared 2-core virtual machine, which hides a change of a
few percent. Instructions executed do not: this starts a private redis-server under
``valgrind --tool=callgrind`` and reads its instruction count (every thread: event
loop, protocol, commands, Lua) around three phases, with ``callgrind_control``:

- ``enqueue_bulk``: ``enqueue_many`` of ``--jobs`` no-argument jobs;
- ``drain``: a burst worker (concurrency 100, the benchmark harness's settings: results
  kept, ``max_retries=3``, heartbeats, the default chain) runs them all;
- ``enqueue_one``: ``--jobs / 10`` awaited enqueues, one at a time;

and the same for the floor (raw redis-py: pipelined ``XADD``, ``XREADGROUP`` of 100,
one ``XACK`` per read); then the drain's steps apart (``split_round``: read, claim,
commit). Each phase is printed as instructions per job, the median over
``--rounds``; ``--keep DIR`` keeps each phase's profile for ``callgrind_annotate``
(the last round's). Under valgrind the server runs about 50 times slower, so a worker's
batches are fuller than on a normal server: compare these numbers with each other
(before and after a change, taskrunner and the floor), not with µs from the harness.
Needs ``valgrind`` (Debian package ``valgrind``) and ``/usr/bin/redis-server``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

from redis.asyncio import Redis

from taskrunner import TaskRunner, scripts
from taskrunner.keys import GROUP

QUEUE = "bench"
CONCURRENCY = 100
READY_S = 60.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def counted_server() -> Iterator[tuple[str, int, Path]]:
    """(url, pid, directory of callgrind's dumps) of a private redis-server under
    callgrind, stopped at the end."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("server_work: valgrind is not installed (apt-get install valgrind)")
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="tr-work-") as tmp:
        out = Path(tmp)
        command = [
            valgrind,
            "--tool=callgrind",
            "--compress-strings=no",
            f"--callgrind-out-file={out}/cg.%p",
            "/usr/bin/redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            tmp,
        ]
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_ready(port)
            yield f"redis://127.0.0.1:{port}/0", proc.pid, out
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def _wait_ready(port: int) -> None:
    deadline = time.monotonic() + READY_S
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1) as s:
            s.sendall(b"PING\r\n")
            if s.recv(16).startswith(b"+PONG"):
                return
        time.sleep(0.2)
    raise SystemExit(f"server_work: redis-server under valgrind not ready in {READY_S:g} s")


class Counter:
    """Instructions the server executed between ``zero()`` and ``read()``."""

    def __init__(self, pid: int, out: Path, keep: Path | None = None) -> None:
        self.pid = pid
        self.out = out
        self.keep = keep

    def _control(self, flag: str) -> None:
        subprocess.run(
            ["callgrind_control", flag, str(self.pid)],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
        )

    def zero(self) -> None:
        self._control("-z")

    def read(self, label: str) -> int:
        before = set(self.out.glob("cg.*"))
        self._control("-d")
        new = sorted(set(self.out.glob("cg.*")) - before)
        total = 0
        for index, path in enumerate(new):  # one file per thread that ran
            found = re.search(r"^totals: (\d+)", path.read_text(), re.MULTILINE)
            total += int(found.group(1)) if found else 0
            if self.keep is not None:
                shutil.copy(path, self.keep / f"{label}.{index}.callgrind")
        return total


async def taskrunner_round(url: str, counter: Counter, jobs: int) -> dict[str, float]:
    label = "taskrunner"
    tr = TaskRunner(url, queue=QUEUE, max_retries=3)

    @tr.task
    async def noop() -> None:
        return None

    out: dict[str, float] = {}
    async with tr:
        await noop.enqueue()  # scripts loaded, connections open
        worker = tr.worker(concurrency=CONCURRENCY, burst=True, handle_signals=False)
        await worker.run()
        counter.zero()
        await noop.enqueue_many([noop.call() for _ in range(jobs)])
        out["enqueue_bulk"] = counter.read(f"{label}.enqueue_bulk") / jobs
        worker = tr.worker(concurrency=CONCURRENCY, burst=True, handle_signals=False)
        counter.zero()
        await worker.run()
        out["drain"] = counter.read(f"{label}.drain") / jobs
        one = max(1, jobs // 10)
        counter.zero()
        for _ in range(one):
            await noop.enqueue()
        out["enqueue_one"] = counter.read(f"{label}.enqueue_one") / one
        await tr.client.redis.flushall()
    return out


async def floor_round(url: str, counter: Counter, jobs: int) -> dict[str, float]:
    label = "floor"
    redis = Redis.from_url(url)
    stream, group = "floor", "g"
    out: dict[str, float] = {}
    await redis.xgroup_create(stream, group, "0", mkstream=True)
    counter.zero()
    pipe = redis.pipeline(transaction=False)
    for _ in range(jobs):
        pipe.xadd(stream, {"job": "x"})
    await pipe.execute()
    out["enqueue_bulk"] = counter.read(f"{label}.enqueue_bulk") / jobs
    counter.zero()
    done = 0
    while done < jobs:
        reply = cast(Any, await redis.xreadgroup(group, "c", {stream: ">"}, count=CONCURRENCY))
        ids = [entry_id for _, rows in reply for entry_id, _ in rows]
        await redis.xack(stream, group, *ids)
        done += len(ids)
    out["drain"] = counter.read(f"{label}.drain") / jobs
    one = max(1, jobs // 10)
    counter.zero()
    for _ in range(one):
        await redis.xadd(stream, {"job": "x"})
    out["enqueue_one"] = counter.read(f"{label}.enqueue_one") / one
    await redis.flushall()
    await redis.aclose()
    return out


BATCH = 50
"""Calls per batch EVALSHA in the split phases: what a worker at concurrency 100 sends
(a read takes half its slots)."""
TOKEN = "t" * 32


async def split_round(url: str, counter: Counter, jobs: int) -> dict[str, float]:
    """The drain's three steps apart, each on every job before the next: ``read``
    (XREADGROUP of 50, as raw commands: the part of fetch.lua any stream consumer
    pays), ``claim`` and ``commit`` (claim.lua and commit.lua through the builders and
    ``run_many``, 50 calls per batch EVALSHA, every job succeeded)."""
    tr = TaskRunner(url, queue=QUEUE, max_retries=3)

    @tr.task
    async def noop() -> None:
        return None

    out: dict[str, float] = {}
    async with tr:
        redis = tr.client.redis
        keys = tr.client.keys(QUEUE)
        await redis.xgroup_create(keys.stream, GROUP, "0", mkstream=True)
        await noop.enqueue_many([noop.call() for _ in range(jobs)])
        env = scripts.Env()
        counter.zero()
        rows: list[tuple[str, str]] = []
        while len(rows) < jobs:
            reply = cast(Any, await redis.xreadgroup(GROUP, "c1", {keys.stream: ">"}, BATCH))
            rows += [(f["job"], entry) for _, entries in reply for entry, f in entries]
        out["read"] = counter.read("split.read") / jobs
        batches = [rows[i : i + BATCH] for i in range(0, jobs, BATCH)]
        counter.zero()
        for batch in batches:
            await scripts.run_many(
                redis,
                [
                    scripts.claim(env, keys, keys.stream, job, "c1", entry, TOKEN, 5, 1 << 20)
                    for job, entry in batch
                ],
            )
        out["claim"] = counter.read("split.claim") / jobs
        counter.zero()
        for batch in batches:
            await scripts.run_many(
                redis,
                [
                    scripts.commit(
                        env,
                        keys,
                        keys.stream,
                        job,
                        entry,
                        TOKEN,
                        "succeeded",
                        "null",
                        86_400_000,
                        0,
                        "default",
                        [],
                        0,
                    )
                    for job, entry in batch
                ],
            )
        out["commit"] = counter.read("split.commit") / jobs
        await redis.flushall()
    return out


def _table(title: str, results: dict[str, list[dict[str, float]]]) -> None:
    print(title)
    phases = list(next(iter(results.values()))[0])
    print(f"{'':<12}" + "".join(f"{phase:>14}" for phase in phases))
    for system, runs in results.items():
        cells = [statistics.median(r[phase] for r in runs) for phase in phases]
        print(f"{system:<12}" + "".join(f"{c:>14,.0f}" for c in cells))


def main(jobs: int, rounds: int, keep: Path | None) -> None:
    results: dict[str, list[dict[str, float]]] = {"taskrunner": [], "floor": []}
    split: dict[str, list[dict[str, float]]] = {"taskrunner": []}
    with counted_server() as (url, pid, out):
        counter = Counter(pid, out, keep)
        for _ in range(rounds):
            results["taskrunner"].append(asyncio.run(taskrunner_round(url, counter, jobs)))
            results["floor"].append(asyncio.run(floor_round(url, counter, jobs)))
            split["taskrunner"].append(asyncio.run(split_round(url, counter, jobs)))
    _table(f"redis-server instructions per job (median of {rounds}, {jobs:,} jobs)", results)
    _table(f"the drain's steps apart, {BATCH} calls per batch", split)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--keep",
        type=Path,
        default=None,
        help="copy each phase's callgrind profile here (callgrind_annotate reads them)",
    )
    options = parser.parse_args()
    main(options.jobs, options.rounds, options.keep)
