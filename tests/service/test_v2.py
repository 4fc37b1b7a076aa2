"""The Open Inference Protocol v2 routes through Flask's test client: JSON and binary tensors, errors, probes."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.app import create_app
from service.batching import Unavailable
from service.classifier import Classifier
from tests.testkit import NEGATIVE, POSITIVE, schema_errors

MODEL = "minilm-l6-sentiment"
INFER = f"/v2/models/{MODEL}/infer"
HEADER = "Inference-Header-Content-Length"
KEY = "v2-k3y"


def text_input(texts: list[str], name: str = "text", **fields: Any) -> dict[str, Any]:
    """Return a JSON BYTES input tensor."""
    return {"name": name, "shape": [len(texts)], "datatype": "BYTES", "data": texts, **fields}


def bytes_tensor(texts: list[str]) -> bytes:
    """Return the binary form of a BYTES tensor: each element's 4-byte little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(text.encode())) + text.encode() for text in texts)


def binary_body(header: dict[str, Any], *tensors: bytes) -> tuple[bytes, dict[str, str]]:
    """Return a binary-extension body (the JSON header, then tensor data) and its header-length header."""
    encoded = json.dumps(header).encode()
    return encoded + b"".join(tensors), {HEADER: str(len(encoded))}


def binary_input(texts: list[str], name: str = "text") -> tuple[dict[str, Any], bytes]:
    """Return a binary BYTES input's JSON description and its data."""
    data = bytes_tensor(texts)
    return {"name": name, "shape": [len(texts)], "datatype": "BYTES",
            "parameters": {"binary_data_size": len(data)}}, data


def read_response(data: bytes, header_length: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a binary response into its JSON header and each output's decoded tensor."""
    header = json.loads(data[:header_length])
    tensors, offset = {}, header_length
    for output in header["outputs"]:
        if "data" in output:  # this one came as JSON
            continue
        size = output["parameters"]["binary_data_size"]
        raw = data[offset:offset + size]
        offset += size
        if output["datatype"] == "FP32":
            tensors[output["name"]] = np.frombuffer(raw, dtype="<f4").reshape(output["shape"])
        else:
            items, position = [], 0
            while position < len(raw):
                (length,) = struct.unpack_from("<I", raw, position)
                items.append(raw[position + 4:position + 4 + length].decode())
                position += 4 + length
            tensors[output["name"]] = np.array(items, dtype=object).reshape(output["shape"])
    assert offset == len(data)
    return header, tensors


def sentiment(client: FlaskClient, texts: list[str]) -> list[dict[str, Any]]:
    """Return /sentiment's every label, sorted, per text."""
    return client.post("/sentiment", json={"texts": texts, "top_k": None}).get_json()


# ---- metadata and probes ------------------------------------------------------------------------------

def test_server_metadata_names_the_extensions(client: FlaskClient) -> None:
    for path in ("/v2", "/v2/"):
        response = client.get(path)
        assert response.status_code == 200
        assert response.get_json() == {"name": "onnx-classifier", "version": "1",
                                       "extensions": ["binary_tensor_data", "classification"]}


@pytest.mark.parametrize("path", [f"/v2/models/{MODEL}", f"/v2/models/{MODEL}/versions/1"])
def test_model_metadata_describes_the_tensors(client: FlaskClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 200
    assert response.get_json() == {
        "name": MODEL, "versions": ["1"], "platform": "onnxruntime_onnx",
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]},
                   {"name": "text_pair", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": "label", "datatype": "BYTES", "shape": [-1]},
                    {"name": "score", "datatype": "FP32", "shape": [-1]},
                    {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]},
                    {"name": "logits", "datatype": "FP32", "shape": [-1, 2]}]}


def test_health_and_readiness(client: FlaskClient) -> None:
    assert (client.get("/v2/health/live").status_code, client.get("/v2/health/live").get_json()) == \
        (200, {"live": True})
    assert client.get("/v2/health/ready").get_json() == {"ready": True}
    for path in (f"/v2/models/{MODEL}/ready", f"/v2/models/{MODEL}/versions/1/ready"):
        response = client.get(path)
        assert (response.status_code, response.get_json()) == (200, {"name": MODEL, "ready": True})


def test_readiness_follows_ready_while_draining(app: Flask) -> None:
    client = app.test_client()
    app.extensions["service.draining"].set()
    assert client.get("/ready").status_code == 503
    response = client.get("/v2/health/ready")
    assert (response.status_code, response.get_json()) == (503, {"ready": False, "error": "shutting down"})
    response = client.get(f"/v2/models/{MODEL}/ready")
    assert (response.status_code, response.get_json()) == \
        (503, {"name": MODEL, "ready": False, "error": "shutting down"})
    assert client.get("/v2/health/live").status_code == 200


