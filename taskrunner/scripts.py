"""The Lua scripts that make every multi-key state change atomic, with typed callers.

Each script lives in ``taskrunner/lua/NAME.lua`` and is documented there (its
KEYS, ARGV and reply). Scripts are loaded once per server and called by SHA; a
server that lost them (a restart) gets them again on the NOSCRIPT error. The
builders below are the only places that know each script's KEYS and ARGV order.

Every script also exists as a *batch* version: the script's body wrapped in a Lua
function and called once per job by a small driver, so N calls of one script on
one queue cost one EVALSHA (one command to pack, one reply to parse) instead of N.
``run_many`` groups calls that way; a batch is atomic as a whole, which is at
least as strong as each call being atomic on its own.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from itertools import chain
from typing import Any, cast

import anyio
from redis.asyncio import Redis, RedisCluster
from redis.exceptions import (
    AskError,
    ClusterDownError,
    NoScriptError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from taskrunner.exceptions import NotReplicated
from taskrunner.keys import GROUP, MAX_PARTITIONS, LimitKeys, QueueKeys

Arg = str | int | float


def _sha(source: str) -> str:
    return hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()


TRIM_MAX = 1000
"""Most members one index trim removes (commit.lua): as many as one batch can add."""


def _read(name: str) -> str:
    return resources.files("taskrunner").joinpath(f"lua/{name}.lua").read_text()


_CLOCK = _read("_clock")
"""Prepended to the scripts that use ``now_ms`` or ``now_text`` (lua/_clock.lua): "now"
from the server's clock (TIME, read once per script run; scripts never trust a
client's clock)."""

READY_NAME_LIMIT = 1024
"""Longest job id a "ready" event names (lua/_ready.lua); a longer one gets a bare
"ready", and the worker claims that job with claim.lua."""

_READY = _read("_ready").replace("@READY_NAME_LIMIT@", str(READY_NAME_LIMIT))
"""Prepended to the scripts that publish "ready" for a job (lua/_ready.lua)."""

_SETTLE = _read("_settle").replace("@TRIM_MAX@", str(TRIM_MAX))
"""Prepended to the scripts that settle entries or index finished jobs, and to every
batch (lua/_settle.lua): what a batch defers to its end, and when to trim an index."""

_HOSTILE = _read("_hostile")
"""Prepended to the scripts whose failure paths meet hostile data (lua/_hostile.lua):
a dead letter's reason, a count that a hostile field does not fail."""


def _prelude(text: str, *, batch: bool) -> str:
    """The helpers ``text`` uses, and no others: each is a closure Lua creates on every
    run of the script, which a lone enqueue or heartbeat would pay for in vain."""
    settles = batch or any(name in text for name in ("settle_entry", "add_to_index"))
    clock = "now_ms" in text or "now_text" in text
    ready = "ready_event" in text
    hostile = "dead_reason" in text or "add_count" in text
    return (
        (_CLOCK if clock else "")
        + (_SETTLE if settles else "")
        + (_READY if ready else "")
        + (_HOSTILE if hostile else "")
    )


_BATCH_DRIVER = _read("_batch")
"""Appended to a script's body to make its batch version (taskrunner/lua/_batch.lua):
runs ``one(KEYS, ARGV)`` per call, in one of two layouts.

- Calls of one shape (the same numbers of keys and of args: a worker's claims and
  commits): ARGV ``'u'``, n, then a pattern for the keys and one for the args, a
  letter per position: ``s`` shared (the same value in every call, sent once) or
  ``v`` varying; then the shared args, then each call's varying args; KEYS the
  shared keys, then each call's varying keys. Every call gets the same two tables
  with its varying positions filled in (no script writes to KEYS or ARGV), so a
  partition's keys and a worker's settings cost the server and the packer once per
  batch, not once per job.
- Otherwise: ARGV n, then (n_keys, n_args) per call, then every call's args in
  order; KEYS every call's keys in order.

A call that fails gives an error in its own place only (what it wrote before failing
stays, as it would for the script run alone); the calls before and after it run as
usual.

Entries a call settles with ``settle_entry`` are acknowledged at once and deleted by
the driver after the last call (``drop_entries`` in lua/_batch.lua: one ``XTRIM
MINID`` per stream for those below the oldest pending entry, an ``XDEL`` for the
rest), and the members calls add with ``add_to_index`` are added with one ``ZADD``
per index: the same writes in the same script, so the same atomic effect, at a
fraction of the cost (an ``XDEL`` searches its entry's listpack node once per id). The
XACK stays first and immediate: it is the call's first write and Redis does not refuse
it when out of memory, and after a script's first write Redis lets its later writes
through, so a commit under ``maxmemory`` still records its outcome (a deferred XACK
left every job of an OOM batch "running" with its entry gone). A failed final delete
or index write (a hostile key) leaves an acknowledged entry for a later batch's trim
or a finished job out of its index, and fails no call. ``trim_due(key, now)`` says
whether a call should trim an index: once per script run and key, in every batch,
else one run in ~32 (a trim removes at most ``TRIM_MAX`` members, enough to keep up
with a batch's inserts)."""


