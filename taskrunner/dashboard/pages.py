"""The dashboard's pages and actions: each a small handler over the admin API.

Pages (GET) render Jinja2 templates; actions (POST, CSRF-checked) act, then redirect
back with a one-line notice (303, so a reload never repeats the action). A page asked
for by htmx with ``?fragment=1`` renders only its live part (the queue counts, the
workers), which the full page polls every few seconds.
"""

from __future__ import annotations

import re
import time
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlencode

from jinja2 import pass_eval_context
from jinja2.nodes import EvalContext
from markupsafe import Markup
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Receive, Scope, Send

from taskrunner.admin import CursorError
from taskrunner.admin.listing import MAX_LIMIT, STATUS_ORDER
from taskrunner.dashboard import chart
from taskrunner.dashboard.guard import check_csrf
from taskrunner.exceptions import ConfigurationError, JobNotFound, TaskrunnerError
from taskrunner.job import JobStatus, safe_text
from taskrunner.runner import TaskRunner
from taskrunner.urls import redact

templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))


def _when(value: datetime | None) -> Markup:
    """A time as a ``<time>`` element (a Python global: cheaper than a macro per row)."""
    if value is None:
        return Markup("&ndash;")
    iso = value.isoformat()
    return Markup('<time datetime="{0}" title="{0}">{1}</time>').format(
        iso, value.strftime("%Y-%m-%d %H:%M:%S")
    )


templates.env.globals["when"] = _when
_tojson = templates.env.filters["tojson"]


@pass_eval_context
def _tojson_redacted(context: EvalContext, value: object, indent: int | None = None) -> Markup:
    """Jinja's ``tojson``, with the password of every URL in it hidden (a job's
    arguments, result and progress are shown as they were stored)."""
    return Markup(redact(str(_tojson(context, value, indent))))  # noqa: S704 - escaped JSON


templates.env.filters["tojson"] = _tojson_redacted
RETRIABLE = {JobStatus.FAILED, JobStatus.ABORTED, JobStatus.REJECTED, JobStatus.DEAD}
ABORTABLE = {JobStatus.SCHEDULED, JobStatus.QUEUED, JobStatus.RUNNING}
PAGE_SIZE = 50
UNREADABLE = 422
"""The answer for a job whose record cannot be read (the data is bad, not the server)."""


def runner_of(request: Request) -> TaskRunner:
    found: TaskRunner = request.app.state.taskrunner
    return found


def path(request: Request, name: str, query: dict[str, Any] | None = None, **params: str) -> str:
    """The path of route ``name`` (under the mount point), with a query string. (Built
    from the route's template: Starlette's ``url_for`` costs ~0.2 ms a call, and a page
    of 50 jobs has over a hundred links.)"""
    template = PATHS[name]
    if params:
        quoted = {k: quote(str(v), safe="/" if k == "path" else "") for k, v in params.items()}
        template = re.sub(r"{(\w+)(?::\w+)?}", lambda m: quoted[m.group(1)], template)
    url = str(request.scope.get("root_path", "")) + template
    wanted = {k: v for k, v in (query or {}).items() if v not in (None, "")}
    return f"{url}?{urlencode(wanted)}" if wanted else url


_KEPT = re.compile(r"(%2[fF]|%25)")