def test_readiness_waits_for_the_model_to_answer(tiny_models: dict[int, Path]) -> None:
    client = create_app({"MODEL_DIR": str(tiny_models[2]), "WARMUP": False}).test_client()
    response = client.get("/v2/health/ready")
    assert (response.status_code, response.get_json()) == \
        (503, {"ready": False, "error": "model not warmed up yet"})
    assert client.get("/v2/models/tiny-2/ready").status_code == 503
    assert client.post("/v2/models/tiny-2/infer", json={"inputs": [text_input(["a film"])]}).status_code == 200
    assert client.get("/v2/health/ready").status_code == 200
    assert client.get("/v2/models/tiny-2/ready").status_code == 200


@pytest.mark.parametrize(("method", "path", "message"), [
    ("GET", "/v2/models/other", "Request for unknown model: 'other' is not found"),
    ("GET", "/v2/models/other/ready", "Request for unknown model: 'other' is not found"),
    ("POST", "/v2/models/other/infer", "Request for unknown model: 'other' is not found"),
    ("POST", "/v2/models/other/versions/1/infer", "Request for unknown model: 'other' is not found"),
    ("GET", f"/v2/models/{MODEL}/versions/2",
     f"Request for unknown model: '{MODEL}' version '2' is not found (the served version is '1')"),
    ("GET", f"/v2/models/{MODEL}/versions/latest/ready",
     f"Request for unknown model: '{MODEL}' version 'latest' is not found (the served version is '1')"),
    ("POST", f"/v2/models/{MODEL}/versions/0/infer",
     f"Request for unknown model: '{MODEL}' version '0' is not found (the served version is '1')"),
    ("POST", "/v2/models/" + "x" * 100 + "/infer", "Request for unknown model: '" + "x" * 64 + "...' is not found"),
])
def test_unknown_models_and_versions_are_404_json(client: FlaskClient, method: str, path: str,
                                                  message: str) -> None:
    response = client.open(path, method=method, json={"inputs": [text_input([POSITIVE])]})
    assert response.status_code == 404
    assert response.get_json() == {"error": message}


def test_wrong_methods_are_405_json(client: FlaskClient) -> None:
    response = client.get(INFER)
    assert response.status_code == 405 and response.get_json() == {"error": "method not allowed"}
    assert "POST" in response.headers["Allow"]
    assert client.post("/v2/health/ready").status_code == 405


# ---- inference: JSON ----------------------------------------------------------------------------------

def test_json_inference_answers_as_sentiment_does(client: FlaskClient) -> None:
    texts = [POSITIVE, NEGATIVE, "an average movie with some good moments"]
    response = client.post(INFER, json={"id": "req-1", "inputs": [text_input(texts)]})
    assert response.status_code == 200 and response.mimetype == "application/json"
    assert HEADER not in response.headers
    body = response.get_json()
    assert (body["model_name"], body["model_version"], body["id"]) == (MODEL, "1", "req-1")
    outputs = {output["name"]: output for output in body["outputs"]}
    assert [output["name"] for output in body["outputs"]] == ["label", "score", "probabilities", "logits"]
    assert {name: (o["datatype"], o["shape"]) for name, o in outputs.items()} == {
        "label": ("BYTES", [3]), "score": ("FP32", [3]), "probabilities": ("FP32", [3, 2]),
        "logits": ("FP32", [3, 2])}
    expected = sentiment(client, texts)
    assert outputs["label"]["data"] == [ranked[0]["label"] for ranked in expected]
    assert outputs["score"]["data"] == pytest.approx([ranked[0]["score"] for ranked in expected], rel=1e-6)
    probabilities = np.array(outputs["probabilities"]["data"]).reshape(3, 2)
    for row, ranked in zip(probabilities, expected, strict=True):
        by_label = {item["label"]: item["score"] for item in ranked}
        assert row.tolist() == pytest.approx([by_label["NEGATIVE"], by_label["POSITIVE"]], rel=1e-6)
    logits = np.array(outputs["logits"]["data"]).reshape(3, 2)
    softmax = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert softmax == pytest.approx(probabilities, rel=1e-5)


def test_requested_outputs_come_alone_and_in_their_order(client: FlaskClient) -> None:
    body = client.post(INFER, json={"inputs": [text_input([NEGATIVE])],
                                    "outputs": [{"name": "logits"}, {"name": "label"}]}).get_json()
    assert [output["name"] for output in body["outputs"]] == ["logits", "label"]
    assert body["outputs"][1]["data"] == ["NEGATIVE"]
    assert "id" not in body
    # an empty list asks for nothing in particular: every output, as Triton answers
    body = client.post(INFER, json={"inputs": [text_input([NEGATIVE])], "outputs": []}).get_json()
    assert len(body["outputs"]) == 4


