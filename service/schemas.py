"""Request validation in one place: a JSON body becomes a ClassifyRequest (or a task's request) or an ApiError.

The bodies' fields (a text, texts, a sentence pair) and the Inference API's parameters are declared here
once, as service.contract declarations: the readers below check a body against them, and
service/openapi.py writes the same declarations into the OpenAPI document.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

from flask import current_app, request

from service import contract
from service.classifier import FUNCTIONS, Input
from service.contract import Param
from service.errors import ApiError
from service.tasks import DEFAULT_TEMPLATE, STRATEGIES, Candidates, Strategy, TaskError, parse_labels, parse_template

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


def check_readable(media_message: str, error_type: str | None = None) -> None:
    """Raise 415 for a body the service cannot read: of a refused media type, or compressed.

    A compressed body (Content-Encoding other than identity) is refused rather than read as JSON or
    ignored; the answer's Accept-Encoding says what to send instead (RFC 9110, 415).
    """
    if request.mimetype in REFUSED_MIMETYPES:
        raise ApiError(415, media_message, error_type)
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        raise ApiError(415, "unsupported Content-Encoding: send the body uncompressed", error_type,
                       {"Accept-Encoding": "identity"})


def json_object(error_type: str | None = None) -> dict[str, Any]:
    """Return the current request's JSON body, which must be an object; errors carry error_type."""
    check_readable("unsupported media type: send a JSON body (Content-Type: application/json)", error_type)
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


# ---- body fields: a text, a list of texts, a sentence pair, declared once for validation and the document ----

# A text must hold a character that str.strip() keeps; this class lists every one Python calls whitespace.
NON_BLANK = "[^\\t\\n\\x0b\\x0c\\r\\x1c-\\x1f \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]"
TEXT = {"type": "string", "minLength": 1, "pattern": NON_BLANK}
BLANK = "text cannot be empty"
_ITEM_BLANK = "text at index {index} cannot be empty"
NOT_UNICODE = "text is not valid Unicode: lone surrogate at character {at}"
TOO_MANY = "batch too large: {count} texts, the limit is {limit} per request"  # 413


@cache
def text_field(name: str) -> Param:
    """Declare a body field holding one non-blank text."""
    return Param(name, TEXT, "A text (not blank).", f"field '{name}' must be a string",
                 messages={"minLength": BLANK, "pattern": BLANK, "unicode": NOT_UNICODE})


@cache
def texts_field(name: str, max_batch: int) -> Param:
    """Declare a body field holding a list of 1 to max_batch non-blank texts (413 beyond max_batch)."""
    return Param(name, {"type": "array", "items": TEXT, "minItems": 1, "maxItems": max_batch},
                 f"At most {max_batch} non-blank texts.", f"field '{name}' must be a list of strings",
                 messages={"minItems": f"field '{name}' cannot be an empty list",
                           "maxItems": TOO_MANY,
                           "items.minLength": _ITEM_BLANK, "items.pattern": _ITEM_BLANK,
                           "items.unicode": "text at index {index} is not valid Unicode: lone surrogate at "
                                            "character {at}"},
                 statuses={"maxItems": 413})


# A sentence pair, as transformers' pipeline takes it; without text_pair, a single text.
PAIR = {"type": "object", "required": ["text"], "additionalProperties": False,
        "properties": {"text": TEXT, "text_pair": {"anyOf": [TEXT, {"type": "null"}]}}}


def _pair_messages(name: str, rule: str = "") -> dict[str, str]:
    """Return the messages of a pair's rules (each prefixed with rule), for the field called name."""
    shape = f"field '{name}' must be an object with 'text' and optional 'text_pair'"
    return {f"{rule}{key}": message for key, message in {
        "type": shape, "required": shape, "additionalProperties": shape,
        "properties.text.type": f"field '{name}.text' must be a string",
        "properties.text.minLength": BLANK, "properties.text.pattern": BLANK, "properties.text.unicode": NOT_UNICODE,
        "properties.text_pair.type": f"field '{name}.text_pair' must be a string",
        "properties.text_pair.minLength": BLANK, "properties.text_pair.pattern": BLANK,
        "properties.text_pair.unicode": NOT_UNICODE}.items()}


