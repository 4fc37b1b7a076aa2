"""Text Embeddings Inference's classifier routes: /predict, /rerank and /tokenize, with TEI's errors.

Errors on these routes are TEI's `{"error", "error_type"}` with TEI's statuses: 400 Empty, 422
Validation, 424 Backend, 429 Overloaded (with Retry-After). Unlike TEI, an input is truncated unless
the request says `"truncate": false` (TEI truncates only when started with --auto-truncate), and
/predict scores with the model's own function (sigmoid for a multi-label model), not always softmax.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
from flask import Blueprint, Response, current_app, jsonify
from werkzeug.exceptions import HTTPException

from service import contract, state
from service.batching import Unavailable
from service.classifier import (
    WIDE_CLIP_CHARS_PER_TOKEN,
    Direction,
    InferenceError,
    Input,
    InputTooLong,
    apply_function,
    rank,
)
from service.contract import Param
from service.errors import ApiError, handle_http_exception, request_id
from service.inference import infer
from service.schemas import json_object
from service.tasks import CLASSIFY

bp = Blueprint("tei", __name__)
logger = logging.getLogger(__name__)

EMPTY, VALIDATION, BACKEND, OVERLOADED = "Empty", "Validation", "Backend", "Overloaded"
_DIRECTIONS: dict[str, Direction] = {"right": "right", "left": "left"}  # TEI also takes Right / Left


@dataclass(frozen=True)
class Options:
    """How a request wants its inputs truncated and scored."""

    truncate: bool
    direction: Direction
    raw_scores: bool


def _invalid(message: str) -> ApiError:
    """Return TEI's validation error."""
    return ApiError(422, message, VALIDATION)


def _boolean(name: str, description: str) -> Param:
    """Declare an optional boolean field."""
    return Param(name, {"type": "boolean"}, description, f"'{name}' must be true or false")


# The fields of TEI's bodies besides the inputs, declared once: validation and the OpenAPI document.
OPTIONS = [
    _boolean("truncate", "Default true (truncate to max_length); false refuses a longer input with 422."),
    Param("truncation_direction", {"type": "string", "enum": list(_DIRECTIONS)}, "Which end is cut (default right).",
          "'truncation_direction' must be \"right\" or \"left\"", fold_case=True),
    _boolean("raw_scores", "Logits instead of probabilities."),
]
RERANK_OPTIONS = [
    _boolean("return_text", "Return each text with its score (default false)."),
    Param("top_n", {"type": "integer", "minimum": 1}, "Return only the best top_n texts (default all).",
          "'top_n' must be an integer >= 1 or null"),
]
TOKENIZE_OPTIONS = [_boolean("add_special_tokens", "Add the model's special tokens (default true).")]


# The inputs of TEI's bodies, declared once: validation (422 Validation unless a rule says otherwise) and the
# OpenAPI document. TEI takes empty strings here; an input that is empty as a whole is refused afterwards.
STRING = {"type": "string"}
_BATCH_LIMIT = "batch size {count} > maximum allowed batch size {limit}"


@cache
def string_field(name: str) -> Param:
    """Declare a field holding one text."""
    return Param(name, STRING, "A text.", f"'{name}' must be a string")


@cache
def sequence_field(name: str) -> Param:
    """Declare a field holding [text] (one text) or [text, text_pair] (one pair)."""
    return Param(name, {"type": "array", "items": STRING, "minItems": 1, "maxItems": 2},
                 "[text] or [text, text_pair].", f"'{name}' must be [text] or [text, text_pair]",
                 messages={"items.type": f"'{name}{{path}}' must be a string"})


