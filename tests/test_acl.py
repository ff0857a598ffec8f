"""The ACL user docs/deployment.md tells operators to create, on a real redis-server.

The ACL line is read from the docs page itself, so the documented line and the tested
one cannot drift apart. Under that user (and nothing more), over plain TCP and over TLS
with client certificates, every feature works: enqueue (plain, delayed, batched,
unique, limited), a worker run with retries, a reclaim after a worker process is
SIGKILLed, abort, progress, cron, pause and resume, info, the admin listings, and the
dead letters (list, retry, delete, purge). The server's ACL LOG must then hold no
denial but CONFIG GET, which the docs leave out on purpose: any other refused command
that taskrunner tolerates (a skipped check) would show there.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis
from apps.acl_app import declare, runner
from conftest import subprocess_env, wait_until
from redisbin import RedisBinary, available_binaries, binaries_under_test
from redisproc import RedisProcess
from tlsfiles import make_tls_files
from workerproc import CliWorker

from taskrunner import (
    Job,
    JobAborted,
    JobDeadLettered,
    JobStatus,
    Task,
    TaskRunner,
    current_job,
    scripts,
)
from taskrunner.cli.info import gather, table

DOCS = Path(__file__).resolve().parents[1] / "docs" / "deployment.md"
DEADLINE = 60.0


def documented_acl() -> str:
    """The one ``user taskrunner ...`` line of docs/deployment.md."""
    found = [
        line.strip()
        for line in DOCS.read_text().splitlines()
        if line.strip().startswith("user taskrunner ")
    ]
    assert len(found) == 1, f"docs/deployment.md must show one ACL line, found {found}"
    return found[0]


SHARDED = ("+spublish", "+ssubscribe", "+sunsubscribe")
"""Sharded pub/sub (Redis 7): the docs say to leave these out on Redis 6.2."""


def acl_for(binary: RedisBinary) -> str:
    """The documented line as the docs say to use it on this server version."""
    line = documented_acl()
    if binary.version >= (7,):
        return line
    return " ".join(word for word in line.split() if word not in SHARDED)


def documented_password(line: str) -> str:
    [password] = [word[1:] for word in shlex.split(line) if word.startswith(">")]
    return password


def test_the_documented_acl_line_grants_only_named_commands_and_the_namespace() -> None:
    words = documented_acl().split()
    assert words[:4] == ["user", "taskrunner", "reset", "on"]  # nothing inherited
    assert "resetchannels" in words  # Redis 6.2's reset leaves every channel allowed
    assert set(SHARDED) <= set(words)
    assert f"On Redis 6.2, leave out `{' '.join(SHARDED)}`" in DOCS.read_text()
    assert {w for w in words if w[0] in "~&%"} == {"~taskrunner:*", "&taskrunner:*"}
    assert not [w for w in words if w.startswith("+@")]  # commands, not categories


def tls_binary() -> RedisBinary:
    found = [b for b in available_binaries() if b.tls]
    if not found:
        pytest.skip(f"no redis-server here is built with TLS: {available_binaries()}")
    return found[0]


CASES = [pytest.param((b, False), id=f"{b.name}-acl") for b in binaries_under_test()]


@pytest.fixture(params=[*CASES, pytest.param((None, True), id="acl+tls")])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RedisProcess]:
    binary, tls = request.param
    if tls:
        binary = tls_binary()
    files = make_tls_files(tmp_path / "tls") if tls else None
    with RedisProcess(
        tmp_path / "redis",
        binary=binary.path,
        tls=files,
        tls_auth_clients="yes",
        acl=[acl_for(binary)],
    ) as started:
        yield started


def denials(server: RedisProcess) -> list[str]:
    """The commands the server refused (its ACL LOG); fails on a refused key or channel."""
    admin = redis.Redis(**server.client_kwargs(), decode_responses=True)
    try:
        entries: list[dict[str, Any]] = admin.acl_log()
    finally:
        admin.close()
    assert {e.get("reason") for e in entries} <= {"command"}, entries  # no key or channel
    return [str(e.get("object")) for e in entries]


@dataclass
class Features:
    """Tasks that use every feature, declared on the worker's runner."""

    flaky: Task[[], int]
    waits: Task[[], None]
    report: Task[[str], str]
    exclusive: Task[[int], int]
    limited: Task[[int], int]
    progressing: Task[[], str]
    ticks: list[int] = field(default_factory=list)
    gate: anyio.Event = field(default_factory=anyio.Event)


def declare_features(tr: TaskRunner) -> Features:
    @tr.task(max_retries=1)
    async def flaky() -> int:
        if current_job().attempt == 1:
            raise ValueError("first attempt fails")
        return current_job().attempt

    @tr.task
    async def waits() -> None:
        await features.gate.wait()

    @tr.task(lock="until_executed")
    async def report(account: str) -> str:
        return account

    @tr.task(lock="while_executing", on_conflict="reschedule", reschedule_delay=0.05)
    async def exclusive(n: int) -> int:
        return n

    @tr.task(concurrency_limit=1, rate_limit="100/s")
    async def limited(n: int) -> int:
        return n

    @tr.task(priority="high")
    async def progressing() -> str:
        await current_job().set_progress(0.5)
        return "done"

    @tr.cron("* * * * * *", name="every-second")
    async def tick() -> None:
        features.ticks.append(1)

    features = Features(flaky, waits, report, exclusive, limited, progressing)
    return features


async def held_by_a_killed_worker(url: str, log: Path, hold: Task[[], int]) -> Job[int]:
    """A job that a worker process took and was SIGKILLed running."""
    worker = CliWorker("apps.acl_app:tr", subprocess_env(url, "taskrunner"), log)
    try:
        worker.start("--concurrency", "2")
        await worker.logged(" ready: ")
        held = await hold.enqueue()
        await wait_until(lambda: _running(held), DEADLINE)
        worker.kill()
    finally:
        worker.close()
    return held


