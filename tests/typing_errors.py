"""Calls that must be type errors, each marked with the error mypy and pyright must give.

Checked by ``tests/test_typing.py`` (never imported, never run; excluded from the
project's mypy run). The line after a ``# E: mypy[CODE,...] pyright[RULE,...]`` comment
must get exactly those errors from ``mypy --strict`` and ``pyright --strict``; every
other line none.
Add a case: write the call, run ``pytest tests/test_typing.py``, and mark the line.
"""

from __future__ import annotations

from datetime import datetime
from typing import TypedDict

from pydantic import BaseModel

from taskrunner import Job, TaskRunner
from taskrunner.fastapi import lifespan

tr = TaskRunner("redis://127.0.0.1:6379/0")


class AuditTaskOptions(TypedDict, total=False):
    audited: bool


class Receipt(BaseModel):
    to: str


@tr.task
async def add(x: int, y: int) -> int:
    return x + y


@tr.task(queue="emails")
async def send(to: str, when: datetime, *, cc: list[str] | None = None) -> Receipt:
    return Receipt(to=to)


# Task options: a misspelt option, a value of the wrong type, an unknown lock kind.
# E: mypy[call-overload,untyped-decorator] pyright[reportCallIssue,reportUntypedFunctionDecorator]
@tr.task(timout=3)
async def misspelt() -> None: ...


# E: mypy[call-overload,untyped-decorator] pyright[reportArgumentType]
@tr.task(max_retries="3")
async def coerced() -> None: ...


# E: mypy[call-overload,untyped-decorator] pyright[reportArgumentType]
@tr.task(lock="forever")
async def bad_lock() -> None: ...


# E: mypy[call-overload,untyped-decorator] pyright[reportArgumentType]
@tr.task(on_conflict="ignore")
async def bad_strategy() -> None: ...


# E: mypy[call-overload,untyped-decorator] pyright[reportArgumentType]
@tr.task(retry_delay="1s")
async def bad_delay() -> None: ...


# E: mypy[call-overload,untyped-decorator] pyright[reportArgumentType]
@tr.task(concurrency_limit="2")
async def bad_concurrency() -> None: ...


# E: mypy[call-overload,untyped-decorator] pyright[reportArgumentType]
@tr.task(limit_args="account_id")
async def bad_limit_args(account_id: int) -> None: ...


# E: mypy[typeddict-unknown-key] pyright[reportCallIssue]
@tr.task(options=AuditTaskOptions(audit=True))
async def bad_user_option() -> None: ...


# E: mypy[arg-type] pyright[reportArgumentType]
@tr.task
def not_async(x: int) -> int:
    return x


async def enqueue_checks() -> None:
    job = await add.enqueue(1, 2)
    # E: mypy[arg-type] pyright[reportArgumentType]
    await add.enqueue(1, "2")
    # E: mypy[call-arg] pyright[reportCallIssue]
    await add.enqueue(1)
    # E: mypy[call-arg] pyright[reportCallIssue]
    await add.enqueue(1, 2, 3)
    # E: mypy[call-arg] pyright[reportCallIssue]
    await add.enqueue(x=1, z=2)
    # E: mypy[arg-type] pyright[reportArgumentType]
    await add.options(delay=5).enqueue("1", 2)
    # E: mypy[call-arg] pyright[reportCallIssue,reportUnknownMemberType]
    await add.options(dealy=5).enqueue(1, 2)
    # E: mypy[arg-type] pyright[reportArgumentType]
    await send.enqueue("a", "not a datetime")
    # E: mypy[arg-type] pyright[reportArgumentType]
    await send.enqueue("a", datetime.now(), cc="b")
    # E: mypy[arg-type] pyright[reportArgumentType]
    add.call("1", 2)
    # E: mypy[list-item] pyright[reportArgumentType]
    await add.enqueue_many([send.call("a", datetime.now())])
    # E: mypy[assignment] pyright[reportAssignmentType]
    wrong: str = await job.result()
    a, s = await tr.enqueue_many((add.call(1, 2), send.call("a", datetime.now())))
    # E: mypy[assignment] pyright[reportAssignmentType]
    mistyped: Job[str] = a
    del wrong, s, mistyped


# Cron: a scheduled function or task takes no arguments; fixed ones go through .call().
# E: mypy[arg-type] pyright[reportArgumentType]
@tr.cron("* * * * *")
async def needs_argument(x: int) -> None: ...


# E: mypy[arg-type] pyright[reportArgumentType]
@tr.cron("* * * * *")
@tr.task
async def task_needs_argument(x: int) -> None: ...


# E: mypy[arg-type] pyright[reportArgumentType]
tr.cron("0 * * * *", add.call(1, "2"))
# E: mypy[call-overload] pyright[reportCallIssue]
tr.cron("0 * * * *", add.call(1, 2), max_drif=5)


# Chains: the next task's first parameter must take the previous result; the rest are
# checked like enqueue's arguments.
@tr.task
async def shout(text: str) -> str:
    return text.upper()


@tr.task
async def scale(x: int, factor: int) -> int:
    return x * factor


@tr.task
async def nothing() -> int:
    return 1


# E: mypy[arg-type] pyright[reportArgumentType]
add.chain(1, 2).then(shout)
# E: mypy[arg-type] pyright[reportArgumentType]
add.chain(1, 2).then(scale, "2")
# E: mypy[call-arg] pyright[reportCallIssue]
add.chain(1, 2).then(scale)
# E: mypy[arg-type] pyright[reportArgumentType]
add.chain(1, 2).then(nothing)
# E: mypy[arg-type] pyright[reportArgumentType]
add.chain("1", 2)
# E: mypy[arg-type] pyright[reportArgumentType]
add.chain(1, 2).then(scale, 2).then(shout)


async def wrong_group_result() -> None:
    group = await tr.group([add.call(1, 2)])
    # E: mypy[assignment] pyright[reportAssignmentType]
    texts: list[str] = await group.results()
    print(texts)


# The ready-made FastAPI lifespan's worker options are tr.worker's keywords, typed.
# E: mypy[call-arg] pyright[reportCallIssue]
lifespan(tr, worker=True, concurency=10)
# E: mypy[arg-type] pyright[reportArgumentType]
lifespan(tr, worker=True, concurrency="10")
