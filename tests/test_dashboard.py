"""The dashboard over HTTP (httpx against the ASGI app, mounted in FastAPI and in
Starlette) on a real redis-server with a real in-process worker: auth, CSRF, every
page, every action, and the standalone ``taskrunner dashboard`` command as a process.
(The browser test is tests/test_browser.py.)"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx
from conftest import subprocess_env, wait_until
from fastapi import FastAPI, Request
from fastapi.security import HTTPBasic
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.routing import Mount
from tcpproxy import MakeProxy

from taskrunner import JobStatus, TaskRunner
from taskrunner.dashboard import dashboard
from taskrunner.keys import QueueKeys
from taskrunner.task import Task

MakeRunner = Callable[..., TaskRunner]
DEADLINE = 20.0
AUTH = ("admin", "secret")
TASKRUNNER = str(Path(sys.executable).with_name("taskrunner"))


def build(make_runner: MakeRunner) -> TaskRunner:
    tr = make_runner(heartbeat_interval=0.1, stale_after=30, max_retries=0)

    @tr.task(name="add")
    async def add(x: int, y: int) -> int:
        return x + y

    @tr.task(name="fixable")
    async def fixable(flag: str) -> str:
        if not await anyio.Path(flag).exists():
            raise RuntimeError(f"not fixed yet: {flag}")
        return "fixed"

    @tr.task(name="hold", timeout=3600, lock="until_executed")
    async def hold(seconds: float) -> float:
        await anyio.sleep(seconds)
        return seconds

    return tr


async def enqueue(tr: TaskRunner, task: str, **kwargs: Any) -> str:
    handle: Task[..., Any] = Task(tr, tr.registry[task])
    return (await handle.enqueue(**kwargs)).id


async def final(tr: TaskRunner, job_id: str) -> JobStatus:
    async def done() -> bool:
        return (await tr.job(job_id).status()).is_final

    await wait_until(done, DEADLINE)
    return await tr.job(job_id).status()


security = HTTPBasic()


async def fastapi_auth(request: Request) -> bool:
    """The recipe of docs/operations.md: reuse FastAPI's HTTPBasic (it raises a 401
    with its challenge when the header is missing)."""
    credentials = await security(request)
    assert credentials is not None
    return (credentials.username, credentials.password) == AUTH


@asynccontextmanager
async def client_for(
    tr: TaskRunner, worker: bool = True, **options: Any
) -> AsyncIterator[httpx.AsyncClient]:
    app = FastAPI()
    app.mount("/ops", dashboard(tr, auth=fastapi_auth, poll_seconds=0, **options))
    transport = httpx.ASGITransport(app=app)
    async with tr:
        if worker:
            async with (
                tr.worker(handle_signals=False, grace_period=0.1),
                httpx.AsyncClient(
                    transport=transport, base_url="http://testserver", auth=AUTH
                ) as client,
            ):
                yield client
        else:
            async with httpx.AsyncClient(
                transport=transport, base_url="http://testserver", auth=AUTH
            ) as client:
                yield client


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found is not None, "no CSRF field on the page"
    return found.group(1)


# -- auth -----------------------------------------------------------------------------------


async def test_every_path_asks_the_hosts_auth_when_mounted_in_fastapi(
    make_runner: MakeRunner,
) -> None:
    tr = build(make_runner)
    async with client_for(tr, worker=False) as client:
        for url in ("/ops/", "/ops/jobs", "/ops/static/htmx.min.js", "/ops/workers"):
            anonymous = await client.get(url, auth=None)
            assert anonymous.status_code == 401, url
            assert anonymous.headers["www-authenticate"].startswith("Basic")
            wrong = await client.get(url, auth=("admin", "nope"))
            assert wrong.status_code == 403, url
            assert (await client.get(url)).status_code == 200, url


async def test_auth_may_be_async_and_return_a_response_or_false(
    make_runner: MakeRunner,
) -> None:
    from starlette.responses import RedirectResponse

    tr = build(make_runner)

    async def to_login(request: Request) -> bool | RedirectResponse:
        if request.cookies.get("session") == "ok":
            return True
        if request.cookies.get("session") == "banned":
            return False
        return RedirectResponse("/login", 302)

    app = Starlette(routes=[Mount("/ops", dashboard(tr, auth=to_login))])
    async with (
        tr,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://testserver"
        ) as client,
    ):
        assert (await client.get("/ops/")).headers["location"] == "/login"
        client.cookies.set("session", "banned")
        assert (await client.get("/ops/")).status_code == 403
        client.cookies.set("session", "ok")
        assert (await client.get("/ops/")).status_code == 200


async def test_a_dashboard_mounted_without_a_lifespan_opens_the_runner_itself(
    make_runner: MakeRunner,
) -> None:
    tr = build(make_runner)
    app = Starlette(routes=[Mount("/ops", dashboard(tr))])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://testserver"
    ) as client:
        response = await client.get("/ops/")
    assert response.status_code == 200
    assert 'data-queue="default"' in response.text
    await tr.__aexit__(None, None, None)  # the one the dashboard opened


# -- CSRF -----------------------------------------------------------------------------------


async def test_actions_need_the_csrf_token_of_the_cookie_and_a_same_origin(
    make_runner: MakeRunner,
) -> None:
    tr = build(make_runner)
    async with client_for(tr, worker=False) as client:
        page = await client.get("/ops/")
        token = csrf_of(page.text)
        assert client.cookies.get("taskrunner_csrf") == token
        cookie = page.headers["set-cookie"]
        assert "HttpOnly" in cookie
        assert "SameSite=Strict" in cookie
        assert "Path=/ops" in cookie
        url = "/ops/queues/default/pause"
        assert (await client.post(url)).status_code == 403
        assert (await client.post(url, data={"csrf": "x" * 43})).status_code == 403
        evil = await client.post(url, data={"csrf": token}, headers={"origin": "https://evil.test"})
        assert evil.status_code == 403
        assert await tr.admin.paused() == set()
        ok = await client.post(url, data={"csrf": token}, headers={"origin": "http://testserver"})
        assert ok.status_code == 303
        assert await tr.admin.paused() == {"default"}
        header = await client.post("/ops/queues/default/resume", headers={"x-csrf-token": token})
        assert header.status_code == 303
        assert await tr.admin.paused() == set()
        other = httpx.AsyncClient(transport=client._transport, base_url="http://testserver")
        async with other:  # a browser without the cookie (another site's form)
            stolen = await other.post(url, data={"csrf": token}, auth=AUTH)
        assert stolen.status_code == 403


# -- pages ----------------------------------------------------------------------------------


async def test_pages_show_counts_jobs_detail_workers_and_no_cron_schedule(
    make_runner: MakeRunner, tmp_path: Path, redis: Redis
) -> None:
    tr = build(make_runner)
    async with client_for(tr) as client:
        ok = [await enqueue(tr, "add", x=i, y=1) for i in range(3)]
        bad = await enqueue(tr, "fixable", flag=str(tmp_path / "flag"))
        for job_id in [*ok, bad]:
            await final(tr, job_id)
        await redis.hset(QueueKeys(tr.namespace, "default").job(bad), "progress", '{"step": 2}')
        queues = (await client.get("/ops/")).text
        failed = (await client.get("/ops/jobs", params={"status": "failed"})).text
        detail = (await client.get(f"/ops/jobs/default/{bad}")).text
        found = await client.get("/ops/jobs", params={"id": bad})
        missing = (await client.get("/ops/jobs", params={"id": "nope"})).text
        fragment = (await client.get("/ops/", params={"fragment": 1})).text

        async def heartbeat() -> bool:
            return "data-worker=" in (await client.get("/ops/workers")).text

        await wait_until(heartbeat, DEADLINE)
        cron = (await client.get("/ops/cron")).text
        bad_cursor = await client.get("/ops/jobs", params={"cursor": "???"})
        bad_status = await client.get("/ops/jobs", params={"status": "nope"})
        no_job = await client.get("/ops/jobs/default/nope")
    assert re.search(r'data-status="succeeded"><a [^>]*>3<', queues)
    assert re.search(r'data-status="failed"><a [^>]*>1<', queues)
    assert "<svg" in queues
    assert "4 finished" in queues
    assert f'data-job="{bad}"' in failed
    assert all(f'data-job="{i}"' not in failed for i in ok)
    assert "RuntimeError" in detail
    assert "Traceback" in detail
    assert '"step": 2' in detail
    assert '"flag": ' in detail
    assert ">Retry</button>" in detail
    assert found.status_code == 303
    assert found.headers["location"] == f"/ops/jobs/default/{bad}"
    assert "No job with id" in missing
    assert fragment.strip().startswith('<div id="counts"')
    assert "<html" not in fragment
    assert "declares no cron schedule" in cron
    assert bad_cursor.status_code == 400
    assert bad_status.status_code == 400
    assert no_job.status_code == 404


async def test_the_cron_page_lists_pauses_resumes_and_triggers_schedules(
    make_runner: MakeRunner, redis: Redis
) -> None:
    tr = build(make_runner)

    @tr.cron("0 3 * * *", tz="Europe/Paris", name="nightly")
    async def nightly() -> str:
        return "ran"

    state = QueueKeys(tr.namespace, "default").cron("nightly")
    async with client_for(tr) as client:
        page = (await client.get("/ops/cron")).text
        assert 'data-cron="nightly"' in page
        assert "<code>0 3 * * *</code> Europe/Paris" in page
        assert ">Pause</button>" in page
        token = csrf_of(page)
        paused = await client.post("/ops/cron/nightly/pause", data={"csrf": token})
        assert paused.status_code == 303
        assert await redis.hget(state, "paused") == "1"
        page = (await client.get("/ops/cron")).text
        assert ">Resume</button>" in page
        assert "paused</span>" in page
        resumed = await client.post("/ops/cron/nightly/resume", data={"csrf": token})
        assert resumed.status_code == 303
        assert await redis.hget(state, "paused") is None
        run = await client.post("/ops/cron/nightly/trigger", data={"csrf": token})
        assert run.status_code == 303
        job_id = re.search(r"job (cron:nightly:manual:[0-9a-f]+) enqueued", _unquote(run))
        assert job_id is not None
        assert await final(tr, job_id.group(1)) == JobStatus.SUCCEEDED
        unknown = await client.post("/ops/cron/nope/pause", data={"csrf": token})
        assert unknown.status_code == 404
        bad = await client.post("/ops/cron/nightly/explode", data={"csrf": token})
        assert bad.status_code == 404
        forged = await client.post("/ops/cron/nightly/pause", data={"csrf": "x" * 43})
        assert forged.status_code == 403
        assert await redis.hget(state, "paused") is None


def _unquote(response: httpx.Response) -> str:
    from urllib.parse import unquote_plus

    return unquote_plus(response.headers["location"])


async def test_job_page_shows_the_lock_holder_and_aborts(make_runner: MakeRunner) -> None:
    tr = build(make_runner)
    async with client_for(tr) as client:
        job_id = await enqueue(tr, "hold", seconds=60)

        async def started() -> bool:
            return await tr.job(job_id).status() == JobStatus.RUNNING

        await wait_until(started, DEADLINE)
        page = (await client.get(f"/ops/jobs/default/{job_id}")).text
        assert "this job" in page
        response = await client.post(
            f"/ops/jobs/default/{job_id}/abort", data={"csrf": csrf_of(page)}
        )
        assert response.status_code == 303
        assert await final(tr, job_id) == JobStatus.ABORTED
        after = (await client.get(response.headers["location"])).text
    assert "aborting" in after
    assert ">Retry</button>" in after
    assert ">Abort</button>" not in after


async def test_retry_from_the_job_page_runs_the_job_again(
    make_runner: MakeRunner, tmp_path: Path
) -> None:
    tr = build(make_runner)
    flag = tmp_path / "flag"
    async with client_for(tr) as client:
        job_id = await enqueue(tr, "fixable", flag=str(flag))
        assert await final(tr, job_id) == JobStatus.FAILED
        page = (await client.get(f"/ops/jobs/default/{job_id}")).text
        flag.touch()
        response = await client.post(
            f"/ops/jobs/default/{job_id}/retry", data={"csrf": csrf_of(page)}
        )
        assert response.status_code == 303
        assert await tr.job(job_id).result(timeout=DEADLINE) == "fixed"
        again = await client.post(f"/ops/jobs/default/{job_id}/retry", data={"csrf": csrf_of(page)})
        notice = (await client.get(again.headers["location"])).text
    assert "not retried" in notice


async def test_dead_letters_page_retries_deletes_and_purges(
    make_runner: MakeRunner, redis: Redis
) -> None:
    tr = build(make_runner)
    keys = QueueKeys(tr.namespace, "default")
    async with client_for(tr, worker=False) as client:
        ids = [await enqueue(tr, "add", x=i, y=i) for i in range(4)]
        for index, job_id in enumerate(ids):  # as the worker leaves a dead letter
            entry = await redis.hget(keys.job(job_id), "entry")
            await redis.xdel(keys.stream, str(entry))
            await redis.hset(keys.job(job_id), "status", "dead")
            await redis.zadd(keys.dead, {job_id: 1000 + index})
        page = (await client.get("/ops/dead", params={"queue": "default"})).text
        token = csrf_of(page)
        assert all(f'data-job="{i}"' in page for i in ids)
        assert "Purge default" in page
        retried = await client.post(
            "/ops/dead/default/retry",
            data={"csrf": token, "job_id": ids[0]},
            headers={"referer": "http://testserver/ops/dead?queue=default"},
        )
        assert retried.headers["location"].startswith("/ops/dead?queue=default&notice=1+dead")
        assert await tr.job(ids[0]).status() == JobStatus.QUEUED
        deleted = await client.post(
            "/ops/dead/default/delete", data={"csrf": token, "job_id": ids[1]}
        )
        assert deleted.status_code == 303
        assert not await redis.exists(keys.job(ids[1]))
        purged = await client.post("/ops/dead/default/purge", data={"csrf": token})
        assert "2+dead+letter" in purged.headers["location"]
        assert await redis.zcard(keys.dead) == 0
        unknown = await client.post("/ops/dead/default/explode", data={"csrf": token})
    assert unknown.status_code == 404


# -- the standalone command -----------------------------------------------------------------


def test_taskrunner_dashboard_serves_the_app_on_loopback_and_stops_on_sigterm(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    log = (tmp_path / "dashboard.log").open("w")
    proc = subprocess.Popen(  # port 0: the OS picks a free one, the startup line names it
        [TASKRUNNER, "dashboard", "apps.cli_app:tr", "--port", "0"],
        env=subprocess_env(redis_url, namespace),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        url = served_url(proc, tmp_path / "dashboard.log")
        assert url.startswith("http://127.0.0.1:"), url
        assert not url.endswith(":0"), url
        response = httpx.get(f"{url}/", timeout=DEADLINE)
        assert response.status_code == 200
        assert 'data-queue="default"' in response.text
        assert 'data-queue="other"' in response.text
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=DEADLINE)
        log.close()
    # uvicorn shuts down gracefully, then re-raises the signal it caught
    assert code in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in (tmp_path / "dashboard.log").read_text()


def dashboard_command(url: str, namespace: str, port: int) -> subprocess.CompletedProcess[str]:
    """``taskrunner dashboard`` of the CLI test app, expected to exit on its own."""
    return subprocess.run(
        [TASKRUNNER, "dashboard", "apps.cli_app:tr", "--port", str(port)],
        env=subprocess_env(url, namespace),
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )


def test_dashboard_command_refuses_a_bad_port_in_one_line(redis_url: str, namespace: str) -> None:
    done = dashboard_command(redis_url, namespace, 99999)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith("taskrunner: error:")


def test_dashboard_command_start_up_failures_are_one_line(
    redis_url: str, namespace: str, unreachable_port: int
) -> None:
    """A port already in use and an unreachable Redis: one line and exit 1 (uvicorn
    printed its log and a traceback, and exited 1 or 3)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        in_use = dashboard_command(redis_url, namespace, port)
    assert in_use.returncode == 1
    assert in_use.stderr == (
        f"taskrunner: error: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    )
    away = f"redis://:dashpw@127.0.0.1:{unreachable_port}/0"
    unreachable = dashboard_command(away, namespace, 0)
    assert unreachable.returncode == 1
    assert unreachable.stderr.count("\n") == 1, unreachable.stderr
    assert unreachable.stderr.startswith("taskrunner: error: cannot reach redis at redis://:***@")
    assert "dashpw" not in unreachable.stderr


def served_url(proc: subprocess.Popen[bytes], log: Path) -> str:
    """The address the dashboard's startup line names, once it serves there. A port
    picked free by the test beforehand could be taken by another process while the
    command starts (and the test would talk to someone else); ``--port 0`` cannot."""
    deadline = time.monotonic() + DEADLINE
    while True:
        exited = proc.poll() is not None  # before reading: its last line is in the log
        text = log.read_text()
        found = re.search(r"Uvicorn running on (http://\S+)", text)
        if found:
            return found.group(1)
        assert not exited, f"the dashboard exited:\n{text}"
        assert time.monotonic() < deadline, f"no startup line within {DEADLINE:g}s:\n{text}"
        time.sleep(0.05)  # starting: read the log again


async def test_jobs_page_filters_by_priority_and_the_job_page_shows_it(
    make_runner: MakeRunner,
) -> None:
    tr = build(make_runner)
    add: Task[..., Any] = Task(tr, tr.registry["add"])
    async with client_for(tr, worker=False) as client:
        high = (await add.options(priority="high").enqueue(x=1, y=1)).id
        low = (await add.options(priority="low").enqueue(x=2, y=2)).id
        everything = (await client.get("/ops/jobs", params={"queue": "default"})).text
        only_low = (await client.get("/ops/jobs", params={"priority": "low"})).text
        detail = (await client.get(f"/ops/jobs/default/{high}")).text
        unknown = await client.get("/ops/jobs", params={"priority": "urgent"})
    assert f'data-job="{high}"' in everything
    assert f'data-job="{low}"' in everything
    assert f'data-job="{low}"' in only_low
    assert f'data-job="{high}"' not in only_low
    assert '<td class="priority">low</td>' in only_low
    assert '<dd class="priority">high</dd>' in detail
    assert "partition 0" in detail
    assert unknown.status_code == 400


async def test_the_job_page_hides_a_password_in_the_jobs_arguments(
    make_runner: MakeRunner,
) -> None:
    tr = build(make_runner)
    secret = "dashpw-in-args"
    async with client_for(tr, worker=False) as client:
        job_id = await enqueue(tr, "fixable", flag=f"redis://:{secret}@cache:6379/0")
        page = (await client.get(f"/ops/jobs/default/{job_id}")).text
    assert secret not in page
    assert "redis://:***@cache:6379/0" in page


async def test_a_queue_and_a_job_id_with_a_slash_have_working_pages_and_actions(
    make_runner: MakeRunner, redis: Redis
) -> None:
    tr = build(make_runner)
    queue, job_id = "eu/emails", "invoice/42%2F"  # sent as eu%2Femails, invoice%2F42%252F

    @tr.task(queue=queue)
    async def mail(to: str) -> str:
        return to

    async with client_for(tr, worker=False) as client:
        await mail.options(job_id=job_id).enqueue("ann@example.com")
        listed = (await client.get("/ops/jobs", params={"queue": queue})).text
        link = re.search(r'href="(/ops/jobs/eu%2Femails/[^"]+)"', listed)
        assert link is not None, listed
        page = await client.get(link.group(1))
        assert page.status_code == 200, page.text
        found = await client.get("/ops/jobs", params={"id": job_id})
        aborted = await client.post(f"{link.group(1)}/abort", data={"csrf": csrf_of(page.text)})
        paused = await client.post(
            "/ops/queues/eu%2Femails/pause", data={"csrf": csrf_of(page.text)}
        )
        status = await tr.job(job_id, queue).status()
    assert job_id in page.text
    assert found.headers["location"] == link.group(1)
    assert aborted.status_code == 303
    assert status == JobStatus.ABORTED
    assert paused.status_code == 303
    assert await redis.exists(QueueKeys(tr.namespace, queue).paused)


async def test_dashboard_answers_503_in_one_line_while_redis_is_unreachable(
    unreachable_port: int, namespace: str, redis_url: str, make_proxy: MakeProxy
) -> None:
    # a bare 500 before, from the first request's opening of the runner as from a page
    secret = "s3cret-dash"
    tr = TaskRunner(f"redis://:{secret}@127.0.0.1:{unreachable_port}/0", pool_timeout=1)
    transport = httpx.ASGITransport(app=dashboard(tr, poll_seconds=0))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        for url in ("/", "/jobs", "/workers"):
            answer = await client.get(url)
            assert answer.status_code == 503, url
            assert answer.text.startswith("Redis is unavailable: "), answer.text
            assert answer.text.count("\n") == 0
            assert secret not in answer.text
            assert answer.headers["retry-after"] == "5"
    parts = urlsplit(redis_url)
    proxy = make_proxy(parts.hostname or "127.0.0.1", parts.port or 6379)
    proxied = TaskRunner(f"redis://127.0.0.1:{proxy.port}/0", namespace=namespace, pool_timeout=1)
    async with client_for(proxied, worker=False) as client:
        assert (await client.get("/ops/")).status_code == 200
        proxy.refuse()
        proxy.cut()
        for url in ("/ops/", "/ops/jobs", "/ops/dead"):
            answer = await client.get(url)
            assert answer.status_code == 503, url
            assert answer.text.startswith("Redis is unavailable: "), answer.text
        proxy.resume()