def test_classification_returns_triton_strings(client: FlaskClient) -> None:
    texts = [POSITIVE, NEGATIVE]
    body = client.post(INFER, json={"inputs": [text_input(texts)], "outputs": [
        {"name": "probabilities", "parameters": {"classification": 2}},
        {"name": "logits", "parameters": {"classification": 1}},
        {"name": "score"}]}).get_json()
    probabilities, logits, score = body["outputs"]
    assert (probabilities["datatype"], probabilities["shape"]) == ("BYTES", [2, 2])
    assert (logits["datatype"], logits["shape"]) == ("BYTES", [2, 1])
    expected = sentiment(client, texts)
    index = {"NEGATIVE": 0, "POSITIVE": 1}
    assert probabilities["data"] == [f"{np.float32(item['score']):f}:{index[item['label']]}:{item['label']}"
                                     for ranked in expected for item in ranked]
    assert probabilities["data"][0].endswith(":1:POSITIVE") and probabilities["data"][2].endswith(":0:NEGATIVE")
    assert [value.split(":", 2)[1:] for value in logits["data"]] == [["1", "POSITIVE"], ["0", "NEGATIVE"]]
    assert float(logits["data"][0].split(":")[0]) > 1.0  # a logit, with Triton's six decimals
    assert len(logits["data"][0].split(":")[0].split(".")[1]) == 6
    assert score["data"] == pytest.approx([ranked[0]["score"] for ranked in expected], rel=1e-6)
    # k above the label count returns every label, as Triton does
    body = client.post(INFER, json={"inputs": [text_input([POSITIVE])], "outputs": [
        {"name": "logits", "parameters": {"classification": 5}}]}).get_json()
    assert body["outputs"][0]["shape"] == [1, 2]


def test_pairs_go_through_text_pair(tiny_models: dict[int, Path]) -> None:
    client = create_app({"MODEL_DIR": str(tiny_models[3])}).test_client()
    texts, pairs = ["a wonderful film", "the plot is dull"], ["i loved every minute of it", "boring"]
    body = client.post("/v2/models/tiny-3/infer", json={
        "inputs": [text_input(texts), text_input(pairs, "text_pair")],
        "outputs": [{"name": "probabilities"}]}).get_json()
    probabilities = np.array(body["outputs"][0]["data"]).reshape(2, 3)
    inputs = [{"text": t, "text_pair": p} for t, p in zip(texts, pairs, strict=True)]
    expected = client.post("/", json={"inputs": inputs}).get_json()
    labels = ["negative", "neutral", "positive"]
    for row, ranked in zip(probabilities, expected, strict=True):
        by_label = {item["label"]: item["score"] for item in ranked}
        assert row.tolist() == pytest.approx([by_label[label] for label in labels], rel=1e-6)
    alone = client.post("/v2/models/tiny-3/infer", json={"inputs": [text_input(texts)],
                                                         "outputs": [{"name": "probabilities"}]}).get_json()
    assert not np.allclose(np.array(alone["outputs"][0]["data"]).reshape(2, 3), probabilities)


def test_truncate_false_refuses_a_long_text(client: FlaskClient) -> None:
    long = POSITIVE + " and more" * 400
    response = client.post(INFER, json={"inputs": [text_input(["fine", long])], "parameters": {"truncate": False}})
    assert response.status_code == 400
    assert response.get_json() == {"error": "input element 1 has more than 256 tokens, the model's limit; send "
                                            "parameters.truncate true (the default) to truncate it"}
    assert client.post(INFER, json={"inputs": [text_input([long])]}).status_code == 200
    left = client.post(INFER, json={"inputs": [text_input([long])],
                                    "parameters": {"truncation_direction": "left"}}).get_json()
    right = client.post(INFER, json={"inputs": [text_input([long])]}).get_json()
    assert left["outputs"][3]["data"] != right["outputs"][3]["data"]  # other tokens kept, other logits
    capital = client.post(INFER, json={"inputs": [text_input([long])],  # as TEI's routes take it
                                       "parameters": {"truncation_direction": "Left"}}).get_json()
    assert capital == left


# ---- inference: the binary tensor data extension --------------------------------------------------------

def test_binary_inputs_and_outputs(client: FlaskClient) -> None:
    texts = [POSITIVE, "Ce film était magnifique 🎬", NEGATIVE]
    description, data = binary_input(texts)
    body, headers = binary_body({"id": "b", "inputs": [description], "parameters": {"binary_data_output": True}},
                                data)
    response = client.post(INFER, data=body, headers={**headers, "Content-Type": "application/octet-stream"})
    assert response.status_code == 200
    assert response.mimetype == "application/octet-stream"
    header, tensors = read_response(response.data, int(response.headers[HEADER]))
    assert header["id"] == "b" and all("data" not in output for output in header["outputs"])
    expected = sentiment(client, texts)
    assert tensors["label"].tolist() == [ranked[0]["label"] for ranked in expected]
    assert tensors["score"].tolist() == pytest.approx([ranked[0]["score"] for ranked in expected], rel=1e-6)
    assert tensors["probabilities"].shape == tensors["logits"].shape == (3, 2)
    assert tensors["probabilities"].sum(axis=1) == pytest.approx([1.0, 1.0, 1.0], rel=1e-6)