@cache
def batch_field(name: str, max_batch: int) -> Param:
    """Declare a field holding a batch of 1 to max_batch sequences (400 Empty when empty, 422 beyond)."""
    sequence = sequence_field(name)
    shape = f"'{name}{{path}}' must be [text] or [text, text_pair]"  # an item that is no sequence
    return Param(name, {"type": "array", "items": sequence.schema, "minItems": 1, "maxItems": max_batch},
                 f"[[text], [text, text_pair], ...]: at most {max_batch}.", sequence.message,
                 messages={"minItems": "Batch is empty", "maxItems": _BATCH_LIMIT, "items.type": shape,
                           "items.minItems": shape, "items.maxItems": shape,
                           "items.items.type": f"'{name}{{path}}' must be a string"},
                 statuses={"minItems": (400, EMPTY)})


@cache
def strings_field(name: str, max_batch: int, empty: str) -> Param:
    """Declare a field holding 1 to max_batch texts (400 Empty with the message `empty` when there are none)."""
    return Param(name, {"type": "array", "items": STRING, "minItems": 1, "maxItems": max_batch},
                 f"At most {max_batch} texts.", f"'{name}' must be a list of strings",
                 messages={"minItems": empty, "maxItems": _BATCH_LIMIT,
                           "items.type": f"'{name}{{path}}' must be a string"},
                 statuses={"minItems": (400, EMPTY)})


def _options(body: dict[str, Any]) -> Options:
    """Return truncate, truncation_direction and raw_scores of a /predict or /rerank body."""
    values = contract.read(body, OPTIONS, 422, VALIDATION)
    return Options(values.get("truncate", True), _DIRECTIONS[values.get("truncation_direction", "right")],
                   values.get("raw_scores", False))


def _checked(value: Any, declared: Param) -> Any:
    """Return value if it meets its declaration, else raise TEI's 422 (or the rule's own status)."""
    return contract.check(value, declared, 422, VALIDATION)


def _input(sequence: list[str]) -> Input:
    """Return [text] as a text and [text, text_pair] as a pair."""
    return sequence[0] if len(sequence) == 1 else (sequence[0], sequence[1])


def predict_inputs(value: Any, max_batch: int) -> tuple[list[Input], bool]:
    """Return the inputs of /predict and whether they were a batch, read as TEI reads them.

    "a" is one text; ["a", "b"] is one pair (not a batch of two); [["a"], ["a", "b"]] is a batch.
    """
    if isinstance(value, str):
        return _not_empty([_checked(value, string_field("inputs"))]), False
    if not isinstance(value, list):
        raise _invalid("'inputs' must be a string, a pair [text, text_pair] or a batch [[text], [text, text_pair]]")
    if value and not isinstance(value[0], list):
        return _not_empty([_input(_checked(value, sequence_field("inputs")))]), False
    return _not_empty([_input(item) for item in _checked(value, batch_field("inputs", max_batch))]), True


def _not_empty(inputs: list[Input]) -> list[Input]:
    """Refuse an empty text, or a pair of two, as TEI's validation does (a blank text is still an input)."""
    for item in inputs:
        if item == "" or item == ("", ""):
            raise _invalid("`inputs` cannot be empty")
    return inputs


def _logits(inputs: list[Input], options: Options) -> np.ndarray:
    """Return the logits of inputs, with a too-long input (truncate: false) as TEI's 422."""
    try:
        return infer(inputs, truncate=options.truncate, direction=options.direction)
    except InputTooLong as exc:
        raise _invalid(f"`inputs` must have less than {exc.max_length} tokens (input {exc.index} has more); "
                       "send \"truncate\": true to truncate it") from None


def _classifier(route: str) -> Any:
    """Return the model if it classifies texts or pairs, else raise TEI's 424 for a model of another kind."""
    classifier = state.classifier()
    if not classifier.task.can(CLASSIFY):
        raise ApiError(424, f"model is not a classifier model: {route} needs one label per input, this model "
                            f"{classifier.task.describe()}", BACKEND)
    return classifier


@bp.post("/predict")
def predict() -> Response:
    """Classify a text, a pair or a batch of them: every label, sorted by score."""
    body = json_object(VALIDATION)
    if "inputs" not in body:
        raise _invalid("missing field 'inputs'")
    inputs, batch = predict_inputs(body["inputs"], state.settings().max_batch)
    options = _options(body)
    classifier = _classifier("/predict")
    logits = _logits(inputs, options)
    ranked = rank(logits if options.raw_scores else apply_function(logits, classifier.function),
                  classifier.labels, None)
    return jsonify(ranked if batch else ranked[0])


