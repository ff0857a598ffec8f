"""The admin API: one job's detail, paginated listings, retry, abort, pause and resume,
queue counts and throughput, live workers and dead letters. ``tr.admin`` is an
``Admin`` for a TaskRunner; the CLI commands and the dashboard are built on it."""

from taskrunner.admin.api import Admin
from taskrunner.admin.listing import CursorError
from taskrunner.admin.models import (
    JobDetail,
    JobPage,
    LockInfo,
    MinuteCounts,
    QueueCounts,
    RunningJob,
    WorkerDetail,
)

__all__ = [
    "Admin",
    "CursorError",
    "JobDetail",
    "JobPage",
    "LockInfo",
    "MinuteCounts",
    "QueueCounts",
    "RunningJob",
    "WorkerDetail",
]
