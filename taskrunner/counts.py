"""Queue counts: how many jobs each queue holds per status, in one round trip.

Every number comes from a structure the queue keeps for the purpose, never from a
SCAN, and the whole read is one pipeline for all the queues asked about (on a Redis
Cluster, one per node that holds some of them). Its cost grows with the number of
queues, partitions and priority levels, and of live workers, not with the number of
jobs. A queue's figures are summed over all its partitions (``keys.Queue.parts``,
including those kept only for reading after N was lowered):

* queued: entries no worker has read yet, summed over every priority level's stream
  (stream length minus pending: a commit deletes its entry, so every entry left is
  either unread or pending);
* running: entries pending in the consumer groups (read and held under a lease, by a
  running job or one waiting in its worker for a free slot);
* scheduled: members of the delayed sets (delays, retries, reschedules);
* failed: jobs that failed for good within the last ``result_ttl``;
* dead: jobs in the dead letters;
* workers: every consumer that registered a heartbeat, with its last one;
* paused partitions: those whose ``paused`` key exists (``taskrunner queue pause``);
* next_due: the earliest due time in the delayed sets (by the scripts' clock).

Used by ``taskrunner info``, the Prometheus exporter's queue gauges
(``taskrunner.metrics``) and ``taskrunner.testing.run_until_idle``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from taskrunner.keys import GROUP, Queue, QueueKeys

if TYPE_CHECKING:
    from taskrunner.client import Client
    from taskrunner.middleware.base import WorkerPort


class Partitioned(Protocol):
    """A queue as the counts need it: its partitions and each one's level streams
    (``keys.Queue`` is one)."""

    @property
    def name(self) -> str: ...

    @property
    def parts(self) -> Sequence[QueueKeys]: ...

    def streams(self, keys: QueueKeys) -> Sequence[str]: ...


@dataclass(frozen=True, slots=True)
class QueueCounts:
    """What one queue holds, per status (summed over its partitions)."""

    queue: str
    queued: int
    scheduled: int
    running: int
    failed: int
    dead: int
    workers: list[tuple[str, float]]
    """Each consumer with a heartbeat on record, and its last one (epoch seconds)."""
    next_due: float | None
    """The earliest due time of a scheduled job (epoch seconds, by the scripts' clock:
    ``TaskRunner.clock``), None when none is."""
    partitions: list[dict[str, int]] = field(default_factory=list)
    """The same five counts for each partition, in partition order."""
    paused_partitions: int = 0
    """How many of its partitions are paused (all of them after ``tr.pause``)."""

    def by_status(self) -> dict[str, int]:
        """The five job counts by status name (``queued``, ``scheduled``, ...)."""
        return {
            "queued": self.queued,
            "scheduled": self.scheduled,
            "running": self.running,
            "failed": self.failed,
            "dead": self.dead,
        }


async def resolve(client: Client, names: Sequence[str]) -> list[Queue]:
    """The queues ``names`` with their partitions (``Client.resolve``: read from the
    queue's meta hash once per process, then cached)."""
    return [await client.resolve(name) for name in names]


@dataclass(frozen=True, slots=True)
class _PortQueue:
    name: str
    parts: Sequence[QueueKeys]
    port: WorkerPort

    def streams(self, keys: QueueKeys) -> Sequence[str]:
        return self.port.streams(keys)


def worker_queues(worker: WorkerPort) -> list[Partitioned]:
    """The queues a worker reads, with the partitions and levels it reads them with."""
    parts: dict[str, list[QueueKeys]] = {}
    for keys in worker.partitions():
        parts.setdefault(keys.queue, []).append(keys)
    return [_PortQueue(name, found, worker) for name, found in parts.items()]


async def queue_counts(
    redis: Redis, queues: Sequence[Partitioned], *, now: float, result_ttl: float
) -> list[QueueCounts]:
    """The counts of each of ``queues``, in order, in one pipelined round trip.
    ``now`` (epoch seconds, by the scripts' clock) and ``result_ttl`` bound the failed
    jobs counted. A queue, partition or level whose stream or group does not exist
    yet counts as empty."""
    pipe = cast(Any, redis.pipeline(transaction=False))
    since = int((now - result_ttl) * 1000)
    for queue in queues:
        for keys in queue.parts:
            for stream in queue.streams(keys):
                pipe.xlen(stream)
                pipe.xpending(stream, GROUP)
            pipe.zcard(keys.delayed)
            pipe.zrange(keys.delayed, 0, 0, withscores=True)
            pipe.zcount(keys.failed, since, "+inf")
            pipe.zcard(keys.dead)
            pipe.exists(keys.paused)
        pipe.zrange(queue.parts[0].workers, 0, -1, withscores=True)
    replies = iter(await pipe.execute(raise_on_error=False))
    return [_counted(queue, replies) for queue in queues]


def _counted(queue: Partitioned, replies: Iterator[Any]) -> QueueCounts:
    """One queue's counts from its replies, in the order ``queue_counts`` sent them."""
    parts: list[dict[str, int]] = []
    dues: list[float] = []
    paused = 0
    for keys in queue.parts:
        part = dict.fromkeys(("queued", "scheduled", "running", "failed", "dead"), 0)
        for _ in queue.streams(keys):
            length, pending = _checked(next(replies)), _checked(next(replies))
            held = int(pending["pending"]) if pending is not None else 0
            part["queued"] += max(0, int(length or 0) - held)
            part["running"] += held
        part["scheduled"] = int(_checked(next(replies)))
        first = _checked(next(replies))
        if first:
            dues.append(float(first[0][1]) / 1000)
        part["failed"] = int(_checked(next(replies)))
        part["dead"] = int(_checked(next(replies)))
        paused += int(_checked(next(replies)))
        parts.append(part)
    queued, scheduled, running, failed, dead = (
        sum(p[name] for p in parts) for name in ("queued", "scheduled", "running", "failed", "dead")
    )
    workers = _checked(next(replies))
    return QueueCounts(
        queue=queue.name,
        queued=queued,
        scheduled=scheduled,
        running=running,
        failed=failed,
        dead=dead,
        workers=[(str(w), float(score) / 1000) for w, score in workers],
        next_due=min(dues) if dues else None,
        partitions=parts,
        paused_partitions=paused,
    )


def _checked(reply: Any) -> Any:
    """A pipeline reply, or None for a missing stream or group (nothing read yet)."""
    if isinstance(reply, ResponseError) and "NOGROUP" in str(reply):
        return None
    if isinstance(reply, Exception):
        raise reply
    return reply


__all__ = ["Partitioned", "QueueCounts", "queue_counts", "resolve", "worker_queues"]