def test_binary_and_json_mix_per_output(client: FlaskClient) -> None:
    description, data = binary_input([NEGATIVE])
    pair, pair_data = binary_input(["a pair, sent as binary too"], "text_pair")
    body, headers = binary_body({"inputs": [description, pair], "parameters": {"binary_data_output": True},
                                 "outputs": [{"name": "label", "parameters": {"binary_data": False}},
                                             {"name": "probabilities", "parameters": {"classification": 1}}]},
                                data, pair_data)
    response = client.post(INFER, data=body, headers=headers)
    assert response.status_code == 200 and response.mimetype == "application/octet-stream"
    header, tensors = read_response(response.data, int(response.headers[HEADER]))
    label, classified = header["outputs"]
    assert label == {"name": "label", "datatype": "BYTES", "shape": [1], "data": [label["data"][0]]}
    assert classified["shape"] == [1, 1] and tensors["probabilities"][0, 0].count(":") == 2
    # JSON inputs with every output as binary, and binary inputs with JSON outputs
    response = client.post(INFER, json={"inputs": [text_input([NEGATIVE])],
                                        "parameters": {"binary_data_output": True}})
    assert response.mimetype == "application/octet-stream"
    body, headers = binary_body({"inputs": [description]}, data)
    response = client.post(INFER, data=body, headers=headers)
    assert response.mimetype == "application/json" and HEADER not in response.headers
    assert response.get_json()["outputs"][0]["data"] == ["NEGATIVE"]


def test_an_empty_binary_text_is_a_text(client: FlaskClient) -> None:
    description, data = binary_input(["", POSITIVE])
    body, headers = binary_body({"inputs": [description], "outputs": [{"name": "label"}]}, data)
    response = client.post(INFER, data=body, headers=headers)
    assert response.status_code == 200 and len(response.get_json()["outputs"][0]["data"]) == 2


# ---- errors ---------------------------------------------------------------------------------------------

TEXT = text_input([POSITIVE])
GOOD, GOOD_DATA = binary_input([POSITIVE, NEGATIVE])


def framed(header: dict[str, Any], tail: bytes, length: int | str | None = None) -> tuple[bytes, dict[str, str]]:
    """Return a binary body whose header-length header may lie."""
    encoded = json.dumps(header).encode()
    return encoded + tail, {HEADER: str(len(encoded) if length is None else length)}


def with_size(size: Any, shape: Any = None) -> dict[str, Any]:
    """Return the text input with another binary_data_size (and shape)."""
    return {**GOOD, "shape": GOOD["shape"] if shape is None else shape, "parameters": {"binary_data_size": size}}


