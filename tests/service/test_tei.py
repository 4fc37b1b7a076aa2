"""TEI's classifier routes: /predict, /rerank and /tokenize answer as text-embeddings-inference does.

The schemas below encode TEI v1.9.3's contract (its OpenAPI document and router types): responses
must validate against them, so a TEI client can switch to this service.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from flask import Flask
from flask.testing import FlaskClient

from service.app import create_app
from service.classifier import Classifier, InferenceError, apply_function
from tests.testkit import NEGATIVE, POSITIVE, build_tiny_model, pytorch_pair_logits

PREDICTION = {"type": "object", "required": ["score", "label"],
              "properties": {"label": {"type": "string"}, "score": {"type": "number"}}}
TEI = {
    "PredictResponse": {"oneOf": [{"type": "array", "items": PREDICTION},
                                  {"type": "array", "items": {"type": "array", "items": PREDICTION}}]},
    "RerankResponse": {"type": "array", "items": {
        "type": "object", "required": ["index", "score"],
        "properties": {"index": {"type": "integer", "minimum": 0}, "score": {"type": "number"},
                       "text": {"type": ["string", "null"]}}}},
    "TokenizeResponse": {"type": "array", "items": {"type": "array", "items": {
        "type": "object", "required": ["id", "text", "special"],
        "properties": {"id": {"type": "integer", "minimum": 0}, "special": {"type": "boolean"},
                       "start": {"type": ["integer", "null"], "minimum": 0},
                       "stop": {"type": ["integer", "null"], "minimum": 0}, "text": {"type": "string"}}}}},
    "ErrorResponse": {"type": "object", "required": ["error", "error_type"], "properties": {
        "error": {"type": "string"},
        "error_type": {"enum": ["Unhealthy", "Backend", "Overloaded", "Validation", "Tokenizer", "Empty"]}}},
}


def tei_valid(value: Any, schema: str) -> bool:
    """Return whether value validates against TEI's schema of that name."""
    return jsonschema.Draft202012Validator(TEI[schema]).is_valid(value)


def test_the_schema_check_can_fail() -> None:
    assert not tei_valid([{"label": "x"}], "PredictResponse")
    assert not tei_valid([{"index": -1, "score": 0.5}], "RerankResponse")
    assert not tei_valid({"error": "x", "error_type": "validation"}, "ErrorResponse")  # TEI's are capitalised


