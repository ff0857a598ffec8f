"""Rate and concurrency limits that hold across every worker.

Run two workers and the producer (the embedded redis-server is used unless
``TASKRUNNER_REDIS_URL`` is set)::

    taskrunner worker examples.limits:tr --concurrency 20
    taskrunner worker examples.limits:tr --concurrency 20
    python -m examples.limits

- ``render`` (``concurrency_limit=2``): 8 jobs, 0.3 s each, over 40 consumers in two
  processes; never more than 2 run at once, so they take about 1.2 s.
- ``call_partner`` (``rate_limit="3/s"``, ``limit_args=["partner"]``): at most 3 starts
  per second *per partner*; two partners get their own windows.
- ``report``: an unlimited task of the same queue runs at once, while limited jobs wait
  in the delayed set (not in a worker).
"""

from __future__ import annotations

import time

import anyio

from taskrunner import TaskRunner

tr = TaskRunner(namespace="examples-limits")


@tr.task(concurrency_limit=2)
async def render(video: int) -> tuple[float, float]:
    started = time.time()
    await anyio.sleep(0.3)
    return started, time.time()


@tr.task(rate_limit="3/s", limit_args=["partner"])
async def call_partner(partner: str, n: int) -> float:
    return time.time()


@tr.task
async def report() -> float:
    return time.time()


def most_at_once(spans: list[tuple[float, float]]) -> int:
    points = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    running = peak = 0
    for _, step in points:
        running += step
        peak = max(peak, running)
    return peak


async def main() -> None:
    async with tr:
        begin = time.time()
        renders = await tr.enqueue_many([render.call(v) for v in range(8)])
        calls = await tr.enqueue_many(
            [call_partner.call(p, n) for p in ("acme", "globex") for n in range(6)]
        )
        quick = await report.enqueue()
        print(f"report ran after {await quick.result(timeout=60) - begin:.2f}s (not held up)")

        spans = [await job.result(timeout=60) for job in renders]
        print(f"render: {len(spans)} jobs, at most {most_at_once(spans)} at once")
        infos = [await job.info() for job in renders]
        print(
            "render: attempts per job",
            {info.attempts for info in infos},
            "- waits in the delayed set:",
            sum(info.reschedules for info in infos),
        )
        for partner, batch in (("acme", calls[:6]), ("globex", calls[6:])):
            starts = [round(await job.result(timeout=60) - begin, 1) for job in batch]
            print(f"call_partner {partner}: started at {sorted(starts)} s")


if __name__ == "__main__":
    anyio.run(main)
