"""``CronHost``: what the crontab and its per-worker service need of their runner (a
narrow port, so the cron package does not depend on ``taskrunner.runner``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from taskrunner.client import Client
    from taskrunner.clock import Clock
    from taskrunner.job import Job
    from taskrunner.middleware.base import Middleware
    from taskrunner.middleware.unique import UniqueMiddleware
    from taskrunner.task import Call


class CronHost(Protocol):
    """The runner as cron sees it (``TaskRunner`` is one)."""

    @property
    def client(self) -> Client: ...

    @property
    def clock(self) -> Clock: ...

    @property
    def max_payload(self) -> int: ...

    @property
    def unique(self) -> UniqueMiddleware: ...

    @property
    def middleware(self) -> Sequence[Middleware]: ...

    def check_priority(self, level: str, task: str) -> str: ...

    async def enqueue_many(self, calls: list[Call[Any]], /) -> list[Job[Any]]: ...
