"""The OpenAPI 3.1 document of the service, kept true to the routes by tests/service/test_openapi.py."""

from __future__ import annotations

from typing import Any

from service import contract
from service.schemas import (
    CLASSIFY_PARAMETERS,
    PAIR,
    ZERO_SHOT_PARAMETERS,
    classify_inputs,
    sentiment_fields,
    tag_parameters,
    task_inputs,
)
from service.tasks import TAG, ZERO_SHOT, Task, TextClassification
from service.tei import (
    OPTIONS,
    RERANK_OPTIONS,
    STRING,
    TOKENIZE_OPTIONS,
    batch_field,
    sequence_field,
    string_field,
    strings_field,
)

_CONTENT_TYPES = (
    "Request bodies are parsed as JSON whatever their Content-Type (application/json is best; "
    "`curl -d` sends application/x-www-form-urlencoded and is accepted). multipart/form-data is "
    "refused with 415. Texts longer than the model's max_length tokens are truncated, not refused."
)
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying",
                                 "schema": {"type": "integer", "minimum": 1}}}
_WWW_AUTHENTICATE = {"WWW-Authenticate": {"description": 'Bearer realm="onnx-classifier"[, error="invalid_token"]',
                                          "schema": {"type": "string"}}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _body(name: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": _ref(name)}}}


def _errors(*statuses: int) -> dict[str, Any]:
    """Return the documented error responses, all with the same {"error": str} body."""
    reasons = {400: "Invalid JSON or invalid fields", 401: "Missing or invalid API key",
               404: "Unknown path", 405: "Wrong method (the Allow header lists the right ones)",
               413: "Body over max_content_length, or more texts than max_batch",
               415: "multipart/form-data or compressed body", 500: "Inference failed or internal error",
               503: ("Overloaded (the queue is full, or the request waited longer than the queue "
                     "timeout) or shutting down: retry after Retry-After seconds")}
    responses = {str(status): _json(_ref("Error"), reasons[status]) for status in statuses}
    if 503 in statuses:
        responses["503"]["headers"] = _RETRY_AFTER
    if 401 in statuses:
        responses["401"]["headers"] = _WWW_AUTHENTICATE
    return responses


def _tei_errors(locked: tuple[int, ...], *statuses: int) -> dict[str, Any]:
    """Return TEI's error responses: {"error", "error_type"}; 429 with Retry-After."""
    reasons = {400: "Invalid JSON, or an empty batch (error_type Empty)",
               413: "Body over max_content_length",
               422: "Invalid fields, an empty input, more inputs than max_batch, or too long with truncate false "
                    "(Validation)",
               424: "The model failed, or cannot serve this route (Backend)",
               429: "Overloaded: retry after Retry-After seconds (Overloaded)"}
    # 413 may come from Waitress before the route runs, without an error_type
    responses = {str(status): _json(_ref("Error" if status == 413 else "TeiError"), reasons[status])
                 for status in statuses}
    if 429 in statuses:
        responses["429"]["headers"] = _RETRY_AFTER
    return {**responses, **_errors(*locked, 415)}


def tei_schemas(max_batch: int) -> dict[str, Any]:
    """Return the schemas of TEI's /predict, /rerank and /tokenize, as TEI's own document has them; their
    fields come from their declarations in service/tei.py, which also validate them."""
    string = STRING
    options = contract.schema(OPTIONS)["properties"]
    predict = [string_field("inputs"), sequence_field("inputs"), batch_field("inputs", max_batch)]
    return {
        "PredictRequest": {"type": "object", "required": ["inputs"], "properties": {
            "inputs": {"description": "A text; [text, text_pair] for one pair; [[text], [text, text_pair], ...] "
                                      "for a batch.",
                       "anyOf": [contract.field_schema(form) for form in predict]},
            **options}},
        "PredictResponse": {"description": "Every label sorted by score; a list of those for a batch.",
                            "anyOf": [{"type": "array", "items": _ref("Prediction")},
                                      {"type": "array", "items": {"type": "array", "items": _ref("Prediction")}}]},
        "RerankRequest": {"type": "object", "required": ["query", "texts"], "properties": {
            "query": contract.field_schema(string_field("query")),
            "texts": contract.field_schema(strings_field("texts", max_batch, "`texts` cannot be empty")),
            **contract.schema(RERANK_OPTIONS)["properties"], **options}},
        "Rank": {"type": "object", "required": ["index", "score"], "additionalProperties": False, "properties": {
            "index": {"type": "integer", "minimum": 0}, "score": {"type": "number"}, "text": string}},
        "RerankResponse": {"type": "array", "items": _ref("Rank"), "description": "Best first."},
        "TokenizeRequest": {"type": "object", "required": ["inputs"], "properties": {
            "inputs": {"anyOf": [contract.field_schema(string_field("inputs")),
                                 contract.field_schema(strings_field("inputs", max_batch, "Batch is empty"))]},
            **contract.schema(TOKENIZE_OPTIONS)["properties"],
            "prompt_name": {"type": "null", "description": "Not supported: no prompts are applied."}}},
        "SimpleToken": {"type": "object", "required": ["id", "text", "special", "start", "stop"],
                        "properties": {"id": {"type": "integer", "minimum": 0}, "text": string,
                                       "special": {"type": "boolean"},
                                       "start": {"type": ["integer", "null"], "minimum": 0,
                                                 "description": "UTF-8 byte offset; null for special tokens"},
                                       "stop": {"type": ["integer", "null"], "minimum": 0}}},
        "TokenizeResponse": {"type": "array", "items": {"type": "array", "items": _ref("SimpleToken")}},
        "TeiError": {"type": "object", "required": ["error", "error_type"], "properties": {
            "error": string,
            "error_type": {"enum": ["Unhealthy", "Backend", "Overloaded", "Validation", "Tokenizer", "Empty"]}}},
    }


def tei_paths(locked: tuple[int, ...]) -> dict[str, Any]:
    """Return the paths of TEI's classifier routes."""
    return {
        "/predict": {"post": {
            "summary": "Classify a text, a pair or a batch (text-embeddings-inference's contract)",
            "requestBody": _body("PredictRequest"),
            "responses": {"200": _json(_ref("PredictResponse"), "Predictions"),
                          **_tei_errors(locked, 400, 413, 422, 424, 429)}}},
        "/rerank": {"post": {
            "summary": "Rank texts against a query with a one-label cross-encoder (TEI's contract, plus top_n)",
            "requestBody": _body("RerankRequest"),
            "responses": {"200": _json(_ref("RerankResponse"), "Ranks, best first"),
                          **_tei_errors(locked, 400, 413, 422, 424, 429)}}},
        "/tokenize": {"post": {
            "summary": "Tokenize texts, not truncated (TEI's contract)",
            "requestBody": _body("TokenizeRequest"),
            "responses": {"200": _json(_ref("TokenizeResponse"), "Tokens per text"),
                          **_tei_errors(locked, 400, 413, 422, 424)}}},
    }


# ---- the Open Inference Protocol v2 (service/v2.py) -------------------------------------------------

_V2_BINARY = ("The binary tensor data extension is accepted as well, and is tritonclient's default: the body is "
              "this JSON object followed by raw tensor data, with the header Inference-Header-Content-Length "
              "giving the JSON's length and an input's parameters.binary_data_size its byte count (each BYTES "
              "element a 4-byte little-endian length, then its UTF-8 bytes). See docs/v2.md.")
_V2_VERSION = {"name": "model_version", "in": "path", "required": True, "schema": {"enum": ["1"]},
               "description": "The one version served; any other is 404."}


def v2_schemas(max_batch: int, task: Task | None = None) -> dict[str, Any]:
    """Return the schemas of the Open Inference Protocol v2 routes (JSON form), with the tensors and parameters
    of the model's task."""
    # v2 imports this module (through api)
    from service.v2 import ID, PARAMETERS, data_field, input_names, output_names, output_parameters, shape_field

    task = task or TextClassification()
    inputs, outputs = input_names(task), output_names(task)
    task_parameters = (tag_parameters(task.max_stride) if task.can(TAG) else
                       [p for p in ZERO_SHOT_PARAMETERS if p.name in ("hypothesis_template", "multi_label")]
                       if task.can(ZERO_SHOT) else [])
    string = {"type": "string"}
    tensor = {"type": "object", "required": ["name", "datatype", "shape"], "properties": {
        "name": string, "datatype": string, "shape": {"type": "array", "items": {"type": "integer"}}}}
    return {
        "V2ServerMetadata": {"type": "object", "required": ["name", "version", "extensions"], "properties": {
            "name": string, "version": string, "extensions": {"type": "array", "items": string}}},
        "V2Live": {"type": "object", "required": ["live"], "properties": {"live": {"type": "boolean"}}},
        "V2Ready": {"type": "object", "required": ["ready"], "properties": {
            "ready": {"type": "boolean"}, "error": string}},
        "V2ModelReady": {"type": "object", "required": ["name", "ready"], "properties": {
            "name": string, "ready": {"type": "boolean"}, "error": string}},
        "V2TensorMetadata": tensor,
        "V2ModelMetadata": {"type": "object", "required": ["name", "versions", "platform", "inputs", "outputs"],
                            "properties": {"name": string, "versions": {"type": "array", "items": string},
                                           "platform": string,
                                           "inputs": {"type": "array", "items": _ref("V2TensorMetadata")},
                                           "outputs": {"type": "array", "items": _ref("V2TensorMetadata")}}},
        "V2InferenceRequest": {
            "type": "object", "required": ["inputs"],
            "description": ("Input 'text' (BYTES, shape [n], n <= max_batch) and optionally "
                            + " and ".join(f"'{name}'" for name in inputs[1:] or ("nothing else",))
                            + " ('text_pair': the pair of each text, the same shape; 'candidate_labels': the labels "
                              "to rank). shape[0] must equal the number of strings in data. Without 'outputs', all "
                              "the task's are returned. " + _V2_BINARY),
            "properties": {
                "id": contract.schema([ID])["properties"]["id"],
                "parameters": {"anyOf": [{"type": "null"}, contract.schema([*PARAMETERS, *task_parameters])]},
                "inputs": {"type": "array", "minItems": 1, "maxItems": len(inputs), "items": {
                    "type": "object", "required": ["name", "shape", "datatype", "data"], "properties": {
                        "name": {"enum": list(inputs)},
                        "datatype": {"const": "BYTES"},
                        "shape": contract.field_schema(shape_field(inputs[0], max_batch)),
                        # as many elements as the shape says: 1 to max_batch
                        "data": {**contract.field_schema(data_field(inputs[0])), "minItems": 1, "maxItems": max_batch},
                        # the JSON form: binary_data_size (the binary form's instead of data) is absent or null
                        "parameters": {"anyOf": [{"type": "null"}, {"type": "object", "properties": {
                            "binary_data_size": {"type": "null"}}}]}}}},
                "outputs": {"anyOf": [{"type": "null"}, {"type": "array", "maxItems": len(outputs), "items": {
                    "type": "object", "required": ["name"], "properties": {
                        "name": {"enum": list(outputs)},
                        "parameters": {"anyOf": [{"type": "null"},
                                                 contract.schema(output_parameters(outputs[0], 0))]}}}}]},
            }},
        "V2Tensor": {"type": "object", "required": ["name", "datatype", "shape"], "properties": {
            "name": string, "datatype": {"enum": ["BYTES", "FP32"]},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "data": {"type": "array", "items": {"type": ["string", "number"]}},
            "parameters": {"type": "object", "properties": {"binary_data_size": {"type": "integer", "minimum": 0}}}}},
        "V2InferenceResponse": {"type": "object", "required": ["model_name", "outputs"], "properties": {
            "model_name": string, "model_version": string, "id": string,
            "outputs": {"type": "array", "items": _ref("V2Tensor")}}},
    }


def v2_paths(locked: tuple[int, ...], model_name: str) -> dict[str, Any]:
    """Return the paths of the Open Inference Protocol v2 routes of the served model."""
    model_parameter = {"name": "model_name", "in": "path", "required": True, "schema": {"enum": [model_name]},
                       "description": "The served model's name (GET /info: model.name); any other is 404."}
    unknown = {"404": _json(_ref("Error"), "Unknown model or version")}
    not_ready = "Not ready: loading, stopping (shutting down) or failed (the batch scheduler has stopped)"
    binary = {"Inference-Header-Content-Length": {"description": "Length of the JSON header when binary "
                                                                 "outputs follow it",
                                                  "schema": {"type": "integer", "minimum": 1}}}
    infer = {"post": {
        "summary": "Classify texts or pairs (Open Inference Protocol v2; binary tensor data accepted)",
        "requestBody": {"required": True, "description": _V2_BINARY,
                        "content": {"application/json": {"schema": _ref("V2InferenceRequest")}}},
        "responses": {"200": {"description": "The outputs: JSON, or (when an output is binary) "
                                             "application/octet-stream holding the JSON then the tensor data",
                              "headers": binary,
                              "content": {"application/json": {"schema": _ref("V2InferenceResponse")},
                                          "application/octet-stream": {"schema": {"type": "string",
                                                                                  "format": "binary"}}}},
                      **_errors(400, *locked, 413, 415, 500, 503), **unknown}}}
    infer["post"]["responses"]["400"]["description"] = ("Invalid JSON, tensors or binary data, or more texts "
                                                        "than max_batch")
    infer["post"]["responses"]["413"]["description"] = "Body over max_content_length"
    metadata = {"get": {"summary": "Model metadata: inputs and outputs with datatype and shape",
                        "responses": {"200": _json(_ref("V2ModelMetadata"), "Model metadata"),
                                      **_errors(*locked), **unknown}}}
    model_ready = {"get": {"summary": "Model readiness (as /ready)",
                           "responses": {"200": _json(_ref("V2ModelReady"), "Ready"),
                                         "503": _json(_ref("V2ModelReady"), not_ready),
                                         **_errors(*locked), **unknown}}}

    def at(operations: dict[str, Any], parameters: list[dict[str, Any]]) -> dict[str, Any]:
        # on each operation, not the path item, so every key of a path item stays a method
        return {method: {**operation, "parameters": parameters} for method, operation in operations.items()}

    model = [model_parameter]
    versioned = [model_parameter, _V2_VERSION]
    return {
        "/v2": {"get": {"summary": "Server metadata: name, version, extensions",
                        "responses": {"200": _json(_ref("V2ServerMetadata"), "Server metadata"),
                                      **_errors(*locked)}}},
        "/v2/health/live": {"get": {"summary": "Liveness (as /health)", "security": [],
                                    "responses": {"200": _json(_ref("V2Live"), "Alive")}}},
        "/v2/health/ready": {"get": {"summary": "Readiness (as /ready)", "security": [],
                                     "responses": {"200": _json(_ref("V2Ready"), "Ready"),
                                                   "503": _json(_ref("V2Ready"), not_ready)}}},
        "/v2/models/{model_name}": at(metadata, model),
        "/v2/models/{model_name}/versions/{model_version}": at(metadata, versioned),
        "/v2/models/{model_name}/ready": at(model_ready, model),
        "/v2/models/{model_name}/versions/{model_version}/ready": at(model_ready, versioned),
        "/v2/models/{model_name}/infer": at(infer, model),
        "/v2/models/{model_name}/versions/{model_version}/infer": at(infer, versioned),
    }


def task_schemas(task: Task, max_batch: int) -> dict[str, Any]:
    """Return the Inference API's request and answer for a token classifier or a zero-shot model (none else).

    The inputs and parameters come from their declarations in service/schemas.py, which also validate them.
    """
    inputs = task_inputs(max_batch)
    if task.can(TAG):
        entity = {"type": "object", "required": ["score", "word", "start", "end"], "properties": {
            "entity": {"type": "string", "description": "The token's label (aggregation_strategy none)."},
            "entity_group": {"type": "string", "description": "The entity's tag, without B-/I- (aggregated)."},
            "score": {"type": "number"}, "word": {"type": "string"}, "index": {"type": "integer"},
            "start": {"type": "integer", "description": "Character offset into the text sent."},
            "end": {"type": "integer"}}}
        entities = {"type": "array", "items": _ref("Entity")}
        parameters = contract.schema(tag_parameters(task.max_stride))
        return {"Entity": entity, "InferenceRequest": {
            "type": "object", "required": ["inputs"],
            "description": "The Inference API's token-classification body (InferenceClient.token_classification). "
                           "Texts longer than max_length tokens are read in windows, never cut.",
            "properties": {"inputs": inputs, "parameters": {"anyOf": [{"type": "null"}, parameters]}}},
            "InferenceResponse": {"anyOf": [entities, {"type": "array", "items": entities}],
                                  "description": "A text's entities; a list of those for a list of texts."}}
    if task.can(ZERO_SHOT):
        ranked_pipeline = {"type": "object", "required": ["sequence", "labels", "scores"], "properties": {
            "sequence": {"type": "string"}, "labels": {"type": "array", "items": {"type": "string"}},
            "scores": {"type": "array", "items": {"type": "number"}}}}
        return {"ZeroShotRequest": {
            "type": "object", "required": ["inputs", "parameters"],
            "description": "The Inference API's zero-shot body (InferenceClient.zero_shot_classification): each "
                           "text is paired with each label's hypothesis; the pairs count against max_batch.",
            "properties": {"inputs": inputs,
                           "parameters": contract.schema(ZERO_SHOT_PARAMETERS, required=["candidate_labels"])}},
            "ZeroShotResponse": {"anyOf": [_ref("Ranked"), ranked_pipeline,
                                           {"type": "array", "items": {"anyOf": [_ref("Ranked"), ranked_pipeline]}}]}}
    return {}


def classify_schemas(max_batch: int) -> dict[str, Any]:
    """Return the Inference API's text-classification body and answer (InferenceRequest, InferenceResponse)."""
    # the inputs: a text, texts, a pair or pairs, a pair as the TextPair component
    one_text, many_texts, _, pairs = (contract.field_schema(form) for form in classify_inputs(max_batch))
    inputs = [one_text, many_texts, _ref("TextPair"), {**pairs, "items": _ref("TextPair")}]
    return {
        "InferenceRequest": {
            "type": "object", "required": ["inputs"],
            "description": ("The Hugging Face Inference API text-classification body. A sentence pair is "
                            "{\"text\", \"text_pair\"}, as transformers' pipeline takes it. " + _CONTENT_TYPES),
            "properties": {
                "inputs": {"anyOf": inputs},
                "parameters": {"anyOf": [{"type": "null"}, contract.schema(CLASSIFY_PARAMETERS)]},
            },
        },
        "InferenceResponse": {"type": "array", "items": _ref("Ranked"),
                              "description": "One Ranked list per input, also for a single string input; "
                                             "all labels unless top_k is given."},
    }


def openapi_document(max_batch: int, max_content_length: int, api_key_required: bool = False,
                     model_name: str = "model", task: Task | None = None) -> dict[str, Any]:
    """Return the OpenAPI document with this instance's limits, authentication and model's task filled in."""
    text, texts, top_k = sentiment_fields(max_batch)
    # 401 only where this instance can answer it, so a schema-driven fuzzer sees no surprise
    locked = (401,) if api_key_required else ()
    classify_errors = _errors(400, *locked, 413, 415, 500, 503)
    schemas = {
        "Prediction": {"type": "object", "required": ["label", "score"], "additionalProperties": False,
                       "properties": {"label": {"type": "string"}, "score": {"type": "number"}}},
        "Ranked": {"type": "array", "items": _ref("Prediction"),
                   "description": "Labels sorted by score, descending."},
        "SentimentRequest": {
            "type": "object",
            "description": "Exactly one of text or texts. " + _CONTENT_TYPES,
            "properties": {"text": contract.field_schema(text), "texts": contract.field_schema(texts),
                           "top_k": contract.schema([top_k])["properties"]["top_k"]},
            "oneOf": [{"required": ["text"]}, {"required": ["texts"]}],
        },
        "SentimentResponse": {
            "description": ("text without top_k: one Prediction (the top label). texts without top_k: "
                            "a list of Predictions in input order. With top_k: Ranked for text, "
                            "a list of Ranked for texts."),
            "anyOf": [_ref("Prediction"), {"type": "array", "items": _ref("Prediction")},
                      {"type": "array", "items": _ref("Ranked")}],
        },
        **classify_schemas(max_batch),
        "TextPair": PAIR,
        **tei_schemas(max_batch),
        **v2_schemas(max_batch, task),
        **task_schemas(task or TextClassification(), max_batch),
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
        "Health": {"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}},
        "Ready": {"type": "object", "required": ["status"],
                  "properties": {"status": {"enum": ["ready", "loading", "stopping", "failed"]},
                                 "error": {"type": "string"}}},
        "Info": _info_schema(),
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "ONNX text classification service", "version": "1",
                 "description": (f"Every error is JSON {{\"error\": \"...\"}}. Bodies are limited to "
                                 f"{max_content_length} bytes and {max_batch} texts. {_CONTENT_TYPES}")},
        "paths": _paths(task, classify_errors, locked, model_name),
        "components": {"schemas": schemas, "securitySchemes": {"bearerAuth": {
            "type": "http", "scheme": "bearer",
            "description": "The key of SERVICE_API_KEY, when the service sets one (see /info auth)."}}},
        # every operation needs the key unless it says "security": [] (the probes and this document)
        **({"security": [{"bearerAuth": []}]} if api_key_required else {}),
    }


def _info_schema() -> dict[str, Any]:
    """Return the schema of /info's answer."""
    return {
        "type": "object",
        "required": ["model", "backend", "versions", "threads", "cpus", "limits", "batching", "auth"],
        "properties": {
            "model": {"anyOf": [{"type": "null", "description": "The default model is not loaded."}, {
                "type": "object",
                "required": ["name", "labels", "max_length", "function_to_apply"],
                "properties": {"name": {"type": "string"},
                               "labels": {"type": "array", "items": {"type": "string"}},
                               "max_length": {"type": "integer"},
                               "function_to_apply": {"enum": ["softmax", "sigmoid", "none"]},
                               "inputs": {"type": ["array", "null"], "items": {"type": "string"}},
                               "source": {}, "quantization": {}, "validation": {},
                               "created_at": {"type": ["string", "null"]}}}]},
            "backend": {"enum": ["onnx", "pytorch", "optimum"]},
            "versions": {"type": "object", "additionalProperties": {"type": ["string", "null"]}},
            "threads": {"type": "object",
                        "required": ["processes", "waitress", "ort_intra_op", "ort_inter_op", "ort_spinning",
                                     "ort_lone_threads", "batch_workers"],
                        "properties": {"ort_spinning": {"type": "boolean"}},
                        "additionalProperties": {"type": "integer"}},
            "cpus": {"type": "array", "items": {"type": "integer"},
                     "description": "the CPUs this server process may run on"},
            "limits": {"type": "object", "required": ["max_batch", "max_content_length", "max_queue",
                                                      "connection_limit"],
                       "additionalProperties": {"type": "integer"}},
            "batching": {"type": "object",
                         "required": ["enabled", "express", "max_texts", "max_tokens", "wait_ms", "gather_ms",
                                      "queue_timeout_s"],
                         "properties": {"enabled": {"type": "boolean"}, "express": {"type": "boolean"},
                                        "max_texts": {"type": "integer"},
                                        "max_tokens": {"type": "integer"}, "wait_ms": {"type": "integer"},
                                        "gather_ms": {"type": "integer"},
                                        "queue_timeout_s": {"type": "number"}}},
            "auth": {"type": "object", "required": ["api_key_required"],
                     "properties": {"api_key_required": {"type": "boolean"}}},
        },
    }


def _paths(task: Task | None, classify_errors: dict[str, Any], locked: tuple[int, ...],
           model_name: str) -> dict[str, Any]:
    """Return the paths of the unprefixed routes: the original contract, the Inference API, TEI, v2, probes."""
    return {
        "/sentiment": {"post": {
            "summary": "Classify one text or a batch (the original service's contract)",
            "requestBody": _body("SentimentRequest"),
            "responses": {"200": _json(_ref("SentimentResponse"), "Predictions"), **classify_errors},
        }},
        "/": {"post": {
            "summary": "Answer the Hugging Face Inference API for the model's task "
                       f"({(task or TextClassification()).name})",
            "requestBody": _body("InferenceRequest") if not (task and task.can(ZERO_SHOT)) else {
                "required": True, "content": {"application/json": {"schema": {
                    "anyOf": [_ref("InferenceRequest"), _ref("ZeroShotRequest")]}}}},
            "responses": {"200": _json(_ref("InferenceResponse") if not (task and task.can(ZERO_SHOT)) else {
                "anyOf": [_ref("InferenceResponse"), _ref("ZeroShotResponse")]}, "The answer of the model's task"),
                          **classify_errors},
        }},
        **tei_paths(locked),
        **v2_paths(locked, model_name),
        "/health": {"get": {"summary": "Liveness", "security": [],
                            "responses": {"200": _json(_ref("Health"), "Alive")}}},
        "/ready": {"get": {"summary": "Readiness: the model has answered, the batch scheduler runs and "
                                      "no shutdown has begun", "security": [],
                           "responses": {"200": _json(_ref("Ready"), "Ready"),
                                         "503": _json(_ref("Ready"), "Not ready: loading, stopping (shutting "
                                                      "down) or failed (the batch scheduler has stopped)")}}},
        "/info": {"get": {"summary": "Model, versions, threads, limits, batching and authentication",
                          "responses": {"200": _json(_ref("Info"), "Service description"),
                                        **_errors(*locked)}}},
        "/metrics": {"get": {"summary": "Prometheus metrics",
                             "responses": {"200": {"description": "Prometheus text format 0.0.4",
                                                   "content": {"text/plain": {"schema": {"type": "string"}}}},
                                           **_errors(*locked)}}},
        "/openapi.json": {"get": {"summary": "This document", "security": [],
                                  "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1 document")}}},
    }


