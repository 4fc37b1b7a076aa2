"""ONNX Runtime inference service for Hugging Face text classifiers."""

from __future__ import annotations

import threading
from typing import Any

from flask import Flask

from service import auth, batching, errors
from service.batching import Scheduler
from service.config import DEFAULTS, Settings
from service.metrics import Metrics


def create_app(config: dict[str, Any] | None = None, classifier: Any = None) -> Flask:
    """Build the app: defaults, SERVICE_* env, then `config`; load and warm the classifier once."""
    app = Flask(__name__, static_folder=None)
    settings = configure(app.config, config)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_content_length  # Werkzeug answers 413 above it

    if classifier is None:
        classifier = load_classifier(settings)

    from service import tei, v2
    from service.api import bp

    metrics = Metrics()
    scheduler = start_scheduler(settings, classifier, metrics)
    if settings.warmup and not classifier.ready:
        if scheduler is None:
            classifier.warmup()
        else:  # through the queue, so the worker's first batch is not a client's
            scheduler.warmup()
    app.extensions.update({"service.settings": settings, "service.classifier": classifier,
                           "service.metrics": metrics,
                           # set by the Waitress runner on SIGTERM: /ready answers 503 from then on
                           "service.draining": threading.Event()})
    metrics.init_app(app)
    errors.init_app(app)
    batching.init_app(app, scheduler)
    auth.init_app(app, settings.api_key)
    app.register_blueprint(bp)
    app.register_blueprint(tei.bp)
    app.register_blueprint(v2.bp)  # the Open Inference Protocol v2 (KServe, Triton)
    return app


def configure(config: Any, overrides: dict[str, Any] | None = None) -> Settings:
    """Fill a Flask config with the defaults, SERVICE_* env, then overrides; return the validated settings."""
    config.from_mapping(DEFAULTS)
    # Keep env values as strings: Settings validates them and names the variable when one is wrong.
    config.from_prefixed_env("SERVICE", loads=str)
    config.from_mapping(overrides or {})
    return Settings.from_mapping(config)


def start_scheduler(settings: Settings, classifier: Any, metrics: Metrics) -> Scheduler | None:
    """Return the running batch scheduler, or None when batching is off or the backend cannot batch."""
    # The reference backends (pytorch, optimum) stand for the original per-request service.
    if not settings.batching or classifier.backend != "onnx":
        return None
    scheduler = Scheduler(classifier, max_texts=settings.batch_max_texts, max_tokens=settings.batch_max_tokens,
                          max_queue=settings.max_queue, queue_timeout=settings.queue_timeout,
                          wait=settings.batch_wait_ms / 1000, gather=settings.batch_gather_ms / 1000,
                          workers=settings.batch_workers, metrics=metrics)
    scheduler.start()
    return scheduler


def load_classifier(settings: Settings) -> Any:
    """Return the classifier of the configured backend (the reference ones import torch lazily)."""
    if settings.backend == "pytorch":
        from service.reference import ReferenceClassifier

        return ReferenceClassifier(settings.model_dir, settings.ort_threads)
    if settings.backend == "optimum":
        from service.reference import OptimumClassifier

        return OptimumClassifier(settings.model_dir, settings.ort_threads)
    from service.classifier import Classifier

    return Classifier(settings.model_dir, settings.ort_threads, spinning=settings.ort_spinning,
                      sessions=settings.batch_workers, lone_threads=settings.ort_lone_threads,
                      cache_dir=settings.cache_dir)