class Script:
    """One Lua script, identified by the SHA1 of its source, and its batch version.

    ``uses`` names other scripts this one calls as local functions of the same name
    (``enqueue(KEYS, ARGV)`` returns what enqueue.lua returns), so one write path
    serves both."""

    __slots__ = ("batch_sha", "batch_source", "name", "sha", "shares", "source")

    def __init__(self, name: str, uses: Sequence[str] = (), *, shares: bool = True) -> None:
        self.name = name
        self.shares = shares
        """Whether a batch of calls of one shape sends its shared positions once."""
        body = "".join(
            f"local function {used}(KEYS, ARGV)\n{_read(used)}\nend\n" for used in uses
        ) + _read(name)
        self.source = _prelude(body, batch=False) + body
        self.sha = _sha(self.source)
        self.batch_source = (
            f"{_prelude(body, batch=True)}local function one(KEYS, ARGV)\n{body}\nend\n"
            f"{_BATCH_DRIVER}"
        )
        self.batch_sha = _sha(self.batch_source)

    def __repr__(self) -> str:
        return f"Script({self.name!r})"


ENQUEUE = Script("enqueue")
FETCH = Script("fetch", uses=("unread",))
PEEK = Script("peek", uses=("unread",))
PROMOTE = Script("promote")
CLAIM = Script("claim")
TAKE = Script("take", uses=("unread", "fetch", "claim"))
COMMIT = Script("commit")
HEARTBEAT = Script("heartbeat")
REQUEUE = Script("requeue")
ABORT = Script("abort")
REVIVE = Script("revive")
LOCK = Script("lock")
UNLOCK = Script("unlock")
LEAVE = Script("leave")
ORPHAN = Script("orphan")
ISOLATE = Script("isolate")
WATCH = Script("watch")
PARTITIONS = Script("partitions")
TURN = Script("turn")
PROGRESS = Script("progress")
PURGE = Script("purge")
PAGE = Script("page")
AGE = Script("age")
RERUN = Script("rerun")
PAUSE = Script("pause")
MINUTES = Script("minutes")
MATCH = Script("match")
ACQUIRE = Script("acquire")
RELEASE = Script("release")
RENEW = Script("renew")
HASTEN = Script("hasten")
TICK = Script("tick", uses=("enqueue",))
UNPAUSE = Script("unpause")
RELAYED = Script("relayed")
ALL = (
    ENQUEUE,
    FETCH,
    PEEK,
    PROMOTE,
    CLAIM,
    TAKE,
    COMMIT,
    HEARTBEAT,
    REQUEUE,
    ABORT,
    REVIVE,
    LOCK,
    UNLOCK,
    LEAVE,
    ORPHAN,
    ISOLATE,
    WATCH,
    PARTITIONS,
    TURN,
    PROGRESS,
    PURGE,
    PAGE,
    AGE,
    RERUN,
    PAUSE,
    MINUTES,
    MATCH,
    ACQUIRE,
    RELEASE,
    RENEW,
    HASTEN,
    TICK,
    UNPAUSE,
    RELAYED,
)


@dataclass(slots=True)
class ScriptCall:
    """A script with its keys and arguments, ready to run alone or in a pipeline."""

    script: Script
    keys: Sequence[str]
    args: Sequence[Arg]


async def load_all(redis: Redis) -> None:
    """Load every script into the server's script cache (every primary of a cluster)."""
    if isinstance(redis, RedisCluster):
        for script in ALL:
            await redis.script_load(script.source)
            await redis.script_load(script.batch_source)
        return
    # only those the server lacks: a SCRIPT LOAD of every source at each connect costs
    # ~100 KB on the wire, and Redis 6.2 appends each to its AOF
    sources = {script.sha: script.source for script in ALL}
    sources |= {script.batch_sha: script.batch_source for script in ALL}
    shas = list(sources)
    try:
        found = await redis.script_exists(*shas)
    except ResponseError:  # an ACL user without +script|exists (one made from an older
        found = [False] * len(shas)  # docs/deployment.md): load them all, as before
    missing = [sha for sha, there in zip(shas, found, strict=True) if not there]
    if not missing:
        return
    pipe = redis.pipeline(transaction=False)
    for sha in missing:
        pipe.script_load(sources[sha])
    await pipe.execute()


