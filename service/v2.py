"""The Open Inference Protocol v2 over REST (KServe, Triton), with Triton's binary tensor data,
classification and model repository (service/v2_repository.py) extensions.

Every model is served as version "1", under its name (service.models: the manifest's name of a
single model folder, the folder's name in a repository). It takes `text` and an
optional `text_pair` (BYTES, shape [n]) and returns `label` (BYTES [n], the top label), `score`
(FP32 [n], its probability), `probabilities` (FP32 [n, labels], the model's function applied) and
`logits` (FP32 [n, labels]). A token classifier takes `text` and returns `entities` (BYTES [n]: each text's
entities as the JSON list POST / answers); a zero-shot model given `candidate_labels` (BYTES [k]) returns
`labels` (BYTES [n, k], best first) and `scores` (FP32 [n, k]); request parameters carry the tasks'
options. Errors are `{"error": ...}` with Triton's statuses: 400 for a request
that cannot be served, 404 for an unknown model or version, 503 when not ready or overloaded
(Retry-After), 500 when the model fails.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
from flask import Blueprint, Response, current_app, jsonify, request

from service import answers, api, contract, state
from service.classifier import Direction, Input, InputTooLong, apply_function
from service.contract import Param
from service.errors import ApiError
from service.inference import infer
from service.schemas import check_readable, read_tag_request, read_zero_shot_request
from service.tasks import TAG, ZERO_SHOT, Task

bp = Blueprint("v2", __name__, url_prefix="/v2")

SERVER_NAME = "onnx-classifier"
SERVER_VERSION = "1"  # the API version, as /openapi.json's info.version
EXTENSIONS = ("binary_tensor_data", "classification")  # Triton's names for them
REPOSITORY_EXTENSION = "model_repository"  # when SERVICE_MODEL_DIR is a repository (service/v2_repository.py)
VERSION = "1"  # the one model version served
HEADER_LENGTH = "Inference-Header-Content-Length"
TEXT, TEXT_PAIR, CANDIDATES = "text", "text_pair", "candidate_labels"
OUTPUTS = ("label", "score", "probabilities", "logits")
TAG_OUTPUTS = ("entities",)
ZERO_SHOT_OUTPUTS = ("labels", "scores")
# request parameters of each task, passed on as the Inference API's
TAG_PARAMETERS = ("aggregation_strategy", "ignore_labels", "stride")
ZERO_SHOT_PARAMETERS = ("hypothesis_template", "multi_label")
CLASSIFIABLE = ("probabilities", "logits")  # one value per label, so top-k names labels
# Triton's platform names ("<runtime>_<format>"); the reference backend runs a transformers pipeline.
PLATFORMS = {"onnx": "onnxruntime_onnx", "optimum": "onnxruntime_onnx", "pytorch": "pytorch_transformers"}

_LENGTH = struct.Struct("<I")  # a BYTES element's length prefix
_DIGITS = re.compile(r"[0-9]{1,18}")
_DIRECTIONS: dict[str, Direction] = {"right": "right", "left": "left"}
_SHARED_MEMORY = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")


# The request's own parameters, declared once: validation and the OpenAPI document.
PARAMETERS = [
    Param("binary_data_output", {"type": "boolean"}, "Outputs as binary data by default.",
          "parameters.binary_data_output must be true or false"),
    Param("truncate", {"type": "boolean"}, "Default true; false refuses a text over the model's max_length tokens "
          "with 400.", "parameters.truncate must be true or false"),
    Param("truncation_direction", {"type": "string", "enum": list(_DIRECTIONS)}, "Which end is cut (default the "
          "tokenizer's, right for most).", "parameters.truncation_direction must be \"right\" or \"left\"",
          fold_case=True),  # as TEI's routes take Right / Left
]


# The request's fields that a schema can say all of, declared once: validation and the OpenAPI document.
# The rest is the protocol's reading: tensor names, datatype and shape (with Triton's wording), JSON data
# against its shape, the binary form and its sizes.
ID = Param("id", {"type": "string"}, "Echoed in the response.", "'id' must be a string")


@cache
def shape_field(name: str, max_batch: int) -> Param:
    """Declare an input tensor's shape: [n], a batch of 1 to max_batch texts."""
    dimensions = f"input '{name}' has {{count}} dimensions, but the model takes shape [n]: a batch of n texts"
    return Param("shape", {"type": "array", "minItems": 1, "maxItems": 1, "items": {
                     "type": "integer", "minimum": 0, "exclusiveMinimum": 0, "maximum": max_batch}},
                 f"[n]: n texts, 1 to {max_batch}.", f"input '{name}': 'shape' must be a list of non-negative integers",
                 messages={"minItems": dimensions, "maxItems": dimensions,
                           "items.exclusiveMinimum": f"input '{name}' has shape [0]: send at least one text",
                           "items.maximum": f"inference request batch-size must be <= {{limit}}: input '{name}' has "
                                            "shape [{value}]"})


