"""The Redis key schema: every key and channel taskrunner uses is named here.

A queue is split into ``N`` partitions (``TaskRunner(partitions=N)``; 1 by default on
a standalone server). Every key of one partition shares one Redis Cluster hash tag,
``{queue}`` for partition 0 and ``{queue#p}`` for partition ``p >= 1``, so each Lua
script touches a single slot, and every script receives all its keys in KEYS::

    {ns}:{queue}:stream           stream of ready jobs of the default priority level
    {ns}:{queue}:stream:{level}   stream of ready jobs of another priority level
    {ns}:{queue}:delayed          sorted set of scheduled jobs, scored by due time (ms)
    {ns}:{queue}:seq              counter that keeps equal due times in FIFO order
    {ns}:{queue}:dead             sorted set of dead-lettered job ids, scored by time
    {ns}:{queue}:failed           sorted set of failed job ids, scored by time (result_ttl)
    {ns}:{queue}:succeeded        likewise for succeeded jobs (the admin API's listings)
    {ns}:{queue}:aborted          likewise for aborted jobs
    {ns}:{queue}:rejected         likewise for rejected jobs
    {ns}:{queue}:job:{id}         hash with the job's state, result and error
    {ns}:{queue}:lock:{digest}    unique-job lock; value is the holder's job id
    {ns}:{queue}:idle             set by a worker that found the partition drained: the
                                  next enqueue deletes it and publishes "ready"
    {ns}:{queue}:paused           present while the queue is paused
    {ns}:{queue}:reclaim          hash: whose turn it is to scan for stale entries, cursor
    {ns}:{queue}:cron:{name}      hash: a cron schedule's state (last tick handled and by
                                  which worker, paused, last tick fired and its job); in
                                  the partition its jobs go to (taskrunner.cron)
    {ns}:{queue}:next             sorted set, the outbox of chains: ids of succeeded jobs
                                  whose follow-up is not written yet, scored by commit
                                  time (ms); commit.lua adds, relayed.lua removes
    {ns}:{queue}:events           channel: "due", "ready [<id>]", "abort <id>", "pause",
                                  "resume"
    {ns}:{queue}:done:{id}        channel: the job reached a final status

(``{queue}`` above stands for the partition's tag.) Per queue, in partition 0's slot:

    {ns}:{queue}:workers          sorted set of live consumers, scored by last heartbeat
    {ns}:{queue}:meta             hash: partitions (what producers use), max_partitions
                                  (every partition workers read)

Rate and concurrency limits (taskrunner.middleware.limits) live apart from every queue,
in a slot of their own: the hash tag is the limit's digest (task name and limit
arguments), so a limit shared by jobs of many queues and partitions is one slot::

    {ns}:limit:{digest}:running   sorted set of concurrency slot holders (lease tokens),
                                  scored by lease expiry (ms, server time)
    {ns}:limit:{digest}:starts    sorted set of the rate window's starts (lease tokens),
                                  scored by start time (ms)
    {ns}:limit:{digest}:waiting   sorted set of jobs waiting for a concurrency slot
                                  (``queue<TAB>partition<TAB>job id``), scored by the
                                  time they last found the limit full (ms)
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

from taskrunner.exceptions import ConfigurationError

GROUP = "taskrunner"
"""The one consumer group of every stream."""

DEFAULT_NAMESPACE = "taskrunner"
DEFAULT_PRIORITIES = ("high", "default", "low")
DEFAULT_LEVEL = "default"
MAX_PARTITIONS = 1024
"""The most partitions a queue may have (``partitions=``; a larger count recorded in
Redis is hostile and read as absent)."""

_FORBIDDEN = frozenset("{}# \t\r\n")
_FORBIDDEN_LEVEL = _FORBIDDEN | {":"}


def check_name(kind: str, name: str) -> str:
    """A namespace or queue name must be non-empty, with no braces (they would move the
    Cluster hash tag), no ``#`` (it separates a queue from its partition number) and no
    whitespace (lock keys are stored space-separated)."""
    if not isinstance(name, str) or not name or _FORBIDDEN.intersection(name):
        raise ConfigurationError(
            f"invalid {kind} name {name!r}: it must be a non-empty string without braces, "
            "'#' or whitespace"
        )
    return name


def check_many(kind: str, values: Sequence[str], example: str) -> list[str]:
    """A list of names or ids given as a sequence: a string is refused, not read as a
    sequence of one-letter ``kind`` (``counts("emails")`` would count queue ``e``...)."""
    if isinstance(values, str | bytes):
        raise ConfigurationError(
            f"{kind} must be a sequence, e.g. [{example!r}], got the string {values!r}"
        )
    return list(values)


def check_levels(levels: Sequence[str]) -> tuple[str, ...]:
    """Priority level names: at least one, unique, and usable in keys and members."""
    if isinstance(levels, str | bytes):  # a string is a sequence: of one-letter levels
        raise ConfigurationError(
            f"priorities must be a sequence of level names, highest first, e.g. "
            f"('high', 'default', 'low'), got the string {levels!r}"
        )
    found = tuple(levels)
    if not found:
        raise ConfigurationError("priorities must name at least one level")
    for level in found:
        if not isinstance(level, str) or not level or _FORBIDDEN_LEVEL.intersection(level):
            raise ConfigurationError(
                f"invalid priority level {level!r}: it must be a non-empty string without "
                "braces, '#', ':' or whitespace"
            )
    if len(set(found)) != len(found):
        raise ConfigurationError(f"priority levels must be unique, got {found!r}")
    return found


def tag(queue: str, partition: int) -> str:
    """The hash tag (without braces) of one partition of a queue."""
    return queue if partition == 0 else f"{queue}#{partition}"


def home_partition(value: str, partitions: int) -> int:
    """The partition a job id (or a lock digest) maps to among ``partitions``."""
    if partitions <= 1:
        return 0
    return zlib.crc32(value.encode("utf-8", "surrogateescape")) % partitions


class QueueKeys:
    """The keys of one partition of a queue in one namespace (computed once)."""

    __slots__ = (
        "aborted",
        "dead",
        "default_level",
        "delayed",
        "events",
        "failed",
        "idle",
        "meta",
        "namespace",
        "outbox",
        "partition",
        "paused",
        "prefix",
        "queue",
        "reclaim",
        "rejected",
        "seq",
        "stream",
        "succeeded",
        "workers",
    )

    def __init__(
        self,
        namespace: str,
        queue: str,
        partition: int = 0,
        *,
        default_level: str = DEFAULT_LEVEL,
    ) -> None:
        check_name("namespace", namespace)
        check_name("queue", queue)
        if partition < 0:
            raise ConfigurationError(f"invalid partition {partition}")
        self.namespace = namespace
        self.queue = queue
        self.partition = partition
        self.default_level = default_level
        self.prefix = f"{namespace}:{{{tag(queue, partition)}}}"
        self.stream = f"{self.prefix}:stream"
        self.delayed = f"{self.prefix}:delayed"
        self.seq = f"{self.prefix}:seq"
        self.dead = f"{self.prefix}:dead"
        self.failed = f"{self.prefix}:failed"
        self.succeeded = f"{self.prefix}:succeeded"
        self.aborted = f"{self.prefix}:aborted"
        self.rejected = f"{self.prefix}:rejected"
        self.events = f"{self.prefix}:events"
        self.idle = f"{self.prefix}:idle"
        self.paused = f"{self.prefix}:paused"
        self.reclaim = f"{self.prefix}:reclaim"
        self.outbox = f"{self.prefix}:next"
        home = f"{namespace}:{{{queue}}}"
        self.workers = f"{home}:workers"
        self.meta = f"{home}:meta"

    def __repr__(self) -> str:
        return f"QueueKeys({self.namespace!r}, {self.queue!r}, {self.partition})"

    def level_stream(self, level: str) -> str:
        """The stream of one priority level (the default level's is ``stream``)."""
        return self.stream if level == self.default_level else f"{self.stream}:{level}"

    def finished(self, outcome: str) -> str:
        """The finished-job index commit.lua writes for ``outcome``: succeeded,
        rejected, or aborted for any other (the status an abort request turns a retry,
        reschedule or hand-back into; failed and dead jobs have their own keys)."""
        if outcome == "succeeded":
            return self.succeeded
        if outcome == "rejected":
            return self.rejected
        return self.aborted

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def done(self, job_id: str) -> str:
        return f"{self.prefix}:done:{job_id}"

    def lock(self, digest: str) -> str:
        return f"{self.prefix}:lock:{digest}"

    def own_locks(self, field: str | None) -> list[str]:
        """The lock keys named in a job's ``locks`` field that are this partition's
        locks. Any other name (hostile data) is left out: a commit or abort never
        touches a key that is not a lock, and its keys stay on one Cluster slot."""
        prefix = self.lock("")
        return [key for key in (field or "").split() if key.startswith(prefix) and key != prefix]

    def cron(self, name: str) -> str:
        """The state of cron schedule ``name`` (taskrunner.cron)."""
        return f"{self.prefix}:cron:{name}"


class Queue:
    """A queue's partitions and priority levels, as one runner sees them."""

    __slots__ = ("levels", "name", "namespace", "partitions", "parts", "read")

    def __init__(
        self,
        namespace: str,
        name: str,
        levels: Sequence[str] = DEFAULT_PRIORITIES,
        default_level: str = DEFAULT_LEVEL,
        partitions: int = 1,
        read: int | None = None,
    ) -> None:
        self.namespace = namespace
        self.name = name
        self.levels = tuple(levels)
        self.partitions = max(1, partitions)
        """How many partitions producers spread new jobs over."""
        self.read = max(self.partitions, read or 0)
        """How many partitions exist (workers read them all; >= ``partitions`` after N
        was lowered, so nothing is stranded)."""
        self.parts = [
            QueueKeys(namespace, name, p, default_level=default_level) for p in range(self.read)
        ]

    def __repr__(self) -> str:
        return f"Queue({self.name!r}, partitions={self.partitions}, read={self.read})"

    def part(self, partition: int) -> QueueKeys:
        return self.parts[partition]

    def for_id(self, job_id: str) -> QueueKeys:
        """The partition a job id lives in when nothing else chose it."""
        return self.parts[home_partition(job_id, self.partitions)]

    def streams(self, keys: QueueKeys) -> list[str]:
        """The level streams of one partition, highest priority first."""
        return [keys.level_stream(level) for level in self.levels]


class LimitKeys:
    """The keys of one rate or concurrency limit (one digest) in one namespace."""

    __slots__ = ("digest", "prefix", "running", "starts", "waiting")

    def __init__(self, namespace: str, digest: str) -> None:
        check_name("namespace", namespace)
        self.digest = digest
        self.prefix = f"{namespace}:limit:{{{digest}}}"
        self.running = f"{self.prefix}:running"
        self.starts = f"{self.prefix}:starts"
        self.waiting = f"{self.prefix}:waiting"

    def __repr__(self) -> str:
        return f"LimitKeys({self.prefix!r})"
