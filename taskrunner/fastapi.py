"""FastAPI integration: the TaskRunner in every route, without a global.

Open the runner (and, if you like, a worker) in the app's lifespan and put it on
``app.state``; routes then ask for it with ``TaskRunnerDep``::

    from contextlib import asynccontextmanager
    from fastapi import FastAPI
    from taskrunner.fastapi import TaskRunnerDep

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async with tr, tr.worker(concurrency=10):  # drop tr.worker(...) to only enqueue
            app.state.taskrunner = tr
            yield

    app = FastAPI(lifespan=lifespan)

    @app.get("/jobs/{job_id}")
    async def status(job_id: str, runner: TaskRunnerDep) -> dict[str, str]:
        return {"status": await runner.job(job_id).status()}

``async with tr.worker(...)`` starts the worker in the background of the lifespan and
returns once it is ready, so it consumes before the first request is served. It
installs no signal handlers: the server (uvicorn) owns SIGINT/SIGTERM and runs the
lifespan's exit, where the worker stops reading and lets running jobs finish within
its ``grace_period`` before handing the rest back to the queue.

``lifespan(tr, worker=True, concurrency=10)`` below is the same lifespan, ready-made
(its worker options are typed as ``WorkerOptions``; one it does not take, or any
without ``worker=True``, raises ``TypeError`` when ``lifespan(...)`` is called); it
also routes taskrunner's log records to uvicorn's handlers (under ``uvicorn app:app``
the root logger has none). In a lifespan of your own, call
``taskrunner.logs.log_through_uvicorn()`` first for the same.
The lifespan may also yield ``{"taskrunner": tr}`` (lifespan state) instead of setting
``app.state``; the dependency looks in both.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from datetime import timedelta
from typing import Annotated, Any, TypedDict, Unpack

from fastapi import Depends, FastAPI, Request

from taskrunner.logs import log_through_uvicorn
from taskrunner.runner import TaskRunner

STATE_KEY = "taskrunner"


def get_taskrunner(request: Request) -> TaskRunner:
    """The app's TaskRunner, from lifespan state or ``app.state.taskrunner``."""
    runner = getattr(request.state, STATE_KEY, None)
    if runner is None:
        runner = getattr(request.app.state, STATE_KEY, None)
    if not isinstance(runner, TaskRunner):
        raise RuntimeError(  # noqa: TRY004 - a setup mistake, not a bad argument
            "no TaskRunner for this app: set app.state.taskrunner = tr (or yield "
            '{"taskrunner": tr}) in the lifespan, inside `async with tr:`'
        )
    return runner


TaskRunnerDep = Annotated[TaskRunner, Depends(get_taskrunner)]
"""A route parameter annotated with this receives the app's TaskRunner."""


class WorkerOptions(TypedDict, total=False):
    """The keywords of ``TaskRunner.worker``, typed: a misspelt or mistyped worker
    option of ``lifespan(...)`` is a mypy and pyright error, not only a TypeError."""

    queues: Sequence[str] | None
    concurrency: int
    burst: bool
    grace_period: float | timedelta
    handle_signals: bool | None
    max_deliveries: int


def lifespan(
    runner: TaskRunner, *, worker: bool = False, **worker_options: Unpack[WorkerOptions]
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """A lifespan that opens ``runner`` for the app's lifetime and sets
    ``app.state.taskrunner``; with ``worker=True`` it also runs
    ``runner.worker(**worker_options)`` in the background of the app.

    Worker options without ``worker=True``, or that ``runner.worker`` does not take,
    raise ``TypeError`` here (not at the app's startup; never dropped)."""
    _check_worker_options(runner, worker, dict(worker_options))

    @asynccontextmanager
    async def run(app: FastAPI) -> AsyncIterator[None]:
        log_through_uvicorn()  # under uvicorn, the worker's lines go to uvicorn's log
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(runner)
            if worker:
                await stack.enter_async_context(runner.worker(**worker_options))
            app.state.taskrunner = runner
            try:
                yield
            finally:
                del app.state.taskrunner

    return run


def _check_worker_options(runner: TaskRunner, worker: bool, options: dict[str, Any]) -> None:
    if options and not worker:
        raise TypeError(
            f"lifespan(): worker options ({', '.join(options)}) need worker=True; "
            "without it the app runs no worker"
        )
    inspect.signature(runner.worker).bind(**options)  # TypeError naming an unknown one
