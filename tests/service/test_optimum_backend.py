"""The optimum backend (Optimum's ORTModel in a transformers pipeline, the benchmark's peer) answers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.app import create_app
from tests.testkit import NEGATIVE, POSITIVE


def test_optimum_backend_classifies_the_default_model(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("SERVICE_")]:
        monkeypatch.delenv(key)
    client = create_app({"MODEL_DIR": str(model_dir), "BACKEND": "optimum", "ORT_THREADS": 2}).test_client()
    positive = client.post("/sentiment", json={"text": POSITIVE})
    negative = client.post("/sentiment", json={"text": NEGATIVE})
    assert (positive.status_code, negative.status_code) == (200, 200)
    assert positive.get_json()["label"] == "POSITIVE" and positive.get_json()["score"] > 0.9
    assert negative.get_json()["label"] == "NEGATIVE"
    info = client.get("/info").get_json()
    assert info["backend"] == "optimum" and info["versions"]["optimum"]
