"""The batch machinery of the scripts (taskrunner/scripts.py, lua/_settle.lua,
lua/_batch.lua), pinned with a real redis-server: calls of one shape send their shared
positions once and each call still gets its own values; a batch of commits removes
exactly the entries it settled (one XTRIM MINID below the oldest pending entry, XDEL
above it) and adds its finished jobs to their index at its end; a claim reads small
arguments in its one HMGET and writes only the fields that changed; a lone call (no
pipeline) answers as a pipeline of one did; take.lua claims the named job in its read.

Jobs are written as enqueue.lua writes them, at stream ids the test chooses where the
order of ids matters (ids whose parts cross a digit boundary: ``9-0`` < ``10-0``, ``1-9``
< ``1-10``, which a comparison of the texts gets wrong), read with fetch.lua and claimed
with claim.lua, then committed in batches with ``scripts.run_many``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import pytest
from redis.asyncio import Redis
from redis.typing import EncodableT, FieldT
from test_reader import Monitor, evalshas

from taskrunner import scripts
from taskrunner.client import new_token
from taskrunner.keys import GROUP, QueueKeys

ENV = scripts.Env()
CONSUMER = "c1"
MAX_PAYLOAD = 1 << 20
TTL_MS = 60_000


@pytest.fixture
def keys(namespace: str) -> QueueKeys:
    return QueueKeys(namespace, "q")


async def stream_of(redis: Redis, keys: QueueKeys) -> str:
    stream = keys.level_stream(keys.default_level)
    await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
    return stream


async def enqueue(redis: Redis, keys: QueueKeys, args: Sequence[str]) -> list[tuple[str, str]]:
    """One job per ``args`` (ids job0, job1, ...), enqueued in one batch: (id, entry)."""
    ids = [f"job{i}" for i in range(len(args))]
    calls = [
        scripts.enqueue(ENV, keys, j, "t", a, keys.default_level, 0)
        for j, a in zip(ids, args, strict=True)
    ]
    replies = await scripts.run_many(redis, calls)
    assert [int(r[0]) for r in replies] == [1] * len(ids)
    return [(j, str(r[1])) for j, r in zip(ids, replies, strict=True)]


async def write_at(
    redis: Redis, keys: QueueKeys, stream: str, entries: Sequence[str], *, with_entry: bool = True
) -> list[tuple[str, str]]:
    """One queued job per stream id (ids job0, job1, ...), written as enqueue.lua writes
    it (without the hash's 'entry' field unless ``with_entry``): (id, entry)."""
    jobs: list[tuple[str, str]] = []
    for i, entry in enumerate(entries):
        job_id = f"job{i}"
        await redis.xadd(stream, {"job": job_id}, id=entry)
        fields: dict[FieldT, EncodableT] = {"status": "queued", "task": "t", "args": "[]"}
        fields |= {"queue": keys.queue, "level": keys.default_level, "enqueued": "1"}
        if with_entry:
            fields["entry"] = entry
        await redis.hset(keys.job(job_id), mapping=fields)
        jobs.append((job_id, entry))
    return jobs


async def read(redis: Redis, keys: QueueKeys, stream: str, count: int) -> list[str]:
    """Read up to ``count`` new entries for CONSUMER: their ids."""
    reply = await scripts.run(redis, scripts.fetch(ENV, keys, [stream], CONSUMER, count, 60_000))
    return [str(item[1]) for item in reply]


def claim(
    keys: QueueKeys, stream: str, job: tuple[str, str], token: str, max_payload: int = MAX_PAYLOAD
) -> scripts.ScriptCall:
    return scripts.claim(ENV, keys, stream, job[0], CONSUMER, job[1], token, 5, max_payload)


async def claim_all(
    redis: Redis, keys: QueueKeys, stream: str, jobs: Sequence[tuple[str, str]]
) -> list[str]:
    """Claim every job in one batch: their lease tokens."""
    tokens = [new_token() for _ in jobs]
    calls = [claim(keys, stream, job, t) for job, t in zip(jobs, tokens, strict=True)]
    replies = await scripts.run_many(redis, calls)
    assert [str(r[0]) for r in replies] == ["ok"] * len(jobs)
    return tokens


PER_CALL_COMMIT = scripts.Script("commit", shares=False)
"""commit.lua in the per-call layout (scripts.COMMIT shares; the per-call layout is the
one a batch of calls of different shapes goes in): the same script and SHA, so the
commit tests below run in both layouts of the batch driver."""

LAYOUT = {"shared": False}


@pytest.fixture(autouse=True, params=["per-call", "shared"])
def commit_layout(request: pytest.FixtureRequest) -> None:
    """Every test once with commits in each layout (``commit()`` below)."""
    LAYOUT["shared"] = request.param == "shared"


def commit(
    keys: QueueKeys,
    stream: str,
    job: tuple[str, str],
    token: str,
    outcome: str = "succeeded",
    payload: str = "",
    *,
    shared: bool | None = None,
) -> scripts.ScriptCall:
    """A commit call; in the shared layout when ``shared`` (default: the test's
    layout)."""
    call = scripts.commit(
        ENV, keys, stream, job[0], job[1], token, outcome, payload, TTL_MS, 0,
        keys.default_level, [], 0,
    )  # fmt: skip
    if LAYOUT["shared"] if shared is None else shared:
        return call
    return scripts.ScriptCall(PER_CALL_COMMIT, call.keys, call.args)


def pattern(calls: Sequence[scripts.ScriptCall]) -> tuple[str, str]:
    """The (keys, args) pattern the batch of ``calls`` is sent with (it must be the
    shared layout): a letter per position, ``s`` sent once, ``v`` sent per call."""
    uniform = scripts._uniform(calls)
    assert uniform is not None, "the calls did not go as one uniform batch"
    args: list[Any] = uniform[1]
    assert args[:2] == ["u", len(calls)]
    return str(args[2]), str(args[3])


async def stream_ids(redis: Redis, stream: str) -> list[str]:
    entries = cast(list[tuple[str, dict[str, str]]], await redis.xrange(stream))
    return [entry_id for entry_id, _ in entries]


async def pending_ids(redis: Redis, stream: str) -> list[str]:
    rows = await redis.xpending_range(stream, GROUP, "-", "+", 100)
    return [str(row["message_id"]) for row in rows]


# -- shared and varying positions ----------------------------------------------------


async def test_a_uniform_batch_of_commits_gives_each_job_its_own_outcome_and_payload(
    redis: Redis, keys: QueueKeys
) -> None:
    stream = await stream_of(redis, keys)
    jobs = await enqueue(redis, keys, ["[0]", "[1]", "[2]", "[3]"])
    assert await read(redis, keys, stream, 4) == [e for _, e in jobs]
    tokens = await claim_all(redis, keys, stream, jobs)
    outcomes = ["succeeded", "failed", "succeeded", "rejected"]
    payloads = ["r0", "e1", "r2", "e3"]
    calls = [
        commit(keys, stream, job, token, outcome, payload, shared=True)
        for job, token, outcome, payload in zip(jobs, tokens, outcomes, payloads, strict=True)
    ]
    # the stream and the queue's keys go once, the job, its index, entry, token,
    # outcome and payload per call
    assert pattern(calls) == ("svsssssv", "svvvvvssvsssss")

    assert await scripts.run_many(redis, calls) == [1] * 4

    for (job_id, _), token, outcome, payload in zip(jobs, tokens, outcomes, payloads, strict=True):
        job = await redis.hgetall(keys.job(job_id))
        assert (job["status"], job["committed"], job["lease"]) == (outcome, token, "")
        field = "result" if outcome == "succeeded" else "error"
        assert job[field] == payload
        assert "result" not in job or "error" not in job
    indexes = {"succeeded": keys.succeeded, "failed": keys.failed, "rejected": keys.rejected}
    for index_name, index in indexes.items():
        members = set(await redis.zrange(index, 0, -1))
        wanted = {j for (j, _), o in zip(jobs, outcomes, strict=True) if o == index_name}
        assert members == wanted, index_name
    assert await redis.xlen(stream) == 0
    assert await pending_ids(redis, stream) == []


@pytest.mark.parametrize(
    ("values", "stored"),
    [
        ((1, 1.0), ["1", "1.0"]),
        ((1.0, 1), ["1.0", "1"]),
        ((1, 1, 1.0), ["1", "1", "1.0"]),
        (("1", 1.0), ["1", "1.0"]),
        ((1.0, "1"), ["1.0", "1"]),
        ((0, 0.0), ["0", "0.0"]),
        ((0.0, -0.0), ["0.0", "-0.0"]),
    ],
)
async def test_equal_values_of_different_types_are_sent_per_call(
    redis: Redis, keys: QueueKeys, values: tuple[int | float | str, ...], stored: list[str]
) -> None:
    """1 == 1.0 in Python, but redis-py sends "1" and "1.0": a position where the calls
    differ only in type is not shared, and each job stores what its own call sent."""
    stream = await stream_of(redis, keys)
    jobs = await enqueue(redis, keys, ["[]"] * len(values))
    await read(redis, keys, stream, len(jobs))
    tokens = await claim_all(redis, keys, stream, jobs)
    calls: list[scripts.ScriptCall] = []
    for job, token, value in zip(jobs, tokens, values, strict=True):
        call = commit(keys, stream, job, token, shared=True)
        args = list(call.args)
        args[5] = value  # the payload: stored as the job's result as it arrived
        calls.append(scripts.ScriptCall(call.script, call.keys, args))
    assert pattern(calls)[1][5] == "v"

    assert await scripts.run_many(redis, calls) == [1] * len(jobs)

    results = [await redis.hget(keys.job(j), "result") for j, _ in jobs]
    assert results == stored


async def test_a_batch_of_differently_shaped_commits_gives_each_job_its_own_values(
    redis: Redis, keys: QueueKeys
) -> None:
    """A call with one key and arg more (a chain step's outbox) sends the batch in the
    per-call layout; every job still gets its own outcome, and only the chain step
    joins the outbox."""
    stream = await stream_of(redis, keys)
    jobs = await enqueue(redis, keys, ["[0]", "[1]", "[2]"])
    await read(redis, keys, stream, 3)
    tokens = await claim_all(redis, keys, stream, jobs)
    pairs = enumerate(zip(jobs, tokens, strict=True))
    calls = [commit(keys, stream, job, t, "succeeded", f"r{i}") for i, (job, t) in pairs]
    calls[1] = scripts.commit(
        ENV, keys, stream, jobs[1][0], jobs[1][1], tokens[1], "succeeded", "r1", TTL_MS, 0,
        keys.default_level, [], 0, follow=True,
    )  # fmt: skip
    assert scripts._uniform(calls) is None

    assert await scripts.run_many(redis, calls) == [1] * 3

    assert [await redis.hget(keys.job(j), "result") for j, _ in jobs] == ["r0", "r1", "r2"]
    assert await redis.zrange(keys.outbox, 0, -1) == [jobs[1][0]]
    assert await redis.zcard(keys.succeeded) == 3
    assert await redis.xlen(stream) == 0


# -- settled entries leave the stream --------------------------------------------------

IDS = ["1-8", "1-9", "1-10", "9-0", "10-0", "10-1", "11-0"]
"""Stream ids whose parts cross a digit boundary; the first READ are read and claimed,
the rest stay queued (never read)."""
READ = 5


@pytest.mark.parametrize("kept", [None, 0, 1, 2, 3, 4])
async def test_a_batch_of_commits_removes_exactly_the_entries_it_committed(
    redis: Redis, keys: QueueKeys, kept: int | None
) -> None:
    """Every read entry but ``kept`` is committed in one batch; ``kept`` (read and
    claimed, not committed) stays pending and in the stream, the queued ones stay, the
    committed ones below and above it are gone."""
    stream = await stream_of(redis, keys)
    jobs = await write_at(redis, keys, stream, IDS)
    assert await read(redis, keys, stream, READ) == IDS[:READ]
    tokens = await claim_all(redis, keys, stream, jobs[:READ])
    done = [i for i in range(READ) if i != kept]
    calls = [commit(keys, stream, jobs[i], tokens[i]) for i in done]

    assert await scripts.run_many(redis, calls) == [1] * len(done)

    still_pending = [] if kept is None else [IDS[kept]]
    assert await pending_ids(redis, stream) == still_pending
    assert await stream_ids(redis, stream) == still_pending + IDS[READ:]
    assert await redis.xlen(stream) - len(still_pending) == len(IDS) - READ
    if kept is not None:  # and it can still be committed
        assert await scripts.run(redis, commit(keys, stream, jobs[kept], tokens[kept])) == 1
        assert await stream_ids(redis, stream) == IDS[READ:]


async def test_committed_entries_go_and_pending_ones_stay_across_successive_batches(
    redis: Redis, keys: QueueKeys
) -> None:
    """Enqueued and read as a worker does (ids from the server's clock): batches that
    each leave a different entry pending remove exactly what they committed."""
    stream = await stream_of(redis, keys)
    jobs = await enqueue(redis, keys, [f"[{i}]" for i in range(12)])
    entries = [e for _, e in jobs]
    assert await read(redis, keys, stream, 8) == entries[:8]
    tokens = await claim_all(redis, keys, stream, jobs[:8])
    # batch 1 commits 0, 2, 3, 5 (1 and 4 stay pending); batch 2 commits 4, 6, 7
    for batch, pending in (([0, 2, 3, 5], [1, 4, 6, 7]), ([4, 6, 7], [1])):
        calls = [commit(keys, stream, jobs[i], tokens[i]) for i in batch]
        assert await scripts.run_many(redis, calls) == [1] * len(batch)
        assert await pending_ids(redis, stream) == [entries[i] for i in pending]
        assert await stream_ids(redis, stream) == [entries[i] for i in pending] + entries[8:]
        assert await redis.xlen(stream) - len(pending) == 4


@pytest.mark.parametrize("with_delivered", [False, True])
async def test_a_commit_of_an_entry_never_delivered_trims_no_queued_entry(
    redis: Redis, keys: QueueKeys, with_delivered: bool
) -> None:
    """Commits whose entry id was never delivered to the group (made up, above every
    queued entry), with job hashes whose lease matches: they commit, and every queued
    entry stays (alone in the batch, or beside a commit of a delivered entry)."""
    stream = await stream_of(redis, keys)
    jobs = await write_at(redis, keys, stream, ["5-0", "6-0", "7-0"])
    calls: list[scripts.ScriptCall] = []
    queued = ["5-0", "6-0", "7-0"]
    if with_delivered:
        assert await read(redis, keys, stream, 1) == ["5-0"]
        [token] = await claim_all(redis, keys, stream, jobs[:1])
        calls.append(commit(keys, stream, jobs[0], token))
        queued = ["6-0", "7-0"]
    for i, made_up in enumerate(["98-0", "99-0"]):
        job_id, token = f"ghost{i}", new_token()
        await redis.hset(
            keys.job(job_id),
            mapping={"status": "running", "task": "t", "entry": made_up, "lease": token},
        )
        calls.append(commit(keys, stream, (job_id, made_up), token))

    assert await scripts.run_many(redis, calls) == [1] * len(calls)

    assert await stream_ids(redis, stream) == queued
    assert await pending_ids(redis, stream) == []
    assert await redis.hget(keys.job("ghost1"), "status") == "succeeded"
    # and the queued entries are still there to read
    assert await read(redis, keys, stream, 10) == queued


async def test_an_entry_id_written_with_a_leading_zero_leaves_no_settled_entry(
    redis: Redis, keys: QueueKeys
) -> None:
    """XACK takes "0005-0" for 5-0, but a trim bound must compare ids as Redis writes
    them: a batch that commits 5-0 so spelled and 20-0 deletes both, and the queued
    entry stays."""
    stream = await stream_of(redis, keys)
    jobs = await write_at(redis, keys, stream, ["5-0", "20-0", "30-0"])
    assert await read(redis, keys, stream, 2) == ["5-0", "20-0"]
    tokens = await claim_all(redis, keys, stream, jobs[:2])
    calls = [
        commit(keys, stream, (jobs[0][0], "0005-0"), tokens[0]),
        commit(keys, stream, jobs[1], tokens[1]),
    ]

    assert await scripts.run_many(redis, calls) == [1, 1]

    assert await stream_ids(redis, stream) == ["30-0"]
    assert await pending_ids(redis, stream) == []


async def test_an_entry_id_with_a_signed_sequence_number_is_deleted_all_the_same(
    redis: Redis, keys: QueueKeys
) -> None:
    """Redis reads the sequence number of "5--02" as 2**64 - 2: a batch that commits the
    entry so spelled, beside one below an entry still pending, deletes it (it must not
    be taken for an id below the trim bound), and the pending one stays."""
    top = f"5-{2**64 - 2}"
    stream = await stream_of(redis, keys)
    jobs = await write_at(redis, keys, stream, ["5-1", "5-100", top])
    assert await read(redis, keys, stream, 3) == ["5-1", "5-100", top]
    tokens = await claim_all(redis, keys, stream, jobs)
    calls = [
        commit(keys, stream, jobs[0], tokens[0]),
        commit(keys, stream, (jobs[2][0], "5--02"), tokens[2]),
    ]

    assert await scripts.run_many(redis, calls) == [1, 1]

    assert await pending_ids(redis, stream) == ["5-100"]
    assert await stream_ids(redis, stream) == ["5-100"]


@pytest.mark.parametrize(
    ("stored", "attempts"),
    [("nan", 1), ("1e300", 1), ("-4", 1), ("3.5", 4), ("abc", 1), ("2", 3)],
)
async def test_a_claim_writes_back_a_hostile_attempt_count_as_a_whole_number(
    redis: Redis, keys: QueueKeys, stored: str, attempts: int
) -> None:
    """A job hash whose 'attempts' is not a whole number in range counts as 0 attempts
    (or its whole part): the claim answers, and writes back, a whole number that
    Redis and Python both read the same."""
    stream = await stream_of(redis, keys)
    [job] = await write_at(redis, keys, stream, ["7-0"])
    await redis.hset(keys.job(job[0]), mapping={"attempts": stored, "reclaims": stored})
    await read(redis, keys, stream, 1)

    reply = await scripts.run(redis, claim(keys, stream, job, new_token()))

    assert (str(reply[0]), int(reply[3])) == ("ok", attempts)
    assert await redis.hget(keys.job(job[0]), "attempts") == str(attempts)


async def test_commits_for_two_groups_on_one_stream_trim_no_entry_either_has_not_read(
    redis: Redis, keys: QueueKeys
) -> None:
    """A trim bound holds for one group: when the calls of a batch name two groups on
    one stream, each entry is deleted by itself, and one that the first group has not
    read yet stays (no builder does this; the driver must not lose entries if one did)."""
    stream = await stream_of(redis, keys)
    jobs = await write_at(redis, keys, stream, ["5-0", "6-0", "7-0"])
    await redis.xgroup_create(stream, "other", id="0")
    assert await read(redis, keys, stream, 1) == ["5-0"]
    [token] = await claim_all(redis, keys, stream, jobs[:1])
    await redis.xreadgroup("other", "c", {stream: ">"}, count=3)  # 5-0, 6-0, 7-0
    other_token = new_token()
    await redis.hset(keys.job(jobs[2][0]), mapping={"status": "running", "lease": other_token})
    mine = commit(keys, stream, jobs[0], token)
    theirs = commit(keys, stream, jobs[2], other_token)
    args = list(theirs.args)
    args[0] = "other"  # the group
    calls = [mine, scripts.ScriptCall(theirs.script, theirs.keys, args)]

    assert await scripts.run_many(redis, calls) == [1, 1]

    assert await stream_ids(redis, stream) == ["6-0"]
    assert await read(redis, keys, stream, 10) == ["6-0"]


# -- finished-job indexes ------------------------------------------------------------


async def test_a_batch_of_commits_puts_every_succeeded_job_in_its_index(
    redis: Redis, keys: QueueKeys
) -> None:
    stream = await stream_of(redis, keys)
    jobs = await enqueue(redis, keys, ["[]"] * 20)
    await read(redis, keys, stream, 20)
    tokens = await claim_all(redis, keys, stream, jobs)
    calls = [
        commit(keys, stream, job, t, payload="ok") for job, t in zip(jobs, tokens, strict=True)
    ]

    assert await scripts.run_many(redis, calls) == [1] * 20

    for job_id, _ in jobs:
        finished = await redis.hget(keys.job(job_id), "finished")
        assert finished is not None
        assert await redis.zscore(keys.succeeded, job_id) == float(finished)
    assert await redis.zcard(keys.succeeded) == 20


async def hostile_index_batch(redis: Redis, keys: QueueKeys) -> tuple[list[Any], list[str]]:
    """Five claimed jobs committed as succeeded in one batch, with the succeeded index
    replaced by a string first: (the replies, the lease tokens)."""
    stream = await stream_of(redis, keys)
    jobs = await enqueue(redis, keys, ["[]"] * 5)
    await read(redis, keys, stream, 5)
    tokens = await claim_all(redis, keys, stream, jobs)
    await redis.set(keys.succeeded, "hostile")
    calls = [
        commit(keys, stream, job, t, payload="ok") for job, t in zip(jobs, tokens, strict=True)
    ]
    return await scripts.run_many(redis, calls, raise_on_error=False), tokens


async def test_a_hostile_index_key_leaves_every_job_of_the_batch_final(
    redis: Redis, keys: QueueKeys
) -> None:
    """The succeeded index replaced by a string: each job is final and its entry settled
    (the batch's end, with its index write, still runs), and the key is left as it was."""
    _, tokens = await hostile_index_batch(redis, keys)

    for i, token in enumerate(tokens):
        job = await redis.hgetall(keys.job(f"job{i}"))
        assert (job["status"], job["result"], job["lease"], job["committed"]) == (
            "succeeded", "ok", "", token,
        )  # fmt: skip
    assert await redis.get(keys.succeeded) == "hostile"
    stream = keys.level_stream(keys.default_level)
    assert await pending_ids(redis, stream) == []
    assert await redis.xlen(stream) == 0


async def test_a_hostile_index_key_fails_no_commit_of_a_batch(
    redis: Redis, keys: QueueKeys
) -> None:
    replies, _ = await hostile_index_batch(redis, keys)
    assert replies == [1] * 5


def test_claims_enqueues_and_commits_share_their_positions(keys: QueueKeys) -> None:
    """The layout each worker batch of calls of one shape goes in."""
    stream = keys.stream
    claims = [
        scripts.claim(ENV, keys, stream, f"j{i}", "c", f"{i}-0", f"t{i}", 5, 100) for i in range(3)
    ]
    enqueues = [scripts.enqueue(ENV, keys, f"j{i}", "t", "[]", "default", 0) for i in range(3)]
    commits = [scripts.commit(
        ENV, keys, stream, f"j{i}", f"{i}-0", f"t{i}", "succeeded", "null", TTL_MS, 0,
        "default", [], 0,
    ) for i in range(3)]  # fmt: skip
    layouts = {}
    for name, calls in {"claim": claims, "enqueue": enqueues, "commit": commits}.items():
        sent = scripts._batch(calls)  # the batch EVALSHA's arguments
        n_keys = int(sent[1])
        layouts[name] = sent[2 + n_keys]
    assert layouts == {"claim": "u", "enqueue": "u", "commit": "u"}


# -- claims ----------------------------------------------------------------------------


async def test_a_claim_returns_small_arguments_and_refuses_too_large_ones(
    redis: Redis, keys: QueueKeys
) -> None:
    """In one batch of claims (max_payload 100): arguments of 2, 100 and 101 bytes."""
    stream = await stream_of(redis, keys)
    at_limit = "[" + "1" * 98 + "]"
    over = "[" + "1" * 99 + "]"
    jobs = await enqueue(redis, keys, ["[7]", at_limit, over])
    await read(redis, keys, stream, 3)
    tokens = [new_token() for _ in jobs]
    calls = [claim(keys, stream, j, t, max_payload=100) for j, t in zip(jobs, tokens, strict=True)]

    replies = await scripts.run_many(redis, calls)

    assert [(str(r[0]), str(r[1]), str(r[2])) for r in replies] == [
        ("ok", "t", "[7]"),
        ("ok", "t", at_limit),
        ("toolarge", "t", ""),
    ]
    assert [int(r[3]) for r in replies] == [1, 1, 1]  # attempts
    for (job_id, entry), token in zip(jobs, tokens, strict=True):
        job = await redis.hgetall(keys.job(job_id))
        assert (job["status"], job["lease"], job["worker"]) == ("running", token, CONSUMER)
        assert (job["entry"], job["attempts"]) == (entry, "1")
        assert "reclaims" not in job  # absent until the first reclaim
    # the too large one claimed again alone (not in a batch), its arguments now small
    await redis.hset(keys.job(jobs[2][0]), "args", "[1]")
    reply = await scripts.run(redis, claim(keys, stream, jobs[2], new_token(), max_payload=100))
    assert (str(reply[0]), str(reply[2])) == ("ok", "[1]")


@pytest.mark.parametrize("batch", [False, True])
async def test_a_claim_writes_entry_and_reclaims_when_they_change(
    redis: Redis, keys: QueueKeys, batch: bool
) -> None:
    """A job hash without 'entry' gets it at its first claim, and no 'reclaims' (absent
    means none); the same entry claimed again (its attempt was cut short) counts a
    reclaim each time, and the entry stays."""
    stream = await stream_of(redis, keys)
    jobs = await write_at(redis, keys, stream, ["3-0", "3-1"], with_entry=False)
    await read(redis, keys, stream, 2)

    async def claim_jobs() -> list[Any]:
        calls = [claim(keys, stream, job, new_token()) for job in jobs]
        if batch:
            return await scripts.run_many(redis, calls)
        return [await scripts.run(redis, call) for call in calls]

    for reclaims in range(3):
        replies = await claim_jobs()
        assert [(str(r[0]), int(r[5]), int(r[8])) for r in replies] == [
            ("ok", reclaims, int(reclaims > 0))
        ] * 2
        for job_id, entry in jobs:
            job = await redis.hgetall(keys.job(job_id))
            assert (job["entry"], job.get("reclaims", "0")) == (entry, str(reclaims))
            assert ("reclaims" in job) == (reclaims > 0)
            assert job["attempts"] == str(reclaims + 1)


async def test_a_lone_call_gives_its_error_in_its_place_and_survives_a_script_flush(
    redis: Redis, keys: QueueKeys
) -> None:
    """A run_many of one call goes without a pipeline and answers as a pipeline did:
    the script's error in its place (or raised), and the scripts loaded again when the
    server lost them."""
    stream = await stream_of(redis, keys)
    [job] = await write_at(redis, keys, stream, ["5-0"])
    assert await read(redis, keys, stream, 1) == ["5-0"]
    hostile_stream = keys.level_stream("hostile")
    await redis.set(hostile_stream, "not a stream")
    hostile = claim(keys, hostile_stream, job, "t0")
    [reply] = await scripts.run_many(redis, [hostile], raise_on_error=False)
    assert isinstance(reply, Exception)
    assert "WRONGTYPE" in str(reply)
    with pytest.raises(Exception, match="WRONGTYPE"):
        await scripts.run_many(redis, [hostile])
    await redis.script_flush()
    [claimed] = await scripts.run_many(redis, [claim(keys, stream, job, "t1")])
    assert str(claimed[0]) == "ok"


async def test_take_claims_the_named_job_in_its_read_and_leaves_the_rest_to_claim(
    redis: Redis, keys: QueueKeys
) -> None:
    """take.lua: the read's entries as fetch.lua gives them, the named job's with
    claim.lua's reply as a fourth element; a named job whose key is not a hash gets
    claim.lua's 'wrongtype' (the worker dead-letters its entry), and the read still
    returns every entry."""
    stream = await stream_of(redis, keys)
    jobs = await write_at(redis, keys, stream, ["1-0", "2-0", "3-0"])
    fetched = scripts.fetch(ENV, keys, [stream], CONSUMER, 2, 60_000)
    reply = await scripts.run(redis, scripts.take(fetched, keys, "job1", "tok", 5, MAX_PAYLOAD))
    assert [(str(e[1]), len(e)) for e in reply] == [("1-0", 3), ("2-0", 4)]
    assert str(reply[1][3][0]) == "ok"
    assert await redis.hget(keys.job("job1"), "lease") == "tok"
    assert await redis.hget(keys.job("job0"), "status") == "queued"  # left to claim.lua

    await redis.xadd(stream, {"job": "hostile"}, id="4-0")
    await redis.set(keys.job("hostile"), "not a hash")
    fetched = scripts.fetch(ENV, keys, [stream], CONSUMER, 5, 60_000)
    reply = await scripts.run(redis, scripts.take(fetched, keys, "hostile", "t", 5, MAX_PAYLOAD))
    assert [(str(e[1]), len(e)) for e in reply] == [("3-0", 3), ("4-0", 4)]
    assert [str(v) for v in reply[1][3]] == ["wrongtype"]
    assert jobs[2][1] == "3-0"


async def test_a_claim_or_take_sent_again_after_a_lost_reply_answers_the_same(
    redis: Redis, keys: QueueKeys
) -> None:
    """redis-py sends a call again on a new connection when the old one broke, also when
    Redis had run it and only the reply was lost. A claim repeated with its own token
    is no reclaim: the same answer, the attempt counted once (it was counted twice, as
    a worker's death, and a job lost a retry to it). A take.lua repeated returns the
    job its first run claimed, with the same answer (the read itself delivers new
    entries: the job would wait for the stale-entry reclaim)."""
    stream = await stream_of(redis, keys)
    jobs = await write_at(redis, keys, stream, ["1-0", "2-0", "3-0"])
    assert await read(redis, keys, stream, 1) == ["1-0"]
    first = await scripts.run(redis, claim(keys, stream, jobs[0], "tok"))
    again = await scripts.run(redis, claim(keys, stream, jobs[0], "tok"))
    assert [str(v) for v in again] == [str(v) for v in first]
    assert (str(first[0]), int(first[3]), int(first[8])) == ("ok", 1, 0)
    job0 = await redis.hgetall(keys.job("job0"))
    assert (job0["attempts"], job0.get("reclaims"), job0["lease"]) == ("1", None, "tok")
    # a new token for the same running entry is a reclaim, and its repeat answers as it
    other = await scripts.run(redis, claim(keys, stream, jobs[0], "tok2"))
    repeat = await scripts.run(redis, claim(keys, stream, jobs[0], "tok2"))
    assert (int(other[3]), int(other[5]), int(other[8])) == (2, 1, 1)
    assert [str(v) for v in repeat] == [str(v) for v in other]
    assert await redis.hget(keys.job("job0"), "attempts") == "2"

    fetched = scripts.fetch(ENV, keys, [stream], CONSUMER, 1, 60_000)
    take = scripts.take(fetched, keys, "job1", "named", 5, MAX_PAYLOAD)
    reply = await scripts.run(redis, take)
    assert [(str(e[1]), str(e[3][0])) for e in reply] == [("2-0", "ok")]
    resent = await scripts.run(redis, take)  # reads 3-0, and gives job1 back
    assert sorted((str(e[1]), len(e)) for e in resent) == [("2-0", 4), ("3-0", 3)]
    named = next(e for e in resent if str(e[1]) == "2-0")
    assert [str(v) for v in named[3]] == [str(v) for v in reply[0][3]]
    assert await redis.hget(keys.job("job1"), "attempts") == "1"
    other_token = scripts.take(fetched, keys, "job1", "someone-else", 5, MAX_PAYLOAD)
    assert await scripts.run(redis, other_token) == []  # not this call's claim: nothing


async def test_a_batch_runs_at_most_batch_max_calls(
    redis: Redis, keys: QueueKeys, redis_url: str
) -> None:
    """More calls of one script and slot than ``BATCH_MAX`` go as several batches in
    the same pipeline (a batch blocks the server for its whole run), in their order."""
    await scripts.load_all(redis)  # else the first pipeline is refused (NOSCRIPT) and sent again
    monitor = Monitor(redis_url, f"{keys.prefix}:marker")
    await monitor.start()
    n = 2 * scripts.BATCH_MAX + 50
    written = await enqueue(redis, keys, ["[]"] * n)
    commands = await monitor.stop(redis)
    sizes = []
    for command in evalshas(commands, scripts.ENQUEUE):
        words = command.split()
        first_arg = 3 + int(words[2])  # after EVALSHA, the sha, numkeys and the keys
        assert words[first_arg] == "u"  # the shared layout: "u", then the number of calls
        sizes.append(int(words[first_arg + 1]))
    assert sizes == [scripts.BATCH_MAX, scripts.BATCH_MAX, 50]
    entries = cast(list[Any], await redis.xrange(keys.level_stream(keys.default_level)))
    assert [fields["job"] for _, fields in entries] == [job for job, _ in written]


async def test_loading_the_scripts_sends_only_those_the_server_lacks(
    redis: Redis, redis_url: str, keys: QueueKeys
) -> None:
    """Every connect makes sure the scripts are there: a SCRIPT EXISTS, then a SCRIPT
    LOAD only of the missing ones (it sent every source each time: about 100 KB, and
    Redis 6.2 appends each SCRIPT LOAD to its AOF)."""
    await scripts.load_all(redis)
    monitor = Monitor(redis_url, f"{keys.prefix}:marker")
    await monitor.start()
    await scripts.load_all(redis)  # all there already
    await redis.script_flush()
    await scripts.load_all(redis)  # all gone: all loaded again
    commands = await monitor.stop(redis)
    loads = [c for c in commands if c.upper().startswith("SCRIPT LOAD")]
    exists = [c for c in commands if c.upper().startswith("SCRIPT EXISTS")]
    assert len(exists) == 2
    assert len(loads) == 2 * len(scripts.ALL)
    assert await redis.script_exists(*(s.sha for s in scripts.ALL)) == [True] * len(scripts.ALL)
