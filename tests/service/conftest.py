"""Fixtures: the real default model, Flask apps and clients, tiny models and a real Waitress process."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from service.app import create_app
from service.classifier import Classifier
from tests.export.tiny import SENTENCES, build_token_checkpoint
from tests.testkit import DEFAULT_MODEL, Server, build_tiny_model, running_server

SENTIMENT, TINY, NER = "sentiment", "tiny", "ner"  # the models of the `repository` fixture


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


def link_copy(source: Path, target: Path) -> Path:
    """Copy a model folder into a repository as hard links (no second copy of the weights on disk)."""
    shutil.copytree(source, target, copy_function=os.link)
    return target


def export_tagger(root: Path) -> Path:
    """Return a tiny token classifier exported by the export's own code path (as tests/export/test_tasks.py does)."""
    from export.pipeline import ExportOptions, run
    from export.quantize import QuantizationSettings

    checkpoint = build_token_checkpoint(root / "ner-checkpoint", "bert")
    texts = root / "texts.txt"
    texts.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    return run(ExportOptions(model=str(checkpoint), name="ner", output_dir=root / "ner-out", validation_file=texts,
                             quantization=QuantizationSettings(mode="none")))


@pytest.fixture(scope="session")
def repository(tmp_path_factory: pytest.TempPathFactory, model_dir: Path, tiny_models: dict[int, Path]) -> Path:
    """Return a repository of the default model, a tiny 3-label classifier and a tiny token classifier."""
    root = tmp_path_factory.mktemp("repository")
    folder = root / "models"
    folder.mkdir()
    link_copy(model_dir, folder / SENTIMENT)
    link_copy(tiny_models[3], folder / TINY)
    link_copy(export_tagger(root), folder / NER)
    return folder
