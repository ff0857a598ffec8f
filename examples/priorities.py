"""Priority levels: an urgent job overtakes a backlog of routine ones.

Run one worker with a single slot, and the producer (the embedded redis-server is used
unless ``TASKRUNNER_REDIS_URL`` is set)::

    taskrunner worker examples.priorities:tr --concurrency 1
    python -m examples.priorities

- ``resize`` is declared ``priority="low"``: the producer queues 30 of them (50 ms
  each).
- ``notify`` has the default level; one call is sent ``.options(priority="high")``.
- The worker takes the high job as soon as its one slot frees, before the 29 or so
  ``resize`` jobs still waiting, and the default-level one before any low one.
- A level the runner does not declare fails at enqueue and writes nothing.
"""

from __future__ import annotations

import anyio

from taskrunner import ConfigurationError, TaskRunner

tr = TaskRunner(namespace="examples-priorities")  # priorities=("high", "default", "low")


@tr.task(priority="low")
async def resize(image: int) -> None:
    await anyio.sleep(0.05)
    await tr.client.redis.rpush("examples-priorities:ran", f"resize {image}")


@tr.task
async def notify(message: str) -> None:
    await tr.client.redis.rpush("examples-priorities:ran", f"notify {message}")


async def main() -> None:
    async with tr:
        redis = tr.client.redis
        await redis.delete("examples-priorities:ran")
        backlog = await tr.enqueue_many([resize.call(i) for i in range(30)])
        normal = await notify.enqueue("weekly digest")
        urgent = await notify.options(priority="high").enqueue("disk full")
        try:
            await notify.options(priority="urgent").enqueue("typo")
        except ConfigurationError as exc:
            print("refused:", exc)

        await urgent.result(timeout=60)
        await normal.result(timeout=60)
        for job in backlog:
            await job.result(timeout=60)
        ran = [str(item) for item in await redis.lrange("examples-priorities:ran", 0, -1)]
        print("ran first:", ", ".join(ran[:5]), "...")
        for message in ("disk full", "weekly digest"):
            resized = [r for r in ran[: ran.index(f"notify {message}")] if r.startswith("resize")]
            print(f"notify {message!r} ran after {len(resized)} of the 30 resize jobs")


if __name__ == "__main__":
    anyio.run(main)
