"""The pytest plugin of ``taskrunner.testing``: a private Redis per test run, a fresh
namespace per test, and your app's TaskRunner bound to both.

Loaded automatically when taskrunner is installed (a ``pytest11`` entry point named
``taskrunner.testing``), or explicitly with ``pytest_plugins = ["taskrunner.testing"]``
(or ``-p taskrunner.testing``). Every fixture is synchronous, so it works with
pytest-asyncio, anyio's plugin, or any other.

Fixtures:

* ``taskrunner_redis_url`` (session): the URL of a private redis-server started for
  the test run (per xdist worker) on a unix socket in a temporary directory, and
  stopped at the end; or the server named by ``--taskrunner-redis-url`` / the
  ``taskrunner_redis_url`` ini option, if given.
* ``taskrunner_namespace``: a fresh key namespace for the test.
* ``bind_taskrunner``: a function ``bind(tr) -> tr`` that points a TaskRunner (your
  app's own object, with its tasks) at that server and namespace for the test, and
  puts its url and namespace back afterwards. Bind it before ``async with tr``.
* ``taskrunner``: the TaskRunner named by the ``taskrunner_app`` ini option
  (``module:attribute``), bound.
"""

from __future__ import annotations

import importlib
import uuid
from collections.abc import Iterator

import pytest

from taskrunner.embedded import EmbeddedRedis
from taskrunner.exceptions import TaskrunnerError
from taskrunner.runner import TaskRunner

URL_OPTION = "taskrunner_redis_url"
APP_OPTION = "taskrunner_app"


def pytest_addoption(parser: pytest.Parser) -> None:
    help_url = (
        "Redis URL for taskrunner's test fixtures instead of a private redis-server "
        "(each test still gets its own namespace)"
    )
    group = parser.getgroup("taskrunner")
    if any(option.dest == URL_OPTION for option in group.options):
        return  # loaded twice (the entry point, and -p taskrunner.testing.plugin): once
    group.addoption("--taskrunner-redis-url", dest=URL_OPTION, default=None, help=help_url)
    parser.addini(URL_OPTION, help_url, default="")
    parser.addini(
        APP_OPTION,
        "module:attribute of the TaskRunner that the `taskrunner` fixture binds to each test",
        default="",
    )


class TaskRunnerBinder:
    """Points TaskRunners at one Redis and namespace; ``restore()`` puts them back."""

    def __init__(self, url: str, namespace: str) -> None:
        self.url = url
        self.namespace = namespace
        self._saved: dict[int, tuple[TaskRunner, str | None, str]] = {}

    def __call__(self, runner: TaskRunner) -> TaskRunner:
        if id(runner) in self._saved:
            return runner
        if _connected(runner):
            raise RuntimeError(
                "bind_taskrunner: this TaskRunner is already connected; bind it before "
                "`async with tr`"
            )
        self._saved[id(runner)] = (runner, runner.url, runner.namespace)
        runner.url = self.url
        runner.namespace = self.namespace
        return runner

    def restore(self) -> None:
        for runner, url, namespace in self._saved.values():
            runner.url = url
            runner.namespace = namespace
        self._saved.clear()


def _connected(runner: TaskRunner) -> bool:
    try:
        runner.client  # noqa: B018 - raises when not connected
    except TaskrunnerError:
        return False
    return True


@pytest.fixture(scope="session")
def taskrunner_redis_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A private redis-server for this test run (or the configured one)."""
    configured = request.config.getoption(URL_OPTION) or request.config.getini(URL_OPTION)
    if configured:
        yield str(configured)
        return
    server = EmbeddedRedis(tmp_path_factory.mktemp("taskrunner-redis"))
    url = server.acquire()
    try:
        yield url
    finally:
        server.release()


@pytest.fixture
def taskrunner_namespace() -> str:
    """A key namespace no other test uses."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def bind_taskrunner(
    taskrunner_redis_url: str, taskrunner_namespace: str
) -> Iterator[TaskRunnerBinder]:
    """``bind(tr)``: your TaskRunner on the test's Redis and namespace, for this test."""
    binder = TaskRunnerBinder(taskrunner_redis_url, taskrunner_namespace)
    try:
        yield binder
    finally:
        binder.restore()


@pytest.fixture
def taskrunner(request: pytest.FixtureRequest, bind_taskrunner: TaskRunnerBinder) -> TaskRunner:
    """The TaskRunner named by the ``taskrunner_app`` ini option, bound to this test."""
    return bind_taskrunner(load_runner(str(request.config.getini(APP_OPTION))))


def load_runner(path: str) -> TaskRunner:
    """The TaskRunner at ``module:attribute`` (pytest.UsageError when there is none)."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise pytest.UsageError(
            f"the taskrunner fixture needs {APP_OPTION} = module:attribute in your pytest "
            f"configuration (got {path!r}); or use bind_taskrunner(your_tr)"
        )
    try:
        found = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise pytest.UsageError(f"{APP_OPTION} = {path}: {exc}") from exc
    if not isinstance(found, TaskRunner):
        raise pytest.UsageError(
            f"{APP_OPTION} = {path} is a {type(found).__name__}, not a TaskRunner"
        )
    return found
