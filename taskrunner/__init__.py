"""taskrunner: an asyncio task runner on Redis streams.

Typed tasks, no lost jobs, no job run twice at once. Start with ``TaskRunner``.
"""

from taskrunner.chain import Chain, ChainJob
from taskrunner.cron import CronInfo, CronSchedule, CronTab
from taskrunner.deadletters import DeadLetters
from taskrunner.exceptions import (
    ConfigurationError,
    EmbeddedRedisError,
    JobAborted,
    JobDeadLettered,
    JobError,
    JobFailed,
    JobNotFound,
    JobRejected,
    LockConflictError,
    LostLease,
    MiddlewareError,
    NotReplicated,
    PayloadTooLarge,
    Retry,
    ScheduleNotFound,
    TaskrunnerError,
    TaskTimeout,
    UnknownOptionError,
)
from taskrunner.group import Group
from taskrunner.job import ErrorInfo, Job, JobContext, JobInfo, JobStatus, current_job
from taskrunner.middleware.base import (
    EnqueueContext,
    ExecutionContext,
    Middleware,
    Outcome,
    OutcomeKind,
    WorkerPort,
)
from taskrunner.options import TaskOptions
from taskrunner.runner import TaskRunner
from taskrunner.task import BoundTask, Call, Task
from taskrunner.worker import Worker

__version__ = "0.1.0"

__all__ = [
    "BoundTask",
    "Call",
    "Chain",
    "ChainJob",
    "ConfigurationError",
    "CronInfo",
    "CronSchedule",
    "CronTab",
    "DeadLetters",
    "EmbeddedRedisError",
    "EnqueueContext",
    "ErrorInfo",
    "ExecutionContext",
    "Group",
    "Job",
    "JobAborted",
    "JobContext",
    "JobDeadLettered",
    "JobError",
    "JobFailed",
    "JobInfo",
    "JobNotFound",
    "JobRejected",
    "JobStatus",
    "LockConflictError",
    "LostLease",
    "Middleware",
    "MiddlewareError",
    "NotReplicated",
    "Outcome",
    "OutcomeKind",
    "PayloadTooLarge",
    "Retry",
    "ScheduleNotFound",
    "Task",
    "TaskOptions",
    "TaskRunner",
    "TaskTimeout",
    "TaskrunnerError",
    "UnknownOptionError",
    "Worker",
    "WorkerPort",
    "__version__",
    "current_job",
]
