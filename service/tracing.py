"""OpenTelemetry traces over OTLP/HTTP: a span per request, its stages as child spans.

Imported only when tracing is on (SERVICE_OTLP_ENDPOINT or OpenTelemetry's endpoint variables), so
a service without it never loads OpenTelemetry. Spans are built when the answer is ready, from the
request's Timing: a model run serves several requests at once, and each of them gets it as a child.
A background thread exports them in batches; a slow or absent collector only drops spans.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode

from service.timing import Timing

SERVICE_NAME = "onnx-text-classify"  # unless OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES name it
EXIT_FLUSH_SECONDS = 2.0  # at exit, spans the collector has not taken by then are dropped


class Tracing:
    """One process' tracer provider, its batching exporter, and the spans of each request."""

    def __init__(self, endpoint: str) -> None:
        """Export to the OTLP/HTTP traces URL endpoint; sampler, headers and timeout come from OTEL_*."""
        named = os.environ.get("OTEL_SERVICE_NAME") or "service.name=" in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
        resource = Resource.create({} if named else {"service.name": SERVICE_NAME})
        self.provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        self.tracer = self.provider.get_tracer("service")
        self.closed = False

    def record(self, timing: Timing, ended: float, method: str, route: str, status: int, request_id: str,
               headers: Mapping[str, str], model: str) -> None:
        """Add the spans of one answered request (to `model`), continuing the caller's traceparent if it sent one."""
        attributes: dict[str, Any] = {"http.request.method": method, "http.route": route,
                                      "http.response.status_code": status, "request.id": request_id,
                                      "model.name": model}
        if timing.texts is not None:
            attributes["classify.texts"] = timing.texts
        if timing.tokens is not None:
            attributes["classify.tokens"] = timing.tokens
        span = self.tracer.start_span(f"{method} {route}", context=propagate.extract(headers), kind=SpanKind.SERVER,
                                      start_time=timing.epoch_ns(timing.started), attributes=attributes)
        if not span.is_recording():  # not sampled: nothing to build
            return
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        context = trace.set_span_in_context(span)

        def child(name: str, start: float, end: float, **attributes: Any) -> None:
            self.tracer.start_span(name, context=context, start_time=timing.epoch_ns(start),
                                   attributes=attributes).end(end_time=timing.epoch_ns(end))

        child("parse", timing.started, timing.tokenizing if timing.tokenizing is not None else ended)
        if timing.tokenizing is not None and timing.tokenized is not None:
            child("tokenize", timing.tokenizing, timing.tokenized)
        if timing.enqueued is not None:
            child("queue", timing.enqueued, timing.taken if timing.taken is not None else ended)
        for run in timing.runs:
            sizes = {} if run.tokens is None else {"batch.tokens": run.tokens}
            child("model run", run.start, run.end, **{"batch.size": run.texts}, **sizes)
        if timing.inferred is not None:
            child("postprocess", timing.inferred, ended)
        span.end(end_time=timing.epoch_ns(ended))

    def shutdown(self) -> None:
        """Export what is queued, waiting at most EXIT_FLUSH_SECONDS for a slow collector; once."""
        if self.closed:
            return
        self.closed = True
        # The SDK's own shutdown waits for an export in progress, as long as its timeout (10 s by default).
        closing = threading.Thread(target=self.provider.shutdown, name="otel-shutdown", daemon=True)
        closing.start()
        closing.join(EXIT_FLUSH_SECONDS)