async def run(redis: Redis, call: ScriptCall) -> Any:
    """Run one script by SHA, loading the scripts first if the server lost them."""
    command = _command(call)
    reply = await _alone(redis, command)
    if isinstance(reply, NoScriptError):
        await load_all(redis)
        reply = await _alone(redis, command)
    if isinstance(reply, Exception):
        raise reply
    return reply


Replicas = tuple[int, int]
"""``(replicas, timeout_ms)``: WAIT for that many replicas after the scripts' writes."""


async def run_many(
    redis: Redis,
    calls: Sequence[ScriptCall],
    *,
    raise_on_error: bool = True,
    replicas: Replicas | None = None,
    prepared: Prepared | None = None,
) -> list[Any]:
    """Run many scripts in one pipelined round trip (not a transaction). Calls of the
    same script on the same queue go as one batch EVALSHA.

    With ``raise_on_error=False`` a script's error is returned in its place (an error
    in a batch is returned for every call of that batch). With ``replicas``, each
    pipeline ends with WAIT; a call whose write fewer replicas confirmed in time gets
    ``NotReplicated`` in its place. ``prepared``: ``prepare(calls)``, made beforehand
    (while the server runs something else)."""
    if not calls:
        return []
    groups = prepared.groups if prepared is not None else prepare(calls).groups
    results = await _pipeline(redis, calls, groups, replicas)
    missing = [g for g in groups if isinstance(results[g[0]], NoScriptError)]
    if missing:  # a restarted server lost the scripts: load them, rerun only those
        await load_all(redis)
        again = await _pipeline(redis, calls, missing, replicas)
        for group in missing:
            for index in group:
                results[index] = again[index]
    if raise_on_error:
        for result in results:
            if isinstance(result, Exception):
                raise result
    return results


BATCH_MAX = 200
"""Most calls one batch EVALSHA runs (more of one script and slot go as several): a
batch blocks the server for its whole run, about 2 ms at this size for enqueues."""


class _Group(list[int]):
    """Indexes of calls sent as one EVALSHA (a batch when more than one), and that
    EVALSHA's arguments."""

    __slots__ = ("command",)

    def __init__(self, indexes: list[int], calls: Sequence[ScriptCall]) -> None:
        super().__init__(indexes)
        self.command: tuple[Arg, ...]
        if len(indexes) == 1:
            self.command = _command(calls[indexes[0]])
        else:
            self.command = _batch([calls[i] for i in indexes])


@dataclass(frozen=True, slots=True)
class Prepared:
    """What ``run_many`` sends for some calls, worked out (``prepare``)."""

    groups: list[_Group]


def prepare(calls: Sequence[ScriptCall]) -> Prepared:
    """The calls grouped by script and hash slot (the key's ``{tag}``), at most
    ``BATCH_MAX`` per group, with each group's EVALSHA arguments."""
    by_key: dict[tuple[str, str], list[int]] = {}
    for index, call in enumerate(calls):
        first = call.keys[0]
        tag = first[first.find("{") : first.find("}") + 1]
        by_key.setdefault((call.script.name, tag), []).append(index)
    return Prepared(
        [
            _Group(indexes[start : start + BATCH_MAX], calls)
            for indexes in by_key.values()
            for start in range(0, len(indexes), BATCH_MAX)
        ]
    )


_REDIRECTS = ("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN")
_CLUSTER_TRIES = 4


async def _pipeline(
    redis: Redis,
    calls: Sequence[ScriptCall],
    groups: list[_Group],
    replicas: Replicas | None = None,
) -> list[Any]:
    if isinstance(redis, RedisCluster):
        return await _cluster_pipeline(redis, calls, groups, replicas)
    return await _node_pipeline(redis, calls, groups, replicas)


