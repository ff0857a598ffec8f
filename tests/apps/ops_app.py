"""A TaskRunner (and a FastAPI app with the dashboard mounted) for the operations tests:
the admin API, the job commands in real subprocesses, and the browser test.

Its namespace comes from ``TEST_NAMESPACE`` and its Redis from ``TASKRUNNER_REDIS_URL``
(set by ``subprocess_env``). ``app`` runs a worker inside itself and serves the
dashboard at ``/taskrunner`` behind HTTP Basic auth (``admin``/``secret``), like a host
application would.
"""

from __future__ import annotations

import base64
import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI, Request, Response
from pydantic import BaseModel

from taskrunner import TaskRunner, current_job
from taskrunner.dashboard import dashboard

NAMESPACE = os.environ.get("TEST_NAMESPACE", "ops")

tr = TaskRunner(
    namespace=NAMESPACE, heartbeat_interval=0.2, stale_after=30, retry_delay=0.01, max_retries=0
)


class Address(BaseModel):
    city: str
    zip: str


@tr.task
async def add(x: int, y: int) -> int:
    return x + y


@tr.task
async def ship(order_id: int, address: Address) -> str:
    return f"order {order_id} shipped to {address.city}"


@tr.task
async def fixable(flag: str) -> str:
    """Fails until the file ``flag`` exists (an operator "fixes" it, then retries)."""
    if not await anyio.Path(flag).exists():
        raise RuntimeError(f"not fixed yet: {flag} is missing")
    return "fixed"


@tr.task(timeout=3600, lock="until_executed")
async def hold(seconds: float, marker: str = "") -> float:
    """Hold a unique lock for ``seconds``; report progress, and touch ``marker`` (it
    has started)."""
    await current_job().set_progress({"step": "waiting for the carrier", "done": 0.4})
    if marker:
        await anyio.Path(marker).touch()
    await anyio.sleep(seconds)
    return seconds


@tr.task(queue="emails")
async def send_email(to: str) -> str:
    return f"sent to {to}"


# A cron schedule for the cron page: New Year's Day only, so it never fires in a test.
tr.cron("0 6 1 1 *", send_email.call("ops@example.com"), name="new-year", tz="Europe/Paris")


USER, PASSWORD = "admin", "secret"


CHALLENGE = Response(
    "sign in", status_code=401, headers={"WWW-Authenticate": 'Basic realm="taskrunner"'}
)


def basic_auth(request: Request) -> bool | Response:
    """The host app's own check (HTTP Basic here): the dashboard asks it per request;
    a 401 with a challenge makes the browser ask for the password."""
    header = request.headers.get("authorization", "")
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return CHALLENGE
    try:
        user, _, password = base64.b64decode(encoded).decode().partition(":")
    except ValueError:
        return CHALLENGE
    if secrets.compare_digest(user, USER) and secrets.compare_digest(password, PASSWORD):
        return True
    return CHALLENGE


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with tr, tr.worker(concurrency=4, grace_period=1, handle_signals=False):
        yield


app = FastAPI(lifespan=lifespan)
app.mount("/taskrunner", dashboard(tr, auth=basic_auth))


@app.get("/")
async def home() -> dict[str, str]:
    return {"dashboard": "/taskrunner/"}
