"""Pair models (cross-encoders, NLI) through the export's own code path, then served: scores as PyTorch's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from export.dataset import read_text_file
from export.pipeline import ExportOptions, run
from export.quantize import QuantizationSettings
from export.resolve import ExportError
from service.app import create_app
from tests.export.tiny import build_checkpoint
from tests.testkit import pytorch_pair_logits

QUERIES = ["a great film", "the plot was bad", "i love this movie", "boring and dull"]
PASSAGES = ["a superb actor and a fun plot", "an awful , boring movie", "it is very good", "i hate this film",
            "not fun at all", "the movie was great fun"]
NLI = ("contradiction", "neutral", "entailment")


def _pairs_file(folder: Path, labels: tuple[str, ...] = ()) -> Path:
    """Write every query x passage pair, labelled in turn when labels are given."""
    lines = []
    for index, (query, passage) in enumerate((q, p) for q in QUERIES for p in PASSAGES):
        lines.append(f"{labels[index % len(labels)]}\t{query}\t{passage}" if labels else f"{query}\t{passage}")
    path = folder / "pairs.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _export(checkpoint: Path, out: Path, validation_file: Path, mode: str = "none") -> Path:
    options = ExportOptions(model=str(checkpoint), name="pairs", output_dir=out, validation_file=validation_file,
                            pairs=True, quantization=QuantizationSettings(mode=mode), min_agreement=0.0,
                            max_accuracy_drop=1.0)
    return run(options)


def test_a_pair_file_is_read_and_a_bad_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "pairs.txt"
    path.write_text("entailment\ta dog runs\tan animal moves\nq\tp\n\n", encoding="utf-8")
    first, second = read_text_file(path, pairs=True)
    assert (first.label, first.input) == ("entailment", ("a dog runs", "an animal moves"))
    assert (second.label, second.input) == (None, ("q", "p"))
    path.write_text("only one field\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"pairs.txt:1: a pair line is"):
        read_text_file(path, pairs=True)


def test_pairs_without_a_pair_file_are_refused_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="--pairs needs --validation-file"):
        run(ExportOptions(model=str(tmp_path), output_dir=tmp_path, pairs=True))


@pytest.mark.parametrize("family", ["bert", "roberta"])  # token_type_ids, and none
def test_a_cross_encoder_exports_and_reranks_with_pytorchs_scores(tmp_path: Path, family: str) -> None:
    checkpoint = build_checkpoint(tmp_path / "cross-encoder", family, {0: "LABEL_0"})
    folder = _export(checkpoint, tmp_path / "out", _pairs_file(tmp_path))
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["model"]["inputs"] == "text pairs"
    assert manifest["validation"]["sets"]["validation"]["onnx_fp32_vs_pytorch"]["max_abs_score_diff"] < 1e-4

    client = create_app({"MODEL_DIR": str(folder), "ORT_THREADS": 1}).test_client()
    query = QUERIES[0]
    expected = 1 / (1 + np.exp(-pytorch_pair_logits(checkpoint, [(query, p) for p in PASSAGES])[:, 0]))
    response = client.post("/rerank", json={"query": query, "texts": PASSAGES, "return_text": True})
    assert response.status_code == 200, response.get_json()
    ranked = response.get_json()
    assert [r["index"] for r in ranked] == list(np.argsort(-expected, kind="stable"))
    assert all(abs(r["score"] - expected[r["index"]]) < 1e-4 and r["text"] == PASSAGES[r["index"]] for r in ranked)

    # the same pairs through TEI's /predict and the Inference API's {"text", "text_pair"}
    predicted = client.post("/predict", json={"inputs": [[query, p] for p in PASSAGES]}).get_json()
    assert [abs(answer[0]["score"] - e) < 1e-4 for answer, e in zip(predicted, expected, strict=True)] == \
        [True] * len(PASSAGES)
    pipeline = client.post("/", json={"inputs": {"text": query, "text_pair": PASSAGES[1]}}).get_json()
    assert abs(pipeline[0][0]["score"] - expected[1]) < 1e-4


def test_an_nli_model_is_gated_on_labelled_pairs_and_quantized(tmp_path: Path) -> None:
    checkpoint = build_checkpoint(tmp_path / "nli", "bert", dict(enumerate(NLI)))
    folder = _export(checkpoint, tmp_path / "out", _pairs_file(tmp_path, NLI), mode="dynamic")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["quantization"]["chosen"] and manifest["validation"]["served_model"] == "onnx_int8"
    validation = manifest["validation"]["sets"]["validation"]
    assert validation["labelled"] == validation["inputs"] > 0  # every pair carried its label
    assert validation["accuracy"]["pytorch"] is not None

    client = create_app({"MODEL_DIR": str(folder), "ORT_THREADS": 1}).test_client()
    answer = client.post("/predict", json={"inputs": ["a dog runs", "an animal moves"]}).get_json()
    assert sorted(entry["label"] for entry in answer) == sorted(NLI)
    assert [entry["score"] for entry in answer] == sorted((entry["score"] for entry in answer), reverse=True)
    assert abs(sum(entry["score"] for entry in answer) - 1.0) < 1e-5


def test_a_distilbert_model_with_a_bert_tokenizer_exports(tmp_path: Path) -> None:
    # the tokenizer emits token_type_ids, which DistilBERT's forward() does not take
    checkpoint = build_checkpoint(tmp_path / "distilbert", "distilbert", bert_tokenizer=True)
    folder = _export(checkpoint, tmp_path / "out", _pairs_file(tmp_path))
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["validation"]["sets"]["validation"]["onnx_fp32_vs_pytorch"]["max_abs_score_diff"] < 1e-4
