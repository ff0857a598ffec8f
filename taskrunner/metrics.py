"""Prometheus metrics: a middleware that counts and times jobs, and ways to expose them.

Needs the ``metrics`` extra (``pip install 'taskrunner-streams[metrics]'``, prometheus-client)::

    from taskrunner import TaskRunner
    from taskrunner.metrics import PrometheusMiddleware, metrics_app

    tr = TaskRunner(middleware=[PrometheusMiddleware()])
    app.mount("/metrics", metrics_app(tr))        # FastAPI, Starlette, any ASGI app

``taskrunner worker APP --metrics-port 9100`` adds the middleware when the app has
none and serves ``/metrics`` from the worker process; with ``--processes N`` the
children write to a multiprocess directory the supervisor creates, and the
supervisor serves the sum (see ``MultiprocessExporter``).

Metrics (all prefixed ``taskrunner_``; ``task`` and ``queue`` labels on the job ones):

* counters ``jobs_enqueued_total`` (producer side; a deduplicated enqueue is not
  counted), ``jobs_started_total`` (attempts that began to run), and, counted when a
  worker records the outcome in Redis: ``jobs_succeeded_total``, ``jobs_failed_total``
  (for good), ``jobs_retried_total``, ``jobs_dead_lettered_total``,
  ``jobs_aborted_total``, ``jobs_rejected_total``, ``jobs_rescheduled_total``, and
  ``jobs_reclaimed_total`` (recorded attempts that had taken the job over from a stale
  worker);
* histograms ``job_duration_seconds`` (one attempt, as seen by this middleware) and
  ``job_queue_wait_seconds`` (from when the job became runnable to its attempt's start);
* gauges ``queue_depth{queue,status}`` (queued, scheduled, running, failed, dead;
  summed over the queue's partitions and priority levels) and
  ``queue_workers{queue}`` (live workers), read by each worker every
  ``queue_interval`` seconds in one pipelined round trip (``taskrunner.counts``).

Labels stay bounded whatever Redis holds: a job whose task this runner does not
declare is counted as ``task="unknown"``, and ``queue`` is one of the worker's queues.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio

from taskrunner.counts import queue_counts, worker_queues
from taskrunner.exceptions import ConfigurationError
from taskrunner.middleware.base import (
    EnqueueContext,
    EnqueueNext,
    ExecuteNext,
    ExecutionContext,
    Middleware,
    Outcome,
    OutcomeKind,
    WorkerPort,
)

try:
    from prometheus_client import (
        REGISTRY,
        CollectorRegistry,
        Counter,
        Gauge,
        Histogram,
        make_asgi_app,
        start_http_server,
    )
    from prometheus_client import multiprocess as _multiprocess
except ImportError as exc:  # pragma: no cover - exercised by users without the extra
    raise ImportError(
        "taskrunner.metrics needs prometheus-client: pip install 'taskrunner-streams[metrics]'"
    ) from exc

if TYPE_CHECKING:
    from taskrunner.job import Job, JobContext
    from taskrunner.runner import TaskRunner
    from taskrunner.scripts import Env

logger = logging.getLogger("taskrunner.metrics")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
DURATION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
)  # fmt: skip
"""Seconds: from a no-op job to an hour-long one."""
WAIT_BUCKETS = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0,
)  # fmt: skip
"""Seconds: from an idle worker's sub-millisecond pick-up to an hour-long backlog."""
UNKNOWN_TASK = "unknown"
STATUSES = ("queued", "scheduled", "running", "failed", "dead")

_OUTCOME_COUNTERS = {
    OutcomeKind.SUCCEEDED: "succeeded",
    OutcomeKind.FAILED: "failed",
    OutcomeKind.RETRY: "retried",
    OutcomeKind.DEAD: "dead_lettered",
    OutcomeKind.ABORTED: "aborted",
    OutcomeKind.REJECTED: "rejected",
    OutcomeKind.RESCHEDULE: "rescheduled",
}
_COUNTER_HELP = {
    "enqueued": "Jobs enqueued (a deduplicated enqueue writes nothing and is not counted).",
    "started": "Attempts that began to run.",
    "succeeded": "Jobs that succeeded.",
    "failed": "Jobs that failed for good (no retries left).",
    "retried": "Failed attempts that were scheduled to run again.",
    "dead_lettered": "Jobs moved to the dead letters.",
    "aborted": "Jobs aborted.",
    "rejected": "Jobs rejected by their unique-job lock when they came to run.",
    "rescheduled": "Attempts sent back to wait by their unique-job lock.",
    "reclaimed": "Recorded attempts that had taken their job over from a stale worker.",
}


@dataclass(frozen=True, slots=True)
class _Families:
    """The metric families of one registry (shared by every middleware using it)."""

    counters: dict[str, Counter]
    duration: Histogram
    queue_wait: Histogram
    depth: Gauge
    workers: Gauge


_families: MutableMapping[CollectorRegistry, _Families] = weakref.WeakKeyDictionary()


