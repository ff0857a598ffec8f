"""FastAPI embedding, tested with httpx against the ASGI app and its lifespan.

The app is examples/fastapi_app.py itself, in both modes: producer only with a
separate worker process (a real ``taskrunner worker`` subprocess), and with a worker
embedded in the lifespan; in both, shutting down while jobs run lets short jobs finish
within the grace period and hands long ones back to the queue (none lost).
The example uses the default namespace, so it gets a redis-server of its own.
"""

from __future__ import annotations

import inspect
import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, cast

import anyio
import httpx
import pytest
from conftest import wait_until
from fastapi import FastAPI, Request
from redis.asyncio import Redis
from redisproc import RedisProcess

from taskrunner import TaskRunner
from taskrunner.fastapi import TaskRunnerDep, WorkerOptions, get_taskrunner, lifespan
from taskrunner.keys import DEFAULT_NAMESPACE, GROUP, QueueKeys

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples import fastapi_app as example  # noqa: E402

DEADLINE = 60.0
TASKRUNNER = str(Path(sys.executable).with_name("taskrunner"))
KEYS = QueueKeys(DEFAULT_NAMESPACE, "default")


@pytest.fixture(scope="module")
def example_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    with RedisProcess(tmp_path_factory.mktemp("fastapi-redis")) as server:
        yield server


@pytest.fixture
async def example_redis(
    example_server: RedisProcess, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Redis]:
    """A clean redis for the example's TaskRunner (it reads TASKRUNNER_REDIS_URL)."""
    monkeypatch.setenv("TASKRUNNER_REDIS_URL", example_server.url)
    client = Redis.from_url(example_server.url, decode_responses=True)
    await client.flushall()
    yield client
    await client.aclose()


