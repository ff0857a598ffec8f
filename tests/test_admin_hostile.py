"""The operations surfaces on hostile data in Redis (anything there may be hostile):
``taskrunner job``, ``jobs``, ``dead-letters``, ``retry-dead``, ``purge-dead``,
``info`` and ``cron`` print one line and exit non-zero on errors (never a traceback), listings show
a bad row sanely, and the dashboard never answers 500 because of data. Real
redis-server, real ``taskrunner`` processes, the dashboard over httpx."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from conftest import subprocess_env
from redis.asyncio import Redis

from taskrunner import JobFailed, JobStatus, TaskRunner, TaskrunnerError
from taskrunner.dashboard import dashboard
from taskrunner.dashboard.pages import UNREADABLE
from taskrunner.keys import QueueKeys

APP = "apps.cli_app:tr"
DEADLINE = 60.0
TASKRUNNER = str(Path(sys.executable).with_name("taskrunner"))
DEEP = "[" * 100_000
MakeRunner = Callable[..., TaskRunner]


@pytest.fixture
def env(redis_url: str, namespace: str) -> dict[str, str]:
    found = subprocess_env(redis_url, namespace)
    for key in [k for k in found if k.startswith("TASKRUNNER_") and k != "TASKRUNNER_REDIS_URL"]:
        del found[key]
    return found


@pytest.fixture
def keys(namespace: str) -> QueueKeys:
    return QueueKeys(namespace, "default")


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TASKRUNNER, *args], env=env, capture_output=True, text=True, timeout=DEADLINE, check=False
    )


def assert_no_traceback(done: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stdout, done.stdout[-2000:]


def now_ms() -> int:
    return int(time.time() * 1000)


def job_hash(status: str, **fields: str) -> dict[str, str | int]:
    found: dict[str, str | int] = {
        "status": status,
        "task": "add",
        "queue": "default",
        "args": '{"x": 1, "y": 2}',
        "enqueued": now_ms(),
        "attempts": 1,
        "finished": now_ms(),
        "error": '{"type": "ValueError", "message": "boom", "traceback": ""}',
    }
    found.update(fields)
    return found


async def put_job(
    redis: Redis, keys: QueueKeys, job_id: str, status: str, index: str, **fields: str
) -> None:
    await redis.hset(keys.job(job_id), mapping=job_hash(status, **fields))  # type: ignore[arg-type]
    await redis.zadd(index, {job_id: now_ms()})


@asynccontextmanager
async def dashboard_client(tr: TaskRunner) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=dashboard(tr, poll_seconds=0), raise_app_exceptions=False)
    async with tr, httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


def build(make_runner: MakeRunner) -> TaskRunner:
    tr = make_runner(max_retries=0)

    @tr.task(name="add")
    async def add(x: int, y: int) -> int:
        return x + y

    return tr


# -- deeply nested JSON in a job's fields ------------------------------------------------------


@pytest.mark.parametrize("field", ["progress", "args"])
async def test_job_and_jobs_commands_show_a_job_with_deeply_nested_json(
    env: dict[str, str], redis: Redis, keys: QueueKeys, field: str
) -> None:
    await put_job(redis, keys, "good", "failed", keys.failed)
    await put_job(redis, keys, "deep", "failed", keys.failed, **{field: DEEP})
    shown = cli(env, "job", APP, "deep")
    assert_no_traceback(shown)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "status      failed" in shown.stdout
    as_json = json.loads(cli(env, "job", APP, "deep", "--json").stdout)
    assert as_json[field] == DEEP  # not JSON that can be decoded: shown as its text
    listed = cli(env, "jobs", APP, "--status", "failed", "--json")
    assert_no_traceback(listed)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert {j["id"] for j in json.loads(listed.stdout)["jobs"]} == {"good", "deep"}
    table = cli(env, "jobs", APP)
    assert table.returncode == 0, table.stderr[-2000:]
    assert "deep" in table.stdout
    assert "good" in table.stdout


async def test_admin_reads_a_succeeded_job_with_a_deeply_nested_result(
    make_runner: MakeRunner, redis: Redis, keys: QueueKeys
) -> None:
    tr = build(make_runner)
    await put_job(redis, keys, "deep", "succeeded", keys.succeeded, result=DEEP, progress=DEEP)
    async with tr:
        detail = await tr.admin.job("deep")
        page = await tr.admin.jobs(status="succeeded")
    assert (detail.status, detail.result, detail.progress) == (JobStatus.SUCCEEDED, DEEP, DEEP)
    assert [j.id for j in page.jobs] == ["deep"]


@pytest.mark.parametrize("field", ["progress", "args", "result"])
async def test_dashboard_jobs_and_job_page_answer_a_deeply_nested_field(
    make_runner: MakeRunner, redis: Redis, keys: QueueKeys, field: str
) -> None:
    tr = build(make_runner)
    status = "succeeded" if field == "result" else "failed"
    index = keys.succeeded if field == "result" else keys.failed
    await put_job(redis, keys, "deep", status, index, **{field: DEEP})
    async with dashboard_client(tr) as client:
        listing = await client.get("/jobs")
        page = await client.get("/jobs/default/deep")
    assert listing.status_code == 200
    assert "deep" in listing.text
    assert page.status_code == 200


# -- dead letters whose job key is not a hash, or whose score is infinite -------------------


async def wrong_type_dead_letter(redis: Redis, keys: QueueKeys) -> None:
    await put_job(redis, keys, "good", "dead", keys.dead)
    await redis.set(keys.job("bad"), "not a hash")
    await redis.zadd(keys.dead, {"bad": now_ms() + 1})


async def test_dead_letters_and_jobs_list_a_dead_letter_whose_job_key_is_not_a_hash(
    env: dict[str, str], redis: Redis, keys: QueueKeys
) -> None:
    await wrong_type_dead_letter(redis, keys)
    listed = cli(env, "dead-letters", APP)
    assert_no_traceback(listed)
    assert listed.returncode == 0, listed.stderr[-2000:]
    lines = listed.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == ["good", "bad"]
    assert "unreadable" in lines[1]
    jobs = cli(env, "jobs", APP, "--status", "dead", "--json")
    assert_no_traceback(jobs)
    assert jobs.returncode == 0, jobs.stderr[-2000:]
    rows = {j["id"]: j for j in json.loads(jobs.stdout)["jobs"]}
    assert set(rows) == {"good", "bad"}
    assert rows["bad"]["status"] == "dead"
    assert "unreadable" in rows["bad"]["error"]["message"]
    filtered = cli(env, "jobs", APP, "--status", "dead", "--task", "add", "--json")
    assert filtered.returncode == 0, filtered.stderr[-2000:]
    assert [j["id"] for j in json.loads(filtered.stdout)["jobs"]] == ["good"]


async def test_retry_dead_all_skips_a_dead_letter_whose_job_key_is_not_a_hash(
    env: dict[str, str], redis: Redis, keys: QueueKeys
) -> None:
    await wrong_type_dead_letter(redis, keys)
    done = cli(env, "retry-dead", APP, "--all")
    assert_no_traceback(done)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "revived 1 job(s)"
    assert await redis.zrange(keys.dead, 0, -1) == ["bad"]  # still there, to delete
    assert await redis.hget(keys.job("good"), "status") == "queued"


async def test_purge_and_delete_dead_remove_a_dead_letter_whose_job_key_is_not_a_hash(
    env: dict[str, str], redis: Redis, keys: QueueKeys
) -> None:
    await wrong_type_dead_letter(redis, keys)
    deleted = cli(env, "delete-dead", APP, "bad")
    assert_no_traceback(deleted)
    assert (deleted.returncode, deleted.stdout.strip()) == (0, "deleted 1 job(s)")
    await wrong_type_dead_letter(redis, keys)
    purged = cli(env, "purge-dead", APP, "--all")
    assert_no_traceback(purged)
    assert purged.returncode == 0, purged.stderr[-2000:]
    assert purged.stdout.strip() == "purged 2 job(s)"
    assert await redis.zcard(keys.dead) == 0


async def test_dashboard_dead_page_lists_a_dead_letter_whose_job_key_is_not_a_hash(
    make_runner: MakeRunner, redis: Redis, keys: QueueKeys
) -> None:
    tr = build(make_runner)
    await wrong_type_dead_letter(redis, keys)
    async with dashboard_client(tr) as client:
        page = await client.get("/dead")
        job = await client.get("/jobs/default/bad")
    assert page.status_code == 200
    assert "good" in page.text
    assert "unreadable" in page.text
    assert job.status_code != 500
    assert "WRONGTYPE" in job.text


@pytest.mark.parametrize("score", ["+inf", "-inf"])
async def test_dead_letters_retry_and_purge_take_a_dead_letter_with_an_infinite_score(
    env: dict[str, str], redis: Redis, keys: QueueKeys, score: str
) -> None:
    await put_job(redis, keys, "good", "dead", keys.dead)
    await redis.hset(keys.job("odd"), mapping=job_hash("dead"))  # type: ignore[arg-type]
    await redis.zadd(keys.dead, {"odd": score})
    listed = cli(env, "dead-letters", APP, "--limit", "1")
    assert_no_traceback(listed)
    assert listed.returncode == 0, listed.stderr[-2000:]
    cursor = listed.stderr.strip().split()[-1]
    rest = cli(env, "dead-letters", APP, "--limit", "1", "--cursor", cursor)
    assert rest.returncode == 0, rest.stderr[-2000:]
    seen = [line.split("\t")[0] for line in (listed.stdout + rest.stdout).splitlines()]
    assert sorted(seen) == ["good", "odd"]
    retried = cli(env, "retry-dead", APP, "--all")
    assert_no_traceback(retried)
    assert (retried.returncode, retried.stdout.strip()) == (0, "revived 2 job(s)")
    for job_id in ("good", "odd"):
        await redis.hset(keys.job(job_id), "status", "dead")
    await redis.zadd(keys.dead, {"good": now_ms(), "odd": score})
    purged = cli(env, "purge-dead", APP, "--all")
    assert_no_traceback(purged)
    assert (purged.returncode, purged.stdout.strip()) == (0, "purged 2 job(s)")
    assert await redis.zcard(keys.dead) == 0


# -- structural keys of the wrong type ----------------------------------------------------


@pytest.mark.parametrize("which", ["failed", "dead", "workers", "delayed"])
async def test_info_prints_one_line_when_a_structural_key_has_the_wrong_type(
    env: dict[str, str], redis: Redis, keys: QueueKeys, which: str
) -> None:
    await redis.set(getattr(keys, which), "x")
    for args in (["info", APP], ["info", APP, "--json"]):
        done = cli(env, *args)
        assert_no_traceback(done)
        assert done.returncode == 1
        assert done.stderr.count("\n") == 1, done.stderr
        assert done.stderr.startswith("taskrunner: error: ")
        assert "WRONGTYPE" in done.stderr


async def test_job_retry_and_abort_print_one_line_for_a_job_key_that_is_not_a_hash(
    env: dict[str, str], redis: Redis, keys: QueueKeys
) -> None:
    await redis.set(keys.job("bad"), "not a hash")
    for args in (["job", APP, "bad"], ["retry", APP, "bad"], ["abort", APP, "bad"]):
        done = cli(env, *args)
        assert_no_traceback(done)
        assert done.returncode == 1
        assert done.stderr.count("\n") == 1, done.stderr
        assert "WRONGTYPE" in done.stderr


async def test_dashboard_answers_without_500_when_a_structural_key_has_the_wrong_type(
    make_runner: MakeRunner, redis: Redis, keys: QueueKeys
) -> None:
    tr = build(make_runner)
    await redis.set(keys.failed, "x")
    async with dashboard_client(tr) as client:
        for url in ("/", "/dead"):
            answer = await client.get(url)
            assert answer.status_code == 502, url
            assert "WRONGTYPE" in answer.text


@pytest.mark.parametrize(
    ("status", "which"),
    [("succeeded", "succeeded"), ("dead", "dead"), ("queued", "stream"), ("running", "stream")],
)
async def test_jobs_listing_reports_an_index_of_the_wrong_type_instead_of_listing_nothing(
    make_runner: MakeRunner,
    env: dict[str, str],
    redis: Redis,
    keys: QueueKeys,
    status: str,
    which: str,
) -> None:
    # the listing read its index with errors ignored: "no jobs" and 200 for a key
    # another program had overwritten
    await redis.set(getattr(keys, which), "x")
    for args in (["jobs", APP, "--status", status], ["jobs", APP, "--status", status, "--json"]):
        done = cli(env, *args)
        assert_no_traceback(done)
        assert done.returncode == 1, done.stdout
        assert done.stderr.count("\n") == 1, done.stderr
        assert "WRONGTYPE" in done.stderr
    async with dashboard_client(build(make_runner)) as client:
        answer = await client.get("/jobs", params={"status": status})
    assert answer.status_code == 502
    assert "WRONGTYPE" in answer.text


async def test_jobs_listing_of_a_queue_nobody_has_used_is_empty(env: dict[str, str]) -> None:
    # no stream and no consumer group yet: nothing to list, not an error
    for status in ("queued", "running", "succeeded"):
        done = cli(env, "jobs", APP, "--status", status, "--json")
        assert_no_traceback(done)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["jobs"] == []


# -- the workers set ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("member", "score"),
    [
        (b"\xff\xfe", None),
        (b"w:1:2", float("inf")),
        (b"no-colons", 1e300),
        (b"a" * 100_000, float("inf")),
    ],
)
async def test_dashboard_workers_page_shows_a_hostile_member_of_the_workers_set(
    make_runner: MakeRunner, redis: Redis, keys: QueueKeys, member: bytes, score: float | None
) -> None:
    tr = build(make_runner)
    await redis.zadd(keys.workers, {member: now_ms() if score is None else score})
    async with dashboard_client(tr) as client:
        page = await client.get("/workers")
        found = await tr.admin.workers()
    assert page.status_code == 200
    assert len(found) == 1
    assert found[0].stale == (score is not None)


# -- the job handle -----------------------------------------------------------------------


async def test_result_of_a_failed_job_without_an_error_raises_job_failed(
    make_runner: MakeRunner, redis: Redis, keys: QueueKeys
) -> None:
    tr = build(make_runner)
    await put_job(redis, keys, "bare", "failed", keys.failed)
    await redis.hdel(keys.job("bare"), "error")
    async with tr:
        with pytest.raises(JobFailed) as failed:
            await tr.job("bare").result(timeout=5)
    assert failed.value.job_id == "bare"


@pytest.mark.parametrize(
    ("task", "result"),
    [("ghost", DEEP), ("ghost", "not json"), ("add", DEEP), ("add", '"x"')],
)
async def test_result_that_does_not_decode_raises_a_taskrunner_error(
    make_runner: MakeRunner, redis: Redis, keys: QueueKeys, task: str, result: str
) -> None:
    """A stored result that is not JSON, too deep, or not of the return type, for a
    task this runner declares (``add``) or not (``ghost``)."""
    tr = build(make_runner)
    await put_job(redis, keys, "odd", "succeeded", keys.succeeded, task=task, result=result)
    async with tr:
        with pytest.raises(TaskrunnerError, match="stored result unreadable") as raised:
            await tr.job("odd").result(timeout=5)
    assert len(str(raised.value)) < 300


async def test_status_of_a_job_with_a_garbage_status_raises_a_taskrunner_error(
    make_runner: MakeRunner, redis: Redis, keys: QueueKeys
) -> None:
    tr = build(make_runner)
    await put_job(redis, keys, "odd", "bogus", keys.failed)
    async with tr:
        with pytest.raises(TaskrunnerError, match="bogus"):
            await tr.job("odd").status()


async def test_waiting_following_or_aborting_a_job_with_a_garbage_status_is_a_taskrunner_error(
    make_runner: MakeRunner, redis: Redis, keys: QueueKeys, env: dict[str, str]
) -> None:
    """``result()``, ``progress()`` and ``abort()`` raised a bare ValueError (the dashboard
    answered 500, ``taskrunner abort`` exited 2 as for a bad argument)."""
    tr = build(make_runner)
    await put_job(redis, keys, "odd", "bogus", keys.failed)
    async with tr:
        job = tr.job("odd")
        with pytest.raises(TaskrunnerError, match="bogus"):
            await job.result(timeout=DEADLINE)
        with pytest.raises(TaskrunnerError, match="bogus"):
            async for _ in job.progress():
                pass
        with pytest.raises(TaskrunnerError, match="bogus"):
            await job.abort()
    async with dashboard_client(tr) as client:
        page = await client.get("/")
        token = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert token is not None, page.text[:2000]
        answer = await client.post("/jobs/default/odd/abort", data={"csrf": token[1]})
        assert answer.status_code == UNREADABLE, answer.text[:2000]
        assert "bogus" in answer.text
    done = cli(env, "abort", APP, "odd")
    assert_no_traceback(done)
    assert done.returncode == 1, done.stderr
    assert "bogus" in done.stderr


# -- cursors ----------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["jobs", "dead-letters"])
def test_a_deeply_nested_cursor_is_a_usage_error(env: dict[str, str], command: str) -> None:
    import base64

    cursor = base64.urlsafe_b64encode(DEEP[:20_000].encode()).decode()
    done = cli(env, command, APP, "--cursor", cursor)
    assert_no_traceback(done)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1, done.stderr[-2000:]


async def test_cron_commands_print_one_line_when_a_schedules_state_is_not_a_hash(
    env: dict[str, str], redis: Redis, namespace: str
) -> None:
    # the state of "nightly" (queue "default", one partition) overwritten by a string:
    # each cron command printed redis-py's traceback
    await redis.set(QueueKeys(namespace, "default").cron("nightly"), "x")
    app = "apps.cron_app:tr"
    for args in (["list", app], ["list", app, "--json"], ["pause", app, "nightly"]):
        done = cli(env, "cron", *args)
        assert_no_traceback(done)
        assert done.returncode == 1, done.stdout
        assert done.stderr.count("\n") == 1, done.stderr
        assert done.stderr.startswith("taskrunner: error: ")
        assert "WRONGTYPE" in done.stderr
