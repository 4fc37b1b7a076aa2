"""Prometheus metrics in a per-app registry: requests, latency, inference time and batch sizes."""

from __future__ import annotations

import time

from flask import Flask, Response, g, request
from prometheus_client import CollectorRegistry, Counter, Histogram

# Short texts take ~2 ms; a batch of 32 long texts takes seconds on 2 cores.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The instruments of one app, in a registry of their own so apps (and tests) don't collide."""

    def __init__(self) -> None:
        """Create the registry and its instruments."""
        self.registry = CollectorRegistry()
        self.requests = Counter("service_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("service_request_duration_seconds", "HTTP request latency by route",
                                 ["route"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.inference = Histogram("service_inference_duration_seconds",
                                   "Tokenize + model + post-process time per request batch",
                                   buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("service_batch_size", "Texts per classification request",
                                    buckets=_BATCH_BUCKETS, registry=self.registry)

    def observe_inference(self, texts: int, seconds: float) -> None:
        """Record one classification call."""
        self.batch_size.observe(texts)
        self.inference.observe(seconds)

    def init_app(self, app: Flask) -> None:
        """Time every request and count it by route template, never by raw path (bounded labels)."""
        app.before_request(_start_timer)

        @app.after_request
        def record(response: Response) -> Response:
            route = request.url_rule.rule if request.url_rule is not None else "<unmatched>"
            self.requests.labels(route, request.method, str(response.status_code)).inc()
            started = g.get("started")
            if started is not None:
                self.latency.labels(route).observe(time.perf_counter() - started)
            return response


def _start_timer() -> None:
    """Remember when the request started."""
    g.started = time.perf_counter()
