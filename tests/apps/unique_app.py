"""A unique-job app for tests that run real worker and producer processes.

    python -m apps.unique_app worker          run a worker until killed
    python -m apps.unique_app produce N       N concurrent enqueues of one unique job;
                                              waits for the key {ns}:test:go first,
                                              prints one JSON line per result
    python -m apps.unique_app flood           enqueue distinct unique jobs until killed

Settings come from the environment (``Settings.to_env``), the Redis URL and the
namespace from ``TASKRUNNER_REDIS_URL`` and ``TEST_NAMESPACE`` (conftest's
``subprocess_env``). The task ``guarded(key, mode)`` is unique by ``key`` only; it
records ``start <id> <attempt>`` and ``end <id>`` in ``{ns}:test:events``; with
``mode="gate"`` it waits until ``{ns}:test:gate:<key>`` exists, then returns
(gate ``ok``) or raises ``ValueError`` (gate ``fail``).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import asdict, dataclass
from typing import Any, cast

import anyio
from redis.asyncio import Redis

from taskrunner import LockConflictError, Task, TaskRunner, current_job
from taskrunner.middleware.unique import ConflictStrategy, LockKind


@dataclass(frozen=True)
class Settings:
    lock: str = "until_executed"
    on_conflict: str = "reject"
    max_retries: int = 0
    retry_delay: float = 60.0
    lock_ttl: float = 30.0
    reschedule_delay: float = 0.1
    heartbeat_interval: float = 0.2
    stale_after: float = 1.0

    def to_env(self) -> dict[str, str]:
        return {f"UNIQUE_{k.upper()}": str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_env(cls) -> Settings:
        values: dict[str, Any] = {}
        for name, default in asdict(cls()).items():
            raw = os.environ.get(f"UNIQUE_{name.upper()}")
            if raw is not None:
                values[name] = type(default)(raw)
        return cls(**values)


def events_key(namespace: str) -> str:
    return f"{namespace}:test:events"


def gate_key(namespace: str, key: str) -> str:
    return f"{namespace}:test:gate:{key}"


def by_key(key: str, mode: str = "ok") -> str:
    return key


def build(url: str, namespace: str, settings: Settings) -> tuple[TaskRunner, Task[[str, str], str]]:
    """A runner with one unique task, ``guarded``, configured by ``settings``."""
    tr = TaskRunner(
        url,
        namespace=namespace,
        retry_delay=settings.retry_delay,
        heartbeat_interval=settings.heartbeat_interval,
        stale_after=settings.stale_after,
        lock_ttl=settings.lock_ttl,
    )
    reschedule = settings.reschedule_delay if settings.on_conflict == "reschedule" else None

    @tr.task(
        name="guarded",
        lock=cast(LockKind, settings.lock),
        on_conflict=cast(ConflictStrategy, settings.on_conflict),
        max_retries=settings.max_retries,
        unique_args=by_key,
        reschedule_delay=reschedule,
    )
    async def guarded(key: str, mode: str = "ok") -> str:
        job = current_job()
        redis = tr.client.redis
        await redis.rpush(events_key(namespace), f"start {job.id} {job.attempt}")
        if mode == "gate":
            # The gate is opened by another process: poll the key.
            while (gate := await redis.get(gate_key(namespace, key))) is None:  # noqa: ASYNC110
                await anyio.sleep(0.02)
            if gate == "fail":
                raise ValueError(f"gate {key} says fail")
        await redis.rpush(events_key(namespace), f"end {job.id}")
        return "done"

    return tr, guarded


def _from_env() -> tuple[TaskRunner, Task[[str, str], str], str]:
    namespace = os.environ["TEST_NAMESPACE"]
    tr, guarded = build(os.environ["TASKRUNNER_REDIS_URL"], namespace, Settings.from_env())
    return tr, guarded, namespace


async def work() -> None:
    tr, _, _ = _from_env()
    await tr.worker(concurrency=4).run()


async def produce(count: int) -> None:
    """Wait for the go key, then enqueue ``guarded("same")`` ``count`` times at once."""
    tr, guarded, namespace = _from_env()
    async with tr:
        redis: Redis = tr.client.redis
        print(json.dumps({"ready": True}), flush=True)
        while not await redis.exists(f"{namespace}:test:go"):  # noqa: ASYNC110 - other process
            await anyio.sleep(0.001)

        async def one() -> dict[str, Any]:
            try:
                job = await guarded.enqueue("same", "ok")
            except LockConflictError as exc:
                return {"conflict": exc.holder}
            return {"id": job.id, "deduplicated": job.deduplicated}

        results = await asyncio.gather(*(one() for _ in range(count)))
    for result in results:
        print(json.dumps(result), flush=True)


async def flood() -> None:
    """Enqueue distinct unique jobs (delayed, so nothing runs them) until killed."""
    tr, guarded, _ = _from_env()
    async with tr:
        print(json.dumps({"ready": True}), flush=True)
        n = 0
        while True:
            calls = [guarded.options(delay=3600).call(f"k{n + i}", "ok") for i in range(50)]
            await tr.enqueue_many(calls)
            n += 50


def main(argv: list[str]) -> None:
    command = argv[1]
    if command == "worker":
        anyio.run(work)
    elif command == "produce":
        anyio.run(produce, int(argv[2]))
    elif command == "flood":
        anyio.run(flood)
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv)
