"""Fixtures for the export tests: tiny checkpoints, validation files and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.export.tiny import build_checkpoint

SENTENCES = [
    ("POSITIVE", "a great film and a superb actor"),
    ("POSITIVE", "i love this movie , it is fun"),
    ("POSITIVE", "very good plot , great fun"),
    ("NEGATIVE", "an awful , boring movie"),
    ("NEGATIVE", "i hate this dull film"),
    ("NEGATIVE", "the plot was bad and not fun"),
]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Return a factory of tiny checkpoints, built once per (family, labels)."""
    built: dict[tuple, Path] = {}

    def make(family: str = "bert", labels: tuple[str, ...] = ("NEGATIVE", "POSITIVE")) -> Path:
        key = (family, labels)
        if key not in built:
            folder = tmp_path_factory.mktemp(f"{family}-{len(labels)}labels")
            built[key] = build_checkpoint(folder, family, dict(enumerate(labels)))
        return built[key]

    return make


@pytest.fixture(scope="session")
def validation_file(tmp_path_factory) -> Path:
    """Write a small labelled validation file ('LABEL<TAB>text' per line)."""
    path = tmp_path_factory.mktemp("validation") / "inputs.txt"
    lines = [f"{label}\t{text}" for label, text in SENTENCES]
    lines += [f"{text} , {other}" for _, text in SENTENCES for _, other in SENTENCES]  # unlabelled
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


@pytest.fixture
def run_cli():
    """Run `python -m export ARGS` in a subprocess, offline, and return its result."""
    import time

    def run(*args: str, timeout: float = 300) -> Result:
        env = {**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1"}
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "export", *args], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout)
        return Result(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started)

    return run
