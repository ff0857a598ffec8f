"""A FastAPI app that enqueues jobs and reports their status and result.

Run it on the embedded default Redis; by default the app runs a worker inside itself::

    uvicorn examples.fastapi_app:app

From a second shell, enqueue a job and poll its status until it has a result (this
demo client posts to http://127.0.0.1:8000, or to the port in UVICORN_PORT)::

    python -m examples.fastapi_app

or with curl::

    curl -X POST localhost:8000/jobs -H 'content-type: application/json' -d '{"x": 1, "y": 2}'
    curl localhost:8000/jobs/JOB_ID

To run the workers in processes of their own instead, turn the embedded one off::

    EMBED_WORKER=0 uvicorn examples.fastapi_app:app
    taskrunner worker examples.fastapi_app:tr
    python -m examples.fastapi_app
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from taskrunner import JobNotFound, JobStatus, TaskRunner
from taskrunner.fastapi import TaskRunnerDep
from taskrunner.logs import log_through_uvicorn

tr = TaskRunner()  # URL: TASKRUNNER_REDIS_URL, else the embedded redis-server


@tr.task(timeout=3600)
async def add(x: int, y: int, seconds: float = 0.0) -> int:
    """Add two numbers, taking ``seconds`` to do it."""
    await anyio.sleep(seconds)
    return x + y


class AddRequest(BaseModel):
    x: int
    y: int
    seconds: float = 0.0


class JobView(BaseModel):
    id: str
    status: JobStatus
    result: Any = None
    error: str | None = None


def make_lifespan(
    runner: TaskRunner, embed_worker: bool, grace_period: float
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """``async with tr`` for enqueueing; plus ``tr.worker(...)`` when embedding a worker."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        log_through_uvicorn()  # the worker's log lines go to uvicorn's handlers
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(runner)
            if embed_worker:  # the same as `async with tr, tr.worker(concurrency=10):`
                worker = runner.worker(concurrency=10, grace_period=grace_period)
                await stack.enter_async_context(worker)
            app.state.taskrunner = runner
            yield

    return lifespan


def create_app(embed_worker: bool = True, grace_period: float = 30.0) -> FastAPI:
    app = FastAPI(
        title="taskrunner example", lifespan=make_lifespan(tr, embed_worker, grace_period)
    )

    @app.post("/jobs", status_code=202)
    async def enqueue(body: AddRequest) -> JobView:
        job = await add.enqueue(body.x, body.y, seconds=body.seconds)
        return JobView(id=job.id, status=JobStatus.QUEUED)

    @app.get("/jobs/{job_id}")
    async def status(job_id: str, runner: TaskRunnerDep) -> JobView:
        job = runner.job(job_id)
        try:
            info = await job.info()
        except JobNotFound:
            raise HTTPException(404, f"no job {job_id}") from None
        view = JobView(id=job_id, status=info.status)
        if info.status == JobStatus.SUCCEEDED:
            view.result = await job.result()
        elif info.status.is_final and info.error is not None:
            view.error = f"{info.error.type}: {info.error.message}"
        return view

    return app


app = create_app(embed_worker=os.environ.get("EMBED_WORKER", "1") != "0")


def demo(base_url: str, timeout: float = 30.0) -> None:
    """Enqueue ``add(1, 2)`` through the API and poll until it is final."""
    request = urllib.request.Request(  # noqa: S310 - base_url is http://
        f"{base_url}/jobs",
        data=json.dumps({"x": 1, "y": 2}).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        job = json.load(response)
    print("enqueued:", job)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{base_url}/jobs/{job['id']}", timeout=10) as response:  # noqa: S310
            view = json.load(response)
        if view["status"] in ("succeeded", "failed", "aborted", "rejected", "dead"):
            print("finished:", view)
            sys.exit(0 if view["status"] == "succeeded" else 1)
        time.sleep(0.1)
    sys.exit(f"job {job['id']} did not finish within {timeout:g}s: is a worker running?")


if __name__ == "__main__":
    demo(f"http://127.0.0.1:{os.environ.get('UVICORN_PORT', '8000')}")