async def test_every_feature_works_under_the_documented_acl_user(
    server: RedisProcess, tmp_path: Path
) -> None:
    url = server.url_for("taskrunner", documented_password(documented_acl()))
    with pytest.raises(redis.exceptions.NoPermissionError):
        redis.Redis.from_url(url).flushall()  # the user really is restricted
    tr = runner(url)
    tasks = declare(tr)
    f = declare_features(tr)
    producer = runner(url)

    @producer.task(name="ghost")  # no worker declares it: dead-lettered
    async def ghost() -> None: ...

    async with tr, producer:
        held = await held_by_a_killed_worker(url, tmp_path / "w.log", tasks.hold)
        many = await tr.enqueue_many([tasks.add.call(i, i) for i in range(20)])
        later = await tasks.add.options(delay=0.3).enqueue(2, 3)
        retried = await f.flaky.enqueue()
        waiting = await f.waits.enqueue()
        unique = [await f.report.enqueue("acct-1") for _ in range(3)]
        exclusives = [await f.exclusive.enqueue(1) for _ in range(3)]
        limits = [await f.limited.enqueue(n) for n in range(3)]
        progress = await f.progressing.enqueue()
        dead = [await ghost.enqueue() for _ in range(3)]
        await tr.pause("default")
        await tr.resume("default")

        async with tr.worker(concurrency=10, handle_signals=False):
            assert await held.result(timeout=DEADLINE) == 2  # reclaimed, run again
            assert (await held.info()).reclaims == 1
            assert [await j.result(timeout=DEADLINE) for j in many] == [2 * i for i in range(20)]
            assert await later.result(timeout=DEADLINE) == 5
            assert await retried.result(timeout=DEADLINE) == 2
            assert sum(not j.deduplicated for j in unique) == 1
            assert await unique[0].result(timeout=DEADLINE) == "acct-1"
            assert [await j.result(timeout=DEADLINE) for j in exclusives] == [1, 1, 1]
            assert [await j.result(timeout=DEADLINE) for j in limits] == [0, 1, 2]
            assert await progress.result(timeout=DEADLINE) == "done"
            assert (await progress.info()).progress == 0.5
            await wait_until(lambda: _running(waiting), DEADLINE)
            assert await waiting.abort() == JobStatus.RUNNING
            with pytest.raises(JobAborted):
                await waiting.result(timeout=DEADLINE)
            await wait_until(lambda: _true(bool(f.ticks)), DEADLINE)
            await check_operations(tr, held.id)
            await check_dead_letters(tr, producer, [job.id for job in dead])
    # Refused on purpose (docs/deployment.md): CONFIG GET, which would show the
    # server's passwords (a worker then skips its maxmemory-policy warning), and the
    # CLIENT SETINFO redis-py sends on connect (it ignores the refusal; Redis 7.0 has
    # no such subcommand, so only 6.2 and 7.2+ log it). And the FLUSHALL tried above.
    refused = {name.split("|")[0] for name in denials(server)}
    assert refused - {"client"} == {"config", "flushall"}


async def check_operations(tr: TaskRunner, job_id: str) -> None:
    found = await gather(tr, ["default"])
    assert found.queues["default"].dead == 3
    assert table(found).splitlines()[0].startswith("QUEUE")
    assert (await tr.admin.jobs(queue="default", limit=50)).jobs
    assert await tr.admin.workers()
    assert (await tr.admin.job(job_id)).id == job_id


async def check_dead_letters(tr: TaskRunner, producer: TaskRunner, ids: list[str]) -> None:
    for job_id in ids:
        with pytest.raises(JobDeadLettered, match="unknown task"):
            await producer.job(job_id).result(timeout=DEADLINE)
    assert sorted(info.id for info in await tr.dead_letters()) == sorted(ids)
    assert await tr.retry_dead([ids[0]]) == 1
    await wait_until(lambda: _dead(tr, 3), DEADLINE)  # dead again: still unknown
    assert await tr.delete_dead([ids[1]]) == 1
    assert await tr.purge_dead() == 2
    assert await tr.dead_letters() == []


async def _true(value: bool) -> bool:
    return value


async def _running(job: Any) -> bool:
    return bool(await job.status() == JobStatus.RUNNING)


async def _dead(tr: TaskRunner, n: int) -> bool:
    return len(await tr.dead_letters()) == n


def test_the_docs_name_the_acl_user_and_password_placeholder() -> None:
    line = documented_acl()
    assert re.search(r"\s>\S+", line), "the ACL line sets a password"


async def test_an_acl_user_without_script_exists_still_gets_the_scripts_loaded(
    tmp_path: Path,
) -> None:
    """An ACL written from an older docs/deployment.md (no +script|exists): loading the
    scripts falls back to loading them all, and the scripts run."""
    binary = binaries_under_test()[0]
    line = " ".join(w for w in acl_for(binary).split() if w != "+script|exists")
    with RedisProcess(tmp_path / "redis", binary=binary.path, acl=[line]) as server:
        url = server.url_for("taskrunner", documented_password(line))
        client = redis.asyncio.Redis.from_url(url)
        try:
            await scripts.load_all(client)
            shas = [s.sha for s in scripts.ALL]
            assert server_scripts_present(server, shas)
        finally:
            await client.aclose()


def server_scripts_present(server: RedisProcess, shas: list[str]) -> bool:
    admin = redis.Redis(**server.client_kwargs())
    try:
        return all(admin.script_exists(*shas))
    finally:
        admin.close()