async def _cluster_pipeline(
    cluster: RedisCluster,
    calls: Sequence[ScriptCall],
    groups: list[_Group],
    replicas: Replicas | None,
) -> list[Any]:
    """One pipeline per node, concurrently (redis-py's cluster pipeline refuses
    EVALSHA). Calls whose slot moved meanwhile (MOVED/ASK, a migration, a failover)
    are retried a few times after the slot map is refreshed."""
    results: list[Any] = [None] * len(calls)
    pending = groups
    for attempt in range(_CLUSTER_TRIES):
        by_node: dict[str, tuple[Any, list[_Group]]] = {}
        for group in pending:
            node = cluster.get_node_from_key(calls[group[0]].keys[0])
            if node is None:
                raise ClusterDownError("no node serves the slot of " + calls[group[0]].keys[0])
            by_node.setdefault(node.name, (node, []))[1].append(group)

        async def one(node: Any, node_groups: list[_Group]) -> None:
            client = cast(Any, cluster).node_redis(node)
            try:
                partial = await _node_pipeline(client, calls, node_groups, replicas)
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                # a node that just died (retried below) or does not answer (its client
                # retried already): the error in place, not in an ExceptionGroup
                partial = [exc] * len(calls)
            for group in node_groups:
                for index in group:
                    results[index] = partial[index]

        async with anyio.create_task_group() as tg:
            for node, node_groups in by_node.values():
                tg.start_soon(one, node, node_groups)
        pending = [g for g in pending if _redirected(results[g[0]])]
        if not pending or attempt == _CLUSTER_TRIES - 1:
            break
        await anyio.sleep(0.05 * (attempt + 1))
        await cluster.nodes_manager.initialize()
    return results


def _redirected(result: Any) -> bool:
    """Whether a call failed because its slot is elsewhere or its node is away now."""
    if isinstance(result, (RedisConnectionError, OSError, AskError, TryAgainError)):
        return True  # (MovedError is an AskError)
    if isinstance(result, ClusterDownError):
        return True
    return isinstance(result, ResponseError) and str(result).startswith(_REDIRECTS)


async def _node_pipeline(
    redis: Redis,
    calls: Sequence[ScriptCall],
    groups: list[_Group],
    replicas: Replicas | None = None,
) -> list[Any]:
    results: list[Any] = [None] * len(calls)
    if replicas is None and len(groups) == 1 and len(groups[0]) == 1:
        results[groups[0][0]] = await _alone(redis, groups[0].command)
        return results
    replies = await _send(redis, groups, replicas)
    for group, reply in zip(groups, replies, strict=True):
        if len(group) == 1:
            results[group[0]] = reply
        elif isinstance(reply, Exception):
            for index in group:
                results[index] = reply
        else:
            for index, value in zip(group, reply, strict=True):
                results[index] = value
    return results


async def _send(redis: Redis, groups: list[_Group], replicas: Replicas | None) -> list[Any]:
    """One pipeline: a reply per group (a batch's is the list of its calls' replies)."""
    pipe = cast(Any, redis.pipeline(transaction=False))
    for group in groups:
        pipe.evalsha(*group.command)
    if replicas is not None:
        pipe.execute_command("WAIT", *replicas)
    replies: list[Any] = await pipe.execute(raise_on_error=False)
    return _replicated(replies, replicas) if replicas is not None else replies


def _command(call: ScriptCall) -> tuple[Arg, ...]:
    """The EVALSHA arguments of one call of the plain script."""
    return (call.script.sha, len(call.keys), *call.keys, *call.args)


async def _alone(redis: Redis, command: tuple[Arg, ...]) -> Any:
    """One EVALSHA's reply (``command``: its arguments), or its error in its place, as
    a pipeline of one would give them, sent without a pipeline's cost (about 20 µs of
    the client's time: the reader's and the committer's round trips when the worker is
    not busy)."""
    # What redis.evalsha(*command) sends, without its two wrapper calls (and redis-py
    # types keys_and_args as str only).
    try:
        return await cast(Any, redis).execute_command("EVALSHA", *command)
    except ResponseError as exc:
        return exc


def _replicated(replies: list[Any], replicas: Replicas) -> list[Any]:
    """The replies before the final WAIT's, each replaced by NotReplicated if WAIT
    confirmed fewer replicas than asked."""
    replies, confirmed = replies[:-1], replies[-1]
    if isinstance(confirmed, int) and confirmed >= replicas[0]:
        return replies
    lost = NotReplicated(replicas[0], confirmed, replicas[1])
    return [r if isinstance(r, Exception) else lost for r in replies]


