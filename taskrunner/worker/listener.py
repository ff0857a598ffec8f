"""The event listener: follows every partition's events channel for a worker.

Messages are ``"<kind>"`` or ``"<kind> <argument>"``: ``due`` (a delayed set changed),
``ready [<job id>]`` (a drained partition got that job), ``abort <job id>``, ``pause``, ``resume``;
the worker itself dispatches ``resubscribed`` (queue "") after a lost link came back.
Handlers are plain callbacks registered per kind and called with ``(queue, argument)``;
``on_partition`` handlers get ``(partition prefix, argument)`` instead (the reader reads
only the partition a ``ready`` came from, and claims the job it names in that read).
Anything else on the channel (anything in Redis may be hostile) is ignored. After each
(re)subscription ``on_resubscribed`` runs, because messages published while the worker
was not subscribed are lost (the periodic fallbacks cover them too).

``follow`` waits at most ``CONFIRM_WAIT`` seconds for each new subscription: a server
that refuses it (an ACL without the channel) must not stall the worker's housekeeping,
which calls it. The subscription stays asked for; until it is confirmed the worker
finds new jobs by its ``max_idle_wait`` fallback reads.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence

import anyio

from taskrunner.keys import QueueKeys
from taskrunner.logs import excerpt
from taskrunner.subscriber import Subscriber, handler

logger = logging.getLogger("taskrunner.worker")

CONFIRM_WAIT = 10.0
"""Seconds ``follow`` waits for the server to confirm one new subscription."""

EventHandler = Callable[[str, str], None]
"""``handler(queue, argument)``."""


class EventListener:
    """Dispatches events of some partitions to handlers."""

    def __init__(self, subscriber: Subscriber, on_resubscribed: Callable[[], None]) -> None:
        self._subscriber = subscriber
        self._on_resubscribed = on_resubscribed
        self._handlers: dict[str, list[EventHandler]] = {}
        self._by_partition: dict[str, list[EventHandler]] = {}
        self._channels: dict[str, str] = {}

    def on(self, kind: str, fn: EventHandler) -> None:
        self._handlers.setdefault(kind, []).append(fn)

    def on_partition(self, kind: str, fn: EventHandler) -> None:
        """Call ``fn(partition prefix, argument)`` for each event of this kind."""
        self._by_partition.setdefault(kind, []).append(fn)

    async def follow(self, partitions: Sequence[QueueKeys]) -> None:
        """Subscribe to the events of these partitions (those not followed yet), all at
        once, waiting at most ``CONFIRM_WAIT`` in all for the confirmations."""
        new = [keys for keys in partitions if keys.events not in self._channels]
        for keys in new:
            self._channels[keys.events] = keys.queue
        confirmed: set[str] = set()

        async def subscribe(keys: QueueKeys) -> None:
            await self._subscriber.subscribe(
                keys.events, handler(self._dispatcher(keys), self._on_resubscribed)
            )
            confirmed.add(keys.events)

        with anyio.move_on_after(CONFIRM_WAIT):
            async with anyio.create_task_group() as tg:
                for keys in new:
                    tg.start_soon(subscribe, keys)
        waiting = [keys.prefix for keys in new if keys.events not in confirmed]
        if waiting:
            logger.warning(
                "events of %s: the subscription was not confirmed within %gs; new jobs "
                "are found by the fallback reads until it is",
                ", ".join(waiting[:10])
                + (f" and {len(waiting) - 10} more" if len(waiting) > 10 else ""),
                CONFIRM_WAIT,
            )

    def _dispatcher(self, keys: QueueKeys) -> Callable[[str], None]:
        def dispatch(data: str) -> None:
            self.dispatch(keys.queue, data, keys.prefix)

        return dispatch

    def dispatch(self, queue: str, data: str, partition: str = "") -> None:
        kind, _, argument = data.partition(" ")
        found = self._handlers.get(kind, [])
        by_partition = self._by_partition.get(kind, []) if partition else []
        if not found and not by_partition:
            logger.debug("ignored an unknown event on queue %s: %s", queue, excerpt(data))
            return
        calls = [functools.partial(fn, queue, argument) for fn in found]
        calls += [functools.partial(fn, partition, argument) for fn in by_partition]
        for call in calls:
            try:
                call()
            except Exception:
                logger.exception("event handler for %r failed", kind)