@cache
def data_field(name: str) -> Param:
    """Declare an input tensor's JSON data: BYTES elements, which are strings in JSON."""
    return Param("data", {"type": "array", "items": {"type": "string"}},
                 "The tensor's elements, row-major: as many as its shape says.",
                 f"input '{name}': 'data' must be a list of strings",
                 messages={"items.type": f"input '{name}': data[{{index}}] must be a string (BYTES elements are "
                                         "strings in JSON)",
                           "items.unicode": f"input '{name}' element {{index}} is not valid Unicode: lone surrogate "
                                            "at character {at}"})


@cache
def output_parameters(name: str, index: int) -> tuple[Param, Param]:
    """Declare the parameters of the index-th requested output: top-k as classification, binary_data."""
    return (Param("classification", {"type": "integer", "minimum": 0},
                  "Top-k as BYTES \"<value>:<index>:<label>\" (probabilities and logits only).",
                  f"output '{name}': parameters.classification must be a non-negative integer"),
            Param("binary_data", {"type": "boolean"}, "This output as binary data (default: binary_data_output).",
                  f"outputs[{index}].parameters.binary_data must be true or false"))


@dataclass(frozen=True)
class Requested:
    """One output the response carries: its name, whether as binary data, and top-k (0: the tensor)."""

    name: str
    binary: bool
    classification: int


@dataclass(frozen=True)
class InferRequest:
    """A validated inference request."""

    id: str | None
    inputs: list[Input]
    outputs: list[Requested]
    truncate: bool
    direction: Direction | None
    candidates: list[str] | None = None  # zero-shot: the labels to rank
    parameters: dict[str, Any] | None = None  # the request's parameters, for the tasks' options


def _bad(message: str) -> ApiError:
    """Return a 400 error."""
    return ApiError(400, message)


def _model(model_name: str, model_version: str | None) -> Any:
    """Return the model the path names (and version "1", if any); 404 when unknown, 503 when not loaded."""
    state.select(model_name)
    classifier = state.classifier()
    if model_version is not None and model_version != VERSION:
        raise ApiError(404, f"Request for unknown model: '{_shown(model_name)}' version '{_shown(model_version)}' "
                            "is not found "
                            f"(the served version is '{VERSION}')")
    return classifier


def _not_ready() -> str | None:
    """Return why the service is not ready (the /ready route's answer), or None when it is."""
    response, status = api.ready()
    return None if status == 200 else response.get_json()["error"]


@bp.get("", strict_slashes=False)
def server_metadata() -> Response:
    """Describe the server: name, version and the protocol extensions it implements."""
    repository = state.models().repository is not None
    return jsonify(name=SERVER_NAME, version=SERVER_VERSION,
                   extensions=[*EXTENSIONS, *([REPOSITORY_EXTENSION] if repository else [])])


@bp.get("/health/live")
def live() -> Response:
    """Say the process is alive."""
    return jsonify(live=True)


@bp.get("/health/ready")
def ready() -> tuple[Response, int]:
    """Say whether inference requests will be served, exactly when /ready does."""
    error = _not_ready()
    if error is None:
        return jsonify(ready=True), 200
    return jsonify(ready=False, error=error), 503


