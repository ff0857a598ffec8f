"""A TaskRunner for the command-line tests, run by real ``taskrunner`` processes.

Its namespace comes from ``TEST_NAMESPACE`` (set by ``subprocess_env``), and its Redis
from ``TASKRUNNER_REDIS_URL``; ``explicit`` takes its URL from ``CLI_APP_URL`` instead,
for the precedence tests. Heartbeats are fast so workers show up in ``info`` quickly.
"""

from __future__ import annotations

import os

import anyio
from pydantic import BaseModel

from taskrunner import TaskRunner

NAMESPACE = os.environ.get("TEST_NAMESPACE", "cli")

tr = TaskRunner(namespace=NAMESPACE, heartbeat_interval=0.2, stale_after=30, retry_delay=0.01)
explicit = TaskRunner(os.environ.get("CLI_APP_URL"), namespace=NAMESPACE)
not_a_runner = 42


class Person(BaseModel):
    name: str
    age: int


class Greeting(BaseModel):
    text: str
    adult: bool


@tr.task
async def add(x: int, y: int) -> int:
    return x + y


@tr.task
async def greet(person: Person, punctuation: str = "!") -> Greeting:
    return Greeting(text=f"hello {person.name}{punctuation}", adult=person.age >= 18)


@tr.task(max_retries=0)
async def fail(message: str) -> None:
    raise ValueError(message)


@tr.task(timeout=3600, max_retries=0)
async def sleepy(seconds: float, marker: str = "") -> float:
    """Sleep; with ``marker``, touch that file first (so a test sees it has started)."""
    if marker:
        await anyio.Path(marker).touch()
    await anyio.sleep(seconds)
    return seconds


@tr.task(queue="other")
async def ping() -> str:
    return "pong"


@explicit.task
async def explicit_add(x: int, y: int) -> int:
    return x + y