@cache
def pair_field(name: str) -> Param:
    """Declare a body field holding one {"text", "text_pair"} pair."""
    messages = _pair_messages(name)
    return Param(name, PAIR, 'A sentence pair {"text", "text_pair"}; without text_pair, one text.',
                 messages["type"], messages=messages)


@cache
def pairs_field(name: str, max_batch: int) -> Param:
    """Declare a body field holding a list of 1 to max_batch sentence pairs (413 beyond max_batch)."""
    return Param(name, {"type": "array", "items": PAIR, "minItems": 1, "maxItems": max_batch},
                 f"At most {max_batch} sentence pairs.", f"field '{name}' must be a list of sentence pairs",
                 messages={"maxItems": TOO_MANY,
                           **_pair_messages(f"{name}[{{index}}]", "items.")},
                 statuses={"maxItems": 413})


# ---- parameters ----

# JSON Schema (and so the OpenAPI document) counts 2.0 as the integer 2; 1e400 parses to inf, which is not.
TOP_K = Param("top_k", {"type": "integer", "minimum": 1}, "Return this many labels sorted by score (null: all labels).",
              "'top_k' must be an integer >= 1 or null")
CLASSIFY_PARAMETERS = [
    Param("function_to_apply", {"type": "string", "enum": list(FUNCTIONS)},
          "Default: the model's (softmax for >1 label, sigmoid for one or a multi-label model, none for regression).",
          f"parameter 'function_to_apply' must be one of {', '.join(FUNCTIONS)}"),
    TOP_K,
]


def read_body(max_batch: int, form: Literal["sentiment", "inference_api"],
              body: dict[str, Any] | None = None) -> ClassifyRequest:
    """Parse and validate the current request's JSON body (or the body already read) for /sentiment or the
    Inference API route."""
    body = json_object() if body is None else body
    if form == "sentiment":
        return _sentiment(body, max_batch)
    return _inference_api(body, max_batch)


@dataclass(frozen=True)
class TagRequest:
    """Typed inputs of one token-classification request on the Inference API route."""

    texts: list[str]
    batch: bool  # False: one text was sent alone, answer with its entities
    strategy: Strategy
    ignore_labels: list[str]
    stride: int | None  # None: windows that do not overlap, for texts longer than max_length


@dataclass(frozen=True)
class ZeroShotRequest:
    """Typed inputs of one zero-shot request on the Inference API route."""

    texts: list[str]
    batch: bool
    candidates: Candidates
    pipeline_shape: bool  # answer transformers' {"sequence", "labels", "scores"} rather than [{"label", "score"}]


# Clients that read the zero-shot pipeline's dict: huggingface_hub before 1.2 (its User-Agent says hf_hub/0.x).
_PIPELINE_SHAPE_AGENTS = ("hf_hub/0.",)
RESPONSE_FORMATS = ("list", "pipeline")


def parameters_of(body: dict[str, Any]) -> dict[str, Any]:
    """Return the Inference API body's "parameters" object ({} when absent or null)."""
    parameters = body.get("parameters")
    if parameters is None:  # the client sends {} without options; null means the same
        return {}
    if not isinstance(parameters, dict):
        raise ApiError(400, "field 'parameters' must be an object")
    return parameters


def task_inputs(max_batch: int) -> dict[str, Any]:
    """Return the schema of a token-classification or zero-shot body's "inputs": a text or a list of texts."""
    return {"anyOf": [contract.field_schema(text_field("inputs")),
                      contract.field_schema(texts_field("inputs", max_batch))],
            "description": "A text, or a list of texts (then a list of answers)."}


def _texts_of_inputs(body: dict[str, Any], max_batch: int) -> tuple[list[str], bool]:
    """Return the texts of "inputs" (a string or a list of strings) and whether it was a list."""
    if "inputs" not in body:
        raise ApiError(400, "missing field 'inputs'")
    inputs = body["inputs"]
    if isinstance(inputs, str):
        return [_text(inputs, text_field("inputs"))], False
    if not isinstance(inputs, list):
        raise ApiError(400, "field 'inputs' must be a string or a list of strings")
    return _texts(inputs, texts_field("inputs", max_batch)), True