def _batch(calls: Sequence[ScriptCall]) -> tuple[Arg, ...]:
    """The EVALSHA arguments of a batch of calls of one script."""
    sha = calls[0].script.batch_sha
    uniform = _uniform(calls) if calls[0].script.shares else None
    if uniform is not None:
        shared_keys, shared_args = uniform
        return (sha, len(shared_keys), *shared_keys, *shared_args)
    keys: list[str] = []
    sizes: list[int] = []
    flat: list[Arg] = []
    for call in calls:
        keys.extend(call.keys)
        flat.extend(call.args)
        sizes.append(len(call.keys))
        sizes.append(len(call.args))
    return (sha, len(keys), *keys, len(calls), *sizes, *flat)


def _uniform(calls: Sequence[ScriptCall]) -> tuple[list[str], list[Arg]] | None:
    """KEYS and ARGV of the driver's shared layout, or None when the calls differ in
    shape. A position is shared when every call sends the same bytes there: the same
    value of the same type (``1`` and ``1.0``, ``0.0`` and ``-0.0`` are equal in Python
    but not on the wire)."""
    n_keys, n_args = len(calls[0].keys), len(calls[0].args)
    if any(len(c.keys) != n_keys or len(c.args) != n_args for c in calls):
        return None
    key_pattern, keys, key_varying = _columns([c.keys for c in calls])
    arg_pattern, args, arg_varying = _columns([c.args for c in calls])
    keys.extend(chain.from_iterable(zip(*key_varying, strict=True)))  # call by call
    args.extend(chain.from_iterable(zip(*arg_varying, strict=True)))
    return keys, ["u", len(calls), key_pattern, arg_pattern, *args]


def _columns(rows: list[Sequence[Any]]) -> tuple[str, list[Any], list[tuple[Any, ...]]]:
    """(pattern, the shared values, the varying columns) of equally long rows."""
    pattern: list[str] = []
    shared: list[Any] = []
    varying: list[tuple[Any, ...]] = []
    count = len(rows)
    for column in zip(*rows, strict=True):
        first = column[0]
        same = column.count(first) == count
        if same and type(first) is not str:  # 1 == 1.0 == True, 0.0 == -0.0
            kind = type(first)
            same = all(type(value) is kind for value in column)
            if same and kind is float:
                same = len({repr(value) for value in column}) == 1
        pattern.append("s" if same else "v")
        if same:
            shared.append(first)
        else:
            varying.append(column)
    return "".join(pattern), shared, varying


# -- builders: one per script, the only code that knows its KEYS and ARGV ------------


@dataclass(frozen=True, slots=True)
class Env:
    """What every script call of one runner shares: how to publish, and the clock."""

    publish: str = "PUBLISH"
    """PUBLISH, or SPUBLISH on a Redis 7 cluster (sharded pub/sub)."""
    clock: str = "0"
    """The scripts' clock argument (taskrunner.clock.Clock.arg)."""


def enqueue(
    env: Env,
    keys: QueueKeys,
    job_id: str,
    task: str,
    args: str,
    level: str,
    delay_ms: int,
    locks: Sequence[tuple[str, int]] = (),
    meta: str = "",
    follow: str = "",
) -> ScriptCall:
    """Write a job due in ``delay_ms`` (and take its enqueue-side locks: ``(key,
    ttl_ms)``); ``meta`` is the job's headers as JSON ("" for none); ``follow`` its
    follow-ups as JSON (a chain step, taskrunner.chain; "" for none)."""
    # Tuples, not lists: a bulk enqueue holds a batch of these, and the garbage collector
    # stops tracking a tuple of strings and numbers, where every collection would walk
    # the lists again (about 2 µs per job of a 20,000-job enqueue_many).
    names: tuple[str, ...] = (
        keys.job(job_id),
        keys.level_stream(level),
        keys.delayed,
        keys.seq,
        keys.idle,
    )
    argv: tuple[Arg, ...] = (
        job_id,
        task,
        args,
        keys.queue,
        level,
        delay_ms,
        meta,
        keys.events,
        env.publish,
        env.clock,
        follow,
    )
    if locks:
        names += tuple(k for k, _ in locks)
        argv += tuple(ttl for _, ttl in locks)
    return ScriptCall(ENQUEUE, names, argv)


def fetch(
    env: Env,
    keys: QueueKeys,
    streams: Sequence[str],
    consumer: str,
    count: int,
    aging_ms: int,
    aged: int = 0,
    caps: Sequence[int] | None = None,
) -> ScriptCall:
    """Read up to ``count`` new entries of one partition: first up to ``aged`` of the
    oldest entries of lower levels that waited over ``aging_ms``, then highest level
    first, at most ``caps[i]`` of level ``i`` (default: no cap); see fetch.lua."""
    return ScriptCall(
        FETCH,
        [*streams, keys.idle, keys.paused],
        [GROUP, consumer, count, aging_ms, env.clock, aged, *(caps or [count] * len(streams))],
    )