@bp.get("/models/<model_name>", defaults={"model_version": None})
@bp.get("/models/<model_name>/versions/<model_version>")
def model_metadata(model_name: str, model_version: str | None) -> Response:
    """Describe the model's inputs and outputs."""
    classifier = _model(model_name, model_version)
    labels = len(classifier.labels)
    tensors = {TEXT: ("BYTES", [-1]), TEXT_PAIR: ("BYTES", [-1]), CANDIDATES: ("BYTES", [-1]),
               "label": ("BYTES", [-1]), "score": ("FP32", [-1]), "probabilities": ("FP32", [-1, labels]),
               "logits": ("FP32", [-1, labels]), "entities": ("BYTES", [-1]), "labels": ("BYTES", [-1, -1]),
               "scores": ("FP32", [-1, -1])}
    described = {name: {"name": name, "datatype": datatype, "shape": shape}
                 for name, (datatype, shape) in tensors.items()}
    task = classifier.task
    outputs = output_names(task)
    return jsonify(name=classifier.name, versions=[VERSION],
                   platform=PLATFORMS.get(classifier.backend, classifier.backend),
                   inputs=[described[name] for name in input_names(task)],
                   outputs=[described[name] for name in outputs])


@bp.get("/models/<model_name>/ready", defaults={"model_version": None})
@bp.get("/models/<model_name>/versions/<model_version>/ready")
def model_ready(model_name: str, model_version: str | None) -> tuple[Response, int]:
    """Say whether the model will serve inference requests: loaded, warmed up, and the server not stopping."""
    try:
        name, error = _model(model_name, model_version).name, _not_ready()
    except ApiError as exc:  # a known model that is not loaded: not ready, in the same shape
        if exc.status != 503:
            raise
        name, error = model_name, exc.message
    if error is None:
        return jsonify(name=name, ready=True), 200
    return jsonify(name=name, ready=False, error=error), 503


@bp.post("/models/<model_name>/infer", defaults={"model_version": None})
@bp.post("/models/<model_name>/versions/<model_version>/infer")
def model_infer(model_name: str, model_version: str | None) -> Response:
    """Classify the texts (or pairs) of a JSON or binary-extension request."""
    classifier = _model(model_name, model_version)
    settings = state.settings()
    header, binary = read_body()
    body = read_request(header, binary, settings.max_batch, classifier.name, classifier.task)
    texts = [item for item in body.inputs if isinstance(item, str)]
    if classifier.task.can(TAG):
        tag = read_tag_request({"inputs": texts, "parameters": _task_parameters(body, TAG_PARAMETERS)},
                               settings.max_batch, classifier.task.max_stride)
        found = answers.tag(tag)
        return _answer(body, classifier, {"entities": [current_app.json.dumps(entities, separators=(",", ":"))
                                                             for entities in found]})
    if body.candidates is not None:
        request_body = {"inputs": texts, "parameters": {CANDIDATES: body.candidates,
                                                         **_task_parameters(body, ZERO_SHOT_PARAMETERS)}}
        ranked = answers.zero_shot(read_zero_shot_request(request_body, settings.max_batch, ""))
        return _answer(body, classifier, {
            "labels": np.array([[entry["label"] for entry in row] for row in ranked], dtype=object),
            "scores": np.array([[entry["score"] for entry in row] for row in ranked], dtype=np.float32)})
    try:
        logits = infer(body.inputs, truncate=body.truncate, direction=body.direction)
    except InputTooLong as exc:
        raise _bad(f"input element {exc.index} has more than {exc.max_length} tokens, the model's limit; "
                   "send parameters.truncate true (the default) to truncate it") from None
    return respond(body, classifier, np.asarray(logits, dtype=np.float32))


def output_names(task: Task) -> tuple[str, ...]:
    """Return every output tensor a model of this task can return (zero-shot's with candidate_labels)."""
    return (*(() if task.can(TAG) else OUTPUTS), *(TAG_OUTPUTS if task.can(TAG) else ()),
            *(ZERO_SHOT_OUTPUTS if task.can(ZERO_SHOT) else ()))


def input_names(task: Task) -> tuple[str, ...]:
    """Return the input tensors a model of this task takes (the first required, the others optional)."""
    if task.can(TAG):
        return (TEXT,)
    return (TEXT, TEXT_PAIR, CANDIDATES) if task.can(ZERO_SHOT) else (TEXT, TEXT_PAIR)


def _task_parameters(body: InferRequest, names: tuple[str, ...]) -> dict[str, Any]:
    """Return the request parameters a task reads; ignore_labels may be a comma-separated string."""
    found = {name: (body.parameters or {}).get(name) for name in names}
    if isinstance(found.get("ignore_labels"), str):
        found["ignore_labels"] = [label.strip() for label in found["ignore_labels"].split(",") if label.strip()]
    if _is_integer(found.get("stride")):
        found["stride"] = int(found["stride"])
    return {name: value for name, value in found.items() if value is not None}