class Segments:
    """ASGI middleware: routes on the path as it was sent, so that a queue name or a job
    id with a ``/`` in it (``eu/emails``, ``invoice/42``: ``path`` sends it as ``%2F``)
    stays one path segment instead of a 404; ``param`` decodes it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope = {**scope, "path": route_path(scope)}
        await self.app(scope, receive, send)


def route_path(scope: Scope) -> str:
    """The request's path with every escape decoded but ``%2F`` and ``%25`` (so that
    ``param`` reads each segment back exactly), from ``raw_path`` when the server gives
    it and it agrees with ``path``."""
    path = str(scope["path"])
    raw = scope.get("raw_path")
    if isinstance(raw, bytes) and raw.isascii():
        parts = _KEPT.split(raw.decode("ascii"))
        kept = "".join(part if index % 2 else unquote(part) for index, part in enumerate(parts))
        if unquote(kept) == path:
            return kept
    return path.replace("%", "%25")


def param(request: Request, name: str) -> str:
    """A path parameter as given to ``path`` (a ``/`` or ``%`` in it included)."""
    return unquote(str(request.path_params[name]))


def render(request: Request, template: str, **context: Any) -> Response:
    runner = runner_of(request)
    context.update(
        request=request,
        title=request.app.state.title,
        poll=request.app.state.poll_seconds,
        notice=request.query_params.get("notice", ""),
        csrf=getattr(request.state, "csrf", ""),
        namespace=runner.namespace,
        path=lambda name, query=None, **params: path(request, name, query, **params),
    )
    return templates.TemplateResponse(request, template, context)


async def queues_page(request: Request) -> Response:
    admin = runner_of(request).admin
    counts = await admin.counts()
    template = "_counts.html" if request.query_params.get("fragment") else "queues.html"
    minutes = await admin.throughput() if template == "queues.html" else []
    return render(
        request,
        template,
        counts=counts,
        chart=Markup(chart.svg(minutes)),  # noqa: S704 - chart.svg escapes its text
        minutes=minutes,
    )


def _limit(request: Request) -> int:
    try:
        return max(1, min(MAX_LIMIT, int(request.query_params.get("limit", PAGE_SIZE))))
    except ValueError:
        return PAGE_SIZE


async def jobs_page(request: Request) -> Response:
    runner = runner_of(request)
    q = request.query_params
    job_id = q.get("id", "").strip()
    if job_id:
        found = await runner.admin.find(job_id)
        if found is not None:
            return RedirectResponse(path(request, "job", queue=found, job_id=job_id), 303)
    status = q.get("status") or None
    if status is not None and status not in {s.value for s in STATUS_ORDER}:
        raise HTTPException(400, f"unknown status {status!r}")
    filters = {
        "queue": q.get("queue") or None,
        "status": status,
        "task": q.get("task") or None,
        "priority": q.get("priority") or None,
    }
    try:
        page = await runner.admin.jobs(**filters, limit=_limit(request), cursor=q.get("cursor"))
    except (CursorError, ConfigurationError, ValueError) as exc:
        raise HTTPException(400, str(exc)) from exc
    return render(
        request,
        "jobs.html",
        page=page,
        filters=filters,
        searched=job_id,
        queues=runner.queues(),
        tasks=sorted(runner.registry),
        priorities=list(runner.priorities),
        statuses=[s.value for s in STATUS_ORDER],
        limit=_limit(request),
    )


async def job_page(request: Request) -> Response:
    runner = runner_of(request)
    queue, job_id = param(request, "queue"), param(request, "job_id")
    try:
        detail = await runner.admin.job(job_id, queue)
    except JobNotFound:
        raise HTTPException(404, f"no job {job_id!r} in queue {queue!r}") from None
    except ConfigurationError as exc:
        raise HTTPException(400, str(exc)) from exc
    except TaskrunnerError as exc:  # its record cannot be read (hostile data)
        raise HTTPException(UNREADABLE, safe_text(str(exc), 500)) from exc
    return render(
        request,
        "job.html",
        job=detail,
        retriable=detail.status in RETRIABLE,
        abortable=detail.status in ABORTABLE and not detail.abort_requested,
    )


async def dead_page(request: Request) -> Response:
    runner = runner_of(request)
    q = request.query_params
    queue = q.get("queue") or None
    try:
        page = await runner.admin.dead_letters(queue, limit=_limit(request), cursor=q.get("cursor"))
    except (CursorError, ConfigurationError, ValueError) as exc:
        raise HTTPException(400, str(exc)) from exc
    counts = {c.queue: c.dead for c in await runner.admin.counts()}
    return render(request, "dead.html", page=page, queue=queue, counts=counts)


async def workers_page(request: Request) -> Response:
    found = await runner_of(request).admin.workers()
    template = "_workers.html" if request.query_params.get("fragment") else "workers.html"
    return render(request, template, workers=found, now=time.time())


async def cron_page(request: Request) -> Response:
    return render(request, "cron.html", schedules=await runner_of(request).crontab.list())


# -- actions (POST) ---------------------------------------------------------------------------


async def _form(request: Request) -> dict[str, str]:
    form = await request.form()
    values = {k: v for k, v in form.items() if isinstance(v, str)}
    check_csrf(request, values.get("csrf"))
    return values


def _back(request: Request, fallback: str, notice: str) -> RedirectResponse:
    """Redirect to the page the form was on (same site only), with ``notice``."""
    target = fallback
    referer = request.headers.get("referer", "")
    base = str(request.base_url)
    if referer.startswith(base):
        target = "/" + referer[len(base) :].lstrip("/")
        target = target.split("?notice=")[0].split("&notice=")[0]
    separator = "&" if "?" in target else "?"
    return RedirectResponse(f"{target}{separator}{urlencode({'notice': notice})}", 303)


async def retry_job(request: Request) -> Response:
    await _form(request)
    queue, job_id = param(request, "queue"), param(request, "job_id")
    try:
        done = await runner_of(request).admin.retry(job_id, queue)
    except JobNotFound:
        raise HTTPException(404, f"no job {job_id!r}") from None
    except TaskrunnerError as exc:  # its record cannot be read (hostile data)
        raise HTTPException(UNREADABLE, safe_text(str(exc), 500)) from exc
    notice = "queued again" if done else "not retried: only failed, aborted, rejected or dead jobs"
    return RedirectResponse(
        path(request, "job", {"notice": notice}, queue=queue, job_id=job_id), 303
    )


async def abort_job(request: Request) -> Response:
    await _form(request)
    queue, job_id = param(request, "queue"), param(request, "job_id")
    try:
        status = await runner_of(request).admin.abort(job_id, queue)
    except JobNotFound:
        raise HTTPException(404, f"no job {job_id!r}") from None
    except TaskrunnerError as exc:  # its record cannot be read (hostile data)
        raise HTTPException(UNREADABLE, safe_text(str(exc), 500)) from exc
    notice = "aborting: its worker is cancelling it" if status == "running" else f"now {status}"
    return RedirectResponse(
        path(request, "job", {"notice": notice}, queue=queue, job_id=job_id), 303
    )


async def pause_queue(request: Request) -> Response:
    await _form(request)
    queue = param(request, "queue")
    await _queue_action(runner_of(request).admin.pause, queue)
    return _back(request, path(request, "queues"), f"queue {queue} paused")


async def resume_queue(request: Request) -> Response:
    await _form(request)
    queue = param(request, "queue")
    await _queue_action(runner_of(request).admin.resume, queue)
    return _back(request, path(request, "queues"), f"queue {queue} resumed")


async def _queue_action(action: Any, queue: str) -> None:
    try:
        await action(queue)
    except ConfigurationError as exc:
        raise HTTPException(400, str(exc)) from exc


async def dead_action(request: Request) -> Response:
    queue, action = param(request, "queue"), param(request, "action")
    if action not in ("retry", "delete", "purge"):
        raise HTTPException(404, f"no dead-letter action {action!r}")
    form = await _form(request)
    admin = runner_of(request).admin
    ids = [form["job_id"]] if form.get("job_id") else []
    try:
        if action == "retry":
            notice = f"{await admin.retry_dead(ids, queue)} dead letter(s) queued again"
        elif action == "delete":
            notice = f"{await admin.delete_dead(ids, queue)} dead letter(s) deleted"
        else:  # purge
            notice = f"{await admin.purge_dead(queue)} dead letter(s) of {queue} purged"
    except TaskrunnerError as exc:
        raise HTTPException(400, str(exc)) from exc
    return _back(request, path(request, "dead", {"queue": queue}), notice)


async def cron_action(request: Request) -> Response:
    """Pause, resume or trigger a cron schedule (``tr.crontab``)."""
    name, action = param(request, "schedule"), param(request, "action")
    if action not in ("pause", "resume", "trigger"):
        raise HTTPException(404, f"no cron action {action!r}")
    await _form(request)
    crontab = runner_of(request).crontab
    if name not in crontab:
        raise HTTPException(404, f"no cron schedule {name!r}")
    if action == "trigger":
        notice = f"cron {name}: job {(await crontab.trigger(name)).id} enqueued"
    else:
        await (crontab.pause if action == "pause" else crontab.resume)(name)
        notice = f"cron {name} {action}d"
    return _back(request, path(request, "cron"), notice)


ROUTES = [
    Route("/", queues_page, name="queues"),
    Route("/jobs", jobs_page, name="jobs"),
    Route("/jobs/{queue}/{job_id}", job_page, name="job"),
    Route("/jobs/{queue}/{job_id}/retry", retry_job, methods=["POST"], name="retry_job"),
    Route("/jobs/{queue}/{job_id}/abort", abort_job, methods=["POST"], name="abort_job"),
    Route("/queues/{queue}/pause", pause_queue, methods=["POST"], name="pause_queue"),
    Route("/queues/{queue}/resume", resume_queue, methods=["POST"], name="resume_queue"),
    Route("/dead", dead_page, name="dead"),
    Route(
        "/dead/{queue}/{action:str}",
        dead_action,
        methods=["POST"],
        name="dead_action",
    ),
    Route("/workers", workers_page, name="workers"),
    Route("/cron", cron_page, name="cron"),
    Route("/cron/{schedule}/{action:str}", cron_action, methods=["POST"], name="cron_action"),
]

PATHS = {route.name: route.path for route in ROUTES}
PATHS["static"] = "/static{path}"
