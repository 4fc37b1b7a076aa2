"""The HTTP routes: classification, the Inference API contract, health, info, metrics and OpenAPI."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Literal

from flask import Blueprint, Response, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service import answers, state
from service.config import available_cpus
from service.errors import ApiError
from service.inference import infer
from service.openapi import openapi_document, with_models
from service.schemas import (
    ClassifyRequest,
    json_object,
    parameters_of,
    read_body,
    read_tag_request,
    read_zero_shot_request,
)
from service.tasks import CLASSIFY, TAG, ZERO_SHOT

bp = Blueprint("api", __name__)
_RUNTIME = ("onnxruntime", "tokenizers", "numpy", "flask", "werkzeug", "waitress", "prometheus-client")
_REFERENCE = {"pytorch": ("torch", "transformers"),
              "optimum": ("torch", "transformers", "optimum", "optimum-onnx")}


def _classify(form: Literal["sentiment", "inference_api"],
              body: dict[str, Any] | None = None) -> tuple[ClassifyRequest, list[list[Any]]]:
    """Validate the body, classify its inputs and rank each one's labels."""
    settings = state.settings()
    classifier = state.classifier()
    if not classifier.task.can(CLASSIFY):
        selected = state.selected()
        raise ApiError(400, f"this model {classifier.task.describe()}: it has no label per text for "
                            f"{request.path}; send its requests to POST {f'/models/{selected}' if selected else '/'}")
    parsed = read_body(settings.max_batch, form, body)
    logits = infer(parsed.inputs)
    return parsed, classifier.postprocess(logits, parsed.top_k, parsed.function_to_apply)


@bp.post("/sentiment")
def sentiment() -> Response:
    """Classify "text" (one result) or "texts" (a list), as the original service did."""
    body, results = _classify("sentiment")
    # without top_k, each text gets the original pipeline's element 0: its top {"label", "score"}
    answers: list[Any] = results if body.ranked else [ranked[0] for ranked in results]
    return jsonify(answers if body.batch else answers[0])


@bp.post("/")
def inference_api() -> Response:
    """Answer the Hugging Face Inference API for the model's task: entities for a token classifier, candidate
    labels ranked when the request names some (zero-shot), else one ranked list of labels per input."""
    settings = state.settings()
    task = state.classifier().task
    body = json_object()
    if task.can(TAG):
        return jsonify(answers.tag(read_tag_request(body, settings.max_batch, task.max_stride)))
    if parameters_of(body).get("candidate_labels") is not None:
        if not task.can(ZERO_SHOT):
            raise ApiError(400, f"this model {task.describe()}: zero-shot classification ('candidate_labels') "
                                "needs an NLI model with an entailment label")
        user_agent = request.headers.get("User-Agent", "")
        return jsonify(answers.zero_shot(read_zero_shot_request(body, settings.max_batch, user_agent)))
    _, results = _classify("inference_api", body)
    return jsonify(results)


@bp.get("/health")
def health() -> Response:
    """Say the process is alive."""
    return jsonify(status="ok")


@bp.get("/ready")
def ready() -> tuple[Response, int]:
    """Say whether requests will be served: every loaded model (or the path's model) has answered, its
    scheduler runs, and no shutdown is under way."""
    if state.draining().is_set():
        return jsonify(status="stopping", error="shutting down"), 503
    models = [state.model()] if state.selected() is not None else state.models().loaded()
    for model in models:
        if model.scheduler is not None and not model.scheduler.alive:
            return jsonify(status="failed", error=f"the batch scheduler of model '{model.name}' has stopped"), 503
        if not model.classifier.ready:
            return jsonify(status="loading", error="model not warmed up yet"), 503
    return jsonify(status="ready"), 200


@bp.get("/info")
def info() -> Response:
    """Describe the model(s), the runtime versions, threads, limits, batching and whether a key is needed."""
    settings = state.settings()
    models = state.models()
    chosen = state.model() if state.selected() is not None else models.get(models.default)
    classifier = chosen.classifier if chosen is not None and chosen.classifier is not None else None
    backend = classifier.backend if classifier is not None else settings.backend
    names = _RUNTIME + _REFERENCE.get(backend, ())
    # a model not loaded has no scheduler: say what the settings give it once loaded
    batching = chosen.scheduler is not None if classifier is not None else settings.batching and backend == "onnx"
    return jsonify(
        model=classifier.info() if classifier is not None else None,  # the path's model, else the default one
        models=models.describe(),
        default_model=models.default,
        # a repository's models share one budget of runs at once per process (service/models.py); None: one model
        run_budget=models.gate.budget if models.gate is not None else None,
        backend=backend,
        versions={name: _version(name) for name in names} | {"python": platform.python_version()},
        # per process: with SERVICE_PROCESSES, each of them has these
        threads={"processes": settings.processes, "waitress": settings.threads,
                 "ort_intra_op": settings.ort_threads, "ort_inter_op": 1,
                 "ort_spinning": settings.ort_spinning, "ort_lone_threads": settings.ort_lone_threads,
                 "batch_workers": settings.batch_workers if batching else 0},
        cpus=sorted(available_cpus()),  # this process' CPUs: its part of the mask when processes are pinned
        limits={"max_batch": settings.max_batch, "max_content_length": settings.max_content_length,
                "max_queue": settings.max_queue, "connection_limit": settings.connection_limit},
        batching={"enabled": batching, "express": batching and settings.batch_express,
                  "max_texts": settings.batch_max_texts,
                  "max_tokens": settings.batch_max_tokens, "wait_ms": settings.batch_wait_ms,
                  "gather_ms": settings.batch_gather_ms,
                  "queue_timeout_s": settings.queue_timeout},
        auth={"api_key_required": settings.api_key is not None},  # whether, never which
    )


@bp.get("/metrics")
def metrics() -> Response:
    """Return the Prometheus text exposition of this app's registry."""
    registry = state.metrics().exposition()
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)


@bp.get("/openapi.json")
def openapi() -> Response:
    """Return the OpenAPI 3.1 document of these routes, for every model."""
    settings = state.settings()
    models = state.models()
    default = models.get(models.default)
    task = default.classifier.task if default is not None and default.classifier is not None else None
    document = openapi_document(settings.max_batch, settings.max_content_length, settings.api_key is not None,
                                models.default, task)
    locked = (401,) if settings.api_key is not None else ()
    tasks = [model.classifier.task for model in models.loaded() if model.classifier is not None]
    return jsonify(with_models(document, models.names(), locked, models.repository is not None, tasks,
                               settings.max_batch))


def _version(distribution: str) -> str | None:
    """Return an installed distribution's version, or None."""
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None