def tag_parameters(max_stride: int) -> list[Param]:
    """Return the token-classification parameters of POST / (stride's limit is the model's)."""
    return [
        Param("aggregation_strategy", {"type": "string", "enum": list(STRATEGIES)},
              "As transformers' pipeline: none (the default) tags every token; simple groups tokens into entities; "
              "first, average and max also vote per word.",
              f"parameter 'aggregation_strategy' must be one of {', '.join(STRATEGIES)}", fold_case=True),
        Param("ignore_labels", {"type": "array", "items": {"type": "string"}},
              'Labels left out of the answer (default ["O"]).', "parameter 'ignore_labels' must be a list of strings"),
        Param("stride", {"type": "integer", "minimum": 0, "maximum": max_stride},
              "Tokens by which the windows of a text longer than max_length overlap (default: windows that do not "
              "overlap); needs an aggregation_strategy other than none.",
              f"parameter 'stride' must be an integer from 0 to {max_stride} (the tokens a window holds less one) "
              "or null"),
    ]


ZERO_SHOT_PARAMETERS = [
    Param("candidate_labels", {"anyOf": [{"type": "array", "items": {"type": "string"}, "minItems": 1},
                                         {"type": "string"}]},
          "The labels to rank: a list, or a comma-separated string.",
          "parameter 'candidate_labels' must be a non-empty list of strings or a comma-separated string"),
    Param("hypothesis_template", {"type": "string"},
          f"The hypothesis each label fills, holding its place as {{}} (default {DEFAULT_TEMPLATE!r}).",
          "parameter 'hypothesis_template' must be a string"),
    Param("multi_label", {"type": "boolean"},
          "Score each label on its own (softmax of entailment against contradiction) rather than letting them compete "
          "(default false).", "parameter 'multi_label' must be true or false"),
    Param("response_format", {"type": "string", "enum": list(RESPONSE_FORMATS)},
          "list: [{label, score}] best first (the default, huggingface_hub 1.2 and later); pipeline: transformers' "
          "{sequence, labels, scores} (the default for a User-Agent of huggingface_hub 0.x, hf_hub/0.).",
          f"parameter 'response_format' must be one of {', '.join(RESPONSE_FORMATS)}"),
]


def read_tag_request(body: dict[str, Any], max_batch: int, max_stride: int) -> TagRequest:
    """Validate a token-classification body: inputs, then the parameters tag_parameters declares."""
    texts, batch = _texts_of_inputs(body, max_batch)
    values = contract.read(parameters_of(body), tag_parameters(max_stride))
    strategy = values.get("aggregation_strategy", "none")
    if "stride" in values and strategy == "none":
        raise ApiError(400, "parameter 'stride' needs an aggregation_strategy other than none: overlapping "
                            "windows are merged by entity")
    return TagRequest(texts, batch, strategy, values.get("ignore_labels", ["O"]), values.get("stride"))


def read_zero_shot_request(body: dict[str, Any], max_batch: int, user_agent: str) -> ZeroShotRequest:
    """Validate a zero-shot body: inputs, then the parameters ZERO_SHOT_PARAMETERS declares.

    Each text is paired with each label, and every pair counts as one text against max_batch.
    """
    texts, batch = _texts_of_inputs(body, max_batch)
    values = contract.read(parameters_of(body), ZERO_SHOT_PARAMETERS)
    try:
        labels = parse_labels(values.get("candidate_labels"))
        template = parse_template(values.get("hypothesis_template", DEFAULT_TEMPLATE))
    except TaskError as exc:
        raise ApiError(400, str(exc)) from None
    multi_label = values.get("multi_label", False)
    response_format = values.get("response_format")
    if len(texts) * len(labels) > max_batch:
        raise ApiError(413, f"batch too large: {len(texts)} texts x {len(labels)} candidate labels are "
                            f"{len(texts) * len(labels)} text pairs, the limit is {max_batch} per request")
    pipeline_shape = (response_format == "pipeline" if response_format is not None
                      else any(agent in user_agent for agent in _PIPELINE_SHAPE_AGENTS))
    return ZeroShotRequest(texts, batch, Candidates(labels, template, bool(multi_label)), pipeline_shape)


