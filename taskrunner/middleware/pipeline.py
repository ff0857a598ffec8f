"""A middleware's per-worker pipeline of script calls.

A middleware whose every attempt makes a script call or two (limits: take and give back
a slot; unique jobs: take and release a lock) sends them through one ``Coalescer`` per
worker: the calls of concurrent jobs share one pipelined round trip, calls of one script
on one hash slot go as one EVALSHA, and no job holds a connection of its own while it
waits. Outside a worker that started the middleware (``on_worker_start`` not called:
e.g. a chain run by hand) a call goes straight to Redis.

The pipeline rides outages: a call the server cannot take now (away, restarting, failing
over) is sent again until it can, so a caller waits rather than getting a connection
error; cancel the caller (or give it a deadline) to stop waiting. A script's own error
(e.g. OOM) is raised to its caller alone. Calls are sent in the order submitted except
that a pipeline groups calls of one script on one hash slot, so a call that must follow
another one of a different script is submitted only after that one's reply (``undo``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from taskrunner import scripts
from taskrunner.middleware.base import WorkerPort
from taskrunner.worker.committer import Coalescer

logger = logging.getLogger("taskrunner.worker")

Undo = Callable[[Any], scripts.ScriptCall | None]
"""Given the reply of a call whose caller was cancelled before it came, the call that
reverses it (None: nothing to reverse)."""


class WorkerPipelines:
    """One pipeline of script calls per worker, for one middleware."""

    def __init__(self, what: str) -> None:
        self._what = what
        """What the calls are, for logs ("lock calls")."""
        self._workers: dict[WorkerPort, Coalescer] = {}

    def start(self, worker: WorkerPort) -> None:
        """Open ``worker``'s pipeline (from ``on_worker_start``): it is flushed by one of
        the worker's services, which runs until the worker's jobs have ended."""
        calls = self._workers[worker] = Coalescer(worker.redis)
        worker.spawn(calls.run)

    def stop(self, worker: WorkerPort) -> None:
        """Forget ``worker``'s pipeline (from ``on_worker_stop``)."""
        self._workers.pop(worker, None)

    async def run(
        self, worker: WorkerPort, call: scripts.ScriptCall, undo: Undo | None = None
    ) -> Any:
        """Run ``call`` in ``worker``'s pipeline (straight to Redis without one) and
        return its reply; a script's error is raised.

        ``undo``: if this caller is cancelled before the reply comes, the call still
        runs; ``undo(reply)`` then gives the call that reverses it, sent in a later
        pipeline (so after it). Without a pipeline a cancelled call is not reversed."""
        calls = self._workers.get(worker)
        if calls is None:
            return await scripts.run(worker.redis, call)
        if undo is None:
            return await calls.submit(call)
        return await calls.submit(call, lambda reply: self._reverse(calls, undo, reply))

    def _reverse(self, calls: Coalescer, undo: Undo, reply: Any) -> None:
        if isinstance(reply, Exception):
            return  # the script failed: it changed nothing
        reverse = undo(reply)
        if reverse is not None:
            calls.submit_nowait(reverse, lambda answer: self._reversed(reverse, answer))

    def _reversed(self, call: scripts.ScriptCall, answer: Any) -> None:
        if isinstance(answer, Exception):
            logger.warning(
                "could not reverse %s %s of a cancelled job (%s); it expires instead",
                self._what,
                call.script.name,
                answer,
            )
