"""The event listener: follows every queue's events channel (pub/sub) for a worker.

Messages are ``"<kind>"`` or ``"<kind> <argument>"``: ``due`` (the delayed set
changed) and ``abort <job id>``. Handlers are plain callbacks registered per kind.
After each (re)subscription ``on_subscribed`` runs, because messages published while
the worker was not subscribed are lost (the periodic fallbacks cover them too).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import anyio
from redis.asyncio import Redis

from taskrunner.connection import REDIS_ERRORS
from taskrunner.keys import QueueKeys

logger = logging.getLogger("taskrunner.worker")

EventHandler = Callable[[str, str], None]
"""``handler(queue, argument)``."""


class EventListener:
    """Dispatches events of some queues to handlers; ``run()`` until cancelled."""

    def __init__(
        self, redis: Redis, keys: Sequence[QueueKeys], on_subscribed: Callable[[], None]
    ) -> None:
        self._redis = redis
        self._channels = {k.events: k.queue for k in keys}
        self._on_subscribed = on_subscribed
        self._handlers: dict[str, list[EventHandler]] = {}

    def on(self, kind: str, handler: EventHandler) -> None:
        self._handlers.setdefault(kind, []).append(handler)

    async def run(self) -> None:
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(*self._channels)
                self._on_subscribed()
                async for message in pubsub.listen():
                    self.dispatch(self._channels[message["channel"]], message["data"])
            except REDIS_ERRORS as exc:
                logger.warning("redis unavailable for events (%s); resubscribing", exc)
                await anyio.sleep(0.5)
            finally:
                with anyio.CancelScope(shield=True):  # close it even when cancelled
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    def dispatch(self, queue: str, data: str) -> None:
        kind, _, argument = data.partition(" ")
        for handler in self._handlers.get(kind, ()):
            handler(queue, argument)