@pytest.fixture(scope="module")
def reranker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Return a tiny random one-label BERT cross-encoder (token_type_ids), exported with optimum."""
    return build_tiny_model(tmp_path_factory.mktemp("tei") / "tiny-reranker", ["relevance"])


@pytest.fixture(scope="module")
def rerank_client(reranker: Path) -> FlaskClient:
    """Return a client of the service on the tiny cross-encoder."""
    with pytest.MonkeyPatch.context() as patch:
        for key in [k for k in os.environ if k.startswith("SERVICE_")]:
            patch.delenv(key)
        return create_app({"MODEL_DIR": str(reranker), "TESTING": True}).test_client()


def _softmax_ranked(logits: np.ndarray, labels: list[str]) -> list[dict[str, Any]]:
    scores = apply_function(logits[None, :], "softmax")[0]
    return sorted(({"label": label, "score": float(s)} for label, s in zip(labels, scores, strict=True)),
                  key=lambda p: -p["score"])


def test_predict_one_text_answers_every_label_sorted(client: FlaskClient, classifier: Classifier) -> None:
    response = client.post("/predict", json={"inputs": POSITIVE})
    assert response.status_code == 200 and tei_valid(response.get_json(), "PredictResponse")
    body = response.get_json()
    assert [p["label"] for p in body] == ["POSITIVE", "NEGATIVE"]
    expected = _softmax_ranked(classifier.logits([POSITIVE])[0], classifier.labels)
    assert [p["score"] for p in body] == pytest.approx([p["score"] for p in expected], abs=1e-6)
    # the same scores as the Inference API route
    assert body == client.post("/", json={"inputs": POSITIVE}).get_json()[0]


def test_predict_reads_inputs_as_tei_does(client: FlaskClient, classifier: Classifier) -> None:
    pair = client.post("/predict", json={"inputs": [NEGATIVE, POSITIVE]}).get_json()  # one pair, not two texts
    assert tei_valid(pair, "PredictResponse") and isinstance(pair[0], dict)
    expected = _softmax_ranked(classifier.logits([(NEGATIVE, POSITIVE)])[0], classifier.labels)
    assert [p["score"] for p in pair] == pytest.approx([p["score"] for p in expected], abs=1e-6)
    batch = client.post("/predict", json={"inputs": [[POSITIVE], [NEGATIVE, POSITIVE], [NEGATIVE]]}).get_json()
    assert tei_valid(batch, "PredictResponse") and len(batch) == 3
    assert [ranked[0]["label"] for ranked in batch] == [
        ranked[0]["label"] for ranked in classifier.classify([POSITIVE, (NEGATIVE, POSITIVE), NEGATIVE])]
    assert batch[1] == pair
    single = client.post("/predict", json={"inputs": [POSITIVE]}).get_json()  # ["a"] is one text
    assert single == client.post("/predict", json={"inputs": POSITIVE}).get_json()


def test_predict_raw_scores_are_the_logits(client: FlaskClient, classifier: Classifier) -> None:
    body = client.post("/predict", json={"inputs": NEGATIVE, "raw_scores": True}).get_json()
    logits = classifier.logits([NEGATIVE])[0]
    assert {p["label"]: p["score"] for p in body} == pytest.approx(
        dict(zip(classifier.labels, logits.tolist(), strict=True)), abs=1e-5)
    assert body[0]["score"] >= body[1]["score"]


def test_truncation_direction_and_refusal(client: FlaskClient, classifier: Classifier) -> None:
    long_text = POSITIVE + " and then" * 200 + " " + NEGATIVE
    for direction in ("right", "Left", "left"):
        body = client.post("/predict", json={"inputs": long_text, "truncation_direction": direction}).get_json()
        side = direction.lower()
        expected = classifier.postprocess(classifier.logits([long_text], direction=side), None)[0]
        assert [p["label"] for p in body] == [p["label"] for p in expected]
        assert body[0]["score"] == pytest.approx(expected[0]["score"], abs=1e-6)
    right = client.post("/predict", json={"inputs": long_text, "raw_scores": True}).get_json()
    left = client.post("/predict", json={"inputs": long_text, "raw_scores": True,
                                         "truncation_direction": "left"}).get_json()
    assert right != left  # different ends of the text were kept
    refused = client.post("/predict", json={"inputs": long_text, "truncate": False})
    assert refused.status_code == 422 and tei_valid(refused.get_json(), "ErrorResponse")
    assert "256 tokens" in refused.get_json()["error"]
    assert client.post("/predict", json={"inputs": "short", "truncate": False}).status_code == 200


@pytest.mark.parametrize(("payload", "status", "error_type"), [
    ({"inputs": []}, 400, "Empty"),
    ({"inputs": ["a", "b", "c"]}, 422, "Validation"),  # a sequence is one text or a pair
    ({"inputs": [["a"], ["a", "b", "c"]]}, 422, "Validation"),
    ({"inputs": [["x"]] * 33}, 422, "Validation"),  # SERVICE_MAX_BATCH
    ({"inputs": 5}, 422, "Validation"),
    ({}, 422, "Validation"),
    ({"inputs": "x", "truncation_direction": "up"}, 422, "Validation"),
    ({"inputs": "x", "raw_scores": "yes"}, 422, "Validation"),
    ({"inputs": "x", "truncate": 1}, 422, "Validation"),
    ({"inputs": "\ud800"}, 422, "Validation"),
])
def test_predict_errors_are_tei_errors(client: FlaskClient, payload: dict, status: int, error_type: str) -> None:
    response = client.post("/predict", json=payload)
    assert response.status_code == status
    assert tei_valid(response.get_json(), "ErrorResponse") and response.get_json()["error_type"] == error_type


@pytest.mark.parametrize(("path", "payload", "status", "error_type", "message"), [
    ("/predict", {"inputs": []}, 400, "Empty", "Batch is empty"),
    ("/predict", {"inputs": ["a", "b", "c"]}, 422, "Validation", "'inputs' must be [text] or [text, text_pair]"),
    ("/predict", {"inputs": ["a", 5]}, 422, "Validation", "'inputs[1]' must be a string"),
    ("/predict", {"inputs": [["a"], "b"]}, 422, "Validation", "'inputs[1]' must be [text] or [text, text_pair]"),
    ("/predict", {"inputs": [["a"], []]}, 422, "Validation", "'inputs[1]' must be [text] or [text, text_pair]"),
    ("/predict", {"inputs": [["a"], ["b", None]]}, 422, "Validation", "'inputs[1][1]' must be a string"),
    ("/predict", {"inputs": [["x"]] * 33}, 422, "Validation", "batch size 33 > maximum allowed batch size 32"),
    ("/predict", {"inputs": [["a", "\ud800"]]}, 422, "Validation",
     "inputs[0][1] is not valid Unicode: lone surrogate at character 0"),
    ("/rerank", {"query": "q", "texts": []}, 400, "Empty", "`texts` cannot be empty"),
    ("/rerank", {"query": "q"}, 422, "Validation", "missing field 'texts'"),
    ("/rerank", {}, 422, "Validation", "missing field 'query' and missing field 'texts'"),
    ("/rerank", {"query": 3, "texts": ["a"]}, 422, "Validation", "'query' must be a string"),
    ("/rerank", {"query": "q", "texts": ["a", 3]}, 422, "Validation", "'texts[1]' must be a string"),
    ("/rerank", {"query": "q", "texts": ["a"] * 33}, 422, "Validation",
     "batch size 33 > maximum allowed batch size 32"),
    ("/tokenize", {"inputs": []}, 400, "Empty", "Batch is empty"),
    ("/tokenize", {"inputs": ["a", {}]}, 422, "Validation", "'inputs[1]' must be a string"),
    ("/tokenize", {"inputs": 3}, 422, "Validation", "'inputs' must be a string or a list of strings"),
])
def test_tei_input_errors_name_the_bad_value(client: FlaskClient, path: str, payload: dict, status: int,
                                             error_type: str, message: str) -> None:
    # the inputs' declarations in service/tei.py make these answers and the OpenAPI document's schemas
    response = client.post(path, json=payload)
    assert (response.status_code, response.get_json()) == (status, {"error": message, "error_type": error_type})


def test_invalid_json_is_a_tei_error(client: FlaskClient) -> None:
    for path in ("/predict", "/rerank", "/tokenize"):
        response = client.post(path, data=b"{broken", content_type="application/json")
        assert response.status_code == 400 and tei_valid(response.get_json(), "ErrorResponse")


@pytest.mark.parametrize("inputs", ["", [""], ["", ""], [["a"], [""]]])
def test_an_empty_input_is_refused_as_in_tei(client: FlaskClient, inputs: Any) -> None:
    response = client.post("/predict", json={"inputs": inputs})
    assert response.status_code == 422 and tei_valid(response.get_json(), "ErrorResponse")
    assert response.get_json() == {"error": "`inputs` cannot be empty", "error_type": "Validation"}


def test_blank_texts_and_half_empty_pairs_are_inputs_as_in_tei(client: FlaskClient) -> None:
    assert client.post("/predict", json={"inputs": " "}).status_code == 200
    assert client.post("/predict", json={"inputs": ["", "a text"]}).status_code == 200


def test_rerank_scores_each_text_against_the_query_like_pytorch(rerank_client: FlaskClient,
                                                                reranker: Path) -> None:
    query = "a wonderful film"
    texts = ["the plot is dull and the acting is terrible", "a wonderful, moving film with a great cast",
             "i loved every minute of it", "boring, predictable and far too long"]
    response = rerank_client.post("/rerank", json={"query": query, "texts": texts})
    assert response.status_code == 200 and tei_valid(response.get_json(), "RerankResponse")
    ranks = response.get_json()
    assert sorted(rank["index"] for rank in ranks) == [0, 1, 2, 3] and all("text" not in r for r in ranks)
    assert [r["score"] for r in ranks] == sorted((r["score"] for r in ranks), reverse=True)
    logits = pytorch_pair_logits(reranker.parent / f"{reranker.name}-checkpoint", [(query, t) for t in texts])[:, 0]
    for rank in ranks:
        assert rank["score"] == pytest.approx(1 / (1 + np.exp(-logits[rank["index"]])), abs=1e-4)
    raw = rerank_client.post("/rerank", json={"query": query, "texts": texts, "raw_scores": True,
                                              "return_text": True, "top_n": 2}).get_json()
    assert len(raw) == 2 and [r["index"] for r in raw] == [r["index"] for r in ranks[:2]]
    for rank in raw:
        assert rank["text"] == texts[rank["index"]]
        assert rank["score"] == pytest.approx(float(logits[rank["index"]]), abs=1e-4)


@pytest.mark.parametrize(("payload", "status", "error_type"), [
    ({"query": "q", "texts": []}, 400, "Empty"),
    ({"query": "q"}, 422, "Validation"),
    ({"query": 3, "texts": ["a"]}, 422, "Validation"),
    ({"query": "q", "texts": "a"}, 422, "Validation"),
    ({"query": "q", "texts": ["a"] * 33}, 422, "Validation"),
    ({"query": "q", "texts": ["a"], "top_n": 0}, 422, "Validation"),
    ({"query": "q", "texts": ["word " * 300], "truncate": False}, 422, "Validation"),
])
def test_rerank_errors_are_tei_errors(rerank_client: FlaskClient, payload: dict, status: int,
                                      error_type: str) -> None:
    response = rerank_client.post("/rerank", json=payload)
    assert response.status_code == status
    assert tei_valid(response.get_json(), "ErrorResponse") and response.get_json()["error_type"] == error_type


def test_rerank_needs_a_one_label_model(client: FlaskClient) -> None:
    response = client.post("/rerank", json={"query": "q", "texts": ["a"]})
    assert response.status_code == 424 and response.get_json()["error_type"] == "Backend"
    assert "one label" in response.get_json()["error"]


def test_tokenize_returns_every_token_with_offsets(client: FlaskClient, classifier: Classifier) -> None:
    body = client.post("/tokenize", json={"inputs": "Ça va? Wonderful!"}).get_json()
    assert tei_valid(body, "TokenizeResponse") and len(body) == 1
    assert body == classifier.tokens(["Ça va? Wonderful!"])
    assert body[0][0]["special"] and body[0][0]["start"] is None
    many = client.post("/tokenize", json={"inputs": ["a", "word " * 400], "add_special_tokens": False}).get_json()
    assert [len(tokens) for tokens in many] == [1, 400]  # not truncated
    assert client.post("/tokenize", json={"inputs": []}).status_code == 400
    response = client.post("/tokenize", json={"inputs": "x", "prompt_name": "query"})
    assert response.status_code == 422 and response.get_json()["error_type"] == "Validation"
    huge = client.post("/tokenize", json={"inputs": "x " * 20_000})
    assert huge.status_code == 422 and "characters" in huge.get_json()["error"]


@pytest.fixture
def stopped_app(model_dir: Path, classifier: Classifier, monkeypatch: pytest.MonkeyPatch) -> Iterator[Flask]:
    """Return an app whose batch scheduler has stopped: every request to the model is refused."""
    for key in [k for k in os.environ if k.startswith("SERVICE_")]:
        monkeypatch.delenv(key)
    app = create_app({"MODEL_DIR": str(model_dir), "TESTING": True}, classifier=classifier)
    app.extensions["service.scheduler"].stop(timeout=0)
    yield app


def test_overload_is_429_with_retry_after(stopped_app: Flask) -> None:
    response = stopped_app.test_client().post("/predict", json={"inputs": POSITIVE})
    assert response.status_code == 429 and int(response.headers["Retry-After"]) >= 1
    assert response.get_json()["error_type"] == "Overloaded"
    assert stopped_app.test_client().post("/", json={"inputs": POSITIVE}).status_code == 503  # our routes: 503


def test_a_model_failure_is_424_backend(client: FlaskClient, classifier: Classifier,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(feeds: dict[str, np.ndarray], alone: bool = True) -> np.ndarray:
        raise InferenceError("injected")

    monkeypatch.setattr(classifier, "run", failing)
    response = client.post("/predict", json={"inputs": POSITIVE})
    assert response.status_code == 424
    assert response.get_json() == {"error": "inference failed", "error_type": "Backend"}


def test_a_body_over_the_limit_is_413_with_an_error_type(model_dir: Path, classifier: Classifier,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVICE_MAX_CONTENT_LENGTH", "100")
    client = create_app({"MODEL_DIR": str(model_dir), "TESTING": True}, classifier=classifier).test_client()
    response = client.post("/predict", data=json.dumps({"inputs": "x" * 200}), content_type="application/json")
    assert response.status_code == 413 and response.get_json()["error_type"] == "Validation"


@pytest.mark.parametrize("value", [True, False, None, 1, 2.0, -1, "x", "RIGHT", "left", [], {}])
def test_each_declared_option_answers_as_its_declaration_says(client: FlaskClient, value: Any) -> None:
    from service.contract import conforms
    from service.tei import OPTIONS, TOKENIZE_OPTIONS

    document = client.get("/openapi.json").get_json()["components"]["schemas"]
    for path, declared, schema in (("/predict", OPTIONS, "PredictRequest"),
                                   ("/tokenize", TOKENIZE_OPTIONS, "TokenizeRequest")):
        for param in declared:
            assert document[schema]["properties"][param.name]["anyOf"][0] == param.schema
            folded = value.lower() if param.fold_case and isinstance(value, str) else value
            response = client.post(path, json={"inputs": "a film", param.name: value})
            refused = response.status_code == 422 and response.get_json() == {"error": param.message,
                                                                              "error_type": "Validation"}
            assert refused == (value is not None and not conforms(folded, param.schema)), (path, param.name)
