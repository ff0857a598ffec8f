"""Shared fixtures: one real redis-server per test session (per xdist worker), and a
fresh namespace per test so tests never see each other's keys."""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

sys.path.insert(0, str(Path(__file__).parent))

from redisproc import RedisProcess

from taskrunner import TaskRunner


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    with RedisProcess(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisProcess) -> str:
    return redis_server.url


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def make_runner(redis_url: str, namespace: str) -> Callable[..., TaskRunner]:
    """Build TaskRunners on the test's redis and namespace (fast timings by default)."""

    def make(**kwargs: Any) -> TaskRunner:
        kwargs.setdefault("namespace", namespace)
        kwargs.setdefault("retry_delay", 0.01)
        return TaskRunner(redis_url, **kwargs)

    return make


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


async def wait_until(
    condition: Callable[[], Awaitable[bool]], timeout: float = 10.0, interval: float = 0.01
) -> None:
    """Poll ``condition`` until it holds or the deadline passes (then fail)."""
    import anyio

    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await anyio.sleep(interval)


def subprocess_env(redis_url: str, namespace: str) -> dict[str, str]:
    """Environment for a child process: same python path, the test's redis and namespace."""
    env = dict(os.environ)
    root = str(Path(__file__).parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(
        [root, str(Path(__file__).parent), env.get("PYTHONPATH", "")]
    )
    env["TASKRUNNER_REDIS_URL"] = redis_url
    env["TEST_NAMESPACE"] = namespace
    return env
