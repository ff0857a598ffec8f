"""Queue names from the command line, checked before anything connects."""

from __future__ import annotations

from collections.abc import Iterable

from taskrunner.cli._common import USAGE_ERROR, fail
from taskrunner.exceptions import ConfigurationError
from taskrunner.keys import check_name


def check_queue_names(queues: Iterable[str]) -> None:
    """A queue name that breaks the key schema (braces, whitespace, empty) is a usage
    error: one line, exit 2, before any Redis (embedded or not) is started."""
    for queue in queues:
        try:
            check_name("queue", queue)
        except ConfigurationError as exc:
            fail(str(exc), USAGE_ERROR)
