"""The real tritonclient.http against a real Waitress server (the Open Inference Protocol v2 contract)."""

from __future__ import annotations

import http.client
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.testkit import NEGATIVE, POSITIVE, Server, running_server

MODEL = "minilm-l6-sentiment"
KEY = "tr1ton-k3y"
TEXTS = [POSITIVE, NEGATIVE, "an average movie with some good moments", "Ce film était magnifique 🎬"]
OUTPUTS = ("label", "score", "probabilities", "logits")


def connect(server: Server) -> triton.InferenceServerClient:
    """Return a client of the server (host:port, no scheme, as tritonclient takes it)."""
    return triton.InferenceServerClient(urlsplit(server.url).netloc, connection_timeout=30, network_timeout=30)


@pytest.fixture
def client(server: Server) -> Iterator[triton.InferenceServerClient]:
    """Yield a client of the default model's server."""
    connected = connect(server)
    yield connected
    connected.close()


def text_inputs(texts: list[str], pairs: list[str] | None = None, binary: bool = True) -> list[triton.InferInput]:
    """Return the `text` input (and `text_pair`), as binary data (tritonclient's default) or JSON."""
    inputs = []
    for name, values in (("text", texts), ("text_pair", pairs)):
        if values is not None:
            tensor = triton.InferInput(name, [len(values)], "BYTES")
            tensor.set_data_from_numpy(np.array(values, dtype=np.object_), binary_data=binary)
            inputs.append(tensor)
    return inputs