BINARY_CASES: list[tuple[str, bytes, dict[str, str], str]] = [
    ("header length over the body", *framed({"inputs": [GOOD]}, GOOD_DATA, 99_999),
     None),
    ("header length zero", *framed({"inputs": [GOOD]}, GOOD_DATA, 0),
     "Inference-Header-Content-Length: 0 (a raw binary request without a JSON header) is not supported"),
    ("header length negative", *framed({"inputs": [GOOD]}, GOOD_DATA, -5),
     "Inference-Header-Content-Length must be the length of the JSON header in bytes"),
    ("header length not a number", *framed({"inputs": [GOOD]}, GOOD_DATA, "12abc"),
     "Inference-Header-Content-Length must be the length of the JSON header in bytes"),
    ("header length huge", *framed({"inputs": [GOOD]}, GOOD_DATA, "9" * 400),
     "Inference-Header-Content-Length must be the length of the JSON header in bytes"),
    ("header length cuts the JSON", *framed({"inputs": [GOOD]}, GOOD_DATA, 10),
     "invalid JSON in the inference header"),
    ("binary size over the data", *framed({"inputs": [with_size(len(GOOD_DATA) + 1)]}, GOOD_DATA),
     f"unexpected size for input 'text': binary_data_size is {len(GOOD_DATA) + 1} but only {len(GOOD_DATA)} "
     "bytes of binary data are left"),
    ("binary size huge", *framed({"inputs": [with_size(2**63)]}, GOOD_DATA),
     f"unexpected size for input 'text': binary_data_size is {2**63} but only {len(GOOD_DATA)} bytes of binary "
     "data are left"),
    ("binary size negative", *framed({"inputs": [with_size(-1)]}, GOOD_DATA),
     "input 'text': parameters.binary_data_size must be a non-negative integer"),
    ("binary size a string", *framed({"inputs": [with_size("10")]}, GOOD_DATA),
     "input 'text': parameters.binary_data_size must be a non-negative integer"),
    ("binary size true", *framed({"inputs": [with_size(True)]}, GOOD_DATA),
     "input 'text': parameters.binary_data_size must be a non-negative integer"),
    ("element length overruns", *framed({"inputs": [with_size(7, [1])]}, struct.pack("<I", 1000) + b"abc"),
     "input 'text': element 0 has a length of 1000 bytes but only 3 are left in its binary_data_size"),
    ("element length 2**32-1", *framed({"inputs": [with_size(5, [1])]}, b"\xff\xff\xff\xff" + b"a"),
     "input 'text': element 0 has a length of 4294967295 bytes but only 1 are left in its binary_data_size"),
    ("element length cut short", *framed({"inputs": [with_size(2, [1])]}, b"\x05\x00"),
     "input 'text': element 0 is cut short (its 4-byte length is incomplete)"),
    ("more elements than the shape", *framed({"inputs": [with_size(len(GOOD_DATA), [1])]}, GOOD_DATA),
     "input 'text': its binary data holds more than the 1 elements of its shape"),
    ("fewer elements than the shape", *framed({"inputs": [with_size(len(GOOD_DATA), [3])]}, GOOD_DATA),
     "input 'text' has 2 elements in its binary data but shape [3]"),
    ("not UTF-8", *framed({"inputs": [with_size(6, [1])]}, struct.pack("<I", 2) + b"\xff\xfe"),
     "input 'text': element 0 is not valid UTF-8"),
    ("a lone surrogate in UTF-8", *framed({"inputs": [with_size(7, [1])]}, struct.pack("<I", 3) + b"\xed\xa0\x80"),
     "input 'text': element 0 is not valid UTF-8"),
    ("bytes after the last input", *framed({"inputs": [GOOD]}, GOOD_DATA + b"xyz"),
     "unexpected additional input data: 3 bytes after the last binary input"),
    ("binary data and JSON data", *framed({"inputs": [{**GOOD, "data": [POSITIVE, NEGATIVE]}]}, GOOD_DATA),
     "input 'text' must set exactly one of 'data' and parameters.binary_data_size"),
    ("not JSON at all", b"\x00\x01\x02\x03binary", {HEADER: "4"}, "invalid JSON in the inference header"),
]


@pytest.mark.parametrize(("case", "body", "headers", "message"), BINARY_CASES, ids=[c[0] for c in BINARY_CASES])
def test_malformed_binary_requests_are_400_json(client: FlaskClient, case: str, body: bytes,
                                                headers: dict[str, str], message: str | None) -> None:
    response = client.post(INFER, data=body, headers={**headers, "Content-Type": "application/octet-stream"})
    assert response.status_code == 400
    if message is None:  # the figure depends on the body length
        message = f"Inference-Header-Content-Length is 99999 but the body has only {len(body)} bytes"
    assert response.get_json() == {"error": message}
    assert client.get("/v2/health/ready").status_code == 200


def test_binary_data_without_the_header_length_says_what_is_missing(client: FlaskClient) -> None:
    response = client.post(INFER, data=json.dumps({"inputs": [GOOD]}))
    assert response.status_code == 400
    assert response.get_json() == {"error": f"unexpected size for input 'text': binary_data_size is "
                                            f"{len(GOOD_DATA)} but only 0 bytes of binary data are left (binary "
                                            "data needs the Inference-Header-Content-Length header)"}


