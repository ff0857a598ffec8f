"""Metrics and traces of a FastAPI app that runs jobs (docs/operations.md, "Metrics and tracing").

Serve it; an embedded worker runs the jobs, ``/metrics`` serves the Prometheus metrics,
and every span is printed on the console (needs ``taskrunner-streams[metrics,otel]`` and
``opentelemetry-sdk``)::

    uvicorn examples.observability:app

From a second shell, upload two images through the API (one that cannot be resized)
and print the job metrics once both are final (this demo client talks to
http://127.0.0.1:8000, or to the port in UVICORN_PORT)::

    python -m examples.observability

Workers in processes of their own serve their metrics themselves, for example
``taskrunner worker examples.observability:tr --metrics-port 9464``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request

from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor
from prometheus_client.parser import text_string_to_metric_families

from taskrunner import TaskRunner
from taskrunner.fastapi import lifespan
from taskrunner.metrics import PrometheusMiddleware, metrics_app
from taskrunner.otel import OpenTelemetryMiddleware


def one_line(span: ReadableSpan) -> str:
    context = span.get_span_context()
    parent = f"{span.parent.span_id:016x}" if span.parent else "-"
    status = span.status.status_code.name
    trace_id = f"{context.trace_id:032x}" if context else "-"
    return f"span {span.name!r} trace={trace_id} parent={parent} status={status}\n"


provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(formatter=one_line)))
trace.set_tracer_provider(provider)

tr = TaskRunner(middleware=[PrometheusMiddleware(), OpenTelemetryMiddleware()])


@tr.task(max_retries=1, retry_delay=0.1)
async def resize(image: str) -> str:
    """Pretend to resize an image; one named bad* fails both of its attempts."""
    if image.startswith("bad"):
        raise ValueError(f"cannot decode {image}")
    return f"small-{image}"


app = FastAPI(title="observability example", lifespan=lifespan(tr, worker=True, concurrency=10))
app.mount("/metrics", metrics_app(tr))


@app.post("/images/{name}", status_code=202)
async def upload(name: str) -> dict[str, str]:
    job = await resize.enqueue(name)
    return {"job": job.id}


def job_counts(base_url: str) -> dict[str, float]:
    """The ``taskrunner_jobs_*_total`` samples of the resize task, by metric name."""
    with urllib.request.urlopen(f"{base_url}/metrics/", timeout=10) as response:  # noqa: S310
        text = response.read().decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("taskrunner_jobs_") and sample.labels.get("task") == "resize"
    }


def demo(base_url: str, timeout: float = 30.0) -> None:
    for name in ("cat.png", "bad.png"):
        request = urllib.request.Request(f"{base_url}/images/{name}", method="POST")  # noqa: S310
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            print("enqueued", name, json.load(response))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts = job_counts(base_url)
        done = counts.get("taskrunner_jobs_succeeded_total", 0)
        if done >= 1 and counts.get("taskrunner_jobs_failed_total", 0) >= 1:
            for name, value in sorted(counts.items()):
                print(f"{name}{{task=resize}} {value:g}")
            return
        time.sleep(0.1)
    sys.exit(f"the jobs did not finish within {timeout:g}s: is the app running?")


if __name__ == "__main__":
    demo(f"http://127.0.0.1:{os.environ.get('UVICORN_PORT', '8000')}")
