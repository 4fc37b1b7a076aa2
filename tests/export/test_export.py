"""Export tiny random classifiers through the same code path as users and check what comes out."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from export import manifest as manifest_module
from export.pipeline import ExportOptions, run, validation_sets
from export.quantize import QuantizationSettings

FAMILIES = [
    ("bert", ("NEGATIVE", "POSITIVE")),
    ("distilbert", ("NEGATIVE", "POSITIVE")),
    ("bert", ("negative", "neutral", "positive")),
    ("distilbert", ("sadness", "joy", "love", "anger")),
]


def _export(checkpoint: Path, out: Path, validation_file: Path, **kw) -> Path:
    """Export with one dynamic int8 recipe unless told otherwise (auto may keep fp32 for a tiny model)."""
    kw.setdefault("quantization", QuantizationSettings(mode="dynamic"))
    options = ExportOptions(model=str(checkpoint), name="m", output_dir=out, validation_file=validation_file,
                            min_agreement=kw.pop("min_agreement", 0.0), max_accuracy_drop=1.0, **kw)
    return run(options)


def _pytorch_and_onnx_logits(checkpoint: Path, model_file: Path, texts: list[str]):
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    enc = tokenizer(texts, padding=True, truncation=True, return_tensors="np")
    with torch.inference_mode():
        expected = model(**{k: torch.from_numpy(v) for k, v in enc.items()}).logits.numpy()
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    feed = {i.name: enc[i.name].astype(np.int64) for i in session.get_inputs()}
    return expected, session.run(["logits"], feed)[0]


@pytest.mark.parametrize(("family", "labels"), FAMILIES, ids=lambda v: v if isinstance(v, str) else f"{len(v)}labels")
def test_fp32_export_matches_pytorch_and_keeps_labels(checkpoints, validation_file, tmp_path, family, labels):
    checkpoint = checkpoints(family, labels)
    folder = _export(checkpoint, tmp_path, validation_file, quantization=QuantizationSettings(mode="none"))

    texts = ["a great film", "an awful , boring movie and a dull plot " * 10, "fun"]
    expected, actual = _pytorch_and_onnx_logits(checkpoint, folder / "model.onnx", texts)
    # Stated tolerance: fp32 ONNX vs PyTorch logits within 1e-4 absolute (measured ~1e-6 here).
    np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=0)
    config = json.loads((folder / "config.json").read_text())
    assert config["id2label"] == {str(i): label for i, label in enumerate(labels)}
    assert json.loads((folder / "manifest.json").read_text())["quantization"] == {"mode": "none"}


@pytest.mark.parametrize(("family", "labels"), FAMILIES[:3], ids=["bert-2", "distilbert-2", "bert-3"])
def test_int8_export_writes_a_complete_folder_and_manifest(checkpoints, validation_file, tmp_path, family, labels):
    checkpoint = checkpoints(family, labels)
    folder = _export(checkpoint, tmp_path, validation_file)

    assert {"model.onnx", "config.json", "tokenizer.json", "tokenizer_config.json", "manifest.json"} <= {
        p.name for p in folder.iterdir()}
    assert not list(tmp_path.glob(".tmp-*")), "the temporary export folder was left behind"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["name"] == "m" and manifest["task"] == "text-classification"
    dt.datetime.fromisoformat(manifest["created_at"])
    assert manifest["source"]["kind"] == "local" and manifest["source"]["path"] == str(checkpoint)
    weights = hashlib.sha256((checkpoint / "model.safetensors").read_bytes()).hexdigest()
    assert manifest["source"]["files_sha256"]["model.safetensors"] == weights
    for package in ("optimum", "onnxruntime", "transformers", "torch"):
        assert manifest["versions"][package], package
    assert manifest["model"]["opset"] >= 14 and manifest["model"]["id2label"] == {
        str(i): label for i, label in enumerate(labels)}
    quant = manifest["quantization"]
    assert quant["mode"] == "dynamic" and quant["kind"] == "dynamic" and quant["per_channel"] is True
    assert quant["target"] in ("avx512_vnni", "avx512", "avx2", "arm64")
    assert [c["name"] for c in quant["candidates"]] == [quant["chosen"]] and quant["sensitivity"] == []
    import onnx

    ops = {node.op_type for node in onnx.load(str(folder / "model.onnx")).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops and "Gather" in ops  # embeddings stay fp32
    # 42 inputs: 10 calibrate, 16 select, 16 test
    validation = manifest["validation"]["sets"]["validation"]
    assert validation["inputs"] == 16 and manifest["validation"]["sets"]["test_file"]["inputs"] == 16
    assert 0.0 <= validation["onnx_int8_vs_pytorch"]["label_agreement"] <= 1.0
    assert validation["onnx_fp32_vs_pytorch"]["max_abs_score_diff"] < 1e-4
    assert set(validation["accuracy"]) == {"pytorch", "onnx_fp32", "onnx_int8"}
    assert set(manifest["validation"]["latency"]["onnx_int8"]) == {"batch1_p50_ms", "batch8_p50_ms"}
    assert manifest["validation"]["latency"]["load_average_1min"] >= 0
    assert manifest["validation"]["gate"]["passed"] is True
    # The weights lie in model.onnx.data beside the graph (onnxruntime maps the file), and both count.
    assert manifest["model"]["files"] == ["model.onnx", "model.onnx.data"]
    assert manifest["model"]["size_bytes"] == sum((folder / name).stat().st_size for name in manifest["model"]["files"])
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    assert any(tensor.data_location == onnx.TensorProto.EXTERNAL for tensor in graph.initializer)
    # Every file is listed with its real checksum, and nothing else is.
    assert set(manifest["files"]) == {p.name for p in folder.iterdir() if p.name != "manifest.json"}
    assert manifest_module.verify(folder) == []
    (folder / "config.json").write_text((folder / "config.json").read_text() + " ")
    assert manifest_module.verify(folder) == ["config.json: sha256 differs"]


def test_accuracy_counts_labelled_inputs_and_matches_labels_by_name(checkpoints, validation_file, tmp_path):
    checkpoint = checkpoints("bert", ("negative", "neutral", "positive"))
    folder = _export(checkpoint, tmp_path, validation_file)
    reported = json.loads((folder / "manifest.json").read_text())["validation"]["sets"]
    splits = validation_sets(ExportOptions(model=None, validation_file=validation_file))
    assert sorted(splits) == ["calibration", "test_file", "validation"]
    assert sorted(e.text for split in splits.values() for e in split) == sorted(
        line.split("\t")[-1] for line in validation_file.read_text().splitlines())
    for name in ("validation", "test_file"):
        labelled = [e for e in splits[name] if e.label]
        assert labelled, f"no labelled input fell into {name}"
        logits, _ = _pytorch_and_onnx_logits(checkpoint, folder / "model.onnx", [e.text for e in labelled])
        truth = np.array([2 if e.label == "POSITIVE" else 0 for e in labelled])
        assert reported[name]["accuracy"]["pytorch"] == round(float((logits.argmax(axis=1) == truth).mean()), 5)

    other = _export(checkpoints("distilbert", FAMILIES[3][1]), tmp_path / "emotions", validation_file)
    reported = json.loads((other / "manifest.json").read_text())["validation"]["sets"]["validation"]["accuracy"]
    assert reported == {"pytorch": None, "onnx_fp32": None, "onnx_int8": None}


def test_force_replaces_an_existing_folder(checkpoints, validation_file, tmp_path):
    first = _export(checkpoints("bert"), tmp_path, validation_file)
    (first / "stale.txt").write_text("from an older export")
    second = _export(checkpoints("bert"), tmp_path, validation_file, force=True)
    assert second == first and not (second / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