JSON_CASES: list[tuple[Any, str]] = [
    (b"{not json", "invalid JSON"),
    (b"", "invalid JSON"),
    (b'{"inputs": [{"name": "text", "shape": [NaN], "datatype": "BYTES", "data": ["a"]}]}', "invalid JSON"),
    (b'{"inputs": [{"name": "text", "shape": [1e400], "datatype": "BYTES", "data": ["a"]}]}',
     "input 'text': 'shape' must be a list of non-negative integers"),
    (b"[" * 100_000 + b"]" * 100_000, "invalid JSON"),
    (b'{"inputs": [{"name": "text", "shape": [' + b"9" * 5000 + b'], "datatype": "BYTES", "data": ["a"]}]}',
     "invalid JSON"),
    ([TEXT], "the inference request must be a JSON object"),
    ({}, "'inputs' must be a non-empty list of input tensors"),
    ({"inputs": []}, "'inputs' must be a non-empty list of input tensors"),
    ({"inputs": TEXT}, "'inputs' must be a non-empty list of input tensors"),
    ({"inputs": ["text"]}, "inputs[0] must be an object"),
    ({"inputs": [{**TEXT, "name": 3}]}, "inputs[0].name must be a string"),
    ({"inputs": [{**TEXT, "name": "input_ids"}]},
     f"unexpected inference input 'input_ids' for model '{MODEL}': its inputs are 'text' and the optional "
     "'text_pair'"),
    ({"inputs": [TEXT, TEXT]}, "input 'text' is given twice"),
    ({"inputs": [text_input(["a"], "text_pair")]}, "input 'text' is missing"),
    ({"inputs": [{**TEXT, "datatype": "FP32"}]},
     f"inference input 'text' data-type is 'FP32', but model '{MODEL}' expects 'BYTES'"),
    ({"inputs": [{**TEXT, "datatype": None}]}, f"inference input 'text' has no 'datatype': model '{MODEL}' expects "
                                               "'BYTES'"),
    ({"inputs": [{k: v for k, v in TEXT.items() if k != "datatype"}]},
     f"inference input 'text' has no 'datatype': model '{MODEL}' expects 'BYTES'"),
    ({"inputs": [{**TEXT, "datatype": 3}]},
     f"inference input 'text' data-type is 'int', but model '{MODEL}' expects 'BYTES'"),
    ({"inputs": [{**TEXT, "shape": [1, 1]}]},
     "input 'text' has 2 dimensions, but the model takes shape [n]: a batch of n texts"),
    ({"inputs": [{**TEXT, "shape": []}]},
     "input 'text' has 0 dimensions, but the model takes shape [n]: a batch of n texts"),
    ({"inputs": [{**TEXT, "shape": "1"}]}, "input 'text': 'shape' must be a list of non-negative integers"),
    ({"inputs": [{**TEXT, "shape": ["1"]}]}, "input 'text': 'shape' must be a list of non-negative integers"),
    ({"inputs": [{**TEXT, "shape": [1.5]}]}, "input 'text': 'shape' must be a list of non-negative integers"),
    ({"inputs": [{**TEXT, "shape": [-1]}]}, "input 'text': 'shape' must be a list of non-negative integers"),
    ({"inputs": [{**TEXT, "shape": [True]}]}, "input 'text': 'shape' must be a list of non-negative integers"),
    ({"inputs": [{**TEXT, "shape": [0], "data": []}]}, "input 'text' has shape [0]: send at least one text"),
    ({"inputs": [{**TEXT, "shape": [10**30]}]},
     "inference request batch-size must be <= 32: input 'text' has shape [more]"),
    ({"inputs": [text_input(["x"] * 33)]}, "inference request batch-size must be <= 32: input 'text' has shape [33]"),
    ({"inputs": [{**TEXT, "shape": [2]}]}, "input 'text' has 1 elements in 'data' but shape [2]"),
    ({"inputs": [{**TEXT, "data": "a film"}]}, "input 'text': 'data' must be a list of strings"),
    ({"inputs": [{**TEXT, "data": [3]}]},
     "input 'text': data[0] must be a string (BYTES elements are strings in JSON)"),
    ({"inputs": [{**TEXT, "data": [["nested"]]}]},
     "input 'text': data[0] must be a string (BYTES elements are strings in JSON)"),
    ({"inputs": [{**TEXT, "data": ["a \ud800 b"]}]},
     "input 'text' element 0 is not valid Unicode: lone surrogate at character 2"),
    ({"inputs": [{key: value for key, value in TEXT.items() if key != "data"}]},
     "input 'text' must set exactly one of 'data' and parameters.binary_data_size"),
    ({"inputs": [{**TEXT, "parameters": []}]}, "'inputs[0].parameters' must be an object"),
    ({"inputs": [{**TEXT, "parameters": {"shared_memory_region": "r"}}]},
     "shared memory is not supported: send tensor data in the body"),
    ({"inputs": [text_input(["a", "b"]), text_input(["c"], "text_pair")]},
     "input 'text_pair' has shape [1] but 'text' has [2]: each text needs its pair"),
    ({"inputs": [TEXT], "id": 42}, "'id' must be a string"),
    ({"inputs": [TEXT], "parameters": "binary"}, "'parameters' must be an object"),
    ({"inputs": [TEXT], "parameters": {"binary_data_output": "yes"}},
     "parameters.binary_data_output must be true or false"),
    ({"inputs": [TEXT], "parameters": {"truncate": 0}}, "parameters.truncate must be true or false"),
    ({"inputs": [TEXT], "parameters": {"truncation_direction": "up"}},
     "parameters.truncation_direction must be \"right\" or \"left\""),
    ({"inputs": [TEXT], "parameters": {"truncation_direction": ["left"]}},
     "parameters.truncation_direction must be \"right\" or \"left\""),
    ({"inputs": [TEXT], "outputs": {"name": "label"}}, "'outputs' must be a list of requested outputs"),
    ({"inputs": [TEXT], "outputs": ["label"]}, "outputs[0] must be an object"),
    ({"inputs": [TEXT], "outputs": [{"name": None}]}, "outputs[0].name must be a string"),
    ({"inputs": [TEXT], "outputs": [{"name": "embeddings"}]},
     f"unexpected inference output 'embeddings' for model '{MODEL}': its outputs are 'label', 'score', "
     "'probabilities', 'logits'"),
    ({"inputs": [TEXT], "outputs": [{"name": "label"}, {"name": "label"}]}, "output 'label' is requested twice"),
    ({"inputs": [TEXT], "outputs": [{"name": "label", "parameters": {"classification": 1}}]},
     "output 'label': classification is available on 'probabilities' and 'logits'"),
    ({"inputs": [TEXT], "outputs": [{"name": "score", "parameters": {"classification": 2}}]},
     "output 'score': classification is available on 'probabilities' and 'logits'"),
    ({"inputs": [TEXT], "outputs": [{"name": "logits", "parameters": {"classification": -1}}]},
     "output 'logits': parameters.classification must be a non-negative integer"),
    ({"inputs": [TEXT], "outputs": [{"name": "logits", "parameters": {"classification": "2"}}]},
     "output 'logits': parameters.classification must be a non-negative integer"),
    ({"inputs": [TEXT], "outputs": [{"name": "logits", "parameters": {"classification": True}}]},
     "output 'logits': parameters.classification must be a non-negative integer"),
    ({"inputs": [TEXT], "outputs": [{"name": "logits", "parameters": {"binary_data": 1}}]},
     "outputs[0].parameters.binary_data must be true or false"),
    ({"inputs": [TEXT], "outputs": [{"name": "logits", "parameters": {"shared_memory_region": "r"}}]},
     "shared memory is not supported: outputs are returned in the body"),
]


