"""Progress: a task reports how far it got; a caller follows it live.

Run a worker, then follow a job from the command line (progress on stderr, the result
on stdout) and from Python (the embedded redis-server is used unless
``TASKRUNNER_REDIS_URL`` is set)::

    taskrunner worker examples.progress:tr
    taskrunner enqueue examples.progress:tr import_rows '{"rows": 30}' --wait
    python -m examples.progress

``import_rows`` stores ``{"done": k, "total": n}`` after each batch with
``current_job().set_progress(...)``; ``job.progress()`` yields each new value and ends
when the job is final; ``(await job.info()).progress`` is the last one.
"""

from __future__ import annotations

import anyio

from taskrunner import TaskRunner, current_job

tr = TaskRunner(namespace="examples-progress")

BATCH = 10


@tr.task
async def import_rows(rows: int) -> str:
    job = current_job()
    for done in range(0, rows + 1, BATCH):
        await job.set_progress({"done": min(done, rows), "total": rows})
        await anyio.sleep(0.05)  # the work of one batch
    return f"imported {rows} rows"


async def main() -> None:
    async with tr:
        job = await import_rows.enqueue(50)
        async for progress in job.progress():  # ends when the job is final
            done, total = progress["done"], progress["total"]
            bar = "#" * (20 * done // total)
            print(f"[{bar:<20}] {done}/{total}")
        print(await job.result(timeout=30))
        print("last progress:", (await job.info()).progress)


if __name__ == "__main__":
    anyio.run(main)
