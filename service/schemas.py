"""Request validation in one place: a JSON body becomes a ClassifyRequest or an ApiError."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from flask import current_app, request

from service.classifier import FUNCTIONS, Input
from service.errors import ApiError

# The body is parsed as JSON whatever its Content-Type, because `curl -d` sends
# application/x-www-form-urlencoded; only multipart bodies, which can never be JSON, are refused.
REFUSED_MIMETYPES = ("multipart/form-data",)


@dataclass(frozen=True)
class ClassifyRequest:
    """Typed inputs of one classification request."""

    inputs: list[Input]  # texts, or (text, text_pair) pairs
    batch: bool  # False: one input was sent alone, answer with one result
    top_k: int | None  # None: all labels
    ranked: bool  # False: /sentiment's legacy single {"label", "score"} per text
    function_to_apply: str | None = None  # None: the model's default


def json_object(error_type: str | None = None) -> dict[str, Any]:
    """Return the current request's JSON body, which must be an object; errors carry error_type."""
    if request.mimetype in REFUSED_MIMETYPES:
        raise ApiError(415, "unsupported media type: send a JSON body (Content-Type: application/json)",
                       error_type)
    # Read whatever the Content-Type; Werkzeug raises 413 here for a body over MAX_CONTENT_LENGTH.
    data = request.get_data(cache=False)
    try:
        # Not request.get_json(): it lets RecursionError from deeply nested arrays escape as a 500,
        # and it accepts NaN and Infinity, which are not JSON (RFC 8259).
        body = current_app.json.loads(data, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise ApiError(400, "invalid JSON", error_type) from None
    if not isinstance(body, dict):
        raise ApiError(400, "the JSON body must be an object", error_type)
    return body


def read_body(max_batch: int, form: Literal["sentiment", "inference_api"]) -> ClassifyRequest:
    """Parse and validate the current request's JSON body for /sentiment or the Inference API route."""
    body = json_object()
    if form == "sentiment":
        return _sentiment(body, max_batch)
    return _inference_api(body, max_batch)


def _sentiment(body: dict[str, Any], max_batch: int) -> ClassifyRequest:
    """Validate {"text": str} or {"texts": [str, ...]}, with optional "top_k"."""
    if "text" in body and "texts" in body:
        raise ApiError(400, "send either 'text' or 'texts', not both")
    ranked = "top_k" in body
    top_k = _top_k(body.get("top_k")) if ranked else 1
    if "texts" in body:
        return ClassifyRequest(_texts(body["texts"], "texts", max_batch), True, top_k, ranked)
    if "text" not in body:
        raise ApiError(400, "missing field 'text'")
    return ClassifyRequest([_text(body["text"], "text")], False, top_k, ranked)


def _inference_api(body: dict[str, Any], max_batch: int) -> ClassifyRequest:
    """Validate the Inference API body {"inputs": str | pair | [str | pair], "parameters": {...}}.

    A pair is {"text": str, "text_pair": str}, as transformers' pipeline takes sentence pairs.
    """
    if "inputs" not in body:
        raise ApiError(400, "missing field 'inputs'")
    parameters = body.get("parameters")
    if parameters is None:  # the client sends {} without options; null means the same
        parameters = {}
    if not isinstance(parameters, dict):
        raise ApiError(400, "field 'parameters' must be an object")
    function = parameters.get("function_to_apply")
    if function is not None and function not in FUNCTIONS:
        raise ApiError(400, f"parameter 'function_to_apply' must be one of {', '.join(FUNCTIONS)}")
    top_k = _top_k(parameters.get("top_k"))
    inputs = body["inputs"]
    if isinstance(inputs, str):
        return ClassifyRequest([_text(inputs, "inputs")], False, top_k, True, function)
    if isinstance(inputs, dict):
        return ClassifyRequest([_pair(inputs, "inputs")], False, top_k, True, function)
    if not isinstance(inputs, list):
        raise ApiError(400, "field 'inputs' must be a string or a list of strings")
    if not inputs or not all(isinstance(item, dict) for item in inputs):
        texts = _texts(inputs, "inputs", max_batch)  # the common case, with the messages of 'texts'
        return ClassifyRequest(list(texts), True, top_k, True, function)
    if len(inputs) > max_batch:
        raise ApiError(413, f"batch too large: {len(inputs)} texts, the limit is {max_batch} per request")
    return ClassifyRequest([_pair(item, f"inputs[{i}]") for i, item in enumerate(inputs)], True, top_k, True,
                           function)


def _pair(value: dict[str, Any], field: str) -> Input:
    """Return (text, text_pair) from {"text": str, "text_pair": str}; without text_pair, the text."""
    unknown = sorted(set(value) - {"text", "text_pair"})
    if unknown or "text" not in value:
        raise ApiError(400, f"field '{field}' must be an object with 'text' and optional 'text_pair'")
    text = _text(value["text"], f"{field}.text")
    if value.get("text_pair") is None:
        return text
    return text, _text(value["text_pair"], f"{field}.text_pair")


def _refuse_constant(name: str) -> Any:
    """Refuse the NaN, Infinity and -Infinity literals that Python's json module accepts."""
    raise ValueError(f"{name} is not JSON")


def _text(value: Any, field: str) -> str:
    """Return a non-blank text."""
    if not isinstance(value, str):
        raise ApiError(400, f"field '{field}' must be a string")
    if not value.strip():
        raise ApiError(400, "text cannot be empty")
    check_unicode(value, "text")
    return value


def _texts(value: Any, field: str, max_batch: int) -> list[str]:
    """Return a non-empty list of non-blank texts no longer than max_batch."""
    if not isinstance(value, list) or not all(isinstance(text, str) for text in value):
        raise ApiError(400, f"field '{field}' must be a list of strings")
    if not value:
        raise ApiError(400, f"field '{field}' cannot be an empty list")
    if len(value) > max_batch:
        raise ApiError(413, f"batch too large: {len(value)} texts, the limit is {max_batch} per request")
    for index, text in enumerate(value):
        if not text.strip():
            raise ApiError(400, f"text at index {index} cannot be empty")
        check_unicode(text, f"text at index {index}")
    return value


def check_unicode(text: str, name: str, status: int = 400, error_type: str | None = None) -> None:
    """Refuse a lone surrogate (JSON "\\ud800"): the tokenizer cannot encode it (a 500 before this check)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ApiError(status, f"{name} is not valid Unicode: lone surrogate at character {exc.start}",
                       error_type) from None


def _top_k(value: Any) -> int | None:
    """Return top_k: an integer >= 1, or None for all labels."""
    if value is None:
        return None
    # JSON Schema (and so the OpenAPI document) counts 2.0 as the integer 2; 1e400 parses to inf, which is not
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ApiError(400, "'top_k' must be an integer >= 1 or null")
    return value