@pytest.mark.parametrize(("payload", "message"), JSON_CASES)
def test_invalid_json_requests_are_400_json(client: FlaskClient, payload: Any, message: str) -> None:
    data = payload if isinstance(payload, bytes) else json.dumps(payload)
    response = client.post(INFER, data=data, content_type="application/json")
    assert response.status_code == 400
    assert response.get_json() == {"error": message}


def test_integral_floats_count_as_integers(client: FlaskClient) -> None:
    response = client.post(INFER, json={"inputs": [{**TEXT, "shape": [1.0]}],
                                        "outputs": [{"name": "logits", "parameters": {"classification": 2.0}}]})
    assert response.status_code == 200 and response.get_json()["outputs"][0]["shape"] == [1, 2]


@pytest.mark.parametrize(("headers", "status", "message"), [
    ({"Content-Encoding": "gzip"}, 415, "unsupported Content-Encoding: send the body uncompressed"),
    ({"Content-Type": "multipart/form-data; boundary=x"}, 415,
     "unsupported media type: send JSON, or JSON then binary tensor data"),
])
def test_bodies_it_cannot_read_are_415(client: FlaskClient, headers: dict[str, str], status: int,
                                      message: str) -> None:
    response = client.post(INFER, data=json.dumps({"inputs": [TEXT]}), headers=headers)
    assert (response.status_code, response.get_json()) == (status, {"error": message})


def test_a_body_over_the_limit_is_413(client: FlaskClient) -> None:
    description, data = binary_input(["x" * (2 * 1024 * 1024)])
    body, headers = binary_body({"inputs": [description]}, data)
    response = client.post(INFER, data=body, headers=headers)
    assert response.status_code == 413
    assert response.get_json() == {"error": "request body too large: the limit is 2097152 bytes"}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tail=st.binary(max_size=64), size=st.integers(-2, 80), count=st.integers(0, 4),
       shift=st.integers(-3, 3))
def test_no_binary_body_gets_anything_but_200_or_400(client: FlaskClient, tail: bytes, size: int, count: int,
                                                     shift: int) -> None:
    encoded = json.dumps({"inputs": [{"name": "text", "shape": [count], "datatype": "BYTES",
                                      "parameters": {"binary_data_size": size}}],
                          "outputs": [{"name": "label"}]}).encode()
    response = client.post(INFER, data=encoded + tail, headers={HEADER: str(len(encoded) + shift)})
    assert response.status_code in (200, 400), response.data
    assert set(response.get_json()) == ({"outputs", "model_name", "model_version"} if response.status_code == 200
                                        else {"error"})


# ---- overload, model failure, auth, metrics, the API document ------------------------------------------------

def test_overload_is_503_with_retry_after(client: FlaskClient, monkeypatch: pytest.MonkeyPatch) -> None:
    def overloaded(*args: Any, **kwargs: Any) -> None:
        # a fake: a full queue on a real server takes hundreds of requests (test_overload.py does that)
        raise Unavailable("overloaded: the queue is full", 3, "queue_full")

    monkeypatch.setattr("service.v2.infer", overloaded)
    response = client.post(INFER, json={"inputs": [TEXT]})
    assert (response.status_code, response.get_json()) == (503, {"error": "overloaded: the queue is full"})
    assert response.headers["Retry-After"] == "3"


