"""A batch of commits (one EVALSHA for many jobs, as a busy worker sends them) records
what the same commits would record one by one, also when Redis is out of memory.

With ``maxmemory`` reached and ``noeviction``, Redis refuses a script's memory-growing
write only while the script has written nothing yet. A commit's first write is its XACK,
which is never refused, so the outcome's writes that follow go through; a batch keeps
that order for every call (the XDELs alone wait for the batch's end)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redisproc import RedisProcess

from taskrunner import scripts
from taskrunner.client import new_token
from taskrunner.keys import GROUP, QueueKeys


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisProcess]:
    """A private server: this test fills its memory limit."""
    with RedisProcess(tmp_path / "redis") as process:
        yield process


async def claimed(redis: Redis, keys: QueueKeys, n: int) -> list[tuple[str, str, str]]:
    """``n`` jobs enqueued, read and claimed by consumer c1: (job id, entry, token)."""
    env = scripts.Env()
    stream = keys.level_stream(keys.default_level)
    await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
    ids = [f"job{i}" for i in range(n)]
    enqueues = [scripts.enqueue(env, keys, j, "t", "[]", keys.default_level, 0) for j in ids]
    await scripts.run_many(redis, enqueues)
    read = await scripts.run(redis, scripts.fetch(env, keys, [stream], "c1", n, 60_000))
    entries = [str(item[1]) for item in read]
    tokens = [new_token() for _ in ids]
    claims = [
        scripts.claim(env, keys, stream, j, "c1", e, t, 5, 1 << 20)
        for j, e, t in zip(ids, entries, tokens, strict=True)
    ]
    assert [str(r[0]) for r in await scripts.run_many(redis, claims)] == ["ok"] * n
    return list(zip(ids, entries, tokens, strict=True))


@pytest.mark.parametrize("size", [1, 2, 100])
async def test_a_batch_of_commits_records_every_outcome_when_redis_is_out_of_memory(
    server: RedisProcess, size: int
) -> None:
    redis = Redis.from_url(server.url, decode_responses=True)
    try:
        keys = QueueKeys("ns", "q")
        stream = keys.level_stream(keys.default_level)
        jobs = await claimed(redis, keys, size)
        await redis.config_set("maxmemory-policy", "noeviction")
        await redis.config_set("maxmemory", 1)  # every memory-growing first write is refused
        env = scripts.Env()
        commits = [
            scripts.commit(
                env, keys, stream, j, e, t, "succeeded", "1", 60_000, 0, keys.default_level, [], 0
            )
            for j, e, t in jobs
        ]
        replies = await scripts.run_many(redis, commits, raise_on_error=False)
        await redis.config_set("maxmemory", 0)
        assert replies == [1] * size
        statuses = [await redis.hget(keys.job(j), "status") for j, _, _ in jobs]
        assert statuses == ["succeeded"] * size
        assert (await redis.xpending(stream, GROUP))["pending"] == 0
        assert await redis.xlen(stream) == 0
    finally:
        await redis.aclose()
