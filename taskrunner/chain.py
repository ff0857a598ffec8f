"""Chains: a job that starts the next one when it succeeds, its result as the first argument.

``add.chain(1, 2).then(double).then(fmt, unit="m")`` builds a ``Chain[str]``; mypy and
pyright check that each task's first parameter takes the previous task's result, and
the rest of its arguments as for ``enqueue``. ``await chain.enqueue()`` validates every
step and writes the first job with the rest of the chain as its follow-up spec (its
``next`` field), in one script; it returns a ``ChainJob[str]`` whose ``result()``
follows the chain to its last step.

How a follow-up is written (docs/chains.md): the commit of a succeeded step puts its id
in its partition's outbox in the same script (commit.lua), so a worker that dies right
after the commit loses nothing; a relay (taskrunner.worker.relay) then writes the next
step into its own queue under a deterministic id (``<first id>.<n>``), so a relay
repeated after a crash writes nothing twice.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Concatenate, Generic, ParamSpec, Protocol, TypeVar, cast

from taskrunner.definition import Call, Calls
from taskrunner.job import Job, JobStore, deadline, safe_text
from taskrunner.keys import check_name
from taskrunner.options import wait_seconds

if TYPE_CHECKING:
    from taskrunner.codec import ResultCodec

P2 = ParamSpec("P2")
R = TypeVar("R")
R2 = TypeVar("R2")

NEXT_HEADER = "taskrunner-next"
"""The job header (``EnqueueContext.meta``) that marks a chain step with follow-ups:
the worker reads it at claim (no extra Redis work for other jobs) and only then asks
commit.lua to put a success in the outbox."""
SPEC_VERSION = 1
MAX_STEPS = 100
"""Steps of one chain (a spec with more is refused at enqueue, and is hostile in Redis)."""


class Enqueues(Protocol):
    """What a chain needs of its runner."""

    async def enqueue_chain(
        self, first: Call[Any], steps: Sequence[Call[Any]]
    ) -> ChainJob[Any]: ...


class Chain(Generic[R]):
    """Calls to run one after the other, each getting the previous result as its first
    argument. Immutable: ``then`` returns a new chain. Nothing is sent before
    ``enqueue()``."""

    __slots__ = ("_first", "_runner", "_steps")

    def __init__(self, runner: Enqueues, first: Call[Any], steps: tuple[Call[Any], ...] = ()):
        self._runner = runner
        self._first = first
        self._steps = steps

    def then(
        self,
        task: Calls[Concatenate[R, P2], R2],
        /,
        *args: P2.args,
        **kwargs: P2.kwargs,
    ) -> Chain[R2]:
        """Run ``task`` when this chain's last step succeeds, with that step's result as
        its first argument and ``args``/``kwargs`` as the rest. ``task`` may carry
        options (``task.options(queue=..., priority=..., delay=...)``; a delay counts
        from the success of the previous step); ``job_id`` and ``at`` are refused."""
        step = cast(Calls[P2, R2], task).call(*args, **kwargs)  # the first argument comes later
        return Chain(self._runner, self._first, (*self._steps, step))

    async def enqueue(self) -> ChainJob[R]:
        """Validate every step (a bad argument raises and writes nothing) and write the
        first job with the rest of the chain; returns the chain's handle."""
        return await self._runner.enqueue_chain(self._first, self._steps)

    def __repr__(self) -> str:
        names = [c.task.name for c in (self._first, *self._steps)]
        return f"Chain({' -> '.join(names)})"


class ChainJob(Generic[R]):
    """A handle to an enqueued chain: one ``Job`` per step (``jobs``; the later ones
    exist once their turn comes) and ``result()``, which follows the chain."""

    __slots__ = ("_client", "deduplicated", "jobs")

    def __init__(self, client: JobStore, jobs: Sequence[Job[Any]], *, deduplicated: bool = False):
        self._client = client
        self.jobs: tuple[Job[Any], ...] = tuple(jobs)
        """The steps' jobs in order; ``jobs[n]`` has id ``<first id>.<n>``."""
        self.deduplicated = deduplicated
        """The first job existed already (an idempotent ``job_id``): nothing was written."""

    @property
    def id(self) -> str:
        """The first job's id (the later steps' ids derive from it)."""
        return self.jobs[0].id

    @property
    def last(self) -> Job[R]:
        """The last step's job (it exists once the step before it succeeded)."""
        return self.jobs[-1]

    def __repr__(self) -> str:
        return f"ChainJob(id={self.id!r}, steps={len(self.jobs)})"

    async def result(self, timeout: float | timedelta | None = None) -> R:
        """Wait for the last step and return its result.

        The chain stops at the first step that does not succeed: this raises that
        step's error (``JobFailed``, ``JobAborted``, ``JobRejected``,
        ``JobDeadLettered``; a follow-up whose spec was unreadable is dead-lettered as
        ``next-<id of the step before>``), and the later steps never exist.
        ``TimeoutError`` when ``timeout`` (seconds or a ``timedelta``) passes first (the
        chain goes on)."""
        timeout = wait_seconds(timeout)
        once = 0.0 if timeout is not None and timeout <= 0 else None  # look once, no wait
        with deadline(None if once == 0 else timeout, f"chain {self.jobs[0].id} is not done"):
            for job in self.jobs[:-1]:
                state = await self._client.wait(job.queue, job.id, once, relayed=True)
                job._outcome(state)  # raises unless it succeeded
                relayed = state.get("relayed", "")
                if relayed.startswith("dead "):
                    await Job(self._client, relayed[5:], job.queue).result(once)
            last = self.last
            return last._outcome(await self._client.wait(last.queue, last.id, once))


# -- the follow-up spec (the job hash's `next` field) -------------------------------------


