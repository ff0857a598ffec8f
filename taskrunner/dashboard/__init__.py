"""The web dashboard: see and steer queues, jobs, dead letters and workers.

Mount it into any FastAPI or Starlette app, or run it alone::

    from taskrunner.dashboard import dashboard

    app.mount("/taskrunner", dashboard(tr, auth=is_admin))   # FastAPI or Starlette

    taskrunner dashboard myapp:tr --port 8080                # standalone (loopback)

Pages: queues (live counts, pause/resume, a throughput chart over the last hour), jobs
(filtered by queue, task and status, search by id), a job's detail (arguments,
attempts, timings, error and traceback, progress, lock holder; retry, abort), dead
letters (retry, delete, purge), workers (running jobs, last heartbeat), and cron
schedules (next and last run; pause, resume, run now). Server-rendered Jinja2 with
htmx (vendored, no CDN, no build step) polling the live parts; the chart is an SVG
drawn on the server.

``auth`` is the host app's check, asked on every request (see ``guard``). Actions are
POST requests with CSRF protection. The runner must be open (``async with tr:`` in
the host app's lifespan, as for ``TaskRunnerDep``); if it is not, the dashboard opens
it at its first request and keeps it open. ``open_runner=True`` gives the dashboard
app its own lifespan that opens and closes it (the standalone command uses that).
While Redis is unreachable or unavailable, every page answers 503 in one line with
``Retry-After: 5``; a job id or queue name with a ``/`` (``invoice/42``) is one part of
the page's address (``%2F``).

Needs the ``dashboard`` extra: ``pip install 'taskrunner-streams[dashboard]'``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from taskrunner.connection import unavailable
from taskrunner.dashboard.guard import Auth, AuthResult, Guard
from taskrunner.dashboard.pages import ROUTES, Segments
from taskrunner.exceptions import TaskrunnerError
from taskrunner.job import safe_text
from taskrunner.runner import TaskRunner
from taskrunner.urls import redact

STATIC = Path(__file__).parent / "static"

__all__ = ["Auth", "AuthResult", "dashboard"]


def dashboard(
    runner: TaskRunner,
    *,
    auth: Auth | None = None,
    title: str = "taskrunner",
    poll_seconds: float = 2.0,
    open_runner: bool = False,
    middleware: list[Middleware] | None = None,
) -> Starlette:
    """The dashboard of ``runner`` as a Starlette app (an ASGI app: mount it anywhere).

    ``auth(request)`` -> True, False (403) or a Response (e.g. a 401 challenge), sync or
    async, may raise ``HTTPException``: asked before every request. ``middleware`` runs
    outside it (e.g. Starlette's ``SessionMiddleware``, so ``auth`` can read the
    session). ``poll_seconds``: how often the live parts refresh (0: never).
    """
    app = Starlette(
        routes=[*ROUTES, Mount("/static", StaticFiles(directory=STATIC), name="static")],
        middleware=[
            *(middleware or []),
            Middleware(Guard, auth=auth),
            Middleware(_Opener),
            Middleware(Segments),
        ],
        lifespan=_lifespan(runner) if open_runner else None,
        exception_handlers={
            ResponseError: _refused,
            RedisConnectionError: _refused,
            RedisTimeoutError: _refused,
            ConnectionError: _refused,  # the builtin ones (reset, refused) a socket raises
            TimeoutError: _refused,
        },
    )
    app.state.taskrunner = runner
    app.state.title = title
    app.state.poll_seconds = poll_seconds
    return app


async def _refused(request: Request, exc: Exception) -> Response:
    return _failure(exc)


def _failure(exc: BaseException) -> Response:
    """A page that Redis broke, in one line (never a bare 500, never a password): 503
    while Redis is unreachable or unavailable (down, loading, failing over: try again),
    502 when what it holds is bad (a key of the wrong type: WRONGTYPE)."""
    line = redact(" ".join(safe_text(str(exc), 500).split()))
    if unavailable(exc):
        return PlainTextResponse(f"Redis is unavailable: {line}", 503, {"Retry-After": "5"})
    return PlainTextResponse(f"Redis refused a read: {line}", 502)


def _lifespan(runner: TaskRunner) -> Callable[[Starlette], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with runner:
            yield

    return lifespan


class _Opener:
    """Opens the runner at the first request when nobody has (kept open after)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._lock = asyncio.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            runner: TaskRunner = scope["app"].state.taskrunner
            if not _is_open(runner):
                try:
                    await self._open(runner)
                except (RedisError, OSError) as exc:  # this request fails; the next retries
                    if not unavailable(exc):
                        raise
                    await _failure(exc)(scope, receive, send)
                    return
        await self.app(scope, receive, send)

    async def _open(self, runner: TaskRunner) -> None:
        async with self._lock:
            if not _is_open(runner):
                await runner.__aenter__()


def _is_open(runner: TaskRunner) -> bool:
    try:
        runner.client  # noqa: B018 - raises when not connected
    except TaskrunnerError:
        return False
    return True
