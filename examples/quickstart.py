"""Quickstart: declare tasks, run a worker, enqueue from a second shell.

Run a worker on the embedded default Redis (started for this directory)::

    taskrunner worker examples.quickstart:tr

Then, in a second shell from the same directory, enqueue jobs and print their results::

    python -m examples.quickstart
"""

from __future__ import annotations

import anyio
from pydantic import BaseModel

from taskrunner import TaskRunner, current_job

tr = TaskRunner()  # URL: argument > TASKRUNNER_REDIS_URL > embedded redis-server


class Greeting(BaseModel):
    text: str
    attempt: int


@tr.task
async def add(x: int, y: int) -> int:
    return x + y


@tr.task(timeout=10, max_retries=2)
async def greet(name: str) -> Greeting:
    return Greeting(text=f"hello {name}", attempt=current_job().attempt)


async def main() -> None:
    async with tr:
        total = await add.enqueue(1, 2)
        greeting = await greet.options(delay=0.5).enqueue("world")
        print("add(1, 2) =", await total.result(timeout=10))
        print("greet('world') =", await greeting.result(timeout=10))


if __name__ == "__main__":
    anyio.run(main)
