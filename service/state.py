"""The app's state, reached one way: typed accessors over Flask's `app.extensions`.

`create_app` stores each object once (`store`); the routes, the runner and the scheduler's hooks read
them through these functions, as the Flask tutorial's `get_db()` does, and never spell a storage key.
Without `app`, each reads the app of the current request (`flask.current_app`).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from flask import Flask, current_app, g, has_request_context

if TYPE_CHECKING:  # the serving modules import this one: no import cycle at run time
    from service.batching import Scheduler
    from service.classifier import Classifier
    from service.config import Settings
    from service.metrics import Metrics
    from service.models import Model, Models

# The storage keys, named once; tests may read them (app.extensions[...]) to reach an app's objects.
# CLASSIFIER and SCHEDULER are the default model's as loaded at start (MODELS holds every model).
SETTINGS, CLASSIFIER, SCHEDULER, METRICS, DRAINING, TRACING, MODELS = (
    "service.settings", "service.classifier", "service.scheduler", "service.metrics", "service.draining",
    "service.tracing", "service.models")
_KEYS = {"settings": SETTINGS, "classifier": CLASSIFIER, "scheduler": SCHEDULER, "metrics": METRICS,
         "draining": DRAINING, "tracing": TRACING, "models": MODELS}


def store(app: Flask, **objects: Any) -> None:
    """Keep the app's objects under their keys (settings=, classifier=, scheduler=, metrics=, draining=, tracing=,
    models=)."""
    unknown = set(objects) - set(_KEYS)
    if unknown:
        raise TypeError(f"no such app state: {', '.join(sorted(unknown))}")
    app.extensions.update({_KEYS[name]: value for name, value in objects.items()})


def _extensions(app: Flask | None) -> dict[str, Any]:
    """Return the extensions of app, or of the current request's app."""
    return (app if app is not None else current_app).extensions


def settings(app: Flask | None = None) -> Settings:
    """Return the validated settings."""
    return _extensions(app)[SETTINGS]


def classifier(app: Flask | None = None) -> Classifier:
    """Return the request's model (the reference backends answer the same calls as the onnx Classifier).

    In a request: the model its path names (/models/{name}/..., /v2/models/{name}/...), else the default
    model; 404 or 503 JSON when that one is unknown or not loaded. With `app`: the default model at start.
    """
    if app is None and has_request_context() and MODELS in current_app.extensions:
        return model().classifier
    return _extensions(app)[CLASSIFIER]


def scheduler(app: Flask | None = None) -> Scheduler | None:
    """Return the request's model's batch scheduler (as classifier() picks it), or None when not batching."""
    if app is None and has_request_context() and MODELS in current_app.extensions:
        return model().scheduler
    return _extensions(app).get(SCHEDULER)


def models(app: Flask | None = None) -> Models:
    """Return every model of the app (service.models)."""
    return _extensions(app)[MODELS]


def model() -> Model:
    """Return the current request's model, counted in flight until the request ends (service.models).

    The path's model (`select` stores its name), else the default one; raise ApiError 404 or 503.
    """
    chosen = g.get("model")
    if chosen is None:
        g.model_asked = g.get("model_name") or models().default
        chosen = g.model = models().enter(g.model_asked)
    return chosen


def asked() -> str | None:
    """Return the model name the request tried to reach (model()), reached or not (404, 503), or None."""
    return g.get("model_asked")


def named() -> str | None:
    """Return the model name the request concerns, for its records: the one it tried to reach or its path's."""
    return g.get("model_asked") or g.get("model_name")


def select(name: str) -> None:
    """Make model `name` the current request's model (a route or URL prefix that names one)."""
    g.model_name = name


def selected() -> str | None:
    """Return the model name the request's path gave, or None for the unprefixed routes."""
    return g.get("model_name")


def metrics(app: Flask | None = None) -> Metrics:
    """Return the app's Prometheus instruments."""
    return _extensions(app)[METRICS]


def draining(app: Flask | None = None) -> threading.Event:
    """Return the event the runner sets on SIGTERM (/ready answers 503 from then on)."""
    return _extensions(app)[DRAINING]


def tracing(app: Flask | None = None) -> Any:
    """Return the app's OpenTelemetry tracing (service.tracing), or None when tracing is off."""
    return _extensions(app).get(TRACING)