def read_body() -> tuple[dict[str, Any], memoryview]:
    """Return the request's JSON header and the binary tensor data after it (empty without the extension)."""
    check_readable("unsupported media type: send JSON, or JSON then binary tensor data")
    data = request.get_data(cache=False)  # Werkzeug answers 413 above MAX_CONTENT_LENGTH
    declared = request.headers.get(HEADER_LENGTH)
    if declared is None:
        length = len(data)
    else:
        if not _DIGITS.fullmatch(declared.strip()):
            raise _bad(f"{HEADER_LENGTH} must be the length of the JSON header in bytes")
        length = int(declared)
        if length == 0:
            raise _bad(f"{HEADER_LENGTH}: 0 (a raw binary request without a JSON header) is not supported")
        if length > len(data):
            raise _bad(f"{HEADER_LENGTH} is {length} but the body has only {len(data)} bytes")
    try:
        # NaN and Infinity are not JSON; deep nesting raises RecursionError, not a 500
        header = current_app.json.loads(data[:length], parse_constant=_refuse_constant)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise _bad("invalid JSON" if declared is None else "invalid JSON in the inference header") from None
    if not isinstance(header, dict):
        raise _bad("the inference request must be a JSON object")
    return header, memoryview(data)[length:]


def read_request(header: dict[str, Any], binary: memoryview, max_batch: int, model: str,
                 task: Task | None = None) -> InferRequest:
    """Validate an inference request: its id, parameters, inputs (JSON or binary) and requested outputs."""
    request_id = contract.read(header, [ID]).get("id")
    parameters = _object(header.get("parameters"), "parameters")
    values = contract.read(parameters, PARAMETERS)
    binary_output, truncate = values.get("binary_data_output", False), values.get("truncate", True)
    direction = values.get("truncation_direction")
    names = input_names(task) if task is not None else (TEXT, TEXT_PAIR)
    texts = _inputs(header.get("inputs"), binary, max_batch, model, names)
    inputs: list[Input] = list(texts[TEXT])
    if TEXT_PAIR in texts:
        inputs = list(zip(texts[TEXT], texts[TEXT_PAIR], strict=True))
    candidates = texts.get(CANDIDATES)
    if candidates is not None and TEXT_PAIR in texts:
        raise _bad(f"input '{CANDIDATES}' ranks labels for single texts: send '{TEXT}' without '{TEXT_PAIR}'")
    names = (TAG_OUTPUTS if task is not None and task.can(TAG) else ZERO_SHOT_OUTPUTS if candidates is not None
             else OUTPUTS)
    return InferRequest(request_id, inputs, _outputs(header.get("outputs"), binary_output, model, names), truncate,
                        _DIRECTIONS.get(direction) if direction is not None else None, candidates, parameters)


def _named(value: list[Any], field: str) -> Iterator[tuple[int, dict[str, Any], str]]:
    """Yield each tensor of an 'inputs' or 'outputs' list with its index and name, checking both."""
    for index, tensor in enumerate(value):
        if not isinstance(tensor, dict):
            raise _bad(f"{field}[{index}] must be an object")
        name = tensor.get("name")
        if not isinstance(name, str):
            raise _bad(f"{field}[{index}].name must be a string")
        yield index, tensor, name


