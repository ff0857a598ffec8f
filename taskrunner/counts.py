"""Queue counts: how many jobs each queue holds per status, in one round trip.

Every number comes from a structure the queue keeps for the purpose, never from a
SCAN, and the whole read is one pipeline for all the queues asked about (its cost
grows with the number of queues and of live workers, not of jobs):

* queued: entries in the stream no worker has read yet (stream length minus pending:
  commits delete their entry, so every entry left is either unread or pending);
* scheduled: members of the delayed set (delays, retries, reschedules);
* running: entries pending in the consumer group (read and held under a lease);
* failed: jobs that failed for good within the last ``result_ttl``;
* dead: jobs in the dead letters;
* workers: every consumer that registered a heartbeat, with its last one;
* next_due: the earliest due time in the delayed set.

Used by ``taskrunner info``, the Prometheus exporter's queue gauges
(``taskrunner.metrics``) and ``taskrunner.testing.run_until_idle``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from taskrunner.keys import GROUP, QueueKeys

_PER_QUEUE = 7
"""Commands per queue in the pipeline below."""


@dataclass(frozen=True, slots=True)
class QueueCounts:
    """What one queue holds, per status."""

    queue: str
    queued: int
    scheduled: int
    running: int
    failed: int
    dead: int
    workers: list[tuple[str, float]]
    """Each consumer with a heartbeat on record, and its last one (epoch seconds)."""
    next_due: float | None
    """The earliest due time of a scheduled job (epoch seconds), None when none is."""

    def by_status(self) -> dict[str, int]:
        """The five job counts by status name (``queued``, ``scheduled``, ...)."""
        return {
            "queued": self.queued,
            "scheduled": self.scheduled,
            "running": self.running,
            "failed": self.failed,
            "dead": self.dead,
        }


async def queue_counts(
    redis: Redis, keys: Sequence[QueueKeys], *, now: float, result_ttl: float
) -> list[QueueCounts]:
    """The counts of each of ``keys``' queues, in order, in one pipelined round trip.
    ``now`` (epoch seconds) and ``result_ttl`` bound the failed jobs counted.
    A queue whose stream or group does not exist yet counts as empty."""
    pipe = cast(Any, redis.pipeline(transaction=False))
    since = int((now - result_ttl) * 1000)
    for k in keys:
        pipe.xlen(k.stream)
        pipe.xpending(k.stream, GROUP)
        pipe.zcard(k.delayed)
        pipe.zrange(k.delayed, 0, 0, withscores=True)
        pipe.zcount(k.failed, since, "+inf")
        pipe.zcard(k.dead)
        pipe.zrange(k.workers, 0, -1, withscores=True)
    replies: list[Any] = await pipe.execute(raise_on_error=False)
    found = []
    for index, k in enumerate(keys):
        length, pending, scheduled, first, failed, dead, workers = [
            _checked(reply) for reply in replies[index * _PER_QUEUE : (index + 1) * _PER_QUEUE]
        ]
        running = int(pending["pending"]) if pending is not None else 0
        found.append(
            QueueCounts(
                queue=k.queue,
                queued=max(0, int(length) - running),
                scheduled=int(scheduled),
                running=running,
                failed=int(failed),
                dead=int(dead),
                workers=[(str(w), float(score) / 1000) for w, score in workers],
                next_due=float(first[0][1]) / 1000 if first else None,
            )
        )
    return found


def _checked(reply: Any) -> Any:
    """A pipeline reply, or None for a missing stream or group (nothing read yet)."""
    if isinstance(reply, ResponseError) and "NOGROUP" in str(reply):
        return None
    if isinstance(reply, Exception):
        raise reply
    return reply
