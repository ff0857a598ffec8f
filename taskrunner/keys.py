"""The Redis key schema: every key and channel taskrunner uses is named here.

All keys of one queue share the hash tag ``{queue}``, so every script touches a
single Redis Cluster slot, and every script receives all its keys in KEYS::

    {ns}:{queue}:stream        stream of ready jobs (one entry per attempt: field ``job``)
    {ns}:{queue}:delayed       sorted set of scheduled jobs, scored by due time (ms)
    {ns}:{queue}:seq           counter that keeps equal due times in FIFO order
    {ns}:{queue}:dead          sorted set of dead-lettered job ids, scored by time
    {ns}:{queue}:failed        sorted set of failed job ids, scored by time (kept result_ttl)
    {ns}:{queue}:job:{id}      hash with the job's state, result and error
    {ns}:{queue}:lock:{digest} unique-job lock; value is the holder's job id
    {ns}:{queue}:workers       sorted set of live consumers, scored by last heartbeat
    {ns}:{queue}:events        pub/sub channel: "due" (delayed set changed), "abort <id>"
    {ns}:{queue}:done:{id}     pub/sub channel: the job reached a final status
"""

from __future__ import annotations

from taskrunner.exceptions import ConfigurationError

GROUP = "taskrunner"
"""The one consumer group of every queue's stream."""

DEFAULT_NAMESPACE = "taskrunner"


_FORBIDDEN = frozenset("{} \t\r\n")


def check_name(kind: str, name: str) -> str:
    """A namespace or queue name must be non-empty, with no braces (they would move the
    Cluster hash tag) and no whitespace (lock keys are stored space-separated)."""
    if not name or _FORBIDDEN.intersection(name):
        raise ConfigurationError(
            f"invalid {kind} name {name!r}: it must be non-empty, without braces or whitespace"
        )
    return name


class QueueKeys:
    """The keys of one queue in one namespace (computed once; used on every job)."""

    __slots__ = (
        "dead",
        "delayed",
        "events",
        "failed",
        "namespace",
        "prefix",
        "queue",
        "seq",
        "stream",
        "workers",
    )

    def __init__(self, namespace: str, queue: str) -> None:
        check_name("namespace", namespace)
        check_name("queue", queue)
        self.namespace = namespace
        self.queue = queue
        self.prefix = f"{namespace}:{{{queue}}}"
        self.stream = f"{self.prefix}:stream"
        self.delayed = f"{self.prefix}:delayed"
        self.seq = f"{self.prefix}:seq"
        self.dead = f"{self.prefix}:dead"
        self.failed = f"{self.prefix}:failed"
        self.workers = f"{self.prefix}:workers"
        self.events = f"{self.prefix}:events"

    def __repr__(self) -> str:
        return f"QueueKeys({self.namespace!r}, {self.queue!r})"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def done(self, job_id: str) -> str:
        return f"{self.prefix}:done:{job_id}"

    def lock(self, digest: str) -> str:
        return f"{self.prefix}:lock:{digest}"
