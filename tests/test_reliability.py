"""No job lost, none run twice at once: real worker processes, SIGKILL, blocked loops.

Workers run ``tests/apps/reliability_app.py`` in subprocesses with a 0.2 s heartbeat
and ``stale_after`` = 1 s. Tasks record each execution start in Redis
(``{ns}:test:runs:<job id>``: ``<pid> <attempt> <epoch ms>``) so runs are counted
from the outside. The helpers here (``WorkerProcess``, ``Spawn``) are shared with
the other reliability test modules.
"""

from __future__ import annotations

import contextlib
import random
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import anyio
import pytest
from conftest import subprocess_env, wait_until
from redis.asyncio import Redis

from taskrunner import ConfigurationError, JobStatus, TaskRunner
from taskrunner.keys import GROUP, QueueKeys
from taskrunner.middleware.lease import LeaseMiddleware, ack_deleted, parse_autoclaim

MakeRunner = Callable[..., TaskRunner]
ALL = pytest.mark.topologies("standalone", "cluster", "sentinel")
"""Every scenario with Redis in it runs on each topology; the two checks of pure
functions (configuration, reply parsing) run once."""
DEADLINE = 30.0
HEARTBEAT = 0.2
STALE = 1.0
HOST = socket.gethostname()


# -- helpers shared by the reliability test modules ----------------------------------------


class WorkerProcess:
    """A ``python -m apps.reliability_app worker`` process, its output in a file."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log = log
        self._file = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "apps.reliability_app", "worker"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._file,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def consumer_prefix(self) -> str:
        """Worker ids are ``host:pid:random``."""
        return f"{HOST}:{self.pid}:"

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def ready(self, timeout: float = DEADLINE) -> None:
        async def up() -> bool:
            if not self.alive:
                raise AssertionError(f"worker exited early:\n{self.output()}")
            return " ready: " in self.output()

        await wait_until(up, timeout, interval=0.05)

    async def logged(self, *texts: str, timeout: float = DEADLINE) -> None:
        """Wait until the log has any of ``texts``."""

        async def found() -> bool:
            output = self.output()
            return any(text in output for text in texts)

        await wait_until(found, timeout, interval=0.05)

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=DEADLINE)

    async def exited(self, timeout: float = DEADLINE) -> int:
        async def done() -> bool:
            return not self.alive

        await wait_until(done, timeout, interval=0.05)
        return self.proc.returncode

    def close(self) -> None:
        if self.alive:
            self.proc.kill()
        self.proc.wait(timeout=DEADLINE)
        self._file.close()


class Spawn(Protocol):
    def __call__(self, url: str | None = None, **settings: Any) -> WorkerProcess: ...


@pytest.fixture
def spawn(redis_url: str, namespace: str, tmp_path: Path) -> Iterator[Spawn]:
    yield from spawn_workers(redis_url, namespace, tmp_path)


def spawn_workers(redis_url: str, namespace: str, tmp_path: Path) -> Iterator[Spawn]:
    """The ``spawn`` fixture: start worker processes (``TEST_*`` settings as keyword
    arguments); all are killed at the end of the test and their output printed."""
    started: list[WorkerProcess] = []

    def start(url: str | None = None, **settings: Any) -> WorkerProcess:
        env = subprocess_env(url or redis_url, namespace)
        env["TEST_HEARTBEAT"] = str(HEARTBEAT)
        env["TEST_STALE"] = str(STALE)
        for name, value in settings.items():
            env[f"TEST_{name.upper()}"] = str(value)
        worker = WorkerProcess(env, tmp_path / f"worker-{len(started)}.log")
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.close()
        print(f"--- worker {worker.pid} (exit {worker.proc.returncode}) ---\n{worker.output()}")


@dataclass(frozen=True)
class Run:
    pid: int
    attempt: int
    started_ms: int


async def runs(redis: Redis, namespace: str, job_id: str) -> list[Run]:
    rows = await redis.lrange(f"{namespace}:test:runs:{job_id}", 0, -1)
    return [Run(*(int(x) for x in row.split())) for row in rows]


def count_runs(redis: Redis, namespace: str, job_id: str, n: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return len(await runs(redis, namespace, job_id)) >= n

    return check


def has_status(tr: TaskRunner, job_id: str, *statuses: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await tr.job(job_id).status() in statuses

    return check


async def pending(redis: Redis, namespace: str, queue: str = "default") -> list[dict[str, Any]]:
    """The pending entries of ``queue``'s default-level streams, over every partition the
    queue records (a Cluster queue has one per master)."""
    meta = await redis.hget(QueueKeys(namespace, queue).meta, "max_partitions")
    found: list[dict[str, Any]] = []
    for partition in range(int(meta or 1)):
        stream = QueueKeys(namespace, queue, partition).stream
        if await redis.exists(stream):
            found += await redis.xpending_range(stream, GROUP, "-", "+", 100)
    return found


def producer(make_runner: MakeRunner) -> tuple[TaskRunner, Any, Any]:
    """A runner in the test process declaring the app's ``hold`` and ``blocker``."""
    tr = make_runner(heartbeat_interval=HEARTBEAT, stale_after=STALE)

    @tr.task(name="hold")
    async def hold(first: float, later: float) -> str:
        raise NotImplementedError

    @tr.task(name="blocker")
    async def blocker(mode: str) -> str:
        raise NotImplementedError

    return tr, hold, blocker