def post(server: Server, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    """POST raw bytes to the server; return the status and the JSON body."""
    address = urlsplit(server.url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
    try:
        connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def sentiment(server: Server, texts: list[str]) -> list[list[dict[str, Any]]]:
    """Return /sentiment's every label, sorted by score, for each text."""
    status, body = post(server, "/sentiment", json.dumps({"texts": texts, "top_k": None}).encode(),
                        {"Content-Type": "application/json"})
    assert status == 200
    return body


def test_metadata_health_and_readiness(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1")
    assert client.get_server_metadata() == {"name": "onnx-classifier", "version": "1",
                                            "extensions": ["binary_tensor_data", "classification"]}
    metadata = client.get_model_metadata(MODEL, "1")
    assert (metadata["name"], metadata["versions"], metadata["platform"]) == (MODEL, ["1"], "onnxruntime_onnx")
    assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["inputs"]] == \
        [("text", "BYTES", [-1]), ("text_pair", "BYTES", [-1])]
    assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["outputs"]] == \
        [("label", "BYTES", [-1]), ("score", "FP32", [-1]), ("probabilities", "FP32", [-1, 2]),
         ("logits", "FP32", [-1, 2])]
    assert not client.is_model_ready("other") and not client.is_model_ready(MODEL, "2")
    with pytest.raises(InferenceServerException) as caught:
        client.get_model_metadata("other")
    assert (caught.value.status(), caught.value.message()) == ("404", "Request for unknown model: 'other' is not found")


@pytest.mark.parametrize("binary", [True, False], ids=["binary (defaults)", "JSON"])
def test_answers_equal_sentiment(server: Server, client: triton.InferenceServerClient, binary: bool) -> None:
    if binary:  # tritonclient's defaults: binary inputs, binary_data_output
        result = client.infer(MODEL, text_inputs(TEXTS), request_id="r1")
    else:
        result = client.infer(MODEL, text_inputs(TEXTS, binary=False), request_id="r1",
                              outputs=[triton.InferRequestedOutput(name, binary_data=False) for name in OUTPUTS])
    response = result.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == (MODEL, "1", "r1")
    assert all(("parameters" in output) == binary for output in response["outputs"])
    expected = sentiment(server, TEXTS)
    labels = [ranked[0]["label"] for ranked in expected]
    assert [label.decode() if binary else label for label in result.as_numpy("label").tolist()] == labels
    score = result.as_numpy("score")
    assert score.dtype == np.float32 and score.shape == (len(TEXTS),)
    assert score.tolist() == pytest.approx([ranked[0]["score"] for ranked in expected], rel=1e-6, abs=1e-7)
    probabilities = result.as_numpy("probabilities")
    assert probabilities.dtype == np.float32 and probabilities.shape == (len(TEXTS), 2)
    for row, ranked in zip(probabilities, expected, strict=True):
        by_label = {item["label"]: item["score"] for item in ranked}
        assert row.tolist() == pytest.approx([by_label["NEGATIVE"], by_label["POSITIVE"]], rel=1e-6, abs=1e-7)
    logits = result.as_numpy("logits")
    assert logits.shape == (len(TEXTS), 2) and np.argmax(logits, axis=1).tolist() == \
        [["NEGATIVE", "POSITIVE"].index(label) for label in labels]


def test_binary_and_json_answers_are_identical(client: triton.InferenceServerClient) -> None:
    binary = client.infer(MODEL, text_inputs(TEXTS))
    plain = client.infer(MODEL, text_inputs(TEXTS, binary=False), outputs=[
        triton.InferRequestedOutput(name, binary_data=False) for name in OUTPUTS])
    for name in ("score", "probabilities", "logits"):
        assert np.array_equal(binary.as_numpy(name), plain.as_numpy(name)), name


def test_classification_extension(server: Server, client: triton.InferenceServerClient) -> None:
    result = client.infer(MODEL, text_inputs(TEXTS[:2]), outputs=[
        triton.InferRequestedOutput("probabilities", class_count=2),
        triton.InferRequestedOutput("logits", class_count=1, binary_data=False)])
    classes = result.as_numpy("probabilities")
    assert classes.shape == (2, 2)
    expected = sentiment(server, TEXTS[:2])
    index = {"NEGATIVE": 0, "POSITIVE": 1}
    assert [[value.decode() for value in row] for row in classes] == [
        [f"{np.float32(item['score']):f}:{index[item['label']]}:{item['label']}" for item in ranked]
        for ranked in expected]
    top = result.as_numpy("logits")
    assert top.shape == (2, 1) and [row[0].split(":", 1)[1] for row in top.tolist()] == ["1:POSITIVE", "0:NEGATIVE"]
    assert result.as_numpy("label") is None  # only what was asked for


def test_only_requested_outputs_in_their_order(client: triton.InferenceServerClient) -> None:
    result = client.infer(MODEL, text_inputs([NEGATIVE]), outputs=[
        triton.InferRequestedOutput("score"), triton.InferRequestedOutput("label", binary_data=False)])
    assert [output["name"] for output in result.get_response()["outputs"]] == ["score", "label"]
    assert result.as_numpy("label").tolist() == ["NEGATIVE"]


@pytest.mark.parametrize(("case", "status", "message"), [
    ("unknown model", "404", "Request for unknown model: 'other' is not found"),
    ("unknown version", "404",
     f"Request for unknown model: '{MODEL}' version '2' is not found (the served version is '1')"),
    ("wrong datatype", "400", f"inference input 'text' data-type is 'FP32', but model '{MODEL}' expects 'BYTES'"),
    ("shape mismatch", "400", "input 'text' has 2 elements in its binary data but shape [3]"),
    ("pair shape mismatch", "400", "input 'text_pair' has shape [1] but 'text' has [2]: each text needs its pair"),
    ("too many texts", "400", "inference request batch-size must be <= 32: input 'text' has shape [33]"),
    ("unknown output", "400",
     f"unexpected inference output 'embedding' for model '{MODEL}': its outputs are 'label', 'score', "
     "'probabilities', 'logits'"),
    ("unknown input", "400",
     f"unexpected inference input 'input_ids' for model '{MODEL}': its inputs are 'text' and the optional "
     "'text_pair'"),
])
def test_errors_reach_the_client_with_triton_statuses(client: triton.InferenceServerClient, case: str,
                                                      status: str, message: str) -> None:
    model, version, inputs, outputs = MODEL, "", text_inputs([POSITIVE]), None
    if case == "unknown model":
        model = "other"
    elif case == "unknown version":
        version = "2"
    elif case == "wrong datatype":
        inputs = [triton.InferInput("text", [2], "FP32").set_data_from_numpy(np.ones(2, dtype=np.float32))]
    elif case == "shape mismatch":
        inputs = text_inputs([POSITIVE, NEGATIVE])
        inputs[0].set_shape([3])  # the header says 3, the binary data holds 2
    elif case == "pair shape mismatch":
        inputs = text_inputs([POSITIVE, NEGATIVE], ["one pair only"])
        inputs[1].set_shape([1])
    elif case == "too many texts":
        inputs = text_inputs([POSITIVE] * 33)
    elif case == "unknown output":
        outputs = [triton.InferRequestedOutput("embedding")]
    elif case == "unknown input":
        inputs = [triton.InferInput("input_ids", [1], "BYTES").set_data_from_numpy(np.array([b"x"], dtype=object))]
    with pytest.raises(InferenceServerException) as caught:
        client.infer(model, inputs, model_version=version, outputs=outputs)
    assert (caught.value.status(), caught.value.message()) == (status, message)


def test_malformed_binary_bodies_are_400_json(server: Server, client: triton.InferenceServerClient) -> None:
    body, header_length = triton.InferenceServerClient.generate_request_body(text_inputs([POSITIVE, NEGATIVE]))
    path = f"/v2/models/{MODEL}/infer"
    cases = [
        (body, str(len(body) + 1), f"Inference-Header-Content-Length is {len(body) + 1} but the body has only "
                                   f"{len(body)} bytes"),
        (body[:-3], str(header_length), "unexpected size for input 'text': binary_data_size is "
                                        f"{len(body) - header_length} but only {len(body) - header_length - 3} "
                                        "bytes of binary data are left"),
        (body + b"\x00", str(header_length), "unexpected additional input data: 1 bytes after the last binary input"),
        (body[:header_length] + struct.pack("<I", 10**6) + body[header_length + 4:], str(header_length),
         f"input 'text': element 0 has a length of 1000000 bytes but only {len(body) - header_length - 4} are "
         "left in its binary_data_size"),
        (body, "abc", "Inference-Header-Content-Length must be the length of the JSON header in bytes"),
    ]
    for data, length, message in cases:
        status, answer = post(server, path, data, {"Inference-Header-Content-Length": length,
                                                   "Content-Type": "application/octet-stream"})
        assert (status, answer) == (400, {"error": message})
    assert client.is_server_ready() and client.infer(MODEL, text_inputs([POSITIVE])).as_numpy("label")[0] == \
        b"POSITIVE"


@pytest.fixture(scope="module")
def tiny_server(tiny_models: dict[int, Path]) -> Iterator[Server]:
    """Return a real server of the 3-label tiny model that requires KEY."""
    with running_server(SERVICE_MODEL_DIR=str(tiny_models[3]), SERVICE_API_KEY=KEY) as started:
        yield started


def test_pairs_through_text_pair(tiny_server: Server) -> None:
    client = connect(tiny_server)
    auth = {"Authorization": f"Bearer {KEY}"}
    texts, pairs = ["a wonderful film", "the plot is dull", "an average movie"], ["i loved it", "boring", "fine"]
    result = client.infer("tiny-3", text_inputs(texts, pairs), headers=auth)
    status, expected = post(tiny_server, "/", json.dumps(
        {"inputs": [{"text": t, "text_pair": p} for t, p in zip(texts, pairs, strict=True)]}).encode(),
        {"Content-Type": "application/json", **auth})
    assert status == 200
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (3, 3)
    for row, ranked in zip(probabilities, expected, strict=True):
        by_label = {item["label"]: item["score"] for item in ranked}
        assert row.tolist() == pytest.approx([by_label[label] for label in ("negative", "neutral", "positive")],
                                             rel=1e-6, abs=1e-7)
    assert [label.decode() for label in result.as_numpy("label")] == [ranked[0]["label"] for ranked in expected]
    alone = client.infer("tiny-3", text_inputs(texts), headers=auth).as_numpy("probabilities")
    assert not np.allclose(alone, probabilities)  # the pair reached the model
    client.close()


def test_the_api_key_is_required_on_infer_but_not_on_probes(tiny_server: Server) -> None:
    client = connect(tiny_server)
    assert client.is_server_live() and client.is_server_ready()
    for headers, status, message in [
            (None, "401", "missing API key: send the header Authorization: Bearer <key>"),
            ({"Authorization": "Bearer wrong"}, "401", "invalid API key")]:
        with pytest.raises(InferenceServerException) as caught:
            client.infer("tiny-3", text_inputs(["a film"]), headers=headers)
        assert (caught.value.status(), caught.value.message()) == (status, message)
    with pytest.raises(InferenceServerException) as caught:
        client.get_model_metadata("tiny-3")
    assert caught.value.status() == "401"
    result = client.infer("tiny-3", text_inputs(["a film"]), headers={"Authorization": f"Bearer {KEY}"})
    assert result.as_numpy("label")[0].decode() in ("negative", "neutral", "positive")
    client.close()
