"""Delayed jobs: run a job after a delay or at a given time, with a worker in-process.

Run it on the embedded default Redis (the script runs its own worker)::

    python -m examples.delayed_jobs

``task.options(delay=...)`` takes seconds or a ``timedelta``; ``options(at=...)`` takes
an aware ``datetime``. Until it is due a job is ``scheduled`` (in the delayed set, not
the stream), so no worker holds it; a job is never run before its due time, and jobs
due at the same time run in the order they were enqueued. ``async with tr,
tr.worker():`` runs a worker in the background of this script, as in a FastAPI
lifespan, and drains it on exit.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import anyio

from taskrunner import TaskRunner

tr = TaskRunner()

START = time.time()


@tr.task
async def remind(text: str) -> float:
    """Return how many seconds after the script started it ran."""
    return round(time.time() - START, 1)


async def main() -> None:
    async with tr, tr.worker(concurrency=5):
        soon = await remind.options(delay=1.0).enqueue("in one second")
        later = await remind.options(at=datetime.now(UTC) + timedelta(seconds=2)).enqueue(
            "at a time two seconds from now"
        )
        now = await remind.enqueue("right away")
        info = await later.info()
        print(f"'later' is {info.status} (due at {info.due_at:%H:%M:%S.%f})")
        for name, job in (("now", now), ("soon", soon), ("later", later)):
            ran_at = await job.result(timeout=30)
            print(f"{name}: ran {ran_at}s after start")
        assert await soon.result() >= 1.0
        assert await later.result() >= 2.0


if __name__ == "__main__":
    anyio.run(main)