@contextlib.asynccontextmanager
async def connected(tr: TaskRunner) -> AsyncIterator[TaskRunner]:
    async with tr:
        yield tr


# -- 1. a killed worker's job re-runs once, after stale_after ------------------------------


@ALL
async def test_killed_worker_job_reruns_once_after_stale_after(
    make_runner: MakeRunner, spawn: Spawn, redis: Redis, namespace: str
) -> None:
    tr, hold, _ = producer(make_runner)
    async with connected(tr):
        first = spawn()
        await first.ready()
        job = await hold.enqueue(3600.0, 0.0)
        await wait_until(count_runs(redis, namespace, job.id, 1), DEADLINE)
        second = spawn()
        await second.ready()

        first.kill()  # SIGKILL mid-job: no hand-back, no commit
        [entry] = await pending(redis, namespace)
        seconds, micros = await redis.time()
        last_beat_ms = seconds * 1000 + micros // 1000 - int(entry["time_since_delivered"])

        assert await job.result(timeout=DEADLINE) == f"{second.pid}:2"
        done = await runs(redis, namespace, job.id)
        assert [(r.pid, r.attempt) for r in done] == [(first.pid, 1), (second.pid, 2)]
        assert done[1].started_ms - last_beat_ms >= STALE * 1000
        info = await job.info()
        assert (info.status, info.attempts, info.reclaims) == (JobStatus.SUCCEEDED, 2, 1)
        assert info.worker is not None
        assert info.worker.startswith(second.consumer_prefix)
        assert await pending(redis, namespace) == []  # nothing left that could run again


# -- 2. a heartbeating job is never reclaimed --------------------------------------------


@ALL
async def test_job_running_ten_times_stale_after_is_never_reclaimed(
    make_runner: MakeRunner, spawn: Spawn, redis: Redis, namespace: str
) -> None:
    tr, hold, _ = producer(make_runner)
    async with connected(tr):
        workers = [spawn(concurrency=2), spawn(concurrency=2)]
        for worker in workers:
            await worker.ready()
        jobs = [await hold.enqueue(10 * STALE, 0.0) for _ in range(4)]
        results = [await job.result(timeout=10 * STALE + DEADLINE) for job in jobs]

        pids = {int(result.split(":")[0]) for result in results}
        assert pids == {w.pid for w in workers}  # both workers held long jobs
        assert all(result.endswith(":1") for result in results)
        for job in jobs:
            assert len(await runs(redis, namespace, job.id)) == 1
            info = await job.info()
            assert (info.attempts, info.reclaims) == (1, 0)
        for worker in workers:
            assert "reclaiming" not in worker.output()


# -- 3. a blocked event loop loses its lease; its late writes are refused ---------------------


