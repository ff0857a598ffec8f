"""Cron with real worker processes: one job per tick whatever the number of workers,
through a SIGKILL and a restart, and ``max_drift`` after every worker was down.

Workers run ``tests/apps/cron_app.py`` (``every-second``: ``* * * * * *``), which counts
each execution of each tick's job in ``{ns}:test:cron-runs``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import cast

import anyio
from apps.cron_app import runs_key
from conftest import StartWorker, wait_until
from redis.asyncio import Redis
from workerproc import CliWorker

from taskrunner.keys import QueueKeys

APP = "apps.cron_app:tr"
PREFIX = "cron:every-second:"


def tick_of(job_id: str) -> int:
    return int(job_id.removeprefix(PREFIX))


async def runs(redis: Redis, namespace: str) -> dict[int, int]:
    """Executions per tick (epoch seconds) of every-second's jobs."""
    found = cast(dict[str, str], await redis.hgetall(runs_key(namespace)))
    return {tick_of(job): int(n) for job, n in found.items()}


async def at_half_second() -> None:
    """Sleep until the middle of a second: ticks (and their jobs) are at its start."""
    await anyio.sleep((1.5 - time.time() % 1) % 1)


async def owner_of(redis: Redis, keys: QueueKeys, workers: list[CliWorker]) -> CliWorker:
    """The worker that handled the last tick (worker ids are ``host:pid:random``)."""
    handled_by = await redis.hget(keys.cron("every-second"), "worker")
    assert isinstance(handled_by, str)
    pid = int(handled_by.split(":")[1])
    return next(w for w in workers if w.pid == pid)


async def start_ready(cli_workers: StartWorker, count: int) -> list[CliWorker]:
    workers = [cli_workers(APP, "--concurrency", "4") for _ in range(count)]
    for worker in workers:
        await worker.ready()
    return workers


async def test_three_workers_one_killed_and_restarted_run_each_tick_once(
    cli_workers: StartWorker, redis: Redis, namespace: str
) -> None:
    workers = await start_ready(cli_workers, 3)
    began = time.time()
    keys = QueueKeys(namespace, "default")
    await anyio.sleep(7)
    await at_half_second()  # no tick's job is running now: the kill interrupts none
    owner = await owner_of(redis, keys, workers)  # the one that fires at each tick
    owner.kill()
    await anyio.sleep(6)
    assert await owner_of(redis, keys, workers) is not owner  # another took over
    workers.append(cli_workers(APP, "--concurrency", "4"))
    await workers[-1].ready()
    await anyio.sleep(max(0.0, began + 20 - time.time()))
    ended = int(time.time())
    alive = [w for w in workers if w is not owner]
    for worker in alive:
        worker.terminate()
    for worker in alive:
        assert await worker.exited() == 0, worker.output()

    found = await runs(redis, namespace)
    ticks = sorted(found)
    assert ticks[0] <= int(began) + 2, ticks  # from the start (a worker's first tick
    assert ticks[-1] >= ended - 1, ticks  #     may wait out the handover) to the end
    assert ticks == list(range(ticks[0], ticks[-1] + 1)), "a tick was not enqueued"
    assert len(ticks) >= 19
    doubles = {t: n for t, n in found.items() if n != 1}
    assert doubles == {}, f"ticks run more than once: {doubles}"
    assert await redis.xlen(keys.stream) == 0  # nothing left over: no second job per tick
    state = await redis.hgetall(keys.cron("every-second"))
    assert int(state["last"]) // 1000 >= ticks[-1]
    assert state["job"] == f"{PREFIX}{int(state['fired']) // 1000}"


async def test_ticks_missed_while_every_worker_was_down_run_within_max_drift_only(
    cli_workers: StartWorker, redis: Redis, namespace: str, tmp_path: Path
) -> None:
    env = {"TEST_CRON_MAX_DRIFT": "3"}
    first = cli_workers(APP, env=env)
    await first.ready()

    async def ran_once() -> bool:
        return len(await runs(redis, namespace)) >= 2

    await wait_until(ran_once, timeout=20)
    await at_half_second()
    first.kill()
    down = await runs(redis, namespace)
    last_before = max(down)
    await anyio.sleep(8)  # every worker down: 8 ticks missed, 3 of them within max_drift
    second = cli_workers(APP, env=env)
    await second.ready()
    restarted = int(time.time())

    async def caught_up() -> bool:
        return max(await runs(redis, namespace)) >= restarted

    await wait_until(caught_up, timeout=20)
    after = sorted(t for t in await runs(redis, namespace) if t > last_before)
    missed = [t for t in range(last_before + 1, restarted - 4)]
    assert missed, (last_before, restarted)
    assert not set(missed) & set(after), "a tick older than max_drift was replayed"
    assert after[0] >= restarted - 4, (after, restarted)  # the replayed ones: within 3 s
    await second.logged("skipped the ticks from")
    assert "more than max_drift=3s late" in second.output()
