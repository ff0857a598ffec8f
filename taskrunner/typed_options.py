"""The keyword options of ``@tr.task``, typed for mypy and pyright.

``TaskOptionsDict`` lists every option of the built-in middleware, one line each, so
``@tr.task(timout=3)`` or ``@tr.task(max_retries="3")`` is a static error. Adding an
option to a built-in middleware's ``Options`` model means adding its line here too
(``tests/test_task_options.py`` fails until both agree). Options of user middleware
go through ``@tr.task(options={...})``, typed by a ``TypedDict`` of their own (see
docs/middleware.md); at run time every option is validated by its middleware's model.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypedDict

from taskrunner.middleware.unique import ConflictStrategy, LockKind


class TaskOptionsDict(TypedDict, total=False):
    """Options of the built-in middleware, as ``@tr.task`` keywords (None: the default)."""

    # TimeoutMiddleware (TimeoutOptions)
    timeout: float | timedelta | None
    # RetryMiddleware (RetryOptions)
    max_retries: int | None
    retry_delay: float | timedelta | None
    # LimitsMiddleware (LimitOptions)
    concurrency_limit: int | None
    rate_limit: str | None
    limit_args: list[str] | None
    # UniqueMiddleware (UniqueOptions)
    lock: LockKind | None
    on_conflict: ConflictStrategy | None
    lock_ttl: float | timedelta | None
    unique_args: Callable[..., Any] | None
    reschedule_delay: float | timedelta | None