class SpecError(ValueError):
    """A follow-up spec in Redis that cannot be used (the reason is the message)."""


@dataclass(frozen=True, slots=True)
class Step:
    """One follow-up as stored: what to enqueue, except the first argument."""

    task: str
    queue: str
    level: str
    """Its priority level; "" for the runner's default."""
    param: str
    """The name of its first parameter: the previous step's result goes there."""
    args: dict[str, Any]
    """Its other arguments, validated at enqueue, keyed by parameter name."""
    delay_ms: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "queue": self.queue,
            "level": self.level,
            "param": self.param,
            "args": self.args,
            "delay_ms": self.delay_ms,
        }

    @classmethod
    def from_json(cls, value: Any) -> Step:
        if not isinstance(value, dict):
            raise SpecError("a step is not an object")
        try:
            step = cls(
                task=_text(value, "task"),
                queue=check_name("queue", _text(value, "queue")),
                level=_text(value, "level", empty=True),
                param=_text(value, "param"),
                args=value["args"],
                delay_ms=value.get("delay_ms", 0),
            )
        except KeyError as exc:
            raise SpecError(f"a step has no {exc}") from None
        except Exception as exc:  # noqa: BLE001 - e.g. a queue name that is not one
            raise SpecError(str(exc)) from None
        if not isinstance(step.args, dict) or step.param in step.args:
            raise SpecError("a step's args are not an object without its first parameter")
        if type(step.delay_ms) is not int or step.delay_ms < 0:
            raise SpecError("a step's delay_ms is not a whole number of 0 or more")
        return step


def _text(value: dict[str, Any], key: str, *, empty: bool = False) -> str:
    found = value[key]
    if not isinstance(found, str) or (not found and not empty):
        raise SpecError(f"a step's {key} is not a non-empty string")
    return found


@dataclass(frozen=True, slots=True)
class Spec:
    """The follow-ups of one job: ``steps[0]`` is written when it succeeds, with id
    ``<root>.<number>``; the rest ride along as that job's own spec."""

    steps: tuple[Step, ...]
    root: str | None = None
    """The chain's first job id (None in the first job's spec: it is that job's id)."""
    number: int = 1
    """The step number of ``steps[0]`` (the first job is step 0)."""

    def encode(self) -> str:
        return json.dumps(
            {
                "v": SPEC_VERSION,
                "root": self.root,
                "n": self.number,
                "steps": [s.to_json() for s in self.steps],
            },
            separators=(",", ":"),
        )

    def next_id(self, job_id: str) -> str:
        """The id of the follow-up of job ``job_id``."""
        return child_id(self.root or job_id, self.number)

    def rest(self, job_id: str) -> Spec | None:
        """The spec the follow-up of ``job_id`` carries (None: it is the last step)."""
        if len(self.steps) == 1:
            return None
        return Spec(self.steps[1:], self.root or job_id, self.number + 1)

    @classmethod
    def decode(cls, text: str | None) -> Spec:
        """Parse a stored spec; SpecError (with the reason) for anything unusable."""
        if not text:
            raise SpecError("the job has no follow-up spec")
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):  # deep nesting: RecursionError
            raise SpecError(f"the follow-up spec is not JSON: {safe_text(text, 200)!r}") from None
        if not isinstance(value, dict) or value.get("v") != SPEC_VERSION:
            raise SpecError("the follow-up spec is not a version 1 object")
        steps, root, number = value.get("steps"), value.get("root"), value.get("n")
        if not isinstance(steps, list) or not 1 <= len(steps) <= MAX_STEPS:
            raise SpecError(f"the follow-up spec needs 1 to {MAX_STEPS} steps")
        if root is not None and (not isinstance(root, str) or not root):
            raise SpecError("the follow-up spec's root is not a job id")
        if type(number) is not int or not 1 <= number <= MAX_STEPS:
            raise SpecError("the follow-up spec's step number is out of range")
        return cls(tuple(Step.from_json(s) for s in steps), root, number)


def child_id(root: str, number: int) -> str:
    """The job id of step ``number`` (1, 2, ...) of the chain whose first job is ``root``."""
    return f"{root}.{number}"


def follow_payload(step: Step, result: str) -> str:
    """The follow-up's arguments: the previous result (JSON as stored) as its first
    parameter, and the step's other arguments."""
    try:
        value = json.loads(result)
    except (ValueError, RecursionError):  # deep nesting: RecursionError
        raise SpecError(f"the result is not JSON: {safe_text(result, 200)!r}") from None
    return json.dumps({step.param: value, **step.args}, separators=(",", ":"))


def follow_meta(meta: str | None, *, more: bool) -> str:
    """A follow-up's headers: its parent's (a trace context goes on), with the chain
    marker only if more steps follow."""
    found: dict[str, str] = {}
    if meta:
        try:
            value = json.loads(meta)
        except (ValueError, RecursionError):  # deep nesting: RecursionError
            value = {}
        if isinstance(value, dict):
            found = {str(k): str(v) for k, v in value.items() if k != NEXT_HEADER}
    if more:
        found[NEXT_HEADER] = "1"
    return json.dumps(found, separators=(",", ":")) if found else ""


def handles(
    client: JobStore,
    first: Job[Any],
    steps: Sequence[tuple[str, ResultCodec]],
) -> ChainJob[Any]:
    """The handle of a chain whose first job is ``first`` and whose follow-ups go to
    ``(queue, result codec)``."""
    jobs = [first] + [
        Job(client, child_id(first.id, n), queue, codec)
        for n, (queue, codec) in enumerate(steps, start=1)
    ]
    return ChainJob(client, jobs, deduplicated=first.deduplicated)


__all__ = ["Chain", "ChainJob"]