# The unprefixed routes each model also answers under /models/{served_model} (service/app.py).
MODEL_ROUTES = ("/", "/sentiment", "/ready", "/info", "/predict", "/rerank", "/tokenize")
_REPOSITORY_SUMMARIES = {"index": "List the repository's models with their state (Triton's model repository "
                                  "extension)",
                         "load": "Load (or reload) a model folder of the repository in every server process",
                         "unload": "Unload a model in every server process once its requests in flight are answered"}


# In a repository's document, the Inference API's body and answer of each task, under names of their own
_TASK_NAMES = {"text-classification": "TextClassification", "token-classification": "TokenClassification",
               "zero-shot-classification": "ZeroShot"}


def _models_tasks(document: dict[str, Any], tasks: list[Task], max_batch: int) -> None:
    """Describe POST /models/{served_model} and v2's infer for every task the repository's models have.

    Each task's Inference API body and answer become components of their own (TextClassificationRequest,
    TokenClassificationResponse, ...); the model's path takes any of them, as v2's infer takes any task's
    tensors. A zero-shot model also classifies without candidate labels.
    """
    schemas, requests, answers, v2_requests = document["components"]["schemas"], [], [], []
    taggers = [task for task in tasks if task.can(TAG)]
    kinds = {task.name: task for task in tasks if not task.can(TAG)}
    if taggers:  # the loosest stride: the largest window's
        kinds[taggers[0].name] = max(taggers, key=lambda task: task.max_stride)
    if any(task.can(ZERO_SHOT) for task in kinds.values()):
        kinds.setdefault(TextClassification.name, TextClassification())
    for name, task in sorted(kinds.items()):
        own = task_schemas(task, max_batch) if name != TextClassification.name else classify_schemas(max_batch)
        prefix = _TASK_NAMES.get(name, "Task")
        for key, schema in own.items():  # InferenceRequest -> TokenClassificationRequest; Entity stays
            renamed = key.replace("Inference", prefix, 1) if key.startswith("Inference") else key
            schemas[renamed] = schema
            if renamed.endswith("Request"):
                requests.append(_ref(renamed))
            elif renamed.endswith("Response"):
                answers.append(_ref(renamed))
        v2_request = v2_schemas(max_batch, task)["V2InferenceRequest"]
        if v2_request not in v2_requests:
            v2_requests.append(v2_request)
    operation = document["paths"]["/models/{served_model}"]["post"]
    operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": {"anyOf": requests}}}}
    operation["responses"]["200"] = _json({"anyOf": answers}, "The answer of the model's task")
    operation["summary"] = "Answer the Hugging Face Inference API for the model's task (this model)"
    schemas["V2InferenceRequest"] = {"anyOf": v2_requests, "description": "The tensors of the model's task."}


