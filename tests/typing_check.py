"""Static typing contract, checked by ``mypy --strict`` in CI (never run by pytest).

``@tr.task`` keeps the function's types: ``enqueue(*P.args, **P.kwargs) -> Job[R]``
and ``await job.result() -> R``. Each ``# type: ignore[...]`` below marks a call
that must be a type error: with ``warn_unused_ignores`` (on under strict), mypy
fails on this file if enqueue ever stops being checked against the signature.
"""

from __future__ import annotations

from datetime import datetime
from typing import assert_type

from pydantic import BaseModel

from taskrunner import BoundTask, Call, Job, JobInfo, JobStatus, Task, TaskRunner

tr = TaskRunner("redis://127.0.0.1:6379/0")


class Receipt(BaseModel):
    to: str


@tr.task
async def add(x: int, y: int) -> int:
    return x + y


@tr.task(queue="emails", timeout=30, max_retries=5)
async def send(to: str, when: datetime, *, cc: list[str] | None = None) -> Receipt:
    return Receipt(to=to)


async def check() -> None:
    as_task: Task[[int, int], int] = add
    bound: BoundTask[[int, int], int] = add.options(delay=1.0)
    del as_task, bound

    job = await add.enqueue(1, 2)
    assert_type(job, Job[int])
    assert_type(await job.result(), int)
    assert_type(await job.result(timeout=5), int)
    assert_type(await job.status(), JobStatus)
    assert_type(await job.info(), JobInfo)
    assert_type(await add(1, 2), int)

    receipt_job = await send.options(delay=10, job_id="r1", queue="q").enqueue("a", datetime.now())
    assert_type(receipt_job, Job[Receipt])
    assert_type(await receipt_job.result(), Receipt)
    assert_type(await send.enqueue("a", datetime.now(), cc=["b"]), Job[Receipt])

    call = add.call(1, 2)
    assert_type(call, Call[int])
    assert_type(await add.enqueue_many([call, add.call(3, 4)]), list[Job[int]])

    # Each of these must be refused by mypy (the ignore would be unused otherwise).
    await add.enqueue(1, "2")  # type: ignore[arg-type]
    await add.enqueue(1)  # type: ignore[call-arg]
    await add.enqueue(1, 2, 3)  # type: ignore[call-arg]
    await add.enqueue(x=1, z=2)  # type: ignore[call-arg]
    await add.options(delay=5).enqueue("1", 2)  # type: ignore[arg-type]
    await send.enqueue("a", "not a datetime")  # type: ignore[arg-type]
    await send.enqueue("a", datetime.now(), cc="b")  # type: ignore[arg-type]
    add.call("1", 2)  # type: ignore[arg-type]
    await add.enqueue_many([send.call("a", datetime.now())])  # type: ignore[list-item]
    wrong: str = await job.result()  # type: ignore[assignment]
    del wrong
