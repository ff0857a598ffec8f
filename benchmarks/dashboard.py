"""How long each dashboard page takes to render with 1,000,000 finished jobs in Redis.

    python -m benchmarks.dashboard                 # 1M finished jobs, 30 requests a page
    python -m benchmarks.dashboard --jobs 100000 --requests 10 --partitions 4

It starts its own redis-server (benchmarks.run's), fills it with finished jobs quickly
(a Lua loop, 10,000 jobs per call: job hashes as the worker leaves them, each in its
id's home partition, and the finished-job indexes, which the throughput chart also
counts: 96% succeeded, 3% failed with a traceback, 1% dead letters, finished over the
last hour), runs a real worker that holds a few running jobs, then times every page
through the ASGI app (httpx, in process: the server-side time from request to last
byte, Redis round trips included) and prints the median, p95 and max per page. The
fill builds its key names in Lua: fine for this private server, never done by
taskrunner itself (its scripts get every key in KEYS).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import anyio
import httpx
from redis.asyncio import Redis

from benchmarks.run import redis_server
from taskrunner import TaskRunner
from taskrunner.dashboard import dashboard
from taskrunner.keys import QueueKeys, home_partition

NAMESPACE = "bench"
BATCH = 10_000
FILL = """
local prefix, now, error = ARGV[1], tonumber(ARGV[2]), ARGV[3]
for k = 4, #ARGV do
  local i = tonumber(ARGV[k])
  local id = string.format('job%08d', i)
  local finished = now - (i % 3600000)
  local status, index, detail, value = 'succeeded', prefix .. ':succeeded', 'result', tostring(i)
  if i % 100 < 3 then
    status, index, detail, value = 'failed', prefix .. ':failed', 'error', error
  elseif i % 100 == 3 then
    status, index, detail, value = 'dead', prefix .. ':dead', 'error', error
  end
  redis.call('HSET', prefix .. ':job:' .. id, 'status', status, 'task',
    (i % 7 == 0) and 'report' or 'add', 'queue', 'default', 'level', 'default', 'args',
    '{"x":' .. i .. ',"y":1}', 'enqueued', finished - 50, 'started', finished - 20,
    'finished', finished, 'attempts', 1, 'worker', 'bench:1:abc', 'locks', '', detail, value)
  redis.call('ZADD', index, finished, id)
end
return #ARGV - 3
"""


async def fill(redis: Redis, jobs: int, partitions: int) -> float:
    """Job hashes as the worker leaves them, in each job id's home partition, and the
    finished-job indexes (the chart counts them: no other structure to fill)."""
    error = json.dumps(
        {"type": "ValueError", "message": "boom", "traceback": "Traceback ...\n" * 20}
    )
    started = time.perf_counter()
    now = int(time.time() * 1000)
    sha = await redis.script_load(FILL)
    for start in range(0, jobs, BATCH):
        by_part: dict[int, list[int]] = {}
        for i in range(start, min(jobs, start + BATCH)):
            by_part.setdefault(home_partition(f"job{i:08d}", partitions), []).append(i)
        for part, ids in by_part.items():
            prefix = QueueKeys(NAMESPACE, "default", part).prefix
            await redis.evalsha(sha, 0, prefix, now, error, *ids)
    return time.perf_counter() - started


def build(partitions: int) -> TaskRunner:
    tr = TaskRunner(
        namespace=NAMESPACE, heartbeat_interval=0.2, stale_after=30, partitions=partitions
    )

    @tr.task(name="add")
    async def add(x: int, y: int) -> int:
        return x + y

    @tr.task(name="hold")
    async def hold(seconds: float) -> float:
        await anyio.sleep(seconds)
        return seconds

    return tr


async def timed(client: httpx.AsyncClient, url: str, requests: int) -> list[float]:
    times = []
    for _ in range(requests):
        started = time.perf_counter()
        response = await client.get(url, follow_redirects=True)
        times.append((time.perf_counter() - started) * 1000)
        if response.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {response.status_code}")
    return times


async def main(
    url: str, jobs: int, requests: int, partitions: int, out: Callable[[str], None]
) -> dict[str, Any]:
    redis = Redis.from_url(url, decode_responses=True)
    seconds = await fill(redis, jobs, partitions)
    memory = (await redis.info("memory"))["used_memory_human"]
    out(
        f"filled {jobs:,} finished jobs over {partitions} partition(s) in {seconds:.1f}s "
        f"(redis used_memory {memory})"
    )
    await redis.aclose()
    tr = build(partitions)
    tr.url = url
    app = dashboard(tr, poll_seconds=0)
    results: dict[str, Any] = {
        "jobs": jobs,
        "partitions": partitions,
        "fill_seconds": round(seconds, 1),
        "pages": {},
    }
    async with tr, tr.worker(handle_signals=False, grace_period=0.1):
        held = await _enqueue_holds(tr)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://bench"
        ) as client:
            pages = {
                "queues": "/",
                "jobs (all statuses)": "/jobs",
                "jobs succeeded": "/jobs?status=succeeded",
                "jobs failed": "/jobs?status=failed",
                "jobs failed, task=report": "/jobs?status=failed&task=report",
                "jobs succeeded, priority=high": "/jobs?status=succeeded&priority=high",
                "jobs succeeded, page 2 (cursor)": await _second_page(client),
                "job detail (failed)": "/jobs/default/job00000000",
                "job search by id (redirect + detail)": "/jobs?id=job00500000",
                "dead letters": "/dead",
                "workers": "/workers",
                "cron": "/cron",
            }
            for name, page in pages.items():
                await timed(client, page, 2)  # warm up
                times = await timed(client, page, requests)
                row = {
                    "median_ms": round(statistics.median(times), 1),
                    "p95_ms": round(sorted(times)[int(len(times) * 0.95) - 1], 1),
                    "max_ms": round(max(times), 1),
                }
                results["pages"][name] = row
                out(
                    f"{name:34} median {row['median_ms']:6.1f} ms   p95 {row['p95_ms']:6.1f} ms"
                    f"   max {row['max_ms']:6.1f} ms"
                )
        for job_id in held:
            await tr.job(job_id).abort()
    return results


async def _enqueue_holds(tr: TaskRunner) -> list[str]:
    from taskrunner.task import Task

    handle: Task[..., Any] = Task(tr, tr.registry["hold"])
    return [(await handle.enqueue(seconds=600)).id for _ in range(3)]


async def _second_page(client: httpx.AsyncClient) -> str:
    import re

    html = (await client.get("/jobs?status=succeeded")).text
    found = re.search(r'href="([^"]*cursor=[^"]+)"', html)
    if found is None:
        raise RuntimeError("no second page")
    return found.group(1).replace("&amp;", "&")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--partitions", type=int, default=1)
    parser.add_argument("--json", default=None, help="Also write the results here.")
    options = parser.parse_args()
    with redis_server() as (url, _):
        found = anyio.run(main, url, options.jobs, options.requests, options.partitions, print)
    if options.json:
        with open(options.json, "w") as handle:
            json.dump(found, handle, indent=2)