def with_models(document: dict[str, Any], names: list[str], locked: tuple[int, ...],
                repository: bool, tasks: list[Task] | None = None, max_batch: int = 0) -> dict[str, Any]:
    """Add each model's routes (/models/{served_model}/...) and, when serving a repository, the repository
    extension to a document of the default model's routes; v2's model_name takes every name, and the
    model's path and v2's infer every task of the loaded models (tasks)."""
    paths = document["paths"]
    for item in paths.values():
        for operation in item.values():
            for parameter in operation.get("parameters", []):
                if parameter.get("name") == "model_name":
                    parameter["schema"] = {"enum": names}
                    parameter["description"] = "A model's name (GET /info: models); another is 404, one not " \
                                               "loaded 503."
    served = {"name": "served_model", "in": "path", "required": True, "schema": {"enum": names},
              "description": "A model's name (GET /info: models); another is 404, one not loaded 503."}
    unknown = {"404": _json(_ref("Error"), "Unknown model"), "503": _json(_ref("Error"), "Model not loaded")}
    for route in MODEL_ROUTES:
        prefixed = "/models/{served_model}" + ("" if route == "/" else route)
        paths[prefixed] = {method: {**operation, "parameters": [served], "summary": operation["summary"] + " (this "
                                    "model)", "responses": {**unknown, **operation["responses"]}}
                           for method, operation in paths[route].items()}
    paths["/models/{served_model}"]["get"] = {**paths["/models/{served_model}/info"]["get"],
                                              "summary": "The model's /info (this model)"}
    if not repository:
        return document
    _models_tasks(document, tasks or [TextClassification()], max_batch)
    name = {"name": "model_name", "in": "path", "required": True, "schema": {"type": "string"},
            "description": "A folder directly inside the repository (SERVICE_MODEL_DIR)"}
    done = _json({"type": "object"}, "Done: {}")
    failed = _errors(400, *locked)
    failed["400"]["description"] = "A bad name, a folder outside the repository, a folder that fails to load, or " \
                                   "SERVICE_MODEL_DIR is one model folder"
    paths["/v2/repository/index"] = {"post": {
        "summary": _REPOSITORY_SUMMARIES["index"],
        "requestBody": {"required": False, "content": {"application/json": {"schema": {
            "type": "object", "properties": {"ready": {"type": "boolean"}}}}}},
        "responses": {"200": _json({"type": "array", "items": {
            "type": "object", "required": ["name", "version", "state"],
            "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                           "state": {"enum": ["READY", "UNAVAILABLE", "LOADING", "UNLOADING"]},
                           "reason": {"type": "string"}}}}, "The models"), **_errors(400, *locked)}}}
    for action in ("load", "unload"):
        paths[f"/v2/repository/models/{{model_name}}/{action}"] = {"post": {
            "summary": _REPOSITORY_SUMMARIES[action], "parameters": [name],
            "requestBody": {"required": False, "content": {"application/json": {"schema": {"type": "object"}}}},
            "responses": {"200": done, **failed, "404": _json(_ref("Error"), "No such folder in the repository")}}}
    return document
