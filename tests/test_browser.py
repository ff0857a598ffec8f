"""The dashboard in a real browser: headless Chromium (Debian's ``chromium`` package)
driven by Playwright, against a real FastAPI app (tests/apps/ops_app.py, served by
uvicorn in its own process on loopback) that runs a real worker and mounts the
dashboard behind HTTP Basic auth.

It checks the counts, opens a failed job, "fixes" it, presses Retry and sees it
succeed, then visits every page, saving a screenshot of each (to the test's temp dir,
or to ``TEST_SCREENSHOTS`` when set: that is how docs/images/dashboard/ is made).

No browser here: skipped, except when ``TEST_REQUIRE_BROWSER=1`` (set by
``.ci/run``, which installs chromium), where a missing browser fails the test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from conftest import subprocess_env
from ports import start_uvicorn

from taskrunner import JobStatus, TaskRunner
from taskrunner.task import Task

CHROMIUM = os.environ.get("TEST_CHROMIUM", "/usr/bin/chromium")
DEADLINE = 30.0
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def browser_or_skip() -> Any:
    """Playwright's sync API, or a skip (a failure when a browser is required)."""
    missing = ""
    try:
        from playwright import sync_api
    except ImportError as exc:
        missing = f"playwright is not installed ({exc})"
    if not missing and not shutil.which(CHROMIUM):
        missing = f"no chromium at {CHROMIUM} (apt-get install chromium)"
    if missing:
        if os.environ.get("TEST_REQUIRE_BROWSER") == "1":
            pytest.fail(f"browser required (TEST_REQUIRE_BROWSER=1): {missing}")
        pytest.skip(missing)
    return sync_api