@asynccontextmanager
async def serve(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """Run the app's lifespan around an httpx client on the ASGI app (no sockets)."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            yield client


async def view(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    response = await client.get(f"/jobs/{job_id}")
    assert response.status_code == 200, response.text
    found: dict[str, Any] = response.json()
    return found


def has_status(client: httpx.AsyncClient, job_id: str, *statuses: str) -> Callable[[], Any]:
    async def check() -> bool:
        return (await view(client, job_id))["status"] in statuses

    return check


def started_line(job_id: str) -> str:
    """The worker's INFO line when a consumer starts the ``add`` task (the status is
    "running" earlier, from the claim)."""
    return f"job {job_id} add attempt 1 started"


def started_in(caplog: pytest.LogCaptureFixture, job_id: str) -> Callable[[], Any]:
    async def check() -> bool:
        return any(r.getMessage() == started_line(job_id) for r in caplog.records)

    return check


def started_in_file(log: Path, job_id: str) -> Callable[[], Any]:
    async def check() -> bool:
        return started_line(job_id) in await anyio.Path(log).read_text()

    return check


async def post(client: httpx.AsyncClient, **body: Any) -> str:
    response = await client.post("/jobs", json=body)
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


async def assert_handed_back(redis: Redis, job_id: str) -> None:
    """Back in the stream, not held by any consumer, not lost."""
    state = await redis.hgetall(KEYS.job(job_id))
    assert state["status"] == "queued"
    assert state["attempts"] == "0"
    entries = cast(list[tuple[str, dict[str, str]]], await redis.xrange(KEYS.stream))
    assert [fields["job"] for _, fields in entries] == [job_id]
    assert (await redis.xpending(KEYS.stream, GROUP))["pending"] == 0


@contextmanager
def worker_process(url: str, tmp_path: Path, *args: str) -> Iterator[subprocess.Popen[str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKRUNNER_")}
    env |= {"TASKRUNNER_REDIS_URL": url, "PYTHONPATH": str(ROOT), "EMBED_WORKER": "0"}
    log = (tmp_path / "worker.log").open("w")
    proc = subprocess.Popen(
        [TASKRUNNER, "worker", "examples.fastapi_app:tr", *args],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=DEADLINE)
        log.close()


def exited(proc: subprocess.Popen[str]) -> Callable[[], Any]:
    async def check() -> bool:
        return proc.poll() is not None

    return check


# -- embedded worker ---------------------------------------------------------------------------


async def test_embedded_worker_is_ready_before_serving_and_installs_no_signal_handlers(
    example_redis: Redis,
) -> None:
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    app = example.create_app(embed_worker=True)
    async with serve(app) as client:
        # Ready before the first request: its consumer group exists already.
        groups = await example_redis.xinfo_groups(KEYS.stream)
        assert [g["name"] for g in groups] == [GROUP]
        assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before

        job_id = await post(client, x=1, y=2)
        await wait_until(has_status(client, job_id, "succeeded"), DEADLINE)
        assert (await view(client, job_id))["result"] == 3

        assert (await client.get("/jobs/nope")).status_code == 404
        assert (await client.post("/jobs", json={"x": "one", "y": 2})).status_code == 422
    assert await example_redis.xlen(KEYS.stream) == 0


async def test_embedded_worker_drains_on_shutdown_and_hands_back_what_outlives_grace(
    example_redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="taskrunner.worker")
    app = example.create_app(embed_worker=True, grace_period=5)
    async with serve(app) as client:
        short = await post(client, x=1, y=1, seconds=0.5)
        long = await post(client, x=2, y=2, seconds=3600)
        # Both started (the worker's log says so), not just claimed: a claimed job no
        # consumer has started yet is handed back at shutdown instead of finishing.
        await wait_until(started_in(caplog, short), DEADLINE)
        await wait_until(started_in(caplog, long), DEADLINE)
    # The lifespan has exited: the short job finished, the long one went back.
    assert await example_redis.hget(KEYS.job(short), "status") == "succeeded"
    assert await example_redis.hget(KEYS.job(short), "result") == "2"
    await assert_handed_back(example_redis, long)


# -- producer only, with a separate worker process ------------------------------------------


async def test_producer_only_app_leaves_jobs_to_a_separate_worker_process(
    example_redis: Redis, example_server: RedisProcess, tmp_path: Path
) -> None:
    app = example.create_app(embed_worker=False)
    async with serve(app) as client:
        job_id = await post(client, x=20, y=22)
        assert (await view(client, job_id))["status"] == "queued"
        assert await example_redis.xinfo_groups(KEYS.stream) == []  # nobody consumes here

        with worker_process(example_server.url, tmp_path, "--grace-period", "5") as proc:
            await wait_until(has_status(client, job_id, "succeeded"), DEADLINE)
            assert (await view(client, job_id))["result"] == 42

            # SIGTERM while two jobs run: the short one finishes, the long one goes back.
            short = await post(client, x=1, y=1, seconds=0.5)
            long = await post(client, x=2, y=2, seconds=3600)
            # Both started (in the worker's log), not just claimed: see above.
            log = tmp_path / "worker.log"
            await wait_until(started_in_file(log, short), DEADLINE)
            await wait_until(started_in_file(log, long), DEADLINE)
            proc.send_signal(signal.SIGTERM)
            await wait_until(exited(proc), DEADLINE)
            assert proc.returncode == 0
        view_short = await view(client, short)
        assert (view_short["status"], view_short["result"]) == ("succeeded", 2)
        assert (await view(client, long))["status"] == "queued"
    await assert_handed_back(example_redis, long)


# -- the dependency and the ready-made lifespan -----------------------------------------------


async def test_dependency_without_a_runner_in_the_lifespan_says_how_to_set_it() -> None:
    app = FastAPI()

    @app.get("/")
    async def index(runner: TaskRunnerDep) -> str:
        return runner.namespace

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        with pytest.raises(RuntimeError, match=r"app\.state\.taskrunner = tr"):
            await client.get("/")


async def test_ready_made_lifespan_runs_a_worker_and_routes_get_the_runner(
    make_runner: Callable[..., TaskRunner],
) -> None:
    runner = make_runner()

    @runner.task
    async def double(n: int) -> int:
        return 2 * n

    app = FastAPI(lifespan=lifespan(runner, worker=True, concurrency=2))

    @app.post("/double/{n}")
    async def route(n: int, tr: TaskRunnerDep) -> dict[str, Any]:
        job = await double.enqueue(n)
        return {"namespace": tr.namespace, "result": await job.result(timeout=DEADLINE)}

    async with serve(app) as client:
        response = await client.post("/double/21")
        assert response.json() == {"namespace": runner.namespace, "result": 42}
        assert app.state.taskrunner is runner
    assert not hasattr(app.state, "taskrunner")


def test_ready_made_lifespan_refuses_worker_options_it_would_not_use_at_once(
    make_runner: Callable[..., TaskRunner],
) -> None:
    # worker options without worker=True were dropped: the app served, and no job ran
    runner = make_runner()
    with pytest.raises(TypeError, match=r"concurrency.*need worker=True"):
        lifespan(runner, concurrency=10)
    with pytest.raises(TypeError, match="concurency"):  # not at the app's startup
        lifespan(runner, worker=True, concurency=10)  # type: ignore[call-arg]
    lifespan(runner, worker=True, concurrency=10, queues=["default"])


def test_ready_made_lifespan_types_every_worker_option_and_only_those() -> None:
    # mypy and pyright check lifespan(tr, worker=True, ...) against WorkerOptions
    # (tests/typing_errors.py): it must name exactly what tr.worker takes
    taken = set(inspect.signature(TaskRunner.worker).parameters) - {"self"}
    assert set(WorkerOptions.__annotations__) == taken
    assert WorkerOptions.__required_keys__ == frozenset()


async def test_dependency_prefers_lifespan_state_over_app_state(
    make_runner: Callable[..., TaskRunner],
) -> None:
    in_state, on_app = make_runner(), make_runner()
    app = FastAPI()
    app.state.taskrunner = on_app
    with_state = Request({"type": "http", "app": app, "state": {"taskrunner": in_state}})
    assert get_taskrunner(with_state) is in_state
    assert get_taskrunner(Request({"type": "http", "app": app, "state": {}})) is on_app


async def test_worker_used_with_async_with_handles_signals_only_when_asked(
    make_runner: Callable[..., TaskRunner],
) -> None:
    runner = make_runner()
    original = signal.getsignal(signal.SIGTERM)
    async with runner, runner.worker():
        assert signal.getsignal(signal.SIGTERM) == original
    async with runner, runner.worker(handle_signals=True) as worker:
        assert signal.getsignal(signal.SIGTERM) != original
        assert not worker.stopping
    assert signal.getsignal(signal.SIGTERM) == original
