"""ONNX Runtime inference service for Hugging Face text classifiers."""

from __future__ import annotations

from typing import Any

from flask import Flask

from service import errors
from service.config import DEFAULTS, Settings


def create_app(config: dict[str, Any] | None = None, classifier: Any = None) -> Flask:
    """Build the app: defaults, SERVICE_* env, then `config`; load and warm the classifier once."""
    app = Flask(__name__, static_folder=None)
    app.config.from_mapping(DEFAULTS)
    # Keep env values as strings: Settings validates them and names the variable when one is wrong.
    app.config.from_prefixed_env("SERVICE", loads=str)
    app.config.from_mapping(config or {})
    settings = Settings.from_mapping(app.config)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_content_length  # Werkzeug answers 413 above it

    if classifier is None:
        classifier = load_classifier(settings)
    if settings.warmup and not classifier.ready:
        classifier.warmup()

    from service.api import bp
    from service.metrics import Metrics

    metrics = Metrics()
    app.extensions.update({"service.settings": settings, "service.classifier": classifier,
                           "service.metrics": metrics})
    metrics.init_app(app)
    errors.init_app(app)
    app.register_blueprint(bp)
    return app


def load_classifier(settings: Settings) -> Any:
    """Return the classifier of the configured backend (the reference ones import torch lazily)."""
    if settings.backend == "pytorch":
        from service.reference import ReferenceClassifier

        return ReferenceClassifier(settings.model_dir, settings.ort_threads)
    if settings.backend == "optimum":
        from service.reference import OptimumClassifier

        return OptimumClassifier(settings.model_dir, settings.ort_threads)
    from service.classifier import Classifier

    return Classifier(settings.model_dir, settings.ort_threads)
