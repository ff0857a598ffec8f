"""Fuzzing a running worker process with hostile data (hypothesis, for a bounded time):
random and hostile stream entries, job hashes and events messages. The worker never
exits; every bad job lands in the dead letters with a reason; every good job written
among them succeeds."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import subprocess_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_reliability import HEARTBEAT, STALE, WorkerProcess

from taskrunner.keys import GROUP, QueueKeys

DEADLINE = 30.0
VALID = {"scheduled", "queued", "running", "succeeded", "failed", "aborted", "rejected", "dead"}

blobs = st.one_of(
    st.binary(max_size=64),
    st.tuples(st.binary(min_size=1, max_size=8), st.integers(1_000, 50_000)).map(
        lambda piece: piece[0] * piece[1]  # huge: up to 400 KB
    ),
    st.text(max_size=64).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.sampled_from([b"", b"\xff\xfe", b"\x00", b"{", b"[1, 2]", b'{"x": "nope", "y": 1}']),
)
names = st.one_of(st.binary(min_size=1, max_size=32), st.sampled_from([b"job", b"task", b"x"]))


@st.composite
def hostile_entry(draw: st.DrawFn) -> dict[bytes, bytes]:
    """A stream entry with random fields; never a 'job' field naming a real job."""
    fields = draw(st.dictionaries(names, blobs, min_size=1, max_size=4))
    if b"job" in fields:
        fields[b"job"] = b"nojob-" + fields[b"job"][:40]  # a job hash that does not exist
    return fields


@st.composite
def hostile_job(draw: st.DrawFn) -> dict[bytes, bytes]:
    """A job hash that cannot run: unknown task, bad arguments, or a status that is none."""
    kind = draw(st.sampled_from(["unknown task", "bad args", "bad status"]))
    fields: dict[bytes, bytes] = draw(st.dictionaries(names, blobs, max_size=3))
    fields.pop(b"job", None)
    fields[b"status"] = b"queued"
    fields[b"task"] = b"add"
    fields[b"args"] = b'{"x": 1, "y": 2}'
    if kind == "unknown task":
        fields[b"task"] = draw(st.binary(max_size=40).filter(lambda b: b != b"add"))
    elif kind == "bad args":
        fields[b"args"] = draw(blobs.filter(lambda b: b not in (b'{"x": 1, "y": 2}',)))
    else:
        status = draw(st.binary(min_size=1, max_size=20))
        if status.decode("utf-8", "replace") in VALID:
            status = b"??" + status
        fields[b"status"] = status
    return fields


operations = st.lists(
    st.one_of(
        st.tuples(st.just("entry"), hostile_entry()),
        st.tuples(st.just("job"), hostile_job()),
        st.tuples(st.just("event"), st.dictionaries(st.just(b"data"), blobs, min_size=1)),
    ),
    min_size=1,
    max_size=6,
)


@pytest.fixture
def worker(redis_url: str, namespace: str, tmp_path: Path) -> Iterator[WorkerProcess]:
    env = subprocess_env(redis_url, namespace)
    env["TEST_HEARTBEAT"] = str(HEARTBEAT)
    env["TEST_STALE"] = str(STALE)
    proc = WorkerProcess(env, tmp_path / "worker.log")
    yield proc
    proc.close()
    tail = proc.output()[-5000:]
    print(f"--- worker {proc.pid} (exit {proc.proc.returncode}) ---\n{tail}")


def wait(condition: Any, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {DEADLINE}s: {what}")
        time.sleep(0.02)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=operations)
def test_hostile_data_never_stops_a_worker_and_good_jobs_around_it_succeed(
    worker: WorkerProcess, redis_url: str, namespace: str, ops: list[tuple[str, Any]]
) -> None:
    client = redis.Redis.from_url(redis_url)
    keys = QueueKeys(namespace, "default")
    try:
        deadline = time.monotonic() + DEADLINE
        while " ready: " not in worker.output():
            assert worker.alive, worker.output()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        expected: set[bytes] = set()
        for n, (kind, value) in enumerate(ops):
            expected |= write(client, keys, f"{time.monotonic_ns()}-{n}", kind, value)
            good = good_job(client, keys, f"good-{time.monotonic_ns()}-{n}")
            wait(lambda g=good: client.hget(keys.job(g), "status") == b"succeeded", "good job")

        def all_dead() -> bool:
            return all(client.zscore(keys.dead, name) is not None for name in expected)

        wait(all_dead, f"bad jobs dead-lettered: {sorted(expected)!r:.300}")
        prefix = keys.job("").encode()
        for name in expected:
            assert client.hget(prefix + name, "error"), name  # with its reason
        assert client.xpending(keys.stream, GROUP)["pending"] == 0
        assert worker.alive, worker.output()[-3000:]
    finally:
        client.close()


def write(client: redis.Redis, keys: QueueKeys, unique: str, kind: str, value: Any) -> set[bytes]:
    """Write one hostile item; the dead letters it must produce (an entry's is named
    after the job id it carries, else after the entry)."""
    if kind == "event":
        client.publish(keys.events, value[b"data"])
        client.publish(keys.events, b"abort " + value[b"data"])
        return set()
    if kind == "entry":
        entry = client.xadd(keys.stream, value)
        entry_id = entry if isinstance(entry, bytes) else str(entry).encode()
        return {value.get(b"job") or b"entry-" + entry_id}
    job_id = f"bad-{unique}"
    client.hset(keys.job(job_id), mapping=value)
    client.xadd(keys.stream, {"job": job_id})
    return {job_id.encode()}


def good_job(client: redis.Redis, keys: QueueKeys, job_id: str) -> str:
    """A well-formed job written as enqueue.lua writes it (the reliability app's add),
    which also wakes idle workers ("ready") when one marked the partition drained."""
    entry = client.xadd(keys.stream, {"job": job_id})
    client.hset(
        keys.job(job_id),
        mapping={
            "status": "queued",
            "task": "add",
            "args": '{"x": 1, "y": 2}',
            "queue": "default",
            "level": "default",
            "enqueued": int(time.time() * 1000),
            "entry": entry,
        },
    )
    if client.delete(keys.idle):
        client.publish(keys.events, b"ready")
    return job_id
