"""Shared fixtures: one real redis-server per test session (per xdist worker), and a
fresh namespace per test so tests never see each other's keys.

Topologies (tests/topology.py): ``@pytest.mark.topologies("standalone", "cluster",
"sentinel")`` runs a test once per topology and points ``redis_url`` at it; the
``topology`` fixture gives its URL and fault operations. Also here: ``make_proxy``
(tests/tcpproxy.py, a misbehaving TCP proxy) and ``cli_workers`` (real worker processes).
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from redis.asyncio import Redis

sys.path.insert(0, str(Path(__file__).parent))

from ports import refused_port
from redisproc import RedisProcess
from tcpproxy import make_proxy  # noqa: F401 - fixture
from topology import (  # noqa: F401 - fixtures
    Topology,
    cluster_topology,
    make_topology,
    sentinel_topology,
    standalone_topology,
    topology,
)
from topology import configure as configure_topologies
from topology import generate_tests as parametrize_topologies
from workerproc import CliWorker

from taskrunner import TaskRunner


def pytest_configure(config: pytest.Config) -> None:
    configure_topologies(config)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    parametrize_topologies(metafunc)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    with RedisProcess(tmp_path_factory.mktemp("redis")) as server:
        yield server


def on_topology(request: pytest.FixtureRequest) -> bool:
    """Whether the test runs on a topology: it asks for the fixture, or the marker
    parametrized it (the marker alone adds ``topology`` to the parameters, not to
    ``request.fixturenames``: without this check such a test ran on the session's
    standalone server under every topology's id)."""
    callspec = getattr(request.node, "callspec", None)
    return "topology" in request.fixturenames or (
        callspec is not None and "topology" in callspec.params
    )


@pytest.fixture
def redis_url(request: pytest.FixtureRequest) -> str:
    """The session's redis-server, or the test's topology when it has one."""
    if on_topology(request):
        return str(request.getfixturevalue("topology").url)
    server: RedisProcess = request.getfixturevalue("redis_server")
    return server.url


@pytest.fixture
def unreachable_port() -> Iterator[int]:
    """A loopback port where nothing listens, held (bound, not listening) for the test:
    connections to it are refused, and no other process can start listening on it
    meanwhile (tests/ports.py)."""
    with refused_port() as port:
        yield port


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
async def redis(request: pytest.FixtureRequest, redis_url: str) -> AsyncIterator[Redis]:
    """A client (decode_responses) of the test's Redis: on a topology, one of its kind
    (a cluster client routes each command by its key, so tests use single-slot commands)."""
    if not on_topology(request):
        client = Redis.from_url(redis_url, decode_responses=True)
        yield client
        await client.aclose()
        return
    current: Topology = request.getfixturevalue("topology")
    async with current.connect(decode_responses=True) as connected:
        # Typed as Redis for the tests: RedisCluster answers the same single-key commands.
        yield cast(Redis, connected)


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


StartWorker = Callable[..., CliWorker]


@pytest.fixture
def cli_workers(redis_url: str, namespace: str, tmp_path: Path) -> Iterator[StartWorker]:
    """``cli_workers(APP, *args, env=None)`` starts ``python -m taskrunner.cli worker APP``
    on the test's Redis and namespace; all are killed after the test, output printed."""
    started: list[CliWorker] = []

    def start(app: str, *args: str, env: dict[str, str] | None = None) -> CliWorker:
        full_env = subprocess_env(redis_url, namespace)
        full_env.update(env or {})
        worker = CliWorker(app, full_env, tmp_path / f"cli-worker-{len(started)}.log")
        started.append(worker)
        return worker.start(*args)

    yield start
    for worker in started:
        worker.close()
        print(f"--- worker {worker.app} (exit {worker.returncode}) ---\n{worker.output()}")
