"""OpenTelemetry tracing: a PRODUCER span per enqueue, a CONSUMER span per attempt.

Needs the ``otel`` extra (``pip install 'taskrunner-streams[otel]'``, opentelemetry-api; your
application sets up the SDK and an exporter as usual)::

    from taskrunner.otel import OpenTelemetryMiddleware

    tr = TaskRunner(middleware=[OpenTelemetryMiddleware()])

The enqueue side starts a ``send <queue>`` span (kind PRODUCER) around the write and
injects its context into the job's headers (``EnqueueContext.meta``, stored with the
job) with the global text-map propagator (W3C ``traceparent``/``tracestate``, and
``baggage``, unless the application configured another). Every attempt of the job
then runs inside a ``process <queue>`` span (kind CONSUMER) whose parent is that
producer context, so a request, the jobs it enqueues and their attempts form one
trace; the span also links to the producer context, as the messaging conventions
recommend. With ``consumer_parent=False`` each attempt starts a new trace instead,
linked to the producer (for long-delayed or periodic jobs).

Attributes follow the OpenTelemetry messaging semantic conventions:
``messaging.system="taskrunner"`` (the wire protocol is taskrunner's own scripts on
Redis streams, not a Redis messaging API, and ``redis`` is the database system of
the Redis client's own spans), ``messaging.operation.name`` and
``messaging.operation.type`` (``send`` / ``process``), ``messaging.destination.name``
(the queue), ``messaging.message.id`` (the job id), ``messaging.message.body.size``
(the JSON arguments, in bytes), ``messaging.destination.partition.id`` (the queue
partition holding the job), ``messaging.consumer.group.name`` and
``messaging.client.id`` (the worker) on the consumer; and taskrunner's own:
``taskrunner.task.name``, ``taskrunner.job.attempt``, ``taskrunner.job.deliveries``,
``taskrunner.job.reclaimed``, ``taskrunner.job.priority`` (the priority level; on the
producer only when the call or the task chose one), ``taskrunner.job.delay`` (seconds,
for a delayed enqueue), ``taskrunner.job.deduplicated`` and ``taskrunner.outcome``. A failed
attempt records the exception as an event and sets the span's status to ERROR and
``error.type`` to the exception's qualified name; an attempt cancelled from outside
(its timeout, an abort, a shutdown hand-back, a lost lease) ends with status ERROR
and ``error.type="cancelled"``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from taskrunner.job import ErrorInfo
from taskrunner.keys import GROUP
from taskrunner.middleware.base import (
    EnqueueContext,
    EnqueueNext,
    ExecuteNext,
    ExecutionContext,
    Middleware,
    Outcome,
)

try:
    from opentelemetry import propagate, trace
    from opentelemetry.context import Context
    from opentelemetry.propagators.textmap import TextMapPropagator
    from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, TracerProvider
except ImportError as exc:  # pragma: no cover - exercised by users without the extra
    raise ImportError(
        "taskrunner.otel needs opentelemetry-api: pip install 'taskrunner-streams[otel]'"
    ) from exc

if TYPE_CHECKING:
    from opentelemetry.util.types import AttributeValue

    from taskrunner.job import Job

SYSTEM = "taskrunner"
CANCELLED = "cancelled"


class OpenTelemetryMiddleware(Middleware):
    """Traces enqueues (PRODUCER) and attempts (CONSUMER), linked through the job.

    ``tracer_provider`` defaults to the global one, ``propagator`` to the global
    text-map propagator (both looked up when used, so setting them up after the
    TaskRunner is built works). ``consumer_parent=False`` starts each attempt's span
    in a new trace, linked to the producer, instead of as its child.
    """

    def __init__(
        self,
        tracer_provider: TracerProvider | None = None,
        *,
        propagator: TextMapPropagator | None = None,
        consumer_parent: bool = True,
    ) -> None:
        from taskrunner import __version__

        self._tracer = trace.get_tracer("taskrunner", __version__, tracer_provider)
        self._propagator = propagator
        self.consumer_parent = consumer_parent

    @property
    def propagator(self) -> TextMapPropagator:
        return self._propagator if self._propagator is not None else propagate.get_global_textmap()

    async def enqueue(self, ctx: EnqueueContext, call_next: EnqueueNext) -> Job[Any]:
        attributes: dict[str, AttributeValue] = {
            "messaging.system": SYSTEM,
            "messaging.operation.name": "send",
            "messaging.operation.type": "send",
            "messaging.destination.name": ctx.queue,
            "messaging.message.id": ctx.job_id,
            "messaging.message.body.size": len(ctx.payload.encode()),
            "taskrunner.task.name": ctx.task.name,
        }
        if ctx.priority is not None:
            attributes["taskrunner.job.priority"] = ctx.priority
        if ctx.due is not None:
            attributes["taskrunner.job.delay"] = max(0.0, ctx.due - ctx.now)
        with self._tracer.start_as_current_span(
            f"send {ctx.queue}",
            kind=SpanKind.PRODUCER,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            self.propagator.inject(ctx.meta)  # the headers are stored with the job
            try:
                job = await call_next(ctx)
            except Exception as exc:
                _failed(span, exc)
                raise
            if job.deduplicated:  # nothing written: the existing job keeps its headers
                span.set_attribute("taskrunner.job.deduplicated", True)
            return job

    async def execute(self, ctx: ExecutionContext, call_next: ExecuteNext) -> Outcome:
        job = ctx.job
        producer = self.propagator.extract(ctx.meta)
        producer_span = trace.get_current_span(producer).get_span_context()
        links = [Link(producer_span)] if producer_span.is_valid else []
        attributes: dict[str, AttributeValue] = {
            "messaging.system": SYSTEM,
            "messaging.operation.name": "process",
            "messaging.operation.type": "process",
            "messaging.destination.name": job.queue,
            "messaging.destination.partition.id": str(ctx.keys.partition),
            "messaging.message.id": job.id,
            "messaging.message.body.size": len(ctx.payload.encode()),
            "messaging.consumer.group.name": GROUP,
            "messaging.client.id": ctx.worker.id,
            "taskrunner.task.name": job.task,
            "taskrunner.job.attempt": job.attempt,
            "taskrunner.job.deliveries": job.deliveries,
            "taskrunner.job.reclaimed": job.reclaimed,
            "taskrunner.job.priority": job.priority,
        }
        with self._tracer.start_as_current_span(
            f"process {job.queue}",
            context=producer if self.consumer_parent else Context(),
            kind=SpanKind.CONSUMER,
            links=links,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            return await _traced_call(span, ctx, call_next)


async def _traced_call(span: Span, ctx: ExecutionContext, call_next: ExecuteNext) -> Outcome:
    """Run the rest of the chain; record on ``span`` how it ended. Cancellation is
    never caught: it is recorded on the way out (``finally``)."""
    ended = False
    try:
        outcome = await call_next(ctx)
        ended = True
    except Exception as exc:
        ended = True
        _failed(span, exc)
        raise
    finally:
        if not ended:  # cancelled from outside: a timeout, an abort, a shutdown
            span.set_attribute("error.type", CANCELLED)
            span.set_status(Status(StatusCode.ERROR, "the attempt was cancelled"))
    span.set_attribute("taskrunner.outcome", str(outcome.kind))
    return outcome


def _failed(span: Span, exc: Exception) -> None:
    """Record the exception as the job's stored error is (``ErrorInfo``): a password
    in a URL of its message or traceback is masked, taskrunner's own frames left out."""
    error = ErrorInfo.from_exception(exc)
    span.record_exception(
        exc,
        attributes={"exception.message": error.message, "exception.stacktrace": error.traceback},
    )
    span.set_attribute("error.type", error.type)
    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {error.message}"))


__all__ = ["OpenTelemetryMiddleware"]
