"""Broken copies of the real default model: `python -m service` stops at once (< 2 s of CPU) with one clear line."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

from tests.reliability.kit import DEFAULT_MODEL, REPO, service_env, sha256

START_UP_LIMIT = 2.0  # seconds, as issue #5 asks: checked on the CPU time the service spends before exiting
# Wall time only guards against a hang: other jobs on the 2 shared cores stretch it (2.59 s seen at
# load 5 for a start-up that used 0.9 s of CPU and took 0.8 s wall at load 2).
HANG_LIMIT = 10.0


def copy_model(target: Path) -> Path:
    """Copy the default model folder, linking the 75 MB model.onnx instead of copying it."""
    def link_or_copy(source: str, destination: str) -> None:
        if Path(source).name == "model.onnx":
            os.symlink(source, destination)
        else:
            shutil.copy2(source, destination)

    return Path(shutil.copytree(DEFAULT_MODEL, target, copy_function=link_or_copy))


def resign(folder: Path, name: str) -> None:
    """Record a changed file's sha256 in manifest.json, so only the fault itself remains."""
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = sha256(folder / name)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def replace(folder: Path, name: str, data: bytes) -> None:
    """Write a new file in place of a (possibly linked) one."""
    (folder / name).unlink()
    (folder / name).write_bytes(data)


def foreign_tokenizer(folder: Path, tokens: int) -> None:
    """Put a word-level tokenizer of another vocabulary in place of tokenizer.json."""
    tokenizer = Tokenizer(WordLevel({f"w{i}": i for i in range(tokens)}, unk_token="w0"))
    tokenizer.pre_tokenizer = Whitespace()
    replace(folder, "tokenizer.json", tokenizer.to_str().encode())


def edit_config(folder: Path, drop: tuple[str, ...]) -> None:
    """Remove keys from config.json."""
    config = json.loads((folder / "config.json").read_text())
    for key in drop:
        config.pop(key)
    (folder / "config.json").write_text(json.dumps(config))


def truncated_onnx(folder: Path) -> None:
    """Cut model.onnx to its first 64 KiB, as an interrupted copy would."""
    replace(folder, "model.onnx", (DEFAULT_MODEL / "model.onnx").read_bytes()[:65536])


# how to break the copy (None: no folder at all), which files to re-sign so only the fault remains,
# and what the one line must say
FAULTS = [
    pytest.param(None, (), "is not a folder", id="missing-folder"),
    pytest.param(lambda f: [p.unlink() for p in f.iterdir()], (), "manifest.json is missing", id="empty-folder"),
    pytest.param(truncated_onnx, (), "model.onnx does not match its sha256 in manifest.json", id="truncated-onnx"),
    pytest.param(truncated_onnx, ("model.onnx",), "cannot be loaded by onnxruntime", id="truncated-onnx-resigned"),
    pytest.param(lambda f: foreign_tokenizer(f, 40_000), (),
                 "tokenizer.json does not match its sha256 in manifest.json", id="foreign-tokenizer"),
    pytest.param(lambda f: foreign_tokenizer(f, 40_000), ("tokenizer.json",),
                 "tokenizer.json has 40000 tokens but the model's vocab_size is 30522: tokenizer and model do not "
                 "match", id="foreign-tokenizer-resigned"),
    pytest.param(lambda f: (foreign_tokenizer(f, 40_000), edit_config(f, ("vocab_size",))),
                 ("tokenizer.json", "config.json"),
                 "model.onnx rejects token id 39999 of tokenizer.json: tokenizer and model do not match",
                 id="foreign-tokenizer-no-vocab-size"),
    pytest.param(lambda f: edit_config(f, ("id2label", "label2id")), ("config.json",),
                 "config.json has no id2label mapping", id="config-without-labels"),
]


@pytest.mark.parametrize(("fault", "resigned", "message"), FAULTS)
def test_a_broken_model_folder_stops_start_up_at_once_with_one_line(
        tmp_path: Path, request: pytest.FixtureRequest, fault: Callable[[Path], object] | None,
        resigned: tuple[str, ...], message: str) -> None:
    folder = tmp_path / "model"
    if fault is not None:
        fault(copy_model(folder))
    for name in resigned:
        resign(folder, name)
    before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
    result = subprocess.run([sys.executable, "-m", "service"], cwd=REPO, capture_output=True, text=True,
                            env=service_env(SERVICE_MODEL_DIR=str(folder)), timeout=60)
    seconds, after = time.monotonic() - started, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)  # this child alone
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert cpu < START_UP_LIMIT, f"start-up used {cpu:.2f} s of CPU before failing"
    assert seconds < HANG_LIMIT, f"start-up took {seconds:.2f} s to fail"
    print(f"\n{request.node.callspec.id}: exit 2 after {cpu:.2f} s CPU, {seconds:.2f} s wall: {lines[0]}")