@dataclass(frozen=True, slots=True)
class _Children:
    """The labelled series of one (task, queue): looked up once, not per job."""

    counters: dict[str, Counter]
    duration: Histogram
    queue_wait: Histogram


def _families_for(
    registry: CollectorRegistry, duration_buckets: Sequence[float], wait_buckets: Sequence[float]
) -> _Families:
    found = _families.get(registry)
    if found is not None:
        return found
    labels = ("task", "queue")
    counters = {
        name: Counter(f"taskrunner_jobs_{name}", text, labels, registry=registry)
        for name, text in _COUNTER_HELP.items()
    }
    found = _families[registry] = _Families(
        counters=counters,
        duration=Histogram(
            "taskrunner_job_duration_seconds",
            "Duration of one attempt, in seconds.",
            labels,
            buckets=duration_buckets,
            registry=registry,
        ),
        queue_wait=Histogram(
            "taskrunner_job_queue_wait_seconds",
            "Time from when a job became runnable to the start of its attempt, in seconds.",
            labels,
            buckets=wait_buckets,
            registry=registry,
        ),
        depth=Gauge(
            "taskrunner_queue_depth",
            "Jobs in a queue per status (read from Redis by the workers).",
            ("queue", "status"),
            registry=registry,
            multiprocess_mode="livemostrecent",
        ),
        workers=Gauge(
            "taskrunner_queue_workers",
            "Live workers of a queue (heartbeat within stale_after).",
            ("queue",),
            registry=registry,
            multiprocess_mode="livemostrecent",
        ),
    )
    return found


class PrometheusMiddleware(Middleware):
    """Counts and times jobs into a Prometheus registry (default: the global one).

    Several middleware (one per TaskRunner in a process) may share one registry: they
    share its metric families, told apart by the ``task`` and ``queue`` labels. The
    buckets of the first one to use a registry apply.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        queue_interval: float = 10.0,
        duration_buckets: Sequence[float] = DURATION_BUCKETS,
        wait_buckets: Sequence[float] = WAIT_BUCKETS,
    ) -> None:
        if queue_interval <= 0:
            raise ConfigurationError("queue_interval must be positive")
        self.registry = REGISTRY if registry is None else registry
        self.queue_interval = queue_interval
        """Seconds between two reads of the queue gauges by each worker."""
        self._metrics = _families_for(self.registry, duration_buckets, wait_buckets)
        self._known: frozenset[str] = frozenset()
        self._series: dict[tuple[str, str], _Children] = {}

    def _children(self, task: str, queue: str) -> _Children:
        """The series of ``task`` on ``queue`` (created at zero on first use, so that
        ``rate()`` sees every counter from the start)."""
        found = self._series.get((task, queue))
        if found is None:
            metrics = self._metrics
            found = self._series[task, queue] = _Children(
                counters={name: c.labels(task, queue) for name, c in metrics.counters.items()},
                duration=metrics.duration.labels(task, queue),
                queue_wait=metrics.queue_wait.labels(task, queue),
            )
        return found

    # -- producer side -------------------------------------------------------------------

    async def enqueue(self, ctx: EnqueueContext, call_next: EnqueueNext) -> Job[Any]:
        job = await call_next(ctx)
        if not job.deduplicated:
            self._children(ctx.task.name, ctx.queue).counters["enqueued"].inc()
        return job

    # -- worker side ---------------------------------------------------------------------

    async def execute(self, ctx: ExecutionContext, call_next: ExecuteNext) -> Outcome:
        series = self._children(ctx.job.task, ctx.job.queue)
        series.counters["started"].inc()
        if ctx.job.ready_at > 0:  # on the scripts' clock, like "now" here
            series.queue_wait.observe(max(0.0, scripts_now(ctx.worker.env) - ctx.job.ready_at))
        started = time.perf_counter()
        try:
            return await call_next(ctx)
        finally:  # also when it raises or is cancelled (timeout, abort, shutdown)
            series.duration.observe(time.perf_counter() - started)

    def on_commit(self, job: JobContext, outcome: Outcome) -> None:
        task = job.task if job.task in self._known else UNKNOWN_TASK
        name = _OUTCOME_COUNTERS.get(outcome.kind)
        if name is None:  # a hand-back: counted by the worker that runs the job
            return
        counters = self._children(task, job.queue).counters
        counters[name].inc()
        if job.reclaimed:
            counters["reclaimed"].inc()

    async def on_worker_start(self, worker: WorkerPort) -> None:
        self._known = self._known | frozenset(worker.tasks())
        worker.spawn(lambda: self._watch_queues(worker))

    async def _watch_queues(self, worker: WorkerPort) -> None:
        """Refresh the queue gauges every ``queue_interval`` until the worker stops."""
        failing = False
        while True:
            try:
                await self.read_queues(worker)
            except Exception as exc:  # noqa: BLE001 - a service loop never dies of one read
                if not failing:
                    logger.warning("could not read the queue counts (%s); retrying", exc)
                failing = True
            else:
                if failing:
                    logger.info("queue counts readable again")
                failing = False
            await anyio.sleep(self.queue_interval)

    async def read_queues(self, worker: WorkerPort) -> None:
        """Read the counts of every queue the worker reads, summed over partitions and
        priority levels (one round trip), and set the gauges."""
        counts = await queue_counts(
            worker.redis,
            worker_queues(worker),
            now=scripts_now(worker.env),
            result_ttl=worker.result_ttl,
        )
        now = time.time()  # heartbeats are on real time
        stale_after = worker.stale_after
        for found in counts:
            for status, value in found.by_status().items():
                self._metrics.depth.labels(found.queue, status).set(value)
            live = sum(1 for _, seen in found.workers if now - seen <= stale_after)
            self._metrics.workers.labels(found.queue).set(live)


def scripts_now(env: Env) -> float:
    """Epoch seconds as the worker's scripts see them (``env.clock``: an offset in ms,
    or ``=<ms>`` while a test froze the clock), estimated with this process's clock."""
    try:
        if env.clock.startswith("="):
            return int(env.clock[1:]) / 1000
        return time.time() + int(env.clock) / 1000
    except ValueError:  # never fail a job over a measurement
        return time.time()


