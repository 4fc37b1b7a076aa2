"""Fixtures: the real default model, Flask apps and clients, tiny models and a real Waitress process."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from service import create_app
from service.classifier import Classifier
from tests.testkit import DEFAULT_MODEL, Server, build_tiny_model, running_server


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """Return the real default model folder, failing loudly when it has not been exported."""
    if not (DEFAULT_MODEL / "model.onnx").is_file():
        pytest.fail(f"the default model {DEFAULT_MODEL} is missing: run `make export` first", pytrace=False)
    return DEFAULT_MODEL


@pytest.fixture(scope="session")
def classifier(model_dir: Path) -> Classifier:
    """Return one warmed-up classifier of the default model for the whole session."""
    loaded = Classifier(model_dir, intra_op_threads=2)
    loaded.warmup()
    return loaded


@pytest.fixture
def app(model_dir: Path, classifier: Classifier, monkeypatch: pytest.MonkeyPatch) -> Flask:
    """Return an app on the real default model, isolated from SERVICE_* variables of the caller."""
    for key in [k for k in os.environ if k.startswith("SERVICE_")]:
        monkeypatch.delenv(key)
    return create_app({"MODEL_DIR": str(model_dir), "TESTING": True}, classifier=classifier)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """Return a Flask test client of the real app."""
    return app.test_client()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Return tiny random BERT model folders with 2 and 3 labels (built once per session)."""
    root = tmp_path_factory.mktemp("tiny")
    return {2: build_tiny_model(root / "tiny-2", ["NEGATIVE", "POSITIVE"]),
            3: build_tiny_model(root / "tiny-3", ["negative", "neutral", "positive"])}


@pytest.fixture(scope="session")
def server(model_dir: Path) -> Iterator[Server]:
    """Return a real Waitress process serving the default model, for the whole session."""
    with running_server(SERVICE_MODEL_DIR=str(model_dir), SERVICE_THREADS="8") as started:
        yield started
