"""A cron app for worker subprocesses started by the tests (``taskrunner worker``).

Its Redis comes from TASKRUNNER_REDIS_URL and its namespace from TEST_NAMESPACE
(``conftest.subprocess_env``). Schedules:

* ``every-second`` (``* * * * * *``): ``beat()`` counts each of its executions in
  the hash ``{ns}:test:cron-runs`` (job id -> executions) and returns the job's pid;
* ``nightly`` (``0 3 * * *`` in Europe/Paris): ``report("nightly", 3)``, fixed
  arguments; never due during a test, for the CLI's listing.

``TEST_CRON_MAX_DRIFT`` sets every-second's ``max_drift`` (default: the default).
"""

from __future__ import annotations

import os

from redis.asyncio import Redis

from taskrunner import TaskRunner, current_job
from taskrunner.cron import DEFAULT_MAX_DRIFT

NAMESPACE = os.environ.get("TEST_NAMESPACE", "taskrunner")
DRIFT = float(os.environ.get("TEST_CRON_MAX_DRIFT") or DEFAULT_MAX_DRIFT)

tr = TaskRunner(namespace=NAMESPACE, heartbeat_interval=0.2, stale_after=1.0)

_clients: dict[str, Redis] = {}


def runs_key(namespace: str) -> str:
    return f"{namespace}:test:cron-runs"


@tr.cron("* * * * * *", name="every-second", max_drift=DRIFT)
async def beat() -> int:
    url = os.environ["TASKRUNNER_REDIS_URL"]
    if url not in _clients:
        _clients[url] = Redis.from_url(url, decode_responses=True)
    await _clients[url].hincrby(runs_key(NAMESPACE), current_job().id, 1)
    return os.getpid()


@tr.task
async def report(kind: str, days: int) -> str:
    return f"{kind} {days}"


tr.cron("0 3 * * *", report.call("nightly", 3), name="nightly", tz="Europe/Paris")