def take(
    fetched: ScriptCall,
    keys: QueueKeys,
    job_id: str,
    token: str,
    max_deliveries: int,
    max_payload: int,
) -> ScriptCall:
    """``fetched`` (a fetch call), and the claim of job ``job_id`` under ``token`` if
    its entry is among those read (see take.lua)."""
    return ScriptCall(
        TAKE,
        [*fetched.keys, keys.job(job_id)],
        [*fetched.args, job_id, token, max_deliveries, max_payload],
    )


def peek(
    env: Env, keys: QueueKeys, streams: Sequence[str], count: int, *, heads: bool
) -> ScriptCall:
    """Up to ``count`` unread entry ids of one partition, highest level first, (with
    ``heads``, also the oldest of every lower level) and the server's time (see
    peek.lua); marks the partition idle when it has none."""
    return ScriptCall(
        PEEK, [*streams, keys.idle, keys.paused], [GROUP, count, env.clock, int(heads)]
    )


def promote(env: Env, keys: QueueKeys, members: Sequence[tuple[str, str, str]]) -> ScriptCall:
    """Move these due members ``(member, job_id, level)`` into their level's stream."""
    return ScriptCall(
        PROMOTE,
        [
            keys.delayed,
            keys.idle,
            *(keys.job(job_id) for _, job_id, _ in members),
            *(keys.level_stream(level) for _, _, level in members),
        ],
        [
            env.clock,
            env.publish,
            keys.events,
            *(part for member, job_id, _ in members for part in (member, job_id)),
        ],
    )


def claim(
    env: Env,
    keys: QueueKeys,
    stream: str,
    job_id: str,
    consumer: str,
    entry_id: str,
    token: str,
    max_deliveries: int,
    max_payload: int,
) -> ScriptCall:
    """Start an attempt under a new lease."""
    return ScriptCall(
        CLAIM,
        [stream, keys.job(job_id)],
        [GROUP, consumer, entry_id, token, max_deliveries, max_payload, env.clock],
    )


def commit(
    env: Env,
    keys: QueueKeys,
    stream: str,
    job_id: str,
    entry_id: str,
    token: str,
    outcome: str,
    payload: str,
    ttl_ms: int,
    delay_ms: int,
    level: str,
    locks: Sequence[str],
    lock_ttl_ms: int,
    *,
    follow: bool = False,
) -> ScriptCall:
    """Record an outcome and acknowledge the entry, if the lease is still ``token``.
    ``follow``: the job has follow-ups (a chain step): a success joins the outbox."""
    return ScriptCall(
        COMMIT,
        [
            stream,
            keys.job(job_id),
            keys.delayed,
            keys.dead,
            keys.seq,
            keys.failed,
            keys.idle,
            keys.finished(outcome),
            *((keys.outbox,) if follow else ()),
            *locks,
        ],
        [
            GROUP,
            entry_id,
            token,
            job_id,
            outcome,
            payload,
            ttl_ms,
            delay_ms,
            keys.done(job_id),
            keys.events,
            env.publish,
            env.clock,
            level,
            lock_ttl_ms,
            *(("1",) if follow else ()),
        ],
    )


def heartbeat(
    keys: QueueKeys,
    stream: str,
    job_id: str,
    consumer: str,
    entry_id: str,
    token: str,
    lock_ttl_ms: int,
    locks: Sequence[str],
) -> ScriptCall:
    """Renew a running job's lease and its locks."""
    return ScriptCall(
        HEARTBEAT,
        [stream, keys.job(job_id), *locks],
        [GROUP, consumer, entry_id, token, lock_ttl_ms, job_id],
    )


def requeue(
    env: Env, keys: QueueKeys, stream: str, consumer: str, entry_id: str, job_id: str
) -> ScriptCall:
    """Put a stale entry this consumer took over back on its stream (see requeue.lua)."""
    return ScriptCall(
        REQUEUE,
        [stream, keys.job(job_id), keys.idle],
        [GROUP, consumer, entry_id, job_id, env.publish, keys.events],
    )


def abort(
    env: Env, keys: QueueKeys, stream: str, job_id: str, ttl_ms: int, locks: Sequence[str]
) -> ScriptCall:
    """Abort a job (see abort.lua for what happens in each status)."""
    return ScriptCall(
        ABORT,
        [keys.job(job_id), stream, keys.delayed, keys.aborted, *locks],
        [job_id, ttl_ms, keys.done(job_id), keys.events, GROUP, env.publish, env.clock],
    )