def _inputs(value: Any, binary: memoryview, max_batch: int, model: str,
            names: tuple[str, ...] = (TEXT, TEXT_PAIR)) -> dict[str, list[str]]:
    """Return the texts of each input tensor (of those names), read from JSON data or the binary data in order."""
    if not isinstance(value, list) or not value:
        raise _bad("'inputs' must be a non-empty list of input tensors")
    texts: dict[str, list[str]] = {}
    offset = 0
    for index, tensor, name in _named(value, "inputs"):
        if name not in names:
            raise _bad(f"unexpected inference input '{_shown(name)}' for model '{model}': its inputs are '{TEXT}'"
                       + "".join(f" and the optional '{other}'" for other in names[1:]))
        if name in texts:
            raise _bad(f"input '{name}' is given twice")
        datatype = tensor.get("datatype")
        if datatype is None:
            raise _bad(f"inference input '{name}' has no 'datatype': model '{model}' expects 'BYTES'")
        if datatype != "BYTES":
            shown = _shown(datatype) if isinstance(datatype, str) else type(datatype).__name__
            raise _bad(f"inference input '{name}' data-type is '{shown}', but model '{model}' expects 'BYTES'")
        count = _shape(tensor.get("shape"), name, max_batch)
        parameters = _object(tensor.get("parameters"), f"inputs[{index}].parameters")
        if any(key in parameters for key in _SHARED_MEMORY):
            raise _bad("shared memory is not supported: send tensor data in the body")
        size = parameters.get("binary_data_size")
        if ("data" in tensor) == (size is not None):
            raise _bad(f"input '{name}' must set exactly one of 'data' and parameters.binary_data_size")
        if size is None:
            texts[name] = _json_texts(tensor["data"], count, name)
            continue
        if not _is_integer(size) or size < 0:
            raise _bad(f"input '{name}': parameters.binary_data_size must be a non-negative integer")
        size = int(size)
        if size > len(binary) - offset:
            raise _bad(f"unexpected size for input '{name}': binary_data_size is {size} but only "
                       f"{len(binary) - offset} bytes of binary data are left"
                       + (f" (binary data needs the {HEADER_LENGTH} header)" if not binary else ""))
        texts[name] = _binary_texts(binary[offset:offset + size], count, name)
        offset += size
    if offset != len(binary):
        raise _bad(f"unexpected additional input data: {len(binary) - offset} bytes after the last binary input")
    if TEXT not in texts:
        raise _bad(f"input '{TEXT}' is missing")
    if TEXT_PAIR in texts and len(texts[TEXT_PAIR]) != len(texts[TEXT]):
        raise _bad(f"input '{TEXT_PAIR}' has shape [{len(texts[TEXT_PAIR])}] but '{TEXT}' has "
                   f"[{len(texts[TEXT])}]: each text needs its pair")
    return texts


def _shape(value: Any, name: str, max_batch: int) -> int:
    """Return n of a shape [n], 1 <= n <= max_batch."""
    return int(contract.check(value, shape_field(name, max_batch))[0])


def _json_texts(data: Any, count: int, name: str) -> list[str]:
    """Return the strings of a JSON BYTES tensor of `count` elements."""
    if isinstance(data, list) and len(data) != count:
        raise _bad(f"input '{name}' has {len(data)} elements in 'data' but shape [{count}]")
    return contract.check(data, data_field(name))


def _binary_texts(chunk: memoryview, count: int, name: str) -> list[str]:
    """Return the UTF-8 texts of a binary BYTES tensor: each a 4-byte little-endian length, then the bytes."""
    texts: list[str] = []
    position = 0
    while position < len(chunk):
        if len(texts) == count:
            raise _bad(f"input '{name}': its binary data holds more than the {count} elements of its shape")
        if len(chunk) - position < _LENGTH.size:
            raise _bad(f"input '{name}': element {len(texts)} is cut short (its 4-byte length is incomplete)")
        (length,) = _LENGTH.unpack_from(chunk, position)
        position += _LENGTH.size
        if length > len(chunk) - position:
            raise _bad(f"input '{name}': element {len(texts)} has a length of {length} bytes but only "
                       f"{len(chunk) - position} are left in its binary_data_size")
        try:
            texts.append(str(chunk[position:position + length], "utf-8"))
        except UnicodeDecodeError:
            raise _bad(f"input '{name}': element {len(texts)} is not valid UTF-8") from None
        position += length
    if len(texts) != count:
        raise _bad(f"input '{name}' has {len(texts)} elements in its binary data but shape [{count}]")
    return texts


