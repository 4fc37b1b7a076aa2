"""The Flask app: settings, the model(s), the scheduler and every route, put together by create_app().

`python -m service` (service/__main__.py) serves it with Waitress; tests and tools call create_app().
"""

from __future__ import annotations

import threading
import time
from typing import Any

from flask import Flask

from service import auth, batching, errors, observe, state
from service.batching import Scheduler
from service.config import DEFAULTS, Settings
from service.metrics import Metrics


def create_app(config: dict[str, Any] | None = None, classifier: Any = None,
               loaded: list[Any] | None = None, settings: Settings | None = None) -> Flask:
    """Build the app: defaults, SERVICE_* env, then `config`; load and warm the model(s) once.

    `settings` are settings validated already (by `python -m service`, which reads them before it
    decides on processes), used instead of reading them again; `config` is then not allowed.
    `classifier` serves one model already loaded; `loaded` (service.models.Loaded) the models a parent
    process loaded before forking; neither: the model folder or repository of SERVICE_MODEL_DIR.
    """
    app = Flask("service", static_folder=None)  # its name is its logger's: the service's
    if settings is None:
        settings = configure(app.config, config)
    elif config is not None:
        raise TypeError("create_app takes config or settings, not both")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_content_length  # Werkzeug answers 413 above it

    from service import api, tei, v2, v2_repository
    from service import models as repository
    from service.api import bp

    if classifier is not None:
        loaded = [repository.Loaded(classifier.name, settings.model_dir, classifier)]
    elif loaded is None:
        loaded = repository.load_repository(settings)
    names = repository.repository_names(settings.model_dir) if classifier is None else None
    default = repository.default_model(settings, names) if names is not None else loaded[0].name

    metrics = Metrics()
    models = repository.Models(settings, metrics, loaded, default, settings.model_dir if names is not None else None)
    first = models.get(default)
    assert first is not None and first.classifier is not None  # load_repository refuses a default it cannot load
    # draining: set by the Waitress runner on SIGTERM, /ready answers 503 from then on
    state.store(app, settings=settings, classifier=first.classifier, metrics=metrics, draining=threading.Event(),
                models=models)
    metrics.init_app(app)
    observe.init_app(app, settings, first.classifier.name)  # before auth's hook, which may refuse
    errors.init_app(app)
    batching.init_app(app, first.scheduler)
    auth.init_app(app, settings.api_key)
    app.register_blueprint(bp)
    app.register_blueprint(tei.bp)
    # every model under its name: the Inference API at /models/{name} (its base_url, posted to verbatim),
    # /sentiment, /ready, /info and TEI's routes below it
    prefix = f"/models/<{MODEL_PREFIX}>"
    # GET /models/{name} is its /info, as Triton's model URL is its metadata
    for rule, view, method, endpoint in (("", api.inference_api, "POST", "inference_api"),
                                         ("", api.info, "GET", "model"),
                                         ("/sentiment", api.sentiment, "POST", "sentiment"),
                                         ("/ready", api.ready, "GET", "ready"), ("/info", api.info, "GET", "info")):
        # strict_slashes=False: a base_url written with a trailing slash (".../models/x/") works too
        app.add_url_rule(prefix + rule, f"models_api.{endpoint}", view_func=view, methods=[method],
                         strict_slashes=False if rule == "" else None)
    app.register_blueprint(tei.bp, url_prefix=prefix, name=f"models_{tei.bp.name}")
    app.register_blueprint(v2.bp)  # the Open Inference Protocol v2 (KServe, Triton)
    if models.repository is not None:
        app.register_blueprint(v2_repository.bp)  # its model repository extension, for a repository
    _route_models(app, models)
    return app


MODEL_PREFIX = "served_model"  # the variable of /models/<served_model>/...


def _route_models(app: Flask, models: Any) -> None:
    """Give each request the model its path names, count it in flight until it ends, and count it per model."""
    from flask import g

    @app.url_value_preprocessor
    def pick(endpoint: str | None, values: dict[str, Any] | None) -> None:
        if values and MODEL_PREFIX in values:
            state.select(values.pop(MODEL_PREFIX))

    @app.after_request
    def count(response: Any) -> Any:
        # a request to a known model counts under its name, answered or not (503 while unloaded); an
        # unknown name (404) does not become a label
        model = g.get("model")
        name = model.name if model is not None else state.asked()
        if name is not None and g.get("started") is not None and (model is not None or name in models.names()):
            models.observe(name, response.status_code, time.perf_counter() - g.started)
        return response

    @app.teardown_request
    def leave(exc: BaseException | None) -> None:
        model = g.pop("model", None)
        if model is not None:
            models.leave(model)


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
    if not settings.batching or not classifier.encodes:
        return None
    scheduler = Scheduler(classifier, max_texts=settings.batch_max_texts, max_tokens=settings.batch_max_tokens,
                          max_queue=settings.max_queue, queue_timeout=settings.queue_timeout,
                          wait=settings.batch_wait_ms / 1000, gather=settings.batch_gather_ms / 1000,
                          workers=settings.batch_workers, express=settings.batch_express, metrics=metrics)
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
