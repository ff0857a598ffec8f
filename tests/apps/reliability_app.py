"""The app that reliability tests run in real worker processes.

    python -m apps.reliability_app worker     run a worker until killed or SIGTERMed

Settings come from the environment: ``TASKRUNNER_REDIS_URL`` and ``TEST_NAMESPACE``
(conftest's ``subprocess_env``), and ``TEST_HEARTBEAT``, ``TEST_STALE``,
``TEST_MAX_DELIVERIES``, ``TEST_GRACE``, ``TEST_CONCURRENCY``.

Every task records each execution start as ``<pid> <attempt> <epoch ms>`` in the
list ``{ns}:test:runs:<job id>``, so tests count runs from Redis. Other markers:
``{ns}:test:events`` gets ``woke <job id> <pid>`` and ``cancelled <job id> <pid>``.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time

import anyio
import redis
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError
from redis.sentinel import Sentinel

from taskrunner import TaskRunner, current_job
from taskrunner.urls import parse_url

if os.environ.get("TEST_CLOCK_SHIFT"):  # a host whose clock is wrong by that many seconds
    _shift = float(os.environ["TEST_CLOCK_SHIFT"])
    _real_time = time.time
    time.time = lambda: _real_time() + _shift

NAMESPACE = os.environ.get("TEST_NAMESPACE", "reliability")
URL = os.environ.get("TASKRUNNER_REDIS_URL")

tr = TaskRunner(
    URL,
    namespace=NAMESPACE,
    heartbeat_interval=float(os.environ.get("TEST_HEARTBEAT", "0.2")),
    stale_after=float(os.environ.get("TEST_STALE", "1.0")),
    max_retries=0,
    retry_delay=0.01,
)

_redis: Redis | None = None


def key(*parts: str) -> str:
    return ":".join((NAMESPACE, "test", *parts))


def _client() -> Redis:
    global _redis  # noqa: PLW0603 - one client per worker process
    if URL and "+" in URL.partition(":")[0]:  # a cluster or a sentinel: the app's own client
        return tr.client.redis
    if _redis is None:
        # Retries: a pooled connection that a Redis restart closed fails once.
        _redis = Redis.from_url(
            URL or "",
            decode_responses=True,
            retry=Retry(ExponentialBackoff(cap=1.0), 5),
            retry_on_error=[ConnectionError],
        )
    return _redis


async def _rpush(name: str, value: str) -> None:
    """RPUSH through restarts and failovers (a pooled connection to a server that is gone
    fails; the next call reaches the new one)."""
    for attempt in range(50):
        try:
            await _client().rpush(name, value)
            return
        except (ConnectionError, OSError):
            if attempt == 49:
                raise
            await anyio.sleep(0.1)


async def record_start() -> None:
    job = current_job()
    entry = f"{os.getpid()} {job.attempt} {int(time.time() * 1000)}"
    await _rpush(key("runs", job.id), entry)


async def event(kind: str) -> None:
    await _rpush(key("events"), f"{kind} {current_job().id} {os.getpid()}")


@tr.task
async def add(x: int, y: int) -> int:
    await record_start()
    return x + y


@tr.task
async def hold(first: float, later: float) -> str:
    """Sleep ``first`` seconds on attempt 1 and ``later`` on the others."""
    await record_start()
    attempt = current_job().attempt
    await anyio.sleep(first if attempt == 1 else later)
    return f"{os.getpid()}:{attempt}"


@tr.task
async def blocker(mode: str) -> str:
    """Attempt 1 blocks its event loop (``time.sleep``) until ``release:<id>`` exists,
    then returns at once (``mode="return"``) or awaits a long time (``mode="await"``).
    Later attempts wait (BLPOP, without blocking the loop) for an item in ``finish:<id>``."""
    await record_start()
    job = current_job()
    if job.attempt == 1:
        _block_until(key("release", job.id))
        if mode == "await":
            await _await_cancellable(60, woke=True)
        else:
            await event("woke")
        return f"first:{os.getpid()}"
    await _client().blpop([key("finish", job.id)], timeout=60)
    return f"second:{os.getpid()}"


def _sync_client() -> redis.Redis | redis.RedisCluster:
    """A blocking client of the test's Redis, whatever its topology."""
    target = parse_url(URL or "")
    auth = {"username": target.username, "password": target.password, **target.ssl_kwargs}
    if target.topology == "cluster":
        host, port = target.nodes[0]
        return redis.RedisCluster(host=host, port=port, **auth)
    if target.topology == "sentinel":
        sentinels = Sentinel(  # type: ignore[no-untyped-call]
            list(target.nodes),
            sentinel_kwargs={
                "username": target.sentinel_username,
                "password": target.sentinel_password,
                **target.ssl_kwargs,
            },
            **auth,
        )
        master: redis.Redis = sentinels.master_for(  # type: ignore[no-untyped-call]
            target.master_name or "", db=target.db
        )
        return master
    return redis.Redis.from_url(URL or "")


def _block_until(name: str, timeout: float = 60.0) -> None:
    sync = _sync_client()
    deadline = time.monotonic() + timeout
    try:
        while not sync.exists(name) and time.monotonic() < deadline:
            time.sleep(0.05)  # deliberately blocks the event loop
    finally:
        sync.close()


async def _await_cancellable(seconds: float, *, woke: bool = False) -> None:
    """Wait, recording a cancellation as "cancelled"; with ``woke``, record the wake-up
    first, inside the same guard: the refused heartbeat's cancellation may come while
    "woke" is being written."""
    try:
        if woke:
            await event("woke")
        await anyio.sleep(seconds)
    except anyio.get_cancelled_exc_class():
        with anyio.CancelScope(shield=True):
            await event("cancelled")
        raise


@tr.task
async def suicide() -> int:
    """SIGKILLs its own worker process while ``kill`` exists; returns the pid otherwise."""
    await record_start()
    if await _client().exists(key("kill")):
        os.kill(os.getpid(), signal.SIGKILL)
    return os.getpid()


@tr.task
async def gate(path: str) -> str:
    """Wait (without Redis, so it runs on through an outage) until ``path`` exists."""
    await record_start()
    while not await anyio.Path(path).exists():  # noqa: ASYNC110 - a file, not an event
        await anyio.sleep(0.05)
    return f"{os.getpid()}:{current_job().attempt}"


@tr.task
async def forever() -> None:
    await record_start()
    await _await_cancellable(3600)


async def work() -> None:
    worker = tr.worker(
        concurrency=int(os.environ.get("TEST_CONCURRENCY", "10")),
        max_deliveries=int(os.environ.get("TEST_MAX_DELIVERIES", "5")),
        grace_period=float(os.environ.get("TEST_GRACE", "30")),
    )
    await worker.run()


def main(argv: list[str]) -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if argv[1:] == ["worker"]:
        anyio.run(work)
    else:
        raise SystemExit(f"usage: python -m apps.reliability_app worker (got {argv[1:]})")


if __name__ == "__main__":
    main(sys.argv)