def test_a_model_failure_is_a_generic_500(tiny_models: dict[int, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    classifier = Classifier(tiny_models[2])
    client = create_app({"MODEL_DIR": str(tiny_models[2])}, classifier=classifier).test_client()
    collate = classifier.collate

    def wrong_dtype(encodings: list) -> dict[str, np.ndarray]:
        feeds = collate(encodings)
        feeds["input_ids"] = feeds["input_ids"].astype(np.float32)  # ORT rejects it for real
        return feeds

    monkeypatch.setattr(classifier, "collate", wrong_dtype)
    response = client.post("/v2/models/tiny-2/infer", json={"inputs": [text_input(["a film"])]})
    assert (response.status_code, response.get_json()) == (500, {"error": "inference failed"})
    monkeypatch.setattr(classifier, "collate", collate)
    assert client.post("/v2/models/tiny-2/infer", json={"inputs": [text_input(["a film"])]}).status_code == 200


@pytest.fixture
def locked(model_dir: Path, classifier: Classifier, monkeypatch: pytest.MonkeyPatch) -> FlaskClient:
    """Return a client of an app that requires KEY."""
    for key in [k for k in os.environ if k.startswith("SERVICE_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("SERVICE_API_KEY", KEY)
    return create_app({"MODEL_DIR": str(model_dir)}, classifier=classifier).test_client()


def test_the_api_key_guards_all_but_the_probes(locked: FlaskClient) -> None:
    assert locked.get("/v2/health/live").status_code == 200
    assert locked.get("/v2/health/ready").status_code == 200
    for method, path in [("GET", "/v2"), ("GET", f"/v2/models/{MODEL}"), ("GET", f"/v2/models/{MODEL}/ready"),
                         ("POST", INFER), ("POST", "/v2/models/other/infer")]:
        response = locked.open(path, method=method, json={"inputs": [TEXT]})
        assert response.status_code == 401, path
        assert response.get_json() == {"error": "missing API key: send the header Authorization: Bearer <key>"}
        response = locked.open(path, method=method, json={"inputs": [TEXT]},
                               headers={"Authorization": f"Bearer {KEY}"})
        assert response.status_code == (404 if "other" in path else 200), path


def test_metrics_count_v2_requests_and_texts(client: FlaskClient) -> None:
    client.post(INFER, json={"inputs": [text_input([POSITIVE, NEGATIVE, POSITIVE])]})
    client.post(INFER, json={"inputs": [{**TEXT, "datatype": "INT64"}]})
    text = client.get("/metrics").get_data(as_text=True)
    assert 'service_requests_total{method="POST",route="/v2/models/<model_name>/infer",status="200"} 1.0' in text
    assert 'service_requests_total{method="POST",route="/v2/models/<model_name>/infer",status="400"} 1.0' in text
    assert "service_batch_size_sum 3.0" in text


@pytest.mark.parametrize(("method", "path", "payload", "status"), [
    ("get", "/v2", None, 200),
    ("get", "/v2/health/live", None, 200),
    ("get", "/v2/health/ready", None, 200),
    ("get", "/v2/models/{model_name}", None, 200),
    ("get", "/v2/models/{model_name}/versions/{model_version}", None, 200),
    ("get", "/v2/models/{model_name}/ready", None, 200),
    ("get", "/v2/models/{model_name}/versions/{model_version}/ready", None, 404),
    ("post", "/v2/models/{model_name}/infer", {"id": "x", "inputs": [text_input([POSITIVE, NEGATIVE])],
                                               "outputs": [{"name": "probabilities",
                                                            "parameters": {"classification": 2}},
                                                           {"name": "score"}]}, 200),
    ("post", "/v2/models/{model_name}/versions/{model_version}/infer", {"inputs": [TEXT]}, 200),
    ("post", "/v2/models/{model_name}/infer", {"inputs": [TEXT], "outputs": [{"name": "x"}]}, 400),
])
def test_v2_requests_and_responses_match_the_api_document(client: FlaskClient, method: str, path: str,
                                                          payload: Any, status: int) -> None:
    document = client.get("/openapi.json").get_json()
    operation = document["paths"][path][method]
    if payload is not None and status == 200:
        assert schema_errors(payload, operation["requestBody"]["content"]["application/json"]["schema"],
                             document) == []
    version = "9" if status == 404 else "1"
    response = client.open(path.format(model_name=MODEL, model_version=version), method=method.upper(),
                           json=payload)
    assert response.status_code == status
    documented = operation["responses"][str(status)]["content"]["application/json"]["schema"]
    assert schema_errors(response.get_json(), documented, document) == []
