"""The relay: writes the follow-ups of chain steps that succeeded (taskrunner.chain).

commit.lua puts a succeeded chain step's id in its partition's outbox (``{queue}:next``)
in the same script that records the success, so the follow-up cannot be lost however
the worker dies. The relay then, for each id in the outbox:

1. reads the job's follow-up spec, result and headers (``next``, ``result``, ``meta``);
2. writes the follow-up into its own queue and partition (another Cluster slot,
   perhaps) with enqueue.lua, under the deterministic id ``<first id>.<n>``: if it
   exists already (this is a relay repeated after a crash), nothing is written;
3. takes the id out of the outbox and records ``relayed`` in the job (relayed.lua),
   telling a waiting ``ChainJob.result()``.

A crash between 2 and 3 repeats 2 (a no-op) and then 3; two relays racing both find
the follow-up written and only one ZREM removes the id. A spec that cannot be used
(hostile data: not JSON, unknown level, an args object that is not one) is
dead-lettered in the step's partition as ``next-<id>`` with the reason, by relayed.lua,
and the relay goes on. A write Redis refuses for a while (the target's slot away, or
``maxmemory`` reached with ``noeviction``) leaves the id in the outbox for a later
round: it is never dead-lettered for that.

Every worker runs one. It is woken by its own commits of chain steps (no Redis work
for other jobs), after a resubscription, and every ``max_wait`` seconds as a fallback
for the steps of a worker that died between its commit and its relay: one pipelined
``ZRANGE`` over the worker's partitions. At most ``RELAY_BATCH`` ids per partition per
round trip.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import anyio
from redis.asyncio import Redis

from taskrunner import scripts
from taskrunner.chain import Spec, SpecError, Step, follow_meta, follow_payload
from taskrunner.connection import (
    REDIS_ERRORS,
    out_of_memory,
    reachable,
    report,
    unavailable,
    wrong_type,
)
from taskrunner.job import ErrorInfo, safe_text
from taskrunner.keys import QueueKeys

if TYPE_CHECKING:
    from taskrunner.client import Client

logger = logging.getLogger("taskrunner.worker")

RELAY_BATCH = 100
"""Outbox ids handled per partition per round trip."""


@dataclass(slots=True)
class _Plan:
    """What the relay does for one outbox id."""

    job_id: str
    task: str = ""
    queue: str = ""
    write: scripts.ScriptCall | None = None
    dead: str = ""
    """The reason the follow-up is dead-lettered instead ("" for none)."""


class Relay:
    """Moves follow-ups out of some partitions' outboxes; ``run()`` until cancelled."""

    def __init__(
        self,
        redis: Redis,
        client: Client,
        partitions: Callable[[], Sequence[QueueKeys]],
        max_wait: float,
    ) -> None:
        self._redis = redis
        self._client = client
        self._partitions = partitions
        self._max_wait = max_wait
        self._wake = anyio.Event()
        self.handled = 0
        """Follow-ups handled so far, by ``run`` or ``relay_all`` (a burst worker reads
        again after any)."""

    def wake(self) -> None:
        """Look at the outboxes now (this worker committed a chain step)."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            try:
                await self.relay_all()
                reachable()
                wait = self._max_wait
            except REDIS_ERRORS as exc:
                report("the chain relay", exc)
                wait = 0.5
            except Exception:  # a bug or hostile data: keep relaying
                logger.exception("chain relay: unexpected error; retrying")
                wait = 0.5
            with anyio.move_on_after(wait):
                await self._wake.wait()
            self._wake = anyio.Event()

    async def relay_all(self) -> int:
        """Write every follow-up waiting in the outboxes now; how many were handled."""
        handled = 0
        pending = list(self._partitions())
        while pending:
            pipe = cast(Any, self._redis.pipeline(transaction=False))
            for keys in pending:
                pipe.zrange(keys.outbox, 0, RELAY_BATCH - 1)
            found = await pipe.execute(raise_on_error=False)
            full = []
            for keys, ids in zip(pending, found, strict=True):
                if isinstance(ids, Exception):
                    if not wrong_type(ids):
                        raise ids
                    report(f"the chain relay of {keys.prefix}", ids)  # hostile: skip it
                    continue
                if ids:
                    count = await self._relay(keys, cast(list[str], ids))
                    handled += count
                    self.handled += count
                    if len(ids) == RELAY_BATCH and count == len(ids):  # more may wait
                        full.append(keys)
            pending = full
        return handled

    async def _relay(self, keys: QueueKeys, ids: list[str]) -> int:
        pipe = cast(Any, self._redis.pipeline(transaction=False))
        for job_id in ids:
            pipe.hmget(keys.job(job_id), ["next", "result", "meta", "task"])
        states = await pipe.execute(raise_on_error=False)
        plans = [await self._plan(job_id, state) for job_id, state in zip(ids, states, strict=True)]
        writes = [p for p in plans if p.write is not None]
        replies = await scripts.run_many(
            self._redis, [cast(scripts.ScriptCall, p.write) for p in writes], raise_on_error=False
        )
        done: list[_Plan] = [p for p in plans if p.write is None]
        for plan, reply in zip(writes, replies, strict=True):
            if isinstance(reply, Exception):
                if unavailable(reply) or out_of_memory(reply):
                    report("the chain relay", reply)
                    continue  # the target's slot is away or full: the next round tries again
                plan.dead = f"the follow-up could not be written: {safe_text(str(reply), 200)}"
            done.append(plan)
        calls = [self._finish(keys, plan) for plan in done]
        for plan, reply in zip(
            done, await scripts.run_many(self._redis, calls, raise_on_error=False), strict=True
        ):
            if isinstance(reply, Exception):
                report("the chain relay", reply)
            elif reply == 1 and plan.dead:
                logger.error(
                    "job %s: its follow-up is dead-lettered as next-%s: %s",
                    plan.job_id,
                    plan.job_id,
                    plan.dead,
                )
        return len(done)

    async def _plan(self, job_id: str, state: list[str | None] | Exception) -> _Plan:
        if isinstance(state, Exception):
            if not wrong_type(state):
                raise state  # the next round tries again
            # hostile: the job's key is not a hash
            return _Plan(job_id, dead=f"the job cannot be read: {safe_text(str(state), 200)}")
        spec_text, result, meta, task = state
        plan = _Plan(job_id, task=task or "")
        if task is None:
            plan.dead = "the job is gone (expired or deleted) before its follow-up"
            return plan
        try:
            spec = Spec.decode(spec_text)
            step = spec.steps[0]
            plan.task, plan.queue = step.task, step.queue
            plan.write = await self._write(job_id, spec, step, result or "null", meta)
        except SpecError as exc:
            plan.dead = str(exc)
        except REDIS_ERRORS:
            raise  # the next round tries again
        except Exception as exc:  # noqa: BLE001 - hostile data: settle this item only
            plan.dead = f"the follow-up spec cannot be used: {safe_text(repr(exc), 200)}"
        return plan

    async def _write(
        self, job_id: str, spec: Spec, step: Step, result: str, meta: str | None
    ) -> scripts.ScriptCall:
        client = self._client
        level = step.level or client.default_level
        if level not in client.levels:
            raise SpecError(f"unknown priority level {safe_text(level, 50)!r}")
        rest = spec.rest(job_id)
        queue = await client.resolve(step.queue)
        follow_id = spec.next_id(job_id)
        return scripts.enqueue(
            client.env,
            queue.for_id(follow_id),
            follow_id,
            step.task,
            follow_payload(step, result),
            level,
            step.delay_ms,
            (),
            follow_meta(meta, more=rest is not None),
            rest.encode() if rest is not None else "",
        )

    def _finish(self, keys: QueueKeys, plan: _Plan) -> scripts.ScriptCall:
        if not plan.dead:
            return scripts.relayed(self._client.env, keys, plan.job_id)
        error = ErrorInfo(type="FollowUpError", message=plan.dead).model_dump_json()
        dead = (f"next-{plan.job_id}", plan.task, plan.queue or keys.queue, error)
        return scripts.relayed(self._client.env, keys, plan.job_id, dead)
