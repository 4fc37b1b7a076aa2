"""The offline default model: the committed folder is intact and meets its gates; the recipe rebuilds it."""

from __future__ import annotations

import json

import pytest

from export import manifest as manifest_module
from export.sources import ENCODER, SNIPPETS
from tests.conftest import DEFAULT_MODEL_DIR

MIN_AGREEMENT = 0.995  # with the fp32 model, on the selection and on the test split
MAX_ACCURACY_DROP = 0.003
MIN_MOVIE_ACCURACY = 0.87


def _check_gates(manifest: dict) -> None:
    validation, quant = manifest["validation"], manifest["quantization"]
    assert validation["served_model"] == "onnx_int8" and quant["mode"] == "auto" and quant["served"] == "int8"
    gate = validation["gate"]
    assert gate["passed"] and gate["agreement"] >= MIN_AGREEMENT and gate["accuracy_drop"] <= MAX_ACCURACY_DROP
    assert gate["confirmed_on_test"] and quant["test"]["agreement"] >= MIN_AGREEMENT
    assert quant["test"]["accuracy_drop"] <= MAX_ACCURACY_DROP
    chosen = next(c for c in quant["candidates"] if c["name"] == quant["chosen"])
    assert chosen["passed"] and chosen["batch8_speedup"] == max(
        c["batch8_speedup"] for c in quant["candidates"] if c.get("passed"))
    # against PyTorch, the original: the fp32 export is faithful, so int8 stays close to it as well
    assert validation["sets"]["validation"]["onnx_fp32_vs_pytorch"]["label_agreement"] >= 0.999
    assert validation["sets"]["validation"]["onnx_int8_vs_pytorch"]["label_agreement"] >= 0.99
    movie = validation["sets"]["test_movie"]
    assert movie["labelled"] > 800
    assert movie["accuracy"]["onnx_int8"] >= MIN_MOVIE_ACCURACY
    assert movie["accuracy"]["pytorch"] >= MIN_MOVIE_ACCURACY
    for domain in ("amazon", "nyt", "tweets"):
        assert validation["sets"][f"test_{domain}"]["accuracy"]["onnx_int8"] is not None
    recipe = manifest["source"]["recipe"]
    assert recipe["sources"][ENCODER.requirement]["sha256"] == ENCODER.sha256
    assert recipe["sources"][SNIPPETS.requirement]["sha256"] == SNIPPETS.sha256
    assert manifest["model"]["id2label"] == {"0": "NEGATIVE", "1": "POSITIVE"}


def test_the_committed_default_model_is_intact_and_meets_its_gates():
    assert (DEFAULT_MODEL_DIR / "manifest.json").is_file(), (
        f"{DEFAULT_MODEL_DIR} is missing: it is committed to the repository; rebuild it with `make export`")
    assert manifest_module.verify(DEFAULT_MODEL_DIR) == []
    manifest = json.loads((DEFAULT_MODEL_DIR / "manifest.json").read_text())
    _check_gates(manifest)
    assert manifest["source"]["kind"] == "recipe"
    # Every weight MatMul is int8 (a two-pass one multiplies its one int8 weight twice); the word embeddings
    # stay fp32: 59 MB against 91 MB fp32.
    assert (DEFAULT_MODEL_DIR / "model.onnx").stat().st_size < 60 * 2**20


@pytest.mark.slow
def test_the_recipe_rebuilds_the_default_model_end_to_end(run_cli, tmp_path):
    """Train (or reuse the cached checkpoint), export, quantize and validate, as `make export` does."""
    # A budget ample for a slow, shared machine, so the plan keeps the splits whole and the gates'
    # size and accuracy checks see every test input (the default plan cuts them on a slow machine).
    result = run_cli("--output-dir", str(tmp_path), "--budget", "40", timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"):
        assert stage in result.stderr
    folder = tmp_path / DEFAULT_MODEL_DIR.name
    assert result.stdout.strip() == str(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    _check_gates(manifest)
    assert manifest_module.verify(folder) == []