@cache
def sentiment_fields(max_batch: int) -> tuple[Param, Param, Param]:
    """Return the fields of /sentiment's body: text or texts (exactly one), and top_k."""
    return text_field("text"), texts_field("texts", max_batch), TOP_K


def _sentiment(body: dict[str, Any], max_batch: int) -> ClassifyRequest:
    """Validate {"text": str} or {"texts": [str, ...]}, with optional "top_k"."""
    if "text" in body and "texts" in body:
        raise ApiError(400, "send either 'text' or 'texts', not both")
    text, texts, top = sentiment_fields(max_batch)
    ranked = "top_k" in body
    top_k = contract.read(body, [top]).get("top_k") if ranked else 1  # null: every label
    if "texts" in body:
        return ClassifyRequest(_texts(body["texts"], texts), True, top_k, ranked)
    if "text" not in body:
        raise ApiError(400, "missing field 'text'")
    return ClassifyRequest([_text(body["text"], text)], False, top_k, ranked)


@cache
def classify_inputs(max_batch: int) -> tuple[Param, Param, Param, Param]:
    """Return the forms of the Inference API's "inputs" for a text classifier: a text, texts, a pair, pairs."""
    return (text_field("inputs"), texts_field("inputs", max_batch), pair_field("inputs"),
            pairs_field("inputs", max_batch))


def _inference_api(body: dict[str, Any], max_batch: int) -> ClassifyRequest:
    """Validate the Inference API body {"inputs": str | pair | [str | pair], "parameters": {...}}.

    A pair is {"text": str, "text_pair": str}, as transformers' pipeline takes sentence pairs.
    """
    if "inputs" not in body:
        raise ApiError(400, "missing field 'inputs'")
    values = contract.read(parameters_of(body), CLASSIFY_PARAMETERS)
    function, top_k = values.get("function_to_apply"), values.get("top_k")
    inputs = body["inputs"]
    text, texts, pair, pairs = classify_inputs(max_batch)
    if isinstance(inputs, str):
        return ClassifyRequest([_text(inputs, text)], False, top_k, True, function)
    if isinstance(inputs, dict):
        return ClassifyRequest([_pair(inputs, pair)], False, top_k, True, function)
    if not isinstance(inputs, list):
        raise ApiError(400, "field 'inputs' must be a string or a list of strings")
    if not inputs or not all(isinstance(item, dict) for item in inputs):
        return ClassifyRequest(_texts(inputs, texts), True, top_k, True, function)  # the common case
    contract.check(inputs, pairs)
    return ClassifyRequest([_pair_of(item) for item in inputs], True, top_k, True, function)


def _pair(value: dict[str, Any], declared: Param) -> Input:
    """Return (text, text_pair) from {"text": str, "text_pair": str} that meets its declaration; without
    text_pair, the text."""
    return _pair_of(contract.check(value, declared))


def _pair_of(value: dict[str, Any]) -> Input:
    """Return the text or (text, text_pair) of a pair that meets PAIR."""
    return value["text"] if value.get("text_pair") is None else (value["text"], value["text_pair"])


def _refuse_constant(name: str) -> Any:
    """Refuse the NaN, Infinity and -Infinity literals that Python's json module accepts."""
    raise ValueError(f"{name} is not JSON")


def _text(value: Any, declared: Param) -> str:
    """Return a text that meets its declaration: a non-blank string of valid Unicode."""
    return contract.check(value, declared)


def _texts(value: Any, declared: Param) -> list[str]:
    """Return a list of texts that meets its declaration: 1 to max_batch non-blank strings of valid Unicode."""
    return contract.check(value, declared)
