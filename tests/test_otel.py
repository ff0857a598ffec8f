"""OpenTelemetry: producer and consumer spans of real jobs run by a real worker on a real
Redis, read from the SDK's in-memory exporter. The trace context travels in the job's
headers, stored in Redis and read back by the worker."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import anyio
import pytest
from conftest import wait_until
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from taskrunner import JobFailed, LockConflictError, TaskRunner, current_job
from taskrunner.otel import OpenTelemetryMiddleware

MakeRunner = Callable[..., TaskRunner]
DEADLINE = 30.0


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


def spans(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.name == name]


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


async def finished(exporter: InMemorySpanExporter, name: str, count: int) -> list[ReadableSpan]:
    """Wait until ``count`` spans named ``name`` have ended (the worker ends a consumer
    span when the attempt returns, just before the commit the caller waits for)."""

    async def enough() -> bool:
        return len(spans(exporter, name)) >= count

    await wait_until(enough, DEADLINE)
    return spans(exporter, name)


def is_child_of(child: ReadableSpan, parent: ReadableSpan) -> bool:
    assert child.parent is not None
    assert child.context is not None
    assert parent.context is not None
    same_trace: bool = child.context.trace_id == parent.context.trace_id
    return same_trace and child.parent.span_id == parent.context.span_id


def links_to(span: ReadableSpan, targets: Sequence[ReadableSpan]) -> bool:
    linked = {(link.context.trace_id, link.context.span_id) for link in span.links}
    wanted = {(t.context.trace_id, t.context.span_id) for t in targets if t.context is not None}
    return linked == wanted


async def test_attempt_span_is_a_child_of_the_enqueue_span_with_messaging_attributes(
    make_runner: MakeRunner, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    tr = make_runner(middleware=[OpenTelemetryMiddleware(provider)], partitions=4)

    @tr.task(name="add", priority="high")
    async def add(x: int, y: int) -> int:
        return x + y

    async with tr, tr.worker(concurrency=2) as worker:
        job = await add.enqueue(1, 2)
        keys = await tr.client.locate("default", job.id)
        stored = await tr.client.redis.hget(keys.job(job.id), "meta")
        assert await job.result(timeout=DEADLINE) == 3
        (consumer,) = await finished(exporter, "process default", 1)
    (producer,) = spans(exporter, "send default")
    assert "traceparent" in str(stored)  # the context travelled through Redis
    assert producer.kind == SpanKind.PRODUCER
    assert attrs(producer) == {
        "messaging.system": "taskrunner",
        "messaging.operation.name": "send",
        "messaging.operation.type": "send",
        "messaging.destination.name": "default",
        "messaging.message.id": job.id,
        "messaging.message.body.size": len('{"x":1,"y":2}'),
        "taskrunner.task.name": "add",
        "taskrunner.job.priority": "high",
    }
    assert consumer.kind == SpanKind.CONSUMER
    assert is_child_of(consumer, producer)
    assert links_to(consumer, [producer])
    assert attrs(consumer) == {
        "messaging.system": "taskrunner",
        "messaging.operation.name": "process",
        "messaging.operation.type": "process",
        "messaging.destination.name": "default",
        "messaging.destination.partition.id": str(keys.partition),
        "messaging.message.id": job.id,
        "messaging.message.body.size": len('{"x":1,"y":2}'),
        "messaging.consumer.group.name": "taskrunner",
        "messaging.client.id": worker.id,
        "taskrunner.task.name": "add",
        "taskrunner.job.attempt": 1,
        "taskrunner.job.deliveries": 1,
        "taskrunner.job.reclaimed": False,
        "taskrunner.job.priority": "high",
        "taskrunner.outcome": "succeeded",
    }
    assert consumer.status.status_code == StatusCode.UNSET


async def test_each_attempt_has_its_own_span_and_failures_record_the_exception(
    make_runner: MakeRunner, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    tr = make_runner(middleware=[OpenTelemetryMiddleware(provider)], retry_delay=0.01)

    @tr.task(name="flaky", max_retries=1)
    async def flaky() -> int:
        if current_job().attempt == 1:
            raise KeyError("first")
        return current_job().attempt

    @tr.task(name="broken", max_retries=0)
    async def broken() -> None:
        raise ValueError("never works")

    async with tr, tr.worker(concurrency=2):
        retried = await flaky.enqueue()
        failing = await broken.enqueue()
        assert await retried.result(timeout=DEADLINE) == 2
        with pytest.raises(JobFailed):
            await failing.result(timeout=DEADLINE)
        consumers = await finished(exporter, "process default", 3)
    producers = {
        attrs(span)["messaging.message.id"]: span for span in spans(exporter, "send default")
    }
    attempts = sorted(
        (span for span in consumers if attrs(span)["messaging.message.id"] == retried.id),
        key=lambda span: attrs(span)["taskrunner.job.attempt"],
    )
    assert [attrs(span)["taskrunner.job.attempt"] for span in attempts] == [1, 2]
    first, second = attempts
    assert all(is_child_of(span, producers[retried.id]) for span in attempts)
    assert first.status.status_code == StatusCode.ERROR
    assert attrs(first)["error.type"] == "KeyError"
    assert [event.name for event in first.events] == ["exception"]
    assert dict(first.events[0].attributes or {})["exception.type"] == "KeyError"
    assert "taskrunner.outcome" not in attrs(first)
    assert second.status.status_code == StatusCode.UNSET
    assert attrs(second)["taskrunner.outcome"] == "succeeded"
    (failed,) = [span for span in consumers if attrs(span)["messaging.message.id"] == failing.id]
    assert failed.status.status_code == StatusCode.ERROR
    assert failed.status.description == "ValueError: never works"
    assert attrs(failed)["error.type"] == "ValueError"


async def test_consumer_parent_false_starts_a_new_trace_linked_to_the_producer(
    make_runner: MakeRunner, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    tr = make_runner(middleware=[OpenTelemetryMiddleware(provider, consumer_parent=False)])

    @tr.task(name="noop")
    async def noop() -> None: ...

    async with tr, tr.worker(concurrency=1):
        await (await noop.enqueue()).result(timeout=DEADLINE)
        (consumer,) = await finished(exporter, "process default", 1)
    (producer,) = spans(exporter, "send default")
    assert consumer.parent is None
    assert consumer.context is not None
    assert producer.context is not None
    assert consumer.context.trace_id != producer.context.trace_id
    assert links_to(consumer, [producer])


async def test_a_request_its_job_and_the_job_it_enqueues_form_one_trace(
    make_runner: MakeRunner, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    tr = make_runner(middleware=[OpenTelemetryMiddleware(provider)])
    tracer = provider.get_tracer("test")

    @tr.task(name="leaf", queue="leaves")
    async def leaf() -> str:
        return "leaf"

    @tr.task(name="root")
    async def root() -> str:
        return await (await leaf.enqueue()).result(timeout=DEADLINE)

    async with tr, tr.worker(concurrency=4):
        with tracer.start_as_current_span("GET /signup") as request:
            job = await root.enqueue()
        assert await job.result(timeout=DEADLINE) == "leaf"
        await finished(exporter, "process leaves", 1)
        await finished(exporter, "process default", 1)
    by_name = {span.name: span for span in exporter.get_finished_spans()}
    assert request.get_span_context().trace_id == by_name["GET /signup"].context.trace_id
    assert is_child_of(by_name["send default"], by_name["GET /signup"])
    assert is_child_of(by_name["process default"], by_name["send default"])
    assert is_child_of(by_name["send leaves"], by_name["process default"])
    assert is_child_of(by_name["process leaves"], by_name["send leaves"])


async def test_cancelled_attempt_and_refused_enqueue_are_errors(
    make_runner: MakeRunner, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    tr = make_runner(middleware=[OpenTelemetryMiddleware(provider)])

    @tr.task(name="slow", timeout=0.05, max_retries=0)
    async def slow() -> None:
        await anyio.sleep(3600)

    @tr.task(name="unique", lock="until_executed", on_conflict="raise")
    async def unique() -> None: ...

    async with tr, tr.worker(concurrency=1):
        with pytest.raises(JobFailed, match="TaskTimeout"):
            await (await slow.enqueue()).result(timeout=DEADLINE)
        (cancelled,) = await finished(exporter, "process default", 1)
    async with tr:
        await unique.options(delay=3600).enqueue()
        with pytest.raises(LockConflictError):
            await unique.options(delay=3600).enqueue()
    assert cancelled.status.status_code == StatusCode.ERROR
    assert attrs(cancelled)["error.type"] == "cancelled"
    refused = spans(exporter, "send default")[-1]
    assert refused.status.status_code == StatusCode.ERROR
    assert attrs(refused)["error.type"] == "taskrunner.exceptions.LockConflictError"
    assert attrs(refused)["taskrunner.job.delay"] == pytest.approx(3600, abs=1)


async def test_a_password_in_an_error_is_masked_in_the_span_as_in_the_stored_error(
    make_runner: MakeRunner, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    secret = "hunter2-otel"
    tr = make_runner(middleware=[OpenTelemetryMiddleware(provider)])

    @tr.task(name="leaky", max_retries=0)
    async def leaky() -> None:
        raise ConnectionError(f"cannot reach redis://app:{secret}@db.internal:6379/0")

    async with tr, tr.worker(concurrency=1):
        with pytest.raises(JobFailed) as failed:
            await (await leaky.enqueue()).result(timeout=DEADLINE)
        (span,) = await finished(exporter, "process default", 1)
    assert secret not in str(failed.value)  # the stored error, masked before
    (event,) = span.events
    recorded = dict(event.attributes or {})
    assert recorded["exception.type"] == "ConnectionError"
    assert recorded["exception.message"] == "cannot reach redis://app:***@db.internal:6379/0"
    assert "redis://app:***@db.internal" in str(recorded["exception.stacktrace"])
    assert span.status.description == (
        "ConnectionError: cannot reach redis://app:***@db.internal:6379/0"
    )
    assert secret not in span.to_json()


async def test_deduplicated_enqueue_is_marked_and_keeps_the_first_context(
    make_runner: MakeRunner, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    tr = make_runner(middleware=[OpenTelemetryMiddleware(provider)])

    @tr.task(name="once")
    async def once() -> None: ...

    async with tr:
        await once.options(job_id="same").enqueue()
        again = await once.options(job_id="same").enqueue()
        async with tr.worker(concurrency=1):
            await again.result(timeout=DEADLINE)
            (consumer,) = await finished(exporter, "process default", 1)
    first, second = spans(exporter, "send default")
    assert again.deduplicated
    assert "taskrunner.job.deduplicated" not in attrs(first)
    assert attrs(second)["taskrunner.job.deduplicated"] is True
    assert is_child_of(consumer, first)