@pytest.fixture
def server(redis_url: str, namespace: str, tmp_path: Path) -> Iterator[str]:
    """tests/apps/ops_app.py under uvicorn on loopback; its base URL.

    The fixture binds and listens on the port itself and hands the socket to uvicorn
    (``--fd``, tests/ports.py): uvicorn binds only after importing the app and running its lifespan
    (seconds under load), and a port picked free beforehand could be taken by another
    process in that time. Connections made meanwhile wait in the socket's backlog, so
    the first GET is answered once the app is up: that is the readiness check.
    """
    log = (tmp_path / "uvicorn.log").open("w")
    proc, port = start_uvicorn(
        "apps.ops_app:app",
        env=subprocess_env(redis_url, namespace),
        cwd=Path(__file__).parent,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        try:  # a crash during startup closes the socket: this fails at once
            httpx.get(f"{base}/", timeout=DEADLINE)
        except httpx.TransportError as exc:
            raise AssertionError(
                f"uvicorn did not answer ({exc!r}):\n{(tmp_path / 'uvicorn.log').read_text()}"
            ) from None
        yield base
    finally:
        proc.terminate()  # the app's worker hands its running job back within 1 s
        try:
            proc.wait(timeout=DEADLINE)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()


def producer(redis_url: str, namespace: str) -> TaskRunner:
    """A producer of ops_app's task names (the app's worker runs them)."""
    tr = TaskRunner(redis_url, namespace=namespace)

    @tr.task(name="add")
    async def add(x: int, y: int) -> int:
        raise NotImplementedError

    @tr.task(name="fixable")
    async def fixable(flag: str) -> str:
        raise NotImplementedError

    @tr.task(name="hold", lock="until_executed")
    async def hold(seconds: float, marker: str = "") -> float:
        raise NotImplementedError

    @tr.task(name="ship")
    async def ship(order_id: int, address: dict[str, str]) -> str:
        raise NotImplementedError

    @tr.task(name="no_such_task")  # no worker knows it: it goes to the dead letters
    async def unknown() -> None:
        raise NotImplementedError

    @tr.task(name="send_email", queue="emails")
    async def send_email(to: str) -> str:
        raise NotImplementedError

    return tr


async def fill(tr: TaskRunner, flag: Path, marker: Path) -> dict[str, str]:
    """Real jobs: 8 succeed, 1 fails (until fixed), 1 is dead-lettered, 1 runs long."""

    async def put(task: str, **kwargs: Any) -> str:
        handle: Task[..., Any] = Task(tr, tr.registry[task])
        return (await handle.enqueue(**kwargs)).id

    async with tr:
        ids = {f"ok{i}": await put("add", x=i, y=i) for i in range(6)}
        ship: Task[..., Any] = Task(tr, tr.registry["ship"])
        shipped = ship.options(priority="high")
        ids["ship"] = (
            await shipped.enqueue(order_id=7, address={"city": "Lyon", "zip": "69001"})
        ).id
        ids["email"] = await put("send_email", to="ops@example.com")
        ids["failed"] = await put("fixable", flag=str(flag))
        ids["dead"] = await put("no_such_task")
        for job_id in ids.values():
            await _final(tr, job_id)
        ids["running"] = await put("hold", seconds=600, marker=str(marker))
    return ids


async def _final(tr: TaskRunner, job_id: str) -> None:
    with anyio.fail_after(DEADLINE):
        while True:
            queue = await tr.admin.find(job_id)
            if queue and (await tr.job(job_id, queue).status()).is_final:
                return
            await anyio.sleep(0.02)  # the app's worker runs it: poll again


def test_dashboard_in_chromium_counts_failed_job_retry_and_every_page(
    server: str, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    sync_api = browser_or_skip()
    shots = Path(os.environ.get("TEST_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    flag, marker = tmp_path / "fixed", tmp_path / "started"
    ids = anyio.run(fill, producer(redis_url, namespace), flag, marker)
    deadline = time.monotonic() + DEADLINE
    while not marker.exists():  # the long job has started: it shows on the workers page
        assert time.monotonic() < deadline, "the long job never started"
        time.sleep(0.02)
    base = f"{server}/taskrunner"
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"),  # a fresh --user-data-dir
            executable_path=CHROMIUM,
            headless=True,
            args=ARGS,
            http_credentials={"username": "admin", "password": "secret"},
            viewport={"width": 1280, "height": 860},
        )
        try:
            walk(sync_api, context.new_page(), base, ids, flag, shots)
        finally:
            context.close()
    for name in (
        "queues",
        "jobs",
        "job-failed",
        "job-retried",
        "job-running",
        "dead-letters",
        "workers",
        "cron",
    ):
        assert (shots / f"{name}.png").stat().st_size > 10_000, name


def walk(sync_api: Any, page: Any, base: str, ids: dict[str, str], flag: Path, shots: Path) -> None:
    expect = sync_api.expect
    expect.set_options(timeout=DEADLINE * 1000)

    # queues: live counts
    page.goto(f"{base}/")
    row = page.locator('tr[data-queue="default"]')
    expect(row.locator('[data-status="succeeded"]')).to_have_text("7")
    expect(row.locator('[data-status="failed"]')).to_have_text("1")
    expect(row.locator('[data-status="dead"]')).to_have_text("1")
    expect(row.locator('[data-status="running"]')).to_have_text("1")
    expect(page.locator('tr[data-queue="emails"] [data-status="succeeded"]')).to_have_text("1")
    expect(page.locator("svg.chart rect.bar-succeeded").first).to_be_visible()
    page.screenshot(path=str(shots / "queues.png"), full_page=True)

    # jobs: the failed one, opened from the list
    row.locator('[data-status="failed"] a').click()
    expect(page.locator(f'tr[data-job="{ids["failed"]}"]')).to_be_visible()
    page.goto(f"{base}/jobs?queue=default")
    expect(page.locator(f'tr[data-job="{ids["ship"]}"] td.priority')).to_have_text("high")
    page.screenshot(path=str(shots / "jobs.png"), full_page=True)
    page.goto(f"{base}/jobs?status=failed")
    page.locator(f'tr[data-job="{ids["failed"]}"] a').click()
    expect(page.locator("h1 .status")).to_have_text("failed")
    expect(page.locator("pre.traceback")).to_contain_text("RuntimeError: not fixed yet")
    page.screenshot(path=str(shots / "job-failed.png"), full_page=True)

    # fix it, press Retry, see it succeed
    flag.touch()
    page.get_by_role("button", name="Retry").click()
    expect(page.locator(".notice")).to_have_text("queued again")
    deadline = time.monotonic() + DEADLINE
    while page.locator("h1 .status").inner_text() != JobStatus.SUCCEEDED:
        assert time.monotonic() < deadline, "the retried job did not succeed"
        page.reload()
    expect(page.locator("pre.json").last).to_have_text('"fixed"')
    page.screenshot(path=str(shots / "job-retried.png"), full_page=True)

    # search by id, a running job with its lock holder
    page.fill('input[name="id"]', ids["running"])
    page.press('input[name="id"]', "Enter")
    expect(page.locator("h1 .status")).to_have_text("running")
    expect(page.locator("table.locks")).to_contain_text("this job")
    expect(page.locator("pre.progress")).to_contain_text("waiting for the carrier")
    page.screenshot(path=str(shots / "job-running.png"), full_page=True)

    # dead letters, workers, cron
    page.click("text=Dead letters")
    expect(page.locator(f'tr[data-job="{ids["dead"]}"]')).to_contain_text("unknown task")
    page.screenshot(path=str(shots / "dead-letters.png"), full_page=True)
    page.click("text=Workers")
    expect(page.locator("table.workers")).to_contain_text(ids["running"][:12])
    expect(page.locator("table.workers")).to_contain_text("waiting for the carrier")
    page.screenshot(path=str(shots / "workers.png"), full_page=True)
    page.click("text=Cron")
    expect(page.locator('tr[data-cron="new-year"]')).to_contain_text("Europe/Paris")
    page.screenshot(path=str(shots / "cron.png"), full_page=True)

    # back on the queues page, the retried job counts as succeeded
    page.goto(f"{base}/")
    expect(row.locator('[data-status="succeeded"]')).to_have_text("8")
    expect(row.locator('[data-status="failed"]')).to_have_text("0")