# -- exposing --------------------------------------------------------------------------

ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]


def middleware_of(runner: TaskRunner) -> PrometheusMiddleware | None:
    """The runner's PrometheusMiddleware, if it has one."""
    for mw in runner.middleware:
        if isinstance(mw, PrometheusMiddleware):
            return mw
    return None


def install(runner: TaskRunner, registry: CollectorRegistry | None = None) -> PrometheusMiddleware:
    """The runner's PrometheusMiddleware, added (innermost) when it has none. Call it
    before the runner enqueues or runs a job (the CLI does, for ``--metrics-port``)."""
    found = middleware_of(runner)
    if found is None:
        found = PrometheusMiddleware(registry)
        runner.middleware.append(found)
    return found


def exposed_registry(registry: CollectorRegistry) -> CollectorRegistry:
    """What to serve: ``registry``, or, when this process runs in Prometheus's
    multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set), the sum over every process
    that writes to that directory (e.g. the workers of a gunicorn app)."""
    path = os.environ.get(MULTIPROC_ENV)
    if not path:
        return registry
    summed = CollectorRegistry()
    _multiprocess.MultiProcessCollector(summed, path=path)  # type: ignore[no-untyped-call]
    return summed


def metrics_app(runner: TaskRunner) -> ASGIApp:
    """An ASGI app serving the runner's metrics: ``app.mount("/metrics", metrics_app(tr))``.

    The runner must have a ``PrometheusMiddleware`` (ConfigurationError otherwise)."""
    found = middleware_of(runner)
    if found is None:
        raise ConfigurationError(
            "this TaskRunner has no PrometheusMiddleware: "
            "TaskRunner(..., middleware=[PrometheusMiddleware()])"
        )
    app: ASGIApp = make_asgi_app(exposed_registry(found.registry))
    return app


class MetricsServer:
    """``/metrics`` over HTTP from a daemon thread (prometheus-client's WSGI server)."""

    def __init__(self, registry: CollectorRegistry, port: int, host: str = "0.0.0.0") -> None:  # noqa: S104
        self._server, self._thread = start_http_server(port, host, registry)
        self.host = host
        self.port: int = self._server.server_port
        logger.info("serving metrics on http://%s:%d/metrics", host, self.port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class MultiprocessExporter:
    """The supervisor's side of ``--processes N --metrics-port P``.

    Creates a private ``PROMETHEUS_MULTIPROC_DIR`` (given to the children through
    ``env``), serves the sum of what the children write there, clears a child's live
    gauges when it exits (``child_exited``), and on close stops serving and deletes
    the directory. Counters of exited children stay in the sum, so totals never go
    backwards when a child is restarted.
    """

    def __init__(self, port: int, host: str = "0.0.0.0") -> None:  # noqa: S104
        self.directory = tempfile.mkdtemp(prefix="taskrunner-metrics-")
        registry = CollectorRegistry()
        _multiprocess.MultiProcessCollector(registry, path=self.directory)  # type: ignore[no-untyped-call]
        try:
            self.server = MetricsServer(registry, port, host)
        except BaseException:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise
        logger.info("metrics of the worker processes in %s", self.directory)

    def env(self) -> dict[str, str]:
        """The environment of a child worker process."""
        return {**os.environ, MULTIPROC_ENV: self.directory}

    def child_exited(self, pid: int) -> None:
        _multiprocess.mark_process_dead(pid, self.directory)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        self.server.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> MultiprocessExporter:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


__all__ = [
    "MetricsServer",
    "MultiprocessExporter",
    "PrometheusMiddleware",
    "exposed_registry",
    "install",
    "metrics_app",
    "middleware_of",
]
