"""Test your tasks against a real, private Redis: the ``taskrunner.testing`` kit.

* A pytest plugin (loaded automatically, or ``pytest_plugins = ["taskrunner.testing"]``)
  with fixtures for a private redis-server per test run, a fresh namespace per test,
  and your app's TaskRunner bound to them (``bind_taskrunner``, ``taskrunner``): see
  ``taskrunner.testing.plugin``.
* ``await run_until_idle(tr)`` (also ``await tr.run_until_idle()``): run a worker in
  this process until every job is final; raises the first job that failed for good
  or was dead-lettered.
* ``async with frozen_time(tr) as clock: await clock.advance(60)``: control time for
  delayed jobs, retries and unique-lock TTLs (the runner's own clock, ``tr.clock``).

Documented in docs/testing.md ("Testing your tasks").
"""

from importlib.util import find_spec

from taskrunner.testing.clock import FrozenClock, frozen_time
from taskrunner.testing.idle import Committed, run_until_idle

if find_spec("pytest") is not None:  # the fixtures need pytest; the rest does not
    from taskrunner.testing.plugin import (
        TaskRunnerBinder,
        bind_taskrunner,
        pytest_addoption,
        taskrunner,
        taskrunner_namespace,
        taskrunner_redis_url,
    )

__all__ = [
    "Committed",
    "FrozenClock",
    "TaskRunnerBinder",
    "bind_taskrunner",
    "frozen_time",
    "pytest_addoption",
    "run_until_idle",
    "taskrunner",
    "taskrunner_namespace",
    "taskrunner_redis_url",
]
