"""What an admin call looks at: a queue's partitions, where a job lives, and "now".

A queue's partitions are the ones recorded in its meta hash (``client.resolve``), or
more when this runner is configured with more (``TaskRunner(partitions=N)``), so a
pause or a listing covers every partition a worker of this runner may read.

"Now" is the scripts' clock (the server's, shifted or frozen by ``tr.clock``),
estimated with this process's clock: admin reads use it only to leave out members of
the finished-job indexes older than ``result_ttl``, where a few ms do not matter.
"""

from __future__ import annotations

from collections.abc import Sequence

from taskrunner.client import Client
from taskrunner.keys import Queue, QueueKeys, check_name


async def queue(client: Client, name: str) -> Queue:
    """The queue ``name`` as recorded in Redis (ConfigurationError for a bad name)."""
    return await client.resolve(check_name("queue", name))


def partitions(client: Client, q: Queue) -> list[QueueKeys]:
    """Every partition of ``q`` this runner knows of."""
    parts = list(q.parts)
    for p in range(len(parts), client.partitions or 0):
        parts.append(QueueKeys(client.namespace, q.name, p, default_level=client.default_level))
    return parts


def now_ms(client: Client) -> int:
    """The scripts' "now", estimated with this process's clock."""
    return int(client.clock.now() * 1000)


def level_or_default(client: Client, q: Queue, level: str | None) -> str:
    """A job's stored level when it is one of the queue's, else the default level (a
    hostile value must not send a job to a stream nobody reads)."""
    return level if level in q.levels else client.default_level


async def locate(client: Client, queues: Sequence[str], job_id: str) -> QueueKeys | None:
    """The partition holding job ``job_id`` among ``queues``: each queue's home
    partition of the id first, then every other partition (two pipelined round trips
    at most, never a scan); None when no partition has it."""
    resolved = [await queue(client, name) for name in queues]
    homes = [q.for_id(job_id) for q in resolved]
    pipe = client.redis.pipeline(transaction=False)
    for keys in homes:
        pipe.exists(keys.job(job_id))
    for keys, found in zip(homes, await pipe.execute(), strict=True):
        if found:
            return keys
    others = [
        keys
        for q, home in zip(resolved, homes, strict=True)
        for keys in partitions(client, q)
        if keys.partition != home.partition
    ]
    if not others:
        return None
    pipe = client.redis.pipeline(transaction=False)
    for keys in others:
        pipe.exists(keys.job(job_id))
    for keys, found in zip(others, await pipe.execute(), strict=True):
        if found:
            return keys
    return None