def revive(env: Env, keys: QueueKeys, job_id: str, levels: Sequence[str]) -> ScriptCall:
    """Put a dead-lettered job back on its queue as a fresh job with the same id, in
    its own level's stream (``levels``: the runner's, highest first)."""
    default = levels.index(keys.default_level) + 1 if keys.default_level in levels else 1
    return ScriptCall(
        REVIVE,
        [keys.dead, keys.job(job_id), keys.idle, *(keys.level_stream(lv) for lv in levels)],
        [job_id, default, env.publish, keys.events, *levels],
    )


def lock(keys: QueueKeys, job_id: str, token: str, ttl_ms: int, locks: Sequence[str]) -> ScriptCall:
    """Take (or re-enter, refreshing the TTL) a running attempt's locks, all or nothing."""
    return ScriptCall(LOCK, [keys.job(job_id), *locks], [job_id, token, ttl_ms])


def unlock(
    keys: QueueKeys, job_id: str, token: str, locks: Sequence[str], *, forget: bool = False
) -> ScriptCall:
    """Compare-and-delete a running attempt's locks (``forget``: drop them from the job)."""
    return ScriptCall(UNLOCK, [keys.job(job_id), *locks], [job_id, token, int(forget)])


def leave(stream: str, consumer: str) -> ScriptCall:
    """Remove ``consumer`` from a stream's group if it holds no entries."""
    return ScriptCall(LEAVE, [stream], [GROUP, consumer])


def orphan(
    env: Env, keys: QueueKeys, stream: str, entry_id: str, job_id: str, task: str, error: str
) -> ScriptCall:
    """Dead-letter (as ``job_id``) and acknowledge an entry that names no usable job."""
    return ScriptCall(
        ORPHAN,
        [stream, keys.job(job_id), keys.dead],
        [GROUP, entry_id, job_id, task, keys.queue, error, env.clock],
    )


def isolate(keys: QueueKeys, job_id: str, token: str) -> ScriptCall:
    """Mark a running attempt as running alone in its worker."""
    return ScriptCall(ISOLATE, [keys.job(job_id)], [token])


def watch(keys: QueueKeys, job_id: str) -> ScriptCall:
    """Ask for the job's final status to be published, and read its state."""
    return ScriptCall(WATCH, [keys.job(job_id)], [])


def partitions(meta_key: str, wanted: int, default: int, *, record: bool) -> ScriptCall:
    """Read (and, with ``record`` or an explicit ``wanted``, set) a queue's partitions."""
    return ScriptCall(PARTITIONS, [meta_key], [wanted, default, int(record), MAX_PARTITIONS])


def turn(keys: QueueKeys, period_ms: int, worker: str) -> ScriptCall:
    """Take this partition's reclaim turn (1: ours, 0: not). Real time, like leases:
    a frozen test clock must not stop reclaims."""
    return ScriptCall(TURN, [keys.reclaim], [period_ms, "0", worker])


def progress(env: Env, keys: QueueKeys, job_id: str, token: str, value: str) -> ScriptCall:
    """Store a running attempt's progress (JSON), fenced by its lease."""
    return ScriptCall(PROGRESS, [keys.job(job_id)], [token, value, keys.done(job_id), env.publish])


def purge(keys: QueueKeys, job_ids: Sequence[str], cutoff_ms: int, keep: int) -> ScriptCall:
    """Remove these dead letters (and their job hashes) if they died at or before
    ``cutoff_ms`` or the dead letters hold more than ``keep`` (-1: remove them all)."""
    return ScriptCall(
        PURGE, [keys.dead, *(keys.job(i) for i in job_ids)], [cutoff_ms, keep, *job_ids]
    )


def page(keys: QueueKeys, after_id: str, after_score_ms: int, count: int) -> ScriptCall:
    """Up to ``count`` dead letters (id, score) after the cursor, oldest first."""
    return ScriptCall(PAGE, [keys.dead], [after_id, after_score_ms, count])


def age_lock(lock: str, job: str, holder: str, step_ms: int) -> ScriptCall:
    """Shorten a unique lock's TTL by ``step_ms`` unless its holder ``job`` is held by
    a worker (taskrunner.testing's frozen clock)."""
    return ScriptCall(AGE, [lock, job], [holder, step_ms])


