"""Prometheus metrics in a per-app registry: requests, latency, inference, batches and the queue.

A process of several serving one port (SERVICE_PROCESSES) has PROMETHEUS_MULTIPROC_DIR
set: prometheus_client then keeps every value in a file of that folder, and /metrics, whichever
process answers it, sums those of all of them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from flask import Flask, Response, g, request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client reads it when it is imported

# Short texts take ~2 ms; a batch of 32 long texts takes seconds on 2 cores.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The instruments of one app, in a registry of their own so apps (and tests) don't collide."""

    def __init__(self) -> None:
        """Create the registry and its instruments."""
        self.registry = CollectorRegistry()
        self.shared = bool(os.environ.get(MULTIPROCESS_DIR))  # values in files, summed over the processes
        self.requests = Counter("service_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("service_request_duration_seconds", "HTTP request latency by route",
                                 ["route"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.inference = Histogram("service_inference_duration_seconds",
                                   "Classification time per request: queue wait (when batching), "
                                   "tokenize, model and post-process",
                                   buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("service_batch_size", "Texts per classification request",
                                    buckets=_BATCH_BUCKETS, registry=self.registry)
        self.run_texts = Histogram("service_model_run_texts",
                                   "Texts per session.run (requests batched together)",
                                   buckets=_BATCH_BUCKETS, registry=self.registry)
        self.queue_wait = Histogram("service_queue_wait_seconds",
                                    "Time a request waited in the batching queue before its batch started",
                                    buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("service_queue_depth", "Texts waiting in the batching queue",
                                 registry=self.registry, multiprocess_mode="livesum")
        self.rejections = Counter("service_rejections", "Requests answered 503 with Retry-After, by reason "
                                  "(queue_full, queue_timeout, shutting_down)", ["reason"],
                                  registry=self.registry)
        for reason in ("queue_full", "queue_timeout", "shutting_down"):
            self.rejections.labels(reason)  # exported as 0 from the start, so rate() sees the first one

    def track_queue(self, depth: Callable[[], float]) -> None:
        """Read the queue depth from the scheduler whenever metrics are scraped (one process)."""
        if not self.shared:
            self.queue_depth.set_function(depth)

    def queue_changed(self, depth: int) -> None:
        """Record the queue's new depth where other processes' /metrics read it (several processes)."""
        if self.shared:
            self.queue_depth.set(depth)

    def exposition(self) -> CollectorRegistry:
        """Return the registry /metrics renders: this app's, or the sum of every process' files."""
        if not self.shared:
            return self.registry
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return registry

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


def share_values(folder: str) -> None:
    """Keep the values of the metrics made from now on in files of folder (a child forked after import)."""
    os.environ[MULTIPROCESS_DIR] = folder
    # prometheus_client picks its value class from the variable once, when it is first imported:
    # a forked child imported it before the folder was known.
    values.ValueClass = values.get_value_class()


def _start_timer() -> None:
    """Remember when the request started."""
    g.started = time.perf_counter()
