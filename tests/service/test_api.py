"""The routes through Flask's test client, on the real default model."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flask import Flask
from flask.testing import FlaskClient

from service.app import create_app
from service.classifier import Classifier
from service.config import usable_cores
from tests.testkit import NEGATIVE, POSITIVE


@pytest.mark.parametrize(("path", "payload", "status", "message"), [
    ("/sentiment", b"{not json", 400, "invalid JSON"),
    ("/sentiment", b"", 400, "invalid JSON"),
    ("/sentiment", b"\xff\xfe", 400, "invalid JSON"),
    ("/sentiment", [1, 2], 400, "the JSON body must be an object"),
    ("/sentiment", "just a string", 400, "the JSON body must be an object"),
    ("/sentiment", {}, 400, "missing field 'text'"),
    ("/sentiment", {"txt": "typo"}, 400, "missing field 'text'"),
    ("/sentiment", {"text": 42}, 400, "field 'text' must be a string"),
    ("/sentiment", {"text": None}, 400, "field 'text' must be a string"),
    ("/sentiment", {"text": ["a list"]}, 400, "field 'text' must be a string"),
    ("/sentiment", {"text": ""}, 400, "text cannot be empty"),
    ("/sentiment", {"text": " \t\n "}, 400, "text cannot be empty"),
    ("/sentiment", {"text": "a", "texts": ["b"]}, 400, "send either 'text' or 'texts', not both"),
    ("/sentiment", {"texts": "not a list"}, 400, "field 'texts' must be a list of strings"),
    ("/sentiment", {"texts": ["ok", 3]}, 400, "field 'texts' must be a list of strings"),
    ("/sentiment", {"texts": []}, 400, "field 'texts' cannot be an empty list"),
    ("/sentiment", {"texts": ["fine", "also fine", "  "]}, 400, "text at index 2 cannot be empty"),
    ("/sentiment", {"texts": ["x"] * 33}, 413, "batch too large: 33 texts, the limit is 32 per request"),
    ("/sentiment", {"text": "good", "top_k": 0}, 400, "'top_k' must be an integer >= 1 or null"),
    ("/sentiment", {"text": "good", "top_k": "2"}, 400, "'top_k' must be an integer >= 1 or null"),
    ("/sentiment", {"text": "good", "top_k": True}, 400, "'top_k' must be an integer >= 1 or null"),
    ("/sentiment", {"text": "good", "top_k": 1.5}, 400, "'top_k' must be an integer >= 1 or null"),
    ("/", {}, 400, "missing field 'inputs'"),
    ("/", {"inputs": ""}, 400, "text cannot be empty"),
    ("/", {"inputs": 7}, 400, "field 'inputs' must be a string or a list of strings"),
    ("/", {"inputs": ["ok", None]}, 400, "field 'inputs' must be a list of strings"),
    ("/", {"inputs": ["ok", ""]}, 400, "text at index 1 cannot be empty"),
    ("/", {"inputs": []}, 400, "field 'inputs' cannot be an empty list"),
    ("/", {"inputs": [{"text": "ok"}, "plain"]}, 400, "field 'inputs' must be a list of strings"),
    ("/", {"inputs": ["x"] * 40}, 413, "batch too large: 40 texts, the limit is 32 per request"),
    ("/", {"inputs": "ok", "parameters": []}, 400, "field 'parameters' must be an object"),
    ("/", {"inputs": "ok", "parameters": {"top_k": -1}}, 400, "'top_k' must be an integer >= 1 or null"),
    ("/", {"inputs": "ok", "parameters": {"function_to_apply": "relu"}}, 400,
     "parameter 'function_to_apply' must be one of softmax, sigmoid, none"),
])
def test_invalid_requests_get_one_json_error(client: FlaskClient, path: str, payload: Any, status: int,
                                             message: str) -> None:
    data = payload if isinstance(payload, bytes) else json.dumps(payload)
    response = client.post(path, data=data, content_type="application/json")
    assert response.status_code == status
    assert response.get_json() == {"error": message}


def test_single_text_answers_like_the_original_service(client: FlaskClient) -> None:
    response = client.post("/sentiment", json={"text": POSITIVE})
    assert response.status_code == 200
    body = response.get_json()
    assert set(body) == {"label", "score"} and body["label"] == "POSITIVE"
    assert isinstance(body["score"], float) and 0.5 < body["score"] <= 1.0
    assert client.post("/sentiment", json={"text": NEGATIVE}).get_json()["label"] == "NEGATIVE"


def test_batch_answers_in_input_order(client: FlaskClient) -> None:
    texts = [NEGATIVE, POSITIVE, NEGATIVE]
    body = client.post("/sentiment", json={"texts": texts}).get_json()
    assert [item["label"] for item in body] == ["NEGATIVE", "POSITIVE", "NEGATIVE"]
    assert all(set(item) == {"label", "score"} for item in body)
    assert len(client.post("/sentiment", json={"texts": ["ok"] * 32}).get_json()) == 32  # the limit itself


def test_top_k_returns_sorted_lists(client: FlaskClient) -> None:
    everything = client.post("/sentiment", json={"text": POSITIVE, "top_k": None}).get_json()
    assert [item["label"] for item in everything] == ["POSITIVE", "NEGATIVE"]
    assert everything[0]["score"] + everything[1]["score"] == pytest.approx(1.0)
    assert client.post("/sentiment", json={"text": POSITIVE, "top_k": 1}).get_json() == everything[:1]
    batch = client.post("/sentiment", json={"texts": [NEGATIVE, POSITIVE], "top_k": 2}).get_json()
    assert [[item["label"] for item in ranked] for ranked in batch] == [["NEGATIVE", "POSITIVE"],
                                                                        ["POSITIVE", "NEGATIVE"]]


def test_inference_api_route_returns_nested_lists(client: FlaskClient) -> None:
    single = client.post("/", json={"inputs": POSITIVE}).get_json()
    assert [[item["label"] for item in ranked] for ranked in single] == [["POSITIVE", "NEGATIVE"]]
    with_params = client.post("/", json={"inputs": POSITIVE, "parameters": {"top_k": 1}}).get_json()
    assert with_params == [single[0][:1]]
    batch = client.post("/", json={"inputs": [NEGATIVE, POSITIVE], "parameters": None}).get_json()
    assert [ranked[0]["label"] for ranked in batch] == ["NEGATIVE", "POSITIVE"]
    raw = client.post("/", json={"inputs": POSITIVE, "parameters": {"function_to_apply": "none"}}).get_json()
    logit_gap = raw[0][0]["score"] - raw[0][1]["score"]
    assert single[0][0]["score"] == pytest.approx(1 / (1 + np.exp(-logit_gap)), abs=1e-9)


@pytest.mark.parametrize("content_type", ["application/json", "application/x-www-form-urlencoded",
                                          "text/plain", None])
def test_json_bodies_are_accepted_whatever_their_content_type(client: FlaskClient,
                                                              content_type: str | None) -> None:
    response = client.post("/sentiment", data=json.dumps({"text": POSITIVE}), content_type=content_type)
    assert response.status_code == 200
    assert response.get_json()["label"] == "POSITIVE"


def test_multipart_bodies_are_refused(client: FlaskClient) -> None:
    response = client.post("/sentiment", data={"text": POSITIVE}, content_type="multipart/form-data")
    assert response.status_code == 415
    assert response.get_json() == {"error": "unsupported media type: send a JSON body "
                                             "(Content-Type: application/json)"}


def test_http_errors_are_json(client: FlaskClient) -> None:
    wrong_method = client.get("/sentiment")
    assert wrong_method.status_code == 405
    assert wrong_method.get_json() == {"error": "method not allowed"}
    assert set(wrong_method.headers["Allow"].split(", ")) == {"POST", "OPTIONS"}
    missing = client.get("/nowhere")
    assert missing.status_code == 404 and missing.get_json() == {"error": "not found"}
    too_large = client.post("/sentiment", data=json.dumps({"text": "a" * (2 * 1024 * 1024)}),
                            content_type="application/json")
    assert too_large.status_code == 413
    assert too_large.get_json() == {"error": "request body too large: the limit is 2097152 bytes"}


def test_large_text_under_the_body_limit_is_truncated(client: FlaskClient) -> None:
    response = client.post("/sentiment", json={"text": NEGATIVE + " really" * 15_000})  # ~105 KB
    assert response.status_code == 200
    assert response.get_json()["label"] == "NEGATIVE"


def test_health_ready_info(client: FlaskClient) -> None:
    assert client.get("/health").get_json() == {"status": "ok"}
    assert client.get("/ready").get_json() == {"status": "ready"}
    info = client.get("/info").get_json()
    assert info["model"]["name"] == "minilm-l6-sentiment"
    assert info["model"]["labels"] == ["NEGATIVE", "POSITIVE"]
    assert info["model"]["max_length"] == 256
    assert info["backend"] == "onnx"
    assert info["versions"]["onnxruntime"] and info["versions"]["waitress"]
    processes = usable_cores()  # one per core
    workers = min(2, usable_cores() // processes)
    assert info["threads"] == {"processes": processes, "waitress": 64 + 32 * workers + 32,
                               "ort_intra_op": max(1, usable_cores() // processes // workers),
                               "ort_inter_op": 1, "ort_spinning": True, "ort_lone_threads": 0,
                               "batch_workers": workers}
    assert info["batching"] == {"enabled": True, "express": True, "max_texts": 32, "max_tokens": 384, "wait_ms": 0,
                                "gather_ms": 1, "queue_timeout_s": 5.0}
    settings = client.application.extensions["service.settings"]
    assert info["limits"] == {"max_batch": 32, "max_content_length": 2097152, "max_queue": 64,
                              "connection_limit": settings.connection_limit}
    assert info["auth"] == {"api_key_required": False}
    assert info["cpus"] == sorted(os.sched_getaffinity(0))  # this process' CPUs: not pinned in-process
    manifest = json.loads((Path(client.application.extensions["service.classifier"].model_dir)
                           / "manifest.json").read_text())
    for key in ("quantization", "validation", "created_at"):
        assert info["model"][key] == manifest[key]
    # the source without the export machine's folders
    assert info["model"]["source"] == {k: v for k, v in manifest["source"].items() if k != "path"}
    assert "path" in manifest["source"]


def test_metrics_count_requests_and_batches(client: FlaskClient) -> None:
    client.post("/sentiment", json={"texts": [POSITIVE, NEGATIVE, POSITIVE]})
    client.post("/sentiment", json={"text": ""})
    text = client.get("/metrics").get_data(as_text=True)
    assert 'service_requests_total{method="POST",route="/sentiment",status="200"} 1.0' in text
    assert 'service_requests_total{method="POST",route="/sentiment",status="400"} 1.0' in text
    assert "service_batch_size_sum 3.0" in text
    assert "service_inference_duration_seconds_count 1.0" in text
    assert 'service_request_duration_seconds_count{route="/sentiment"} 2.0' in text


def test_ready_is_503_until_the_model_has_answered(tiny_models: dict[int, Path]) -> None:
    app = create_app({"MODEL_DIR": str(tiny_models[2]), "WARMUP": False})
    client = app.test_client()
    response = client.get("/ready")
    assert response.status_code == 503
    assert response.get_json() == {"status": "loading", "error": "model not warmed up yet"}
    assert client.post("/sentiment", json={"text": "a film"}).status_code == 200
    assert client.get("/ready").status_code == 200


@pytest.mark.parametrize("batching", [True, False])
def test_inference_failure_is_a_generic_500_with_the_cause_logged(
        tiny_models: dict[int, Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        batching: bool) -> None:
    classifier = Classifier(tiny_models[2])
    client = create_app({"MODEL_DIR": str(tiny_models[2]), "BATCHING": batching},
                        classifier=classifier).test_client()
    collate = classifier.collate

    def wrong_dtype(encodings: list) -> dict[str, np.ndarray]:
        feeds = collate(encodings)
        if len(encodings[0]) > 4:  # "a film" is [CLS] a film [SEP]: the long text fails
            feeds["input_ids"] = feeds["input_ids"].astype(np.float32)  # ORT rejects it for real
        return feeds

    monkeypatch.setattr(classifier, "collate", wrong_dtype)
    with caplog.at_level(logging.ERROR, logger="service.errors"):
        response = client.post("/sentiment", json={"text": "a dull and terrible film"},
                               headers={"X-Request-ID": "abc-123"})
    assert response.status_code == 500
    assert response.get_json() == {"error": "inference failed"}
    assert response.headers["X-Request-ID"] == "abc-123"
    assert "request abc-123: inference failed" in caplog.text
    assert "onnxruntime failed" in caplog.text
    # the service goes on serving
    assert client.post("/sentiment", json={"text": "a film"}).status_code == 200
    assert client.get("/ready").status_code == 200


def test_unexpected_errors_are_a_generic_500(tiny_models: dict[int, Path], monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    classifier = Classifier(tiny_models[2])
    client = create_app({"MODEL_DIR": str(tiny_models[2])}, classifier=classifier).test_client()

    def broken(*args: Any, **kwargs: Any) -> None:
        raise KeyError("/secret/internal/path")

    monkeypatch.setattr(classifier, "postprocess", broken)  # runs in the request thread, batching or not
    with caplog.at_level(logging.ERROR, logger="service.errors"):
        response = client.post("/sentiment", json={"text": "a film"})
    assert response.status_code == 500
    assert response.get_json() == {"error": "internal error"}
    assert "secret" not in response.get_data(as_text=True)
    assert "unhandled KeyError" in caplog.text and "Traceback" in caplog.text


@pytest.mark.parametrize(("path", "body", "status"), [
    ("/sentiment", {"text": "What a great movie."}, 200),
    ("/sentiment", {"text": 3}, 400),  # refused before its texts reach the queue
    ("/v2/models/minilm-l6-sentiment/infer", {"inputs": []}, 400),
    ("/nowhere", {"text": "x"}, 404),
])
def test_a_post_is_counted_on_its_way_to_the_queue_only_until_it_ends(app: Flask, client: FlaskClient,
                                                                       path: str, body: Any, status: int) -> None:
    scheduler = app.extensions["service.scheduler"]
    assert client.post(path, json=body).status_code == status
    assert scheduler.arriving == 0  # a leftover count would make every later run wait for it


def test_candidate_labels_need_a_zero_shot_model(client: FlaskClient) -> None:
    response = client.post("/", json={"inputs": "good", "parameters": {"candidate_labels": ["a", "b"]}})
    assert response.status_code == 400 and "needs an NLI model" in response.get_json()["error"]
    assert client.get("/info").get_json()["model"]["task"] == "text-classification"
