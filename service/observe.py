"""Each request observed: TEI's timing headers, an access record and, with tracing on, its spans.

The request's stages are timed into a Timing kept in Flask's `g` (service.inference and the batch
scheduler fill it); the answer reads it once. Tracing is imported only when it is on.
"""

from __future__ import annotations

import logging
import time
import weakref
from typing import Any

from flask import Flask, Response, g, request

from service import state
from service.config import Settings
from service.errors import request_id
from service.logs import ACCESS
from service.timing import Timing

access_logger = logging.getLogger(ACCESS)
logger = logging.getLogger(__name__)


def init_app(app: Flask, settings: Settings, model: str) -> None:
    """Time every request from its start, and observe its answer (register before other hooks)."""
    tracing: Any = None
    if settings.otlp_endpoint is not None:
        from service.tracing import Tracing

        tracing = Tracing(settings.otlp_endpoint)
        weakref.finalize(app, tracing.shutdown)  # at exit too: the spans still queued
    state.store(app, tracing=tracing)
    access = settings.access_log

    @app.before_request
    def start() -> None:
        g.timing = Timing()
        request_id()  # now, so every log line of the request carries it

    @app.after_request
    def observe(response: Response) -> Response:
        ended = time.perf_counter()
        timing: Timing | None = g.get("timing")
        if timing is None:  # a request that failed before any hook ran
            return response
        if timing.inferred is not None and response.status_code < 400:
            add_timing_headers(response, timing, ended)
        if access or tracing is not None:
            route = request.url_rule.rule if request.url_rule is not None else "<unmatched>"
            identifier = g.request_id
            served = g.get("model")  # the request's model (service.models), if it reached one
            named = served.name if served is not None else state.named()
            shown = model if named is None else _shown(named)
            if access:
                log_access(timing, ended, route, shown, response.status_code, identifier)
            if tracing is not None:
                try:
                    tracing.record(timing, ended, request.method, route, response.status_code, identifier,
                                   request.headers, shown)
                except Exception as exc:  # tracing never fails a request: the answer is ready
                    logger.warning("request %s: no spans: %s: %s", identifier, type(exc).__name__, exc)
        return response


def finish(app: Flask) -> None:
    """Export the spans still queued, if tracing is on, as the server stops."""
    # a forked server process exits without the interpreter's teardown, which runs the exit hook
    tracing = state.tracing(app)
    if tracing is not None:
        tracing.shutdown()


def add_timing_headers(response: Response, timing: Timing, ended: float) -> None:
    """Set TEI's x-*-time headers (whole milliseconds, truncated, as TEI's as_millis) and its counts."""
    total = str(int((ended - timing.started) * 1000))
    headers = response.headers
    headers["x-compute-time"] = total  # TEI sends the request's whole time under both names
    headers["x-total-time"] = total
    headers["x-tokenization-time"] = str(int(timing.tokenization_seconds * 1000))
    headers["x-queue-time"] = str(int(timing.queue_seconds * 1000))
    headers["x-inference-time"] = str(int(timing.inference_seconds * 1000))
    if timing.tokens is not None:
        headers["x-compute-tokens"] = str(timing.tokens)
    if timing.characters is not None:
        headers["x-compute-characters"] = str(timing.characters)


def _shown(name: str) -> str:
    """Return a model name as a log shows it: a client's unknown name is cut to 64 characters."""
    return name if len(name) <= 64 else name[:64] + "..."


def log_access(timing: Timing, ended: float, route: str, model: str, status: int, identifier: str) -> None:
    """Log the request's access record: who asked what, how it ended, how long it took, how much it was."""
    duration = round((ended - timing.started) * 1000, 3)
    fields = {"request_id": identifier, "method": request.method, "route": route, "model": model,
              "status": status, "duration_ms": duration, "texts": timing.texts, "tokens": timing.tokens}
    access_logger.info("%s %s %d %.1f ms", request.method, route, status, duration, extra={"fields": fields})
