"""A model whose weights are inline in model.onnx is served from a memory-mapped copy, with the same scores."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests

from service import weights
from service.classifier import Classifier
from service.config import ConfigError, Settings
from tests.testkit import REPO, running_server, service_env

TEXTS = ["a wonderful film", "Dull, predictable and far too long. " * 40, "fun", "not good, not bad"]


def scores(classifier: Classifier) -> list:
    """Return the raw logits of TEXTS, scored together and one by one."""
    together = classifier.classify(TEXTS, top_k=None, function_to_apply="none")
    alone = [classifier.classify([text], top_k=None, function_to_apply="none")[0] for text in TEXTS]
    return [together, alone]


def mapped_files() -> set[str]:
    """Return the files this process has memory-mapped."""
    with open("/proc/self/maps") as maps:
        return {line.split(maxsplit=5)[5].strip() for line in maps if len(line.split(maxsplit=5)) == 6}


def test_inline_weights_are_served_from_a_memory_mapped_copy_with_the_same_scores(
        model_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    inline = Classifier(model_dir, intra_op_threads=1)
    mapped = Classifier(model_dir, intra_op_threads=1, cache_dir=cache)
    assert inline.model_path == model_dir / "model.onnx"
    assert mapped.model_path.parent.parent == cache
    data = mapped.model_path.parent / weights.DATA_FILE
    # the weights left the graph: a small model.onnx and a data file onnxruntime maps in place
    assert mapped.model_path.stat().st_size < 1 << 20 < 40 << 20 < data.stat().st_size
    assert str(data) in mapped_files()
    assert scores(mapped) == scores(inline)
    # the next start finds the copy and writes nothing
    written = data.stat().st_mtime_ns
    again = Classifier(model_dir, intra_op_threads=1, cache_dir=cache)
    assert again.model_path == mapped.model_path and data.stat().st_mtime_ns == written
    assert sorted(p.name for p in cache.iterdir()) == [mapped.model_path.parent.name]  # no partial copy left


def test_an_unwritable_cache_serves_the_model_as_it_is(model_dir: Path, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "file").write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="service.weights"):
        classifier = Classifier(model_dir, intra_op_threads=1, cache_dir=tmp_path / "file" / "cache")
    assert classifier.model_path == model_dir / "model.onnx"
    assert classifier.classify(["a wonderful film"])[0][0]["label"] == "POSITIVE"
    (record,) = caplog.records
    assert "with its weights in memory" in record.message and "SERVICE_CACHE_DIR" in record.message
    assert "\n" not in record.message


def test_a_damaged_copy_is_removed_and_written_again(
        model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = tmp_path / "cache"
    copy = Classifier(model_dir, intra_op_threads=1, cache_dir=cache).model_path
    data = copy.parent / weights.DATA_FILE
    with data.open("r+b") as handle:
        handle.truncate(data.stat().st_size // 2)
    with caplog.at_level(logging.WARNING, logger="service.classifier"):
        healed = Classifier(model_dir, intra_op_threads=1, cache_dir=cache)
    assert any("cannot be loaded" in r.message and "removed" in r.message for r in caplog.records)
    assert healed.model_path == copy and data.stat().st_size > 40 << 20  # the same start wrote it again
    assert scores(healed) == scores(Classifier(model_dir, intra_op_threads=1))


def test_a_copy_that_cannot_be_loaded_even_when_written_afresh_serves_the_model_as_it_is(
        model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def unloadable(model: Path, target: Path) -> None:  # a writer that produces what ORT rejects
        target.write_bytes(b"not an onnx graph")
        (target.parent / weights.DATA_FILE).write_bytes(b"\0" * 1024)
        for path in (target, target.parent / weights.DATA_FILE):
            path.chmod(0o644)

    monkeypatch.setattr(weights, "_write", unloadable)
    cache = tmp_path / "cache"
    with caplog.at_level(logging.WARNING):
        classifier = Classifier(model_dir, intra_op_threads=1, cache_dir=cache)
    assert classifier.model_path == model_dir / "model.onnx" and list(cache.iterdir()) == []
    messages = [r.message for r in caplog.records]
    assert any("cannot be loaded" in m and "removed" in m for m in messages)
    assert any(m.endswith("with its weights in memory") for m in messages)
    assert scores(classifier) == scores(Classifier(model_dir, intra_op_threads=1))


def test_a_copy_others_may_have_written_is_not_loaded(model_dir: Path, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    cache = tmp_path / "cache"
    copy = Classifier(model_dir, intra_op_threads=1, cache_dir=cache).model_path
    data = copy.parent / weights.DATA_FILE
    assert data.stat().st_mode & 0o777 == 0o644 and copy.parent.stat().st_mode & 0o777 == 0o755
    data.chmod(0o666)  # a shared cache: anyone could have replaced the weights
    with caplog.at_level(logging.WARNING, logger="service.weights"):
        refused = Classifier(model_dir, intra_op_threads=1, cache_dir=cache)
    assert refused.model_path == model_dir / "model.onnx" and data.exists()  # refused, not deleted
    assert any("writable by others" in r.message for r in caplog.records)
    data.chmod(0o644)
    assert Classifier(model_dir, intra_op_threads=1, cache_dir=cache).model_path == copy
    if os.geteuid() == 0:  # only root can give a file away
        os.chown(data, 12345, -1)
        assert Classifier(model_dir, intra_op_threads=1, cache_dir=cache).model_path == model_dir / "model.onnx"


def test_a_copy_removed_while_the_service_starts_is_written_again(
        model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    cache = tmp_path / "cache"
    copy = Classifier(model_dir, intra_op_threads=1, cache_dir=cache).model_path
    found, removed = weights._complete, []

    def found_then_removed(folder: Path) -> bool:  # another process cleans the cache in that instant
        complete = found(folder)
        if complete and not removed:
            shutil.rmtree(folder)
            removed.append(folder)
        return complete

    monkeypatch.setattr(weights, "_complete", found_then_removed)
    with caplog.at_level(logging.WARNING, logger="service.weights"):
        classifier = Classifier(model_dir, intra_op_threads=1, cache_dir=cache)
    assert removed == [copy.parent] and any("could not be read" in r.message for r in caplog.records)
    assert classifier.model_path == copy and (copy.parent / weights.DATA_FILE).stat().st_size > 40 << 20
    assert scores(classifier) == scores(Classifier(model_dir, intra_op_threads=1))


def test_concurrent_starts_share_one_copy(model_dir: Path, tmp_path: Path) -> None:
    digest = Classifier(model_dir, intra_op_threads=1).manifest["files"]["model.onnx"]
    found: list[Path | None] = []
    start = threading.Barrier(3)

    def write() -> None:
        start.wait()
        found.append(weights.mapped_copy(model_dir / "model.onnx", digest, tmp_path))

    threads = [threading.Thread(target=write) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(found) == 3 and found[0] is not None and len(set(found)) == 1
    assert [p.name for p in tmp_path.iterdir()] == [found[0].parent.name]


def test_a_partial_copy_abandoned_by_a_killed_process_is_removed(model_dir: Path, tmp_path: Path) -> None:
    abandoned, recent = tmp_path / ".partial-abandoned", tmp_path / ".partial-recent"
    for folder in (abandoned, recent):
        folder.mkdir()
        (folder / weights.DATA_FILE).write_bytes(b"\0" * 1024)
    old = abandoned.stat().st_mtime - weights.ABANDONED_SECONDS - 60
    os.utime(abandoned, (old, old))
    Classifier(model_dir, intra_op_threads=1, cache_dir=tmp_path)
    assert not abandoned.exists() and recent.exists()  # a recent one may be another process' write


def test_small_or_unverified_models_are_served_as_they_are(tiny_models: dict[int, Path], model_dir: Path,
                                                          tmp_path: Path) -> None:
    tiny = Classifier(tiny_models[2], cache_dir=tmp_path)
    assert tiny.model_path == tiny_models[2] / "model.onnx"
    unverified = Classifier(model_dir, intra_op_threads=1, verify=False, cache_dir=tmp_path)
    assert unverified.model_path == model_dir / "model.onnx"  # no manifest sha256 to name a copy by
    assert list(tmp_path.iterdir()) == []


def test_the_cache_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert Settings.from_mapping({"MODEL_DIR": str(tmp_path)}).cache_dir == tmp_path / "xdg" / "onnx-text-classify"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert weights.default_cache_dir() == Path.home() / ".cache" / "onnx-text-classify"
    chosen = Settings.from_mapping({"MODEL_DIR": str(tmp_path), "CACHE_DIR": str(tmp_path / "c")})
    assert chosen.cache_dir == tmp_path / "c" and chosen.map_weights
    off = Settings.from_mapping({"MODEL_DIR": str(tmp_path), "CACHE_DIR": str(tmp_path), "MAP_WEIGHTS": "false"})
    assert off.cache_dir is None
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="SERVICE_CACHE_DIR .* is not a folder"):
        Settings.from_mapping({"MODEL_DIR": str(tmp_path), "CACHE_DIR": str(tmp_path / "file")})


def test_a_real_server_maps_the_copy_and_answers_as_the_model(model_dir: Path, tmp_path: Path,
                                                              classifier: Classifier) -> None:
    cache = tmp_path / "cache"
    with running_server(SERVICE_CACHE_DIR=str(cache), SERVICE_MODEL_DIR=str(model_dir)) as server:
        answers = [requests.post(f"{server.url}/sentiment", json={"text": text}, timeout=30).json()
                   for text in TEXTS]
        (copy,) = cache.iterdir()
        with open(f"/proc/{server.process.pid}/maps") as maps:
            assert str(copy / weights.DATA_FILE) in maps.read()
    assert answers == [classifier.classify([text])[0][0] for text in TEXTS]
    assert any(f"weights memory-mapped from {copy}" in line for line in server.log)


def test_prepare_writes_the_copy_for_a_later_read_only_start(model_dir: Path, tmp_path: Path) -> None:
    def prepare(cache: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "service", "--prepare"], cwd=REPO, capture_output=True,
                              text=True, timeout=120,
                              env=service_env(SERVICE_MODEL_DIR=str(model_dir), SERVICE_CACHE_DIR=str(cache)))

    done = prepare(tmp_path / "cache")
    assert done.returncode == 0, done.stderr
    (copy,) = (tmp_path / "cache").iterdir()
    assert done.stdout.strip() == f"serving {model_dir / 'model.onnx'} from {copy / 'model.onnx'}"
    (tmp_path / "file").write_text("")
    failed = prepare(tmp_path / "file" / "cache")
    assert failed.returncode == 1
    assert "could not be written" in failed.stderr and "Traceback" not in failed.stderr