def rerun(env: Env, keys: QueueKeys, stream: str, job_id: str) -> ScriptCall:
    """Run a failed, aborted, rejected or dead job again under the same id, in
    ``stream`` (its level's, in its partition); see rerun.lua."""
    return ScriptCall(
        RERUN,
        [
            keys.job(job_id),
            stream,
            keys.failed,
            keys.aborted,
            keys.rejected,
            keys.dead,
            keys.idle,
        ],
        [job_id, env.publish, keys.events, env.clock],
    )


def pause(env: Env, keys: QueueKeys, *, paused: bool) -> ScriptCall:
    """Pause (or resume) one partition of a queue and tell its workers."""
    return ScriptCall(
        PAUSE,
        [keys.paused],
        ["pause" if paused else "resume", env.publish, keys.events, env.clock],
    )


def minutes(env: Env, indexes: Sequence[str], count: int) -> ScriptCall:
    """Jobs finished in each of the last ``count`` minutes, per index (one partition)."""
    return ScriptCall(MINUTES, list(indexes), [count, env.clock])


def match(
    keys: QueueKeys, job_ids: Sequence[str], status: str, task: str, level: str
) -> ScriptCall:
    """Which of these jobs of one partition have ``status``, ``task`` and ``level``
    ("" matches any task or level)."""
    return ScriptCall(
        MATCH,
        [keys.job(i) for i in job_ids],
        [status, task, level, keys.default_level],
    )


def acquire(
    env: Env,
    keys: LimitKeys,
    holder: str,
    waiter: str,
    concurrency: int,
    lease_ms: int,
    rate: int,
    period_ms: int,
) -> ScriptCall:
    """Take a limit's slot for one attempt (``holder``: its lease token), or learn how
    long to wait; a refused concurrency check registers ``waiter`` (see acquire.lua)."""
    return ScriptCall(
        ACQUIRE,
        [keys.running, keys.starts, keys.waiting],
        [holder, waiter, concurrency, lease_ms, rate, period_ms, env.clock],
    )


def release(keys: LimitKeys, holder: str, concurrency: int, lease_ms: int) -> ScriptCall:
    """Give back a concurrency slot (``holder`` "" gives back none) and pick the waiters
    to wake for the free slots."""
    return ScriptCall(RELEASE, [keys.running, keys.waiting], [holder, concurrency, lease_ms])


def renew(running: str, lease_ms: int, holders: Sequence[str]) -> ScriptCall:
    """Renew concurrency slots of one limit (``running``: its holders key)."""
    return ScriptCall(RENEW, [running], [lease_ms, *holders])


def hasten(env: Env, keys: QueueKeys, job_id: str) -> ScriptCall:
    """Make a job waiting in the delayed set for a limit slot due now."""
    return ScriptCall(
        HASTEN, [keys.job(job_id), keys.delayed], [env.clock, env.publish, keys.events]
    )


def unpause(state: str, tick_ms: int, now_ms: int) -> ScriptCall:
    """Resume a paused cron schedule (its ``state`` key): the ticks up to ``tick_ms``
    (its latest at or before ``now_ms``) count as handled (see unpause.lua)."""
    return ScriptCall(UNPAUSE, [state], [tick_ms, now_ms])


def relayed(
    env: Env,
    keys: QueueKeys,
    job_id: str,
    dead: tuple[str, str, str, str] | None = None,
) -> ScriptCall:
    """Take job ``job_id`` out of its partition's outbox once its follow-up is written,
    or, with ``dead`` = ``(dead_id, task, queue, error_json)``, dead-letter the
    follow-up in this partition instead (see relayed.lua)."""
    dead_id, task, queue, error = dead or ("", "", "", "")
    return ScriptCall(
        RELAYED,
        [keys.outbox, keys.job(job_id), keys.dead, keys.job(dead_id or f"next-{job_id}")],
        [
            job_id,
            "dead" if dead else "ok",
            keys.done(job_id),
            env.publish,
            env.clock,
            dead_id,
            task,
            queue,
            error,
        ],
    )


def tick(
    env: Env,
    state: str,
    events: str,
    name: str,
    tick_ms: int,
    max_drift_ms: int,
    worker: str,
    write: ScriptCall,
) -> ScriptCall:
    """Handle one tick of cron schedule ``name`` (its ``state`` key): if no later tick
    was handled, it is due and at most ``max_drift_ms`` late, run ``write`` (an
    ``enqueue`` call in the same slot) unless the schedule is paused (see tick.lua)."""
    return ScriptCall(
        TICK,
        [state, *write.keys],
        [tick_ms, max_drift_ms, name, worker, env.clock, env.publish, events, *write.args],
    )
