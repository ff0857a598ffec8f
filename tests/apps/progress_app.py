"""Tasks that report progress, for tests that run real worker processes.

    taskrunner worker apps.progress_app:tr

Its Redis comes from TASKRUNNER_REDIS_URL, its key namespace from TEST_NAMESPACE
(conftest's ``subprocess_env``). ``stepped`` sets each of its values in turn, and with
``gated`` waits for ``{ns}:test:go:<k>`` before setting value ``k`` (k >= 1), so a test
can follow every value. ``stalls`` lets a test stop its worker (SIGSTOP) and find out
what the stale copy's ``set_progress`` does once it runs again. Notes go to the list
``{ns}:test:notes``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import anyio

from taskrunner import PayloadTooLarge, Task, TaskRunner, current_job

NAMESPACE = os.environ.get("TEST_NAMESPACE", "taskrunner")
LIMIT = 64 * 1024


def notes_key(namespace: str) -> str:
    return f"{namespace}:test:notes"


def go_key(namespace: str, step: int | str) -> str:
    return f"{namespace}:test:go:{step}"


def runner(url: str | None = None, namespace: str = NAMESPACE) -> TaskRunner:
    return TaskRunner(
        url, namespace=namespace, retry_delay=0.01, heartbeat_interval=0.2, stale_after=1.0
    )


@dataclass(frozen=True)
class Tasks:
    stepped: Task[[list[Any], bool, bool], int]
    bounds: Task[[], list[str]]
    stalls: Task[[], str]
    endless: Task[[], None]


async def gate(tr: TaskRunner, step: int | str) -> None:
    while not await tr.client.redis.exists(go_key(tr.namespace, step)):  # noqa: ASYNC110
        await anyio.sleep(0.02)  # opened by the test process


async def note(tr: TaskRunner, text: str) -> None:
    await tr.client.redis.rpush(notes_key(tr.namespace), text)


async def attempt_bounds() -> list[str]:
    """Set values that cannot be stored between ones that can; say what happened."""
    job = current_job()
    happened = []
    deep: list[Any] = []
    for _ in range(5000):  # 10 KB of JSON, nested deeper than the encoder recurses
        deep = [deep]
    for value in [
        {"ok": 1},
        object(),
        float("nan"),
        deep,
        "x" * (LIMIT - 2),  # exactly LIMIT bytes as JSON, quotes included
        "x" * (LIMIT - 1),
    ]:
        try:
            happened.append(f"stored {await job.set_progress(value)}")
        except (TypeError, PayloadTooLarge) as exc:
            happened.append(type(exc).__name__)
    return happened


def declare(tr: TaskRunner) -> Tasks:
    """Declare the app's tasks on ``tr`` (tests declare them on their own runner too)."""

    @tr.task(name="stepped", max_retries=0)
    async def stepped(values: list[Any], gated: bool = False, fail: bool = False) -> int:
        for k, value in enumerate(values):
            if gated and k > 0:
                await gate(tr, k)
            assert await current_job().set_progress(value)
        if fail:
            raise ValueError("failed after its progress")
        return len(values)

    @tr.task(name="bounds", max_retries=0)
    async def bounds() -> list[str]:
        return await attempt_bounds()

    @tr.task(name="stalls", max_retries=0)
    async def stalls() -> str:
        job = current_job()
        if not job.reclaimed:
            await job.set_progress("first copy")
            await note(tr, "first copy running")
            with anyio.CancelScope(shield=True):  # the lost lease cancels it after this
                await gate(tr, "stale")
                stored = await job.set_progress("stale write")
                await note(tr, f"stale copy stored: {stored}")
            await anyio.sleep(3600)
        await job.set_progress("second copy")
        await gate(tr, "second")
        return "second copy"

    @tr.task(name="endless", max_retries=0)
    async def endless() -> None:
        await current_job().set_progress(0.1)
        await anyio.sleep(3600)  # until aborted

    return Tasks(stepped, bounds, stalls, endless)


tr = runner()
tasks = declare(tr)
