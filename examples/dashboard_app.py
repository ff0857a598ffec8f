"""The dashboard mounted in a FastAPI app, behind the app's own auth, with a worker inside.

Run it on the embedded default Redis (the dashboard is at /taskrunner/, user ``admin``,
password from ``DASHBOARD_PASSWORD``, default ``change-me``); ``EMBED_WORKER=0`` serves
the dashboard without the worker inside (here, so the jobs run in the burst worker
below, where their logs are easy to read)::

    EMBED_WORKER=0 uvicorn examples.dashboard_app:app

From a second shell, make some jobs (a few succeed, some at high priority, one reports
its progress, one fails until "fixed"), run them, then look at them from the command
line::

    python -m examples.dashboard_app
    taskrunner worker examples.dashboard_app:tr --burst
    taskrunner jobs examples.dashboard_app:tr --status failed
    taskrunner jobs examples.dashboard_app:tr --status succeeded --priority high
    taskrunner queue pause examples.dashboard_app:tr default
    taskrunner queue resume examples.dashboard_app:tr default

Open http://127.0.0.1:8000/taskrunner/ to see the same from the browser: press Retry
on the failed job after creating the file its error names. The same dashboard runs
alone (no auth, loopback only) with ``taskrunner dashboard examples.dashboard_app:tr``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.security import HTTPBasic

from taskrunner import Job, TaskRunner, current_job
from taskrunner.dashboard import dashboard

tr = TaskRunner(max_retries=0)  # URL: TASKRUNNER_REDIS_URL, else the embedded redis-server
FLAG = Path(tempfile.gettempdir()) / "taskrunner-example-fixed"


@tr.task
async def add(x: int, y: int) -> int:
    return x + y


@tr.task
async def export(rows: int) -> int:
    """Reports its progress as it goes: the dashboard shows it on the job's page."""
    for done in range(0, rows + 1, max(1, rows // 4)):
        await current_job().set_progress({"rows": done, "of": rows})
        await anyio.sleep(0.05)
    return rows


@tr.task
async def fragile(order_id: int) -> str:
    """Fails until the file FLAG exists: create it, then retry the job."""
    if not await anyio.Path(FLAG).exists():
        raise RuntimeError(f"order {order_id}: create {FLAG} and retry me")
    return f"order {order_id} done"


security = HTTPBasic(realm="taskrunner")  # FastAPI's own helper: a 401 challenge
PASSWORD = os.environ.get("DASHBOARD_PASSWORD", "change-me")


async def admin_only(request: Request) -> bool:
    """The dashboard's auth hook: asked before every request it serves."""
    credentials = await security(request)
    if credentials is None:
        return False
    user_ok = secrets.compare_digest(credentials.username, "admin")
    return user_ok and secrets.compare_digest(credentials.password, PASSWORD)


EMBED_WORKER = os.environ.get("EMBED_WORKER", "1") != "0"


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(tr)
        if EMBED_WORKER:
            await stack.enter_async_context(tr.worker(concurrency=10))
        app.state.taskrunner = tr
        yield


app = FastAPI(lifespan=lifespan)
app.mount("/taskrunner", dashboard(tr, auth=admin_only))


async def demo() -> None:
    """Enqueue a few jobs (a worker runs them: the app's, or a burst worker)."""
    async with tr:
        jobs: list[Job[Any]] = [await add.enqueue(i, i) for i in range(5)]
        jobs += [await add.options(priority="high").enqueue(i, 10) for i in range(2)]
        jobs.append(await export.enqueue(1000))
        jobs.append(await fragile.enqueue(42))
        for job in jobs:
            print(job.id, await job.status())


if __name__ == "__main__":
    anyio.run(demo)
