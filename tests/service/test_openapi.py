"""The OpenAPI document stays true to the routes and to the real responses."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from service.app import create_app
from service.classifier import Classifier
from tests.testkit import NEGATIVE, POSITIVE, schema_errors

IGNORED_METHODS = {"HEAD", "OPTIONS"}  # added by Flask and Werkzeug to every rule


def test_every_route_is_documented_and_every_documented_route_exists(client: FlaskClient) -> None:
    document = client.get("/openapi.json").get_json()
    assert document["openapi"].startswith("3.1")
    # Werkzeug's <name> is OpenAPI's {name}
    routes = {(re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule), method.lower())
              for rule in client.application.url_map.iter_rules() for method in rule.methods - IGNORED_METHODS}
    documented = {(path, method) for path, item in document["paths"].items() for method in item}
    assert routes == documented


def test_every_reference_resolves(client: FlaskClient) -> None:
    text = client.get("/openapi.json").get_data(as_text=True)
    schemas = json.loads(text)["components"]["schemas"]
    references = {part.split('"')[0] for part in text.split('"#/components/schemas/')[1:]}
    assert references and references <= set(schemas)


CASES: list[tuple[str, str, Any, int]] = [
    ("post", "/sentiment", {"text": POSITIVE}, 200),
    ("post", "/sentiment", {"texts": [POSITIVE, NEGATIVE]}, 200),
    ("post", "/sentiment", {"text": POSITIVE, "top_k": None}, 200),
    ("post", "/sentiment", {"texts": [POSITIVE, NEGATIVE], "top_k": 1}, 200),
    ("post", "/sentiment", {"text": ""}, 400),
    ("post", "/sentiment", {"texts": ["x"] * 33}, 413),
    ("post", "/", {"inputs": POSITIVE}, 200),
    ("post", "/", {"inputs": [POSITIVE, NEGATIVE], "parameters": {"top_k": 1}}, 200),
    ("post", "/", {"inputs": 3}, 400),
    ("get", "/health", None, 200),
    ("get", "/ready", None, 200),
    ("get", "/info", None, 200),
]


@pytest.mark.parametrize(("method", "path", "payload", "status"), CASES)
def test_real_requests_and_responses_match_the_documented_schemas(client: FlaskClient, method: str, path: str,
                                                                  payload: Any, status: int) -> None:
    document = client.get("/openapi.json").get_json()
    operation = document["paths"][path][method]
    if payload is not None and status == 200:
        request_schema = operation["requestBody"]["content"]["application/json"]["schema"]
        assert schema_errors(payload, request_schema, document) == []
    response = client.open(path, method=method.upper(), json=payload)
    assert response.status_code == status
    documented = operation["responses"][str(status)]["content"]["application/json"]["schema"]
    assert schema_errors(response.get_json(), documented, document) == []


def test_the_schema_check_can_fail(client: FlaskClient) -> None:
    document = client.get("/openapi.json").get_json()
    prediction = {"$ref": "#/components/schemas/Prediction"}
    assert schema_errors({"label": "POSITIVE", "score": "high"}, prediction, document)
    assert schema_errors({"label": "POSITIVE"}, prediction, document)
    assert schema_errors([[{"label": "x", "score": 1.0}]], {"$ref": "#/components/schemas/SentimentResponse"},
                         document) == []
    assert schema_errors([{"label": "x", "score": 1.0}], {"$ref": "#/components/schemas/InferenceResponse"},
                         document)


def test_with_an_api_key_the_document_asks_for_it_except_on_probes(model_dir: Path, classifier: Classifier,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVICE_API_KEY", "k3y")
    document = create_app({"MODEL_DIR": str(model_dir)}, classifier=classifier).test_client() \
        .get("/openapi.json").get_json()
    assert document["security"] == [{"bearerAuth": []}]
    scheme = document["components"]["securitySchemes"]["bearerAuth"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    for path, item in document["paths"].items():
        for operation in item.values():
            if path in ("/health", "/ready", "/models/{served_model}/ready", "/openapi.json", "/v2/health/live",
                        "/v2/health/ready"):
                assert operation["security"] == [] and "401" not in operation["responses"]
            else:
                assert "security" not in operation  # the document-wide requirement applies
                assert operation["responses"]["401"]["headers"]["WWW-Authenticate"]


def test_without_a_key_no_401_is_documented_and_503_carries_retry_after(client: FlaskClient) -> None:
    document = client.get("/openapi.json").get_json()
    assert "security" not in document
    assert all("401" not in operation["responses"] for item in document["paths"].values()
               for operation in item.values())
    for path in ("/sentiment", "/"):
        assert "Retry-After" in document["paths"][path]["post"]["responses"]["503"]["headers"]