@ALL
@pytest.mark.parametrize("mode", ["return", "await"])
async def test_blocked_worker_loses_its_lease_and_its_late_writes_are_refused(
    make_runner: MakeRunner, spawn: Spawn, redis: Redis, namespace: str, mode: str
) -> None:
    """``return``: the woken task returns at once, so its ack and result are refused;
    ``await``: it keeps running, so its heartbeat is refused and cancels it. Either way
    the entry stays with the reclaimer, whose result is final."""
    tr, _, blocker = producer(make_runner)
    async with connected(tr):
        blocked = spawn()
        await blocked.ready()
        job = await blocker.enqueue(mode)
        await wait_until(count_runs(redis, namespace, job.id, 1), DEADLINE)
        rescuer = spawn()
        await rescuer.ready()
        await wait_until(count_runs(redis, namespace, job.id, 2), DEADLINE)
        info = await job.info()
        assert (info.status, info.attempts, info.reclaims) == (JobStatus.RUNNING, 2, 1)

        await redis.set(f"{namespace}:test:release:{job.id}", 1)  # wake the blocked loop
        if mode == "return":
            # When the loop wakes, the task's return and the overdue heartbeat are both
            # ready to run, in either order: the commit is refused, or the heartbeat is
            # refused first and cancels the copy before it commits. Nothing is written
            # either way (checked below).
            await blocked.logged("lost its lease; its succeeded was not recorded", "lease lost")
        else:
            await blocked.logged("lease lost")
            events = f"{namespace}:test:events"

            async def cancelled() -> bool:
                return f"cancelled {job.id} {blocked.pid}" in await redis.lrange(events, 0, -1)

            await wait_until(cancelled, DEADLINE)
        # The late writes changed nothing: still running, entry still the rescuer's.
        assert await job.status() == JobStatus.RUNNING
        [entry] = await pending(redis, namespace)
        assert str(entry["consumer"]).startswith(rescuer.consumer_prefix)

        await redis.rpush(f"{namespace}:test:finish:{job.id}", 1)
        assert await job.result(timeout=DEADLINE) == f"second:{rescuer.pid}"
        assert len(await runs(redis, namespace, job.id)) == 2
        assert blocked.alive  # losing a lease is not fatal


# -- shutdown hand-back ----------------------------------------------------------------------


@ALL
async def test_jobs_cancelled_at_end_of_grace_period_are_claimable_at_once(
    make_runner: MakeRunner, spawn: Spawn, redis: Redis, namespace: str
) -> None:
    # stale_after is long: a re-run before it proves the hand-back, not a reclaim.
    tr = make_runner(heartbeat_interval=1.0, stale_after=120.0)

    @tr.task(name="hold")
    async def hold(first: float, later: float) -> str:
        raise NotImplementedError

    async with tr:
        first = spawn(grace=0.2, heartbeat=1.0, stale=120.0)
        await first.ready()
        job = await hold.enqueue(3600.0, 3600.0)
        await wait_until(count_runs(redis, namespace, job.id, 1), DEADLINE)
        first.signal(signal.SIGTERM)
        assert await first.exited() == 0
        assert await job.status() == JobStatus.QUEUED
        assert await pending(redis, namespace) == []  # new entry, not pending: claimable

        second = spawn(heartbeat=1.0, stale=120.0)
        await wait_until(count_runs(redis, namespace, job.id, 2), DEADLINE)
        [_, rerun] = await runs(redis, namespace, job.id)
        assert rerun.pid == second.pid
        info = await job.info()
        assert info.reclaims == 0


# -- configuration and the reclaim reply --------------------------------------------------


def test_stale_after_below_twice_the_heartbeat_interval_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="at least twice"):
        TaskRunner("redis://unused", heartbeat_interval=1.0, stale_after=1.9)
    with pytest.raises(ConfigurationError, match="positive"):
        LeaseMiddleware(heartbeat_interval=0, stale_after=1.0)
    assert LeaseMiddleware(heartbeat_interval=1.0, stale_after=2.0).stale_after == 2.0


def test_xautoclaim_reply_of_redis_7_and_of_redis_6_2() -> None:
    # Redis 7: [cursor, entries, deleted ids] (deleted ids are already out of the PEL).
    seven = ["0-0", [("1-0", {"job": "a"})], ["2-0"]]
    assert parse_autoclaim(seven) == ("0-0", [("1-0", {"job": "a"})], 0)
    # Redis 6.2: [cursor, entries] with a nil per deleted entry (redis-py: (None, None)).
    six = ["5-0", [(None, None), ("3-0", {"job": "b"}), (None, None)]]
    assert parse_autoclaim(six) == ("5-0", [("3-0", {"job": "b"})], 2)
    assert parse_autoclaim(["0-0", []]) == ("0-0", [], 0)


