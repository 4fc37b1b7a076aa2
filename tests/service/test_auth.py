"""The optional API key: Bearer authentication on every route but the probes and the API document."""

from __future__ import annotations

import http.client
import json
import os
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from flask import Flask
from flask.testing import FlaskClient

from service.app import create_app
from service.classifier import Classifier
from service.config import ConfigError, Settings
from tests.testkit import POSITIVE, running_server

KEY = "s3cr3t-K3y_with.allowed~chars/+="


@pytest.fixture
def locked(model_dir: Path, classifier: Classifier, monkeypatch: pytest.MonkeyPatch) -> FlaskClient:
    """Return a client of an app that requires KEY, configured through the environment as in production."""
    for key in [k for k in os.environ if k.startswith("SERVICE_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("SERVICE_API_KEY", KEY)
    app: Flask = create_app({"MODEL_DIR": str(model_dir)}, classifier=classifier)
    return app.test_client()


@pytest.mark.parametrize(("method", "path"), [("POST", "/sentiment"), ("POST", "/"), ("GET", "/info"),
                                              ("GET", "/metrics"), ("GET", "/no/such/path")])
@pytest.mark.parametrize(("authorization", "message", "challenge"), [
    (None, "missing API key: send the header Authorization: Bearer <key>", 'Bearer realm="onnx-classifier"'),
    ("Bearer", "missing API key: send the header Authorization: Bearer <key>", 'Bearer realm="onnx-classifier"'),
    (f"Basic {KEY}", "missing API key: send the header Authorization: Bearer <key>",
     'Bearer realm="onnx-classifier"'),
    ("Bearer wrong", "invalid API key", 'Bearer realm="onnx-classifier", error="invalid_token"'),
    (f"Bearer {KEY[:-1]}", "invalid API key", 'Bearer realm="onnx-classifier", error="invalid_token"'),
    (f"Bearer {KEY}x", "invalid API key", 'Bearer realm="onnx-classifier", error="invalid_token"'),
])
def test_requests_without_the_right_key_get_401_json(locked: FlaskClient, method: str, path: str,
                                                     authorization: str | None, message: str,
                                                     challenge: str) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    response = locked.open(path, method=method, json={"text": POSITIVE}, headers=headers)
    assert response.status_code == 401
    assert response.get_json() == {"error": message}
    assert response.headers["WWW-Authenticate"] == challenge
    assert KEY not in response.get_data(as_text=True)


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_the_right_key_opens_every_route(locked: FlaskClient, scheme: str) -> None:
    headers = {"Authorization": f"{scheme} {KEY}"}
    response = locked.post("/sentiment", json={"text": POSITIVE}, headers=headers)
    assert response.status_code == 200 and response.get_json()["label"] == "POSITIVE"
    assert locked.post("/", json={"inputs": POSITIVE}, headers=headers).status_code == 200
    info = locked.get("/info", headers=headers)
    assert info.status_code == 200 and info.get_json()["auth"] == {"api_key_required": True}
    assert KEY not in info.get_data(as_text=True)
    assert locked.get("/metrics", headers=headers).status_code == 200
    assert locked.post("/sentiment", json={"text": ""}, headers=headers).status_code == 400


def test_probes_and_the_api_document_stay_open(locked: FlaskClient) -> None:
    assert locked.get("/health").status_code == 200
    assert locked.get("/ready").status_code == 200
    document = locked.get("/openapi.json")
    assert document.status_code == 200
    assert document.get_json()["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"


@pytest.mark.parametrize(("value", "message"), [
    ("", "SERVICE_API_KEY must not be empty (unset it to turn authentication off)"),
    ("   ", "SERVICE_API_KEY must not be empty (unset it to turn authentication off)"),
    ("two words", "SERVICE_API_KEY must be printable ASCII without spaces (a Bearer token)"),
    ("clé", "SERVICE_API_KEY must be printable ASCII without spaces (a Bearer token)"),
])
def test_unusable_keys_stop_start_up_without_showing_the_key(tmp_path: Path, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_mapping({"MODEL_DIR": str(tmp_path), "API_KEY": value})
    assert str(caught.value) == message


def test_the_key_never_reaches_the_log_or_the_settings_repr(model_dir: Path) -> None:
    assert KEY not in repr(Settings.from_mapping({"MODEL_DIR": str(model_dir), "API_KEY": KEY}))
    with running_server(SERVICE_MODEL_DIR=str(model_dir), SERVICE_API_KEY=KEY) as server:
        address = urlsplit(server.url)
        for headers in ({}, {"Authorization": f"Bearer {KEY}"}, {"Authorization": "Bearer wrong"}):
            connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
            connection.request("POST", "/sentiment", body=json.dumps({"text": POSITIVE}),
                               headers={"Content-Type": "application/json", **headers})
            response = connection.getresponse()
            assert response.status == (200 if headers.get("Authorization", "").endswith(KEY) else 401)
            response.read()
            connection.close()
    log = "".join(server.log)
    assert "API key required" in log
    assert KEY not in log
