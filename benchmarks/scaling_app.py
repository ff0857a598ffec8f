"""The app the scaling benchmark's worker processes run (``benchmarks.scaling``):

    TASKRUNNER_REDIS_URL=... SCALING_NAMESPACE=... taskrunner worker benchmarks.scaling_app:tr

One no-op task on queue ``bench``, the default chain (lease, unique, retry, timeout),
results kept for the default day. The partition count is not set here: workers read it
from the queue's meta, where the benchmark's producer recorded it.
"""

from __future__ import annotations

import os

from taskrunner import TaskRunner

QUEUE = "bench"

tr = TaskRunner(queue=QUEUE, namespace=os.environ.get("SCALING_NAMESPACE", "scaling"))


@tr.task
async def noop() -> None:
    """Does nothing: the benchmark measures the queue, not the task."""
