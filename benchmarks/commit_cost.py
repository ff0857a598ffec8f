"""Redis CPU of commit.lua per job, read from the server's own accounting.

    python -m benchmarks.commit_cost                      # 20,000 jobs, 3 rounds
    python -m benchmarks.commit_cost --jobs 20000 --index 1000000 --rounds 5

It starts a private redis-server (benchmarks.run's), writes ``--jobs`` running jobs
(hashes with a lease, stream entries pending under one consumer), then commits them
all as succeeded with the builders of ``taskrunner.scripts``, the way a worker does: in
batches of 100 through ``run_many`` (one batch EVALSHA each), and again one EVALSHA per
job. The cost is ``INFO commandstats``' ``usec`` of ``evalsha`` divided by the jobs
(CONFIG RESETSTAT first): the server's time inside the scripts, nothing of the client.
``--index`` prefills the succeeded-jobs index (as after a busy day) so the ZADD is
measured at that size. Point PYTHONPATH at another checkout to measure its scripts
(the same builders exist on main); the median over ``--rounds`` is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from typing import Any, cast

import anyio
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from benchmarks.run import redis_server
from taskrunner import scripts
from taskrunner.keys import GROUP, QueueKeys

BATCH = 100
TOKEN = "t" * 32


async def prepare(redis: Redis, keys: QueueKeys, jobs: int, round_: int) -> list[tuple[str, str]]:
    """``jobs`` running jobs whose entries this consumer holds: (job id, entry id)."""
    ids = [f"r{round_}j{i:07d}" for i in range(jobs)]
    for start in range(0, jobs, 1000):
        pipe = redis.pipeline(transaction=False)
        for job_id in ids[start : start + 1000]:
            pipe.hset(
                keys.job(job_id),
                mapping={
                    "status": "running",
                    "lease": TOKEN,
                    "task": "add",
                    "queue": keys.queue,
                    "attempts": 1,
                    "level": "default",
                    "args": '{"x":1,"y":2}',
                },
            )
            pipe.xadd(keys.stream, {"job": job_id})
        await pipe.execute()
    with contextlib.suppress(ResponseError):  # the group exists from an earlier round
        await redis.xgroup_create(keys.stream, GROUP, "0", mkstream=True)
    entries: list[tuple[str, str]] = []
    while len(entries) < jobs:
        reply = await redis.xreadgroup(GROUP, "bench", {keys.stream: ">"}, count=1000)
        for _, rows in cast(list[Any], reply):
            entries += [(fields["job"], entry_id) for entry_id, fields in rows]
    return entries


def call(keys: QueueKeys, job_id: str, entry_id: str) -> scripts.ScriptCall:
    return scripts.commit(
        scripts.Env(),
        keys,
        keys.stream,
        job_id,
        entry_id,
        TOKEN,
        "succeeded",
        "3",
        86_400_000,
        0,
        "default",
        [],
        0,
    )


async def evalsha_usec(redis: Redis) -> tuple[int, int]:
    stats = await redis.info("commandstats")
    found = stats.get("cmdstat_evalsha", {"usec": 0, "calls": 0})
    return int(found["usec"]), int(found["calls"])


async def cpu_seconds(redis: Redis) -> float:
    """The server process's CPU time (user + system): unlike commandstats' usec, which
    is wall time inside the command, it does not grow when a loaded machine preempts
    the server mid-command."""
    info = await redis.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def one_round(
    redis: Redis, keys: QueueKeys, jobs: int, round_: int
) -> tuple[float, float, float]:
    """(evalsha µs per job batched, the same one call each, server CPU µs per job
    batched)."""
    results = []
    cpu = 0.0
    for batched in (True, False):
        entries = await prepare(redis, keys, jobs, 2 * round_ + int(batched))
        await redis.config_resetstat()
        cpu_before = await cpu_seconds(redis)
        if batched:
            for start in range(0, jobs, BATCH):
                chunk = entries[start : start + BATCH]
                await scripts.run_many(redis, [call(keys, j, e) for j, e in chunk])
        else:
            for start in range(0, jobs, BATCH):
                pipe = redis.pipeline(transaction=False)
                for job_id, entry_id in entries[start : start + BATCH]:
                    c = call(keys, job_id, entry_id)
                    cast(Any, pipe).evalsha(c.script.sha, len(c.keys), *c.keys, *c.args)
                await pipe.execute()
        if batched:
            cpu = (await cpu_seconds(redis) - cpu_before) * 1e6 / jobs
        usec, _ = await evalsha_usec(redis)
        results.append(usec / jobs)
    return results[0], results[1], cpu


async def main(url: str, jobs: int, index: int, rounds: int) -> None:
    redis = Redis.from_url(url, decode_responses=True)
    keys = QueueKeys("bench", "default")
    await scripts.load_all(redis)
    if index:  # finished over the last ~17 minutes: within result_ttl, nothing to trim
        succeeded = f"{keys.prefix}:succeeded"  # keys.succeeded where it exists
        now = int(time.time() * 1000)
        for start in range(0, index, 10_000):
            members = {f"old{i:08d}": now - index + i for i in range(start, start + 10_000)}
            await redis.zadd(succeeded, members)
    batched, single, cpus = [], [], []
    for round_ in range(rounds):
        b, s, c = await one_round(redis, keys, jobs, round_)
        batched.append(b)
        single.append(s)
        cpus.append(c)
        print(
            f"round {round_ + 1}: evalsha {b:.2f} µs/job batched, {s:.2f} µs/job one "
            f"EVALSHA each; server CPU {c:.2f} µs/job batched"
        )
    print(
        f"median over {rounds}: evalsha {statistics.median(batched):.2f} µs/job batched "
        f"(100 per EVALSHA), {statistics.median(single):.2f} µs/job one EVALSHA each; "
        f"server CPU {statistics.median(cpus):.2f} µs/job batched "
        f"({jobs:,} jobs, succeeded index prefilled with {index:,})"
    )
    await redis.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    with redis_server() as (url, _):
        anyio.run(main, url, options.jobs, options.index, options.rounds)