@bp.post("/rerank")
def rerank() -> Response:
    """Score each text against the query with a one-label cross-encoder; best first."""
    body = json_object(VALIDATION)
    missing = [name for name in ("query", "texts") if name not in body]
    if missing:
        raise _invalid(" and ".join(f"missing field '{name}'" for name in missing))
    query = _checked(body["query"], string_field("query"))
    texts = _checked(body["texts"], strings_field("texts", state.settings().max_batch, "`texts` cannot be empty"))
    _not_empty([(query, text) for text in texts])
    values = contract.read(body, RERANK_OPTIONS, 422, VALIDATION)
    top_n, return_text = values.get("top_n"), values.get("return_text", False)
    options = _options(body)
    classifier = _classifier("/rerank")
    if len(classifier.labels) != 1:
        raise ApiError(424, f"model is not a re-ranker model: /rerank needs a cross-encoder with one label, "
                            f"this one has {len(classifier.labels)}", BACKEND)
    logits = _logits([(query, text) for text in texts], options)[:, 0]
    scores = logits.astype(np.float64) if options.raw_scores else apply_function(logits, "sigmoid")
    order = np.argsort(-scores, kind="stable")[:top_n]
    ranks = [{"index": int(i), "score": float(scores[i]), **({"text": texts[i]} if return_text else {})}
             for i in order]
    return jsonify(ranks)


@bp.post("/tokenize")
def tokenize() -> Response:
    """Return the tokens of a text or a list of texts, with their ids, texts and byte offsets."""
    body = json_object(VALIDATION)
    if "inputs" not in body:
        raise _invalid("missing field 'inputs'")
    inputs = body["inputs"]
    if not isinstance(inputs, (str, list)):
        raise _invalid("'inputs' must be a string or a list of strings")
    texts = [_checked(inputs, string_field("inputs"))] if isinstance(inputs, str) else _checked(
        inputs, strings_field("inputs", state.settings().max_batch, "Batch is empty"))
    add_special_tokens = contract.read(body, TOKENIZE_OPTIONS, 422, VALIDATION).get("add_special_tokens", True)
    if body.get("prompt_name") is not None:
        raise _invalid("'prompt_name' is not supported: this service applies no prompts")
    classifier = state.classifier()
    limit = classifier.max_length * WIDE_CLIP_CHARS_PER_TOKEN
    for index, text in enumerate(texts):
        if len(text) > limit:
            raise _invalid(f"`inputs` must have less than {limit} characters. Given: {len(text)} (input {index})")
    if not classifier.encodes:
        raise ApiError(424, f"/tokenize needs the onnx backend, not {classifier.backend}", BACKEND)
    return jsonify(classifier.tokens(texts, add_special_tokens))


@bp.errorhandler(Unavailable)
def overloaded(exc: Unavailable) -> tuple[Response, int, dict[str, str]]:
    """Answer overload as TEI does: 429 Overloaded, with Retry-After."""
    return jsonify(error=exc.message, error_type=OVERLOADED), 429, {"Retry-After": str(exc.retry_after)}


@bp.errorhandler(InferenceError)
def backend_failed(exc: InferenceError) -> tuple[Response, int]:
    """Log a model failure and answer TEI's 424 Backend."""
    logger.error("request %s: inference failed: %s", request_id(), exc, exc_info=exc)
    return jsonify(error="inference failed", error_type=BACKEND), 424


@bp.errorhandler(HTTPException)
def http_error(exc: HTTPException) -> Response:
    """Answer Werkzeug's errors inside these routes (a body over the limit: 413) with an error_type."""
    response = handle_http_exception(exc)
    response.set_data(current_app.json.dumps({**response.get_json(), "error_type": VALIDATION}))
    return response
