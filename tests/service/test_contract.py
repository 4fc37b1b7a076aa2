"""The ONNX service answers like the PyTorch reference (the original pipeline) on the same requests.

Two pairs: a tiny random BERT (its fp32 ONNX export against its checkpoint: every status and key,
numbers within float rounding) in the default tier, and the default model (int8 against the trained
fp32 checkpoint) in the slow tier, since a clean machine first trains that checkpoint (minutes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from service.app import create_app
from service.classifier import Classifier
from tests.testkit import NEGATIVE, POSITIVE

# int8 against fp32: on borderline review snippets the gap reaches 0.3 and labels can flip, so only
# clearly polar texts are compared, with room for int8's rounding. fp32 against fp32: float rounding.
TOLERANCES = {"default": (0.05, 0.25), "tiny": (1e-4, 1e-4)}  # probabilities, raw logits

LONG = NEGATIVE + " Honestly," + " it just kept going" * 3_000  # truncated to 256 tokens by both
REQUESTS: list[tuple[str, str, Any]] = [
    ("POST", "/sentiment", {"text": POSITIVE}),
    ("POST", "/sentiment", {"text": NEGATIVE}),
    ("POST", "/sentiment", {"text": LONG}),
    ("POST", "/sentiment", {"text": "Ce film était magnifique, j'ai adoré! 🎬 Wonderful, brilliant."}),
    ("POST", "/sentiment", {"texts": [POSITIVE, NEGATIVE, "Terrible. I hated it."]}),
    ("POST", "/sentiment", {"text": POSITIVE, "top_k": None}),
    ("POST", "/sentiment", {"texts": [NEGATIVE, POSITIVE], "top_k": 1}),
    ("POST", "/", {"inputs": POSITIVE}),
    ("POST", "/", {"inputs": [NEGATIVE, POSITIVE], "parameters": {"top_k": 1}}),
    ("POST", "/", {"inputs": POSITIVE, "parameters": {"function_to_apply": "sigmoid"}}),
    ("POST", "/", {"inputs": NEGATIVE, "parameters": {"function_to_apply": "none"}}),
    ("POST", "/sentiment", {"text": ""}),
    ("POST", "/sentiment", {"text": "   "}),
    ("POST", "/sentiment", {}),
    ("POST", "/sentiment", {"text": 5}),
    ("POST", "/sentiment", {"texts": ["ok", ""]}),
    ("POST", "/sentiment", {"texts": ["x"] * 33}),
    ("POST", "/sentiment", b"{broken"),
    ("POST", "/", {"inputs": "ok", "parameters": {"top_k": 0}}),
    ("GET", "/sentiment", None),
    ("GET", "/missing", None),
    ("GET", "/health", None),
    ("GET", "/ready", None),
]


@pytest.fixture(scope="session")
def default_pair(model_dir: Path, classifier: Classifier) -> tuple[Flask, Flask]:
    """Return the default model's app and the PyTorch reference on its fp32 checkpoint."""
    from export.recipe import ensure_checkpoint

    # Cached after `make export` or the slow recipe test; on a clean machine this trains it (minutes).
    checkpoint = ensure_checkpoint()
    return (create_app({"MODEL_DIR": str(model_dir)}, classifier=classifier),
            create_app({"MODEL_DIR": str(checkpoint), "BACKEND": "pytorch", "ORT_THREADS": 2}))


@pytest.fixture(scope="session")
def tiny_pair(tiny_models: dict[int, Path]) -> tuple[Flask, Flask]:
    """Return a tiny model's ONNX app and the PyTorch reference on the checkpoint it was exported from."""
    folder = tiny_models[3]
    checkpoint = folder.parent / f"{folder.name}-checkpoint"
    return (create_app({"MODEL_DIR": str(folder), "ORT_THREADS": 1}),
            create_app({"MODEL_DIR": str(checkpoint), "BACKEND": "pytorch", "ORT_THREADS": 1}))


@pytest.fixture(params=["tiny", pytest.param("default", marks=pytest.mark.slow)])
def pair(request: pytest.FixtureRequest) -> tuple[str, Flask, Flask]:
    """Return which model, the ONNX app and its PyTorch reference."""
    return (request.param, *request.getfixturevalue(f"{request.param}_pair"))


def send(client: FlaskClient, method: str, path: str, payload: Any) -> tuple[int, Any]:
    """Send one request; return the status and the JSON body."""
    if payload is None:
        response = client.open(path, method=method)
    else:
        data = payload if isinstance(payload, bytes) else json.dumps(payload)
        response = client.open(path, method=method, data=data, content_type="application/json")
    return response.status_code, response.get_json()


def differences(ours: Any, reference: Any, tolerance: float, where: str = "$") -> list[str]:
    """Return where two JSON bodies differ: structure, keys, types, strings exactly, numbers within tolerance."""
    if type(ours) is not type(reference):
        return [f"{where}: {type(ours).__name__} vs {type(reference).__name__}"]
    if isinstance(ours, dict):
        if ours.keys() != reference.keys():
            return [f"{where}: keys {sorted(ours)} vs {sorted(reference)}"]
        return [d for key in ours for d in differences(ours[key], reference[key], tolerance, f"{where}.{key}")]
    if isinstance(ours, list):
        if len(ours) != len(reference):
            return [f"{where}: {len(ours)} vs {len(reference)} items"]
        return [d for i, (a, b) in enumerate(zip(ours, reference, strict=True))
                for d in differences(a, b, tolerance, f"{where}[{i}]")]
    if isinstance(ours, float):
        return [] if abs(ours - reference) <= tolerance else [f"{where}: {ours} vs {reference}"]
    return [] if ours == reference else [f"{where}: {ours!r} vs {reference!r}"]


@pytest.mark.parametrize(("method", "path", "payload"), REQUESTS,
                         ids=[f"{m} {p} {str(b)[:40]}" for m, p, b in REQUESTS])
def test_onnx_answers_like_the_pytorch_reference(pair: tuple[str, Flask, Flask], method: str, path: str,
                                                 payload: Any) -> None:
    model, onnx_app, reference_app = pair
    ours = send(onnx_app.test_client(), method, path, payload)
    reference = send(reference_app.test_client(), method, path, payload)
    assert ours[0] == reference[0]
    raw_logits = isinstance(payload, dict) and payload.get("parameters", {}).get("function_to_apply") == "none"
    probabilities, logits = TOLERANCES[model]
    assert differences(ours[1], reference[1], logits if raw_logits else probabilities) == []


def test_info_describes_both_backends_alike(pair: tuple[str, Flask, Flask]) -> None:
    _, onnx_app, reference_app = pair
    ours = onnx_app.test_client().get("/info").get_json()
    reference = reference_app.test_client().get("/info").get_json()
    assert (ours["backend"], reference["backend"]) == ("onnx", "pytorch")
    for key in ("labels", "max_length", "function_to_apply"):
        assert ours["model"][key] == reference["model"][key]


def test_the_comparison_can_fail() -> None:
    assert differences({"label": "POSITIVE", "score": 0.9}, {"label": "NEGATIVE", "score": 0.9}, 0.05)
    assert differences({"label": "POSITIVE", "score": 0.9}, {"label": "POSITIVE", "score": 0.8}, 0.05)
    assert differences([{"label": "A", "score": 1.0}], {"label": "A", "score": 1.0}, 0.05)
    assert differences({"error": "a"}, {"error": "a", "x": 1}, 0.05)