@ALL
async def test_pending_ids_of_deleted_entries_are_acknowledged(
    redis: Redis, namespace: str
) -> None:
    """What Redis 6.2 leaves behind after XAUTOCLAIM returns nils: pending ids of
    deleted entries under the claiming consumer. ack_deleted drops them and only them."""
    keys = QueueKeys(namespace, "default")
    await redis.xgroup_create(keys.stream, GROUP, id="0", mkstream=True)
    gone = await redis.xadd(keys.stream, {"job": "gone"})
    kept = await redis.xadd(keys.stream, {"job": "kept"})
    await redis.xreadgroup(GROUP, "me", {keys.stream: ">"})
    await redis.xdel(keys.stream, gone)
    assert await ack_deleted(redis, keys.stream, "me", "-", "+") == 1
    left = await redis.xpending_range(keys.stream, GROUP, "-", "+", 10)
    assert [p["message_id"] for p in left] == [kept]


@ALL
async def test_reclaim_takes_every_stale_entry_page_by_page_and_drops_deleted_ones(
    make_runner: MakeRunner, redis: Redis, namespace: str
) -> None:
    """A dead consumer left 30 pending entries: 10 deleted from the stream (Redis 7
    reports them in the third reply element), 10 of finished jobs, 10 live. A worker
    with 4 slots reclaims page by page: every live job runs once, nothing else does."""
    # One partition: the dead consumer's entries are read by hand from its one stream.
    tr = make_runner(heartbeat_interval=HEARTBEAT, stale_after=STALE, partitions=1)
    seen: list[int] = []

    @tr.task
    async def item(n: int) -> None:
        seen.append(n)

    keys = QueueKeys(namespace, "default")
    async with tr:
        jobs = [await item.enqueue(n) for n in range(30)]
        await redis.xgroup_create(keys.stream, GROUP, id="0", mkstream=True)
        delivered = cast(Any, await redis.xreadgroup(GROUP, "dead-worker", {keys.stream: ">"}))
        for n, (entry_id, _) in enumerate(delivered[0][1]):
            if n % 3 == 0:
                await redis.xdel(keys.stream, entry_id)
            elif n % 3 == 1:
                await redis.hset(keys.job(jobs[n].id), "status", "aborted")

        async def all_stale() -> bool:
            entries = await pending(redis, namespace)
            return all(int(e["time_since_delivered"]) > STALE * 1000 for e in entries)

        await wait_until(all_stale, DEADLINE)
        async with tr.worker(handle_signals=False, concurrency=4):

            async def drained() -> bool:
                return len(seen) >= 10 and await pending(redis, namespace) == []

            await wait_until(drained, DEADLINE)
        assert sorted(seen) == [n for n in range(30) if n % 3 == 2]
        for n in range(2, 30, 3):
            info = await jobs[n].info()
            assert (info.status, info.attempts, info.reclaims) == (JobStatus.SUCCEEDED, 1, 0)


# -- 7. chaos: workers SIGKILLed and restarted while 2,000 jobs run ------------------------


@ALL
async def test_chaos_killing_workers_loses_nothing_and_commits_each_job_once(
    make_runner: MakeRunner, spawn: Spawn, redis: Redis, namespace: str
) -> None:
    tr, hold, _ = producer(make_runner)
    rng = random.Random(7)
    async with tr:
        workers = [spawn(concurrency=40) for _ in range(3)]
        jobs = await tr.enqueue_many([hold.call(0.3, 0.3) for _ in range(2000)])
        kills = 0
        deadline = anyio.current_time() + 20
        while anyio.current_time() < deadline:
            await anyio.sleep(1.0)  # the chaos schedule, not a synchronisation
            victim = rng.randrange(len(workers))
            workers[victim].kill()
            workers[victim] = spawn(concurrency=40)
            kills += 1

        results = [await job.result(timeout=120) for job in jobs]  # none lost
        reruns = 0
        pipe = redis.pipeline(transaction=False)
        for job in jobs:
            pipe.lrange(f"{namespace}:test:runs:{job.id}", 0, -1)
            home = tr.client.cached("default").for_id(job.id)  # on a cluster, of N partitions
            pipe.hmget(home.job(job.id), "attempts", "lease")
        replies = await pipe.execute()
        for result, started, (attempts, lease) in zip(
            results, replies[::2], replies[1::2], strict=True
        ):
            pid, attempt = (int(x) for x in result.split(":"))
            last = started[-1].split()
            # The one committed outcome is the last attempt's, and its lease is spent.
            assert (int(last[0]), int(last[1])) == (pid, attempt)
            assert attempt == int(attempts)
            assert lease == ""
            reruns += len(started) - 1
        assert await pending(redis, namespace) == []
        print(f"chaos: {kills} kills, {reruns} re-runs of 2000 jobs")
