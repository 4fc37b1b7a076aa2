"""Fixtures: the real default model behind a real Waitress process, and a Flask client for fast properties."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from service.app import create_app
from service.classifier import Classifier
from tests.reliability.kit import DEFAULT_MODEL, Server, running_server, send


@pytest.fixture(scope="session")
def default_model() -> str:
    """Return the real default model folder, failing loudly when it has not been exported."""
    if not (DEFAULT_MODEL / "model.onnx").is_file():
        pytest.fail(f"the default model {DEFAULT_MODEL} is missing: run `make export` first", pytrace=False)
    return str(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def live(default_model: str) -> Iterator[Server]:
    """Return a real `python -m service` on a free port with the default settings."""
    with running_server(SERVICE_MODEL_DIR=default_model) as server:
        yield server


@pytest.fixture(scope="session")
def versions(live: Server) -> list[str]:
    """Return the library version strings /info publishes, which no other response may carry."""
    return [version for version in send(live, "GET", "/info").json()["versions"].values() if version]


@pytest.fixture(scope="session")
def client(default_model: str) -> FlaskClient:
    """Return a Flask test client of the real app (session-wide, so Hypothesis can reuse it)."""
    with pytest.MonkeyPatch.context() as patch:
        for key in [k for k in os.environ if k.startswith("SERVICE_")]:
            patch.delenv(key)  # the caller's SERVICE_* must not change what is tested
        classifier = Classifier(Path(default_model), intra_op_threads=2)
        return create_app({"MODEL_DIR": default_model, "TESTING": True}, classifier=classifier).test_client()
