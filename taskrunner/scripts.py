"""The Lua scripts that make every multi-key state change atomic, with typed callers.

Each script lives in ``taskrunner/lua/NAME.lua`` and is documented there (its
KEYS, ARGV and reply). Scripts are loaded once per server and called by SHA; a
server that lost them (a restart) gets them again on the NOSCRIPT error. The
builders below are the only places that know each script's KEYS and ARGV order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, cast

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from taskrunner.keys import GROUP, QueueKeys

Arg = str | int | float


class Script:
    """One Lua script, identified by the SHA1 of its source."""

    __slots__ = ("name", "sha", "source")

    def __init__(self, name: str) -> None:
        self.name = name
        self.source = resources.files("taskrunner").joinpath(f"lua/{name}.lua").read_text()
        self.sha = hashlib.sha1(self.source.encode(), usedforsecurity=False).hexdigest()

    def __repr__(self) -> str:
        return f"Script({self.name!r})"


ENQUEUE = Script("enqueue")
PROMOTE = Script("promote")
CLAIM = Script("claim")
COMMIT = Script("commit")
HEARTBEAT = Script("heartbeat")
ABORT = Script("abort")
REVIVE = Script("revive")
LOCK = Script("lock")
UNLOCK = Script("unlock")
ALL = (ENQUEUE, PROMOTE, CLAIM, COMMIT, HEARTBEAT, ABORT, REVIVE, LOCK, UNLOCK)


@dataclass(slots=True)
class ScriptCall:
    """A script with its keys and arguments, ready to run alone or in a pipeline."""

    script: Script
    keys: Sequence[str]
    args: Sequence[Arg]


async def load_all(redis: Redis) -> None:
    """Load every script into the server's script cache."""
    pipe = redis.pipeline(transaction=False)
    for script in ALL:
        pipe.script_load(script.source)
    await pipe.execute()


async def run(redis: Redis, call: ScriptCall) -> Any:
    """Run one script by SHA, loading the scripts first if the server lost them."""
    args = (call.script.sha, len(call.keys), *call.keys, *call.args)
    client = cast(Any, redis)  # redis-py types keys_and_args as str only
    try:
        return await client.evalsha(*args)
    except NoScriptError:
        await load_all(redis)
        return await client.evalsha(*args)


async def run_many(
    redis: Redis, calls: Sequence[ScriptCall], *, raise_on_error: bool = True
) -> list[Any]:
    """Run many scripts in one pipelined round trip (not a transaction).

    With ``raise_on_error=False`` a script's error is returned in its place."""
    if not calls:
        return []
    results = await _pipeline(redis, calls)
    missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
    if missing:
        await load_all(redis)
        again = await _pipeline(redis, [calls[i] for i in missing])
        for i, result in zip(missing, again, strict=True):
            results[i] = result
    if raise_on_error:
        for result in results:
            if isinstance(result, Exception):
                raise result
    return results


async def _pipeline(redis: Redis, calls: Sequence[ScriptCall]) -> list[Any]:
    pipe = cast(Any, redis.pipeline(transaction=False))
    for call in calls:
        pipe.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
    return list(await pipe.execute(raise_on_error=False))


# -- builders: one per script, the only code that knows its KEYS and ARGV ------------


def enqueue(
    keys: QueueKeys,
    job_id: str,
    task: str,
    args: str,
    now_ms: int,
    due_ms: int,
    locks: Sequence[tuple[str, int]] = (),
) -> ScriptCall:
    """Write a job (and take its enqueue-side locks: ``(key, ttl_ms)``)."""
    return ScriptCall(
        ENQUEUE,
        [keys.job(job_id), keys.stream, keys.delayed, keys.seq, *(k for k, _ in locks)],
        [
            job_id,
            task,
            args,
            keys.queue,
            now_ms,
            due_ms,
            keys.events,
            len(locks),
            *(ttl for _, ttl in locks),
        ],
    )


def promote(keys: QueueKeys, members: Sequence[str]) -> ScriptCall:
    """Move these due members of the delayed set into the stream."""
    job_keys = [keys.job(m[17:]) for m in members]
    return ScriptCall(PROMOTE, [keys.delayed, keys.stream, *job_keys], list(members))


def claim(
    keys: QueueKeys,
    job_id: str,
    consumer: str,
    entry_id: str,
    token: str,
    now_ms: int,
    max_deliveries: int,
) -> ScriptCall:
    """Start an attempt under a new lease."""
    return ScriptCall(
        CLAIM,
        [keys.stream, keys.job(job_id)],
        [GROUP, consumer, entry_id, token, now_ms, max_deliveries],
    )


def commit(
    keys: QueueKeys,
    job_id: str,
    entry_id: str,
    token: str,
    outcome: str,
    now_ms: int,
    payload: str,
    ttl_ms: int,
    due_ms: int,
    locks: Sequence[str],
) -> ScriptCall:
    """Record an outcome and acknowledge the entry, if the lease is still ``token``."""
    return ScriptCall(
        COMMIT,
        [keys.stream, keys.job(job_id), keys.delayed, keys.dead, keys.seq, keys.failed, *locks],
        [
            GROUP,
            entry_id,
            token,
            job_id,
            outcome,
            now_ms,
            payload,
            ttl_ms,
            due_ms,
            keys.done(job_id),
            keys.events,
        ],
    )


def heartbeat(
    keys: QueueKeys,
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
        [keys.stream, keys.job(job_id), *locks],
        [GROUP, consumer, entry_id, token, lock_ttl_ms, job_id],
    )


def abort(
    keys: QueueKeys, job_id: str, now_ms: int, ttl_ms: int, locks: Sequence[str]
) -> ScriptCall:
    """Abort a job (see abort.lua for what happens in each status)."""
    return ScriptCall(
        ABORT,
        [keys.job(job_id), keys.stream, keys.delayed, *locks],
        [job_id, now_ms, ttl_ms, keys.done(job_id), keys.events, GROUP],
    )


def revive(keys: QueueKeys, job_id: str) -> ScriptCall:
    """Put a dead-lettered job back on its queue as a fresh job with the same id."""
    return ScriptCall(REVIVE, [keys.dead, keys.stream, keys.job(job_id)], [job_id])


def lock(keys: QueueKeys, job_id: str, token: str, ttl_ms: int, locks: Sequence[str]) -> ScriptCall:
    """Take (or re-enter, refreshing the TTL) a running attempt's locks, all or nothing."""
    return ScriptCall(LOCK, [keys.job(job_id), *locks], [job_id, token, ttl_ms])


def unlock(
    keys: QueueKeys, job_id: str, token: str, locks: Sequence[str], *, forget: bool = False
) -> ScriptCall:
    """Compare-and-delete a running attempt's locks (``forget``: drop them from the job)."""
    return ScriptCall(UNLOCK, [keys.job(job_id), *locks], [job_id, token, int(forget)])