def _outputs(value: Any, binary_output: bool, model: str, names: tuple[str, ...] = OUTPUTS) -> list[Requested]:
    """Return the requested outputs (of those names) in order; none (or an empty list): every output."""
    if value is None or value == []:
        return [Requested(name, binary_output, 0) for name in names]
    if not isinstance(value, list):
        raise _bad("'outputs' must be a list of requested outputs")
    requested: list[Requested] = []
    for index, tensor, name in _named(value, "outputs"):
        if name not in names:
            raise _bad(f"unexpected inference output '{_shown(name)}' for model '{model}': its outputs are "
                       + ", ".join(f"'{output}'" for output in names))
        if any(output.name == name for output in requested):
            raise _bad(f"output '{name}' is requested twice")
        parameters = _object(tensor.get("parameters"), f"outputs[{index}].parameters")
        if any(key in parameters for key in _SHARED_MEMORY):
            raise _bad("shared memory is not supported: outputs are returned in the body")
        classification, binary_data = output_parameters(name, index)
        top_k = contract.read(parameters, [classification]).get("classification", 0)
        if top_k and name not in CLASSIFIABLE:
            raise _bad(f"output '{name}': classification is available on "
                       + " and ".join(f"'{output}'" for output in CLASSIFIABLE))
        binary = contract.read(parameters, [binary_data]).get("binary_data", binary_output)
        requested.append(Requested(name, binary, top_k))
    return requested


def respond(body: InferRequest, classifier: Any, logits: np.ndarray) -> Response:
    """Return the inference response: JSON, or JSON then binary tensor data when an output is binary."""
    scores = apply_function(logits, classifier.function)  # float64, so ties break as /sentiment's do
    top = np.argmax(scores, axis=1)
    probabilities = scores.astype(np.float32)
    labels = list(classifier.labels)
    values: dict[str, np.ndarray | list[str]] = {
        "label": [labels[i] for i in top], "score": probabilities[np.arange(len(top)), top],
        "probabilities": probabilities, "logits": logits}
    return _answer(body, classifier, values)


def _answer(body: InferRequest, classifier: Any, values: dict[str, np.ndarray | list[str]]) -> Response:
    """Return the requested outputs of values: JSON, or JSON then binary tensor data when an output is binary."""
    labels = list(classifier.labels)
    outputs, chunks = [], []
    for output in body.outputs:
        datatype, shape, data = _tensor(values[output.name], labels, output.classification)
        tensor: dict[str, Any] = {"name": output.name, "datatype": datatype, "shape": shape}
        if output.binary:
            raw = _serialize(data)
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            tensor["data"] = data if isinstance(data, list) else data.tolist()
        outputs.append(tensor)
    answer = {"model_name": classifier.name, "model_version": VERSION, "outputs": outputs}
    if body.id is not None:
        answer["id"] = body.id
    if not chunks:
        return jsonify(answer)
    header = current_app.json.dumps(answer, separators=(",", ":")).encode()
    return Response(header + b"".join(chunks), content_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(header))})


def _tensor(value: np.ndarray | list[str], labels: list[str],
            top_k: int) -> tuple[str, list[int], np.ndarray | list[str]]:
    """Return an output's datatype, shape and flat row-major data; with top_k, its classification instead."""
    if isinstance(value, list):
        return "BYTES", [len(value)], value
    if value.dtype == object:  # strings of more than one dimension (zero-shot's ranked labels)
        return "BYTES", list(value.shape), [str(item) for item in value.ravel()]
    if not top_k:
        return "FP32", list(value.shape), value.ravel()
    count = min(top_k, len(labels))
    strings = []
    for row in value:
        # stable: equal values keep label order, as rank() does (Triton's std::sort leaves ties unspecified)
        for i in np.argsort(-row, kind="stable")[:count]:
            # "%f": Triton formats the value with std::to_string
            strings.append(f"{float(row[i]):f}:{i}:{labels[i]}")
    return "BYTES", [len(value), count], strings


def _serialize(value: np.ndarray | list[str]) -> bytes:
    """Return a tensor's binary data: little-endian FP32, or length-prefixed UTF-8 BYTES elements."""
    if isinstance(value, list):
        encoded = [text.encode() for text in value]
        return b"".join(_LENGTH.pack(len(item)) + item for item in encoded)
    return np.ascontiguousarray(value, dtype="<f4").tobytes()


def _object(value: Any, field: str) -> dict[str, Any]:
    """Return an optional JSON object field (absent or null: empty)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(f"'{field}' must be an object")
    return value


def _is_integer(value: Any) -> bool:
    """Return whether a JSON number is a whole number (2.0 counts, as JSON Schema says; true does not)."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def _shown(text: str) -> str:
    """Return a client's name cut to a length fit for an error message."""
    return text if len(text) <= 64 else text[:64] + "..."


def _refuse_constant(name: str) -> Any:
    """Refuse the NaN, Infinity and -Infinity literals that Python's json module accepts."""
    raise ValueError(f"{name} is not JSON")
