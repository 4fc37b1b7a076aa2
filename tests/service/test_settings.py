"""Settings: defaults, environment variables and one-line errors naming the bad value."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from service_testkit import REPO

from service.config import ConfigError, Settings, resolve_model_dir, usable_cores


def test_defaults(tmp_path: Path) -> None:
    settings = Settings.from_mapping({"MODEL_DIR": str(tmp_path)})
    assert (settings.host, settings.port, settings.threads, settings.max_batch) == ("127.0.0.1", 8000, 4, 32)
    assert settings.max_content_length == 2 * 1024 * 1024
    assert settings.backend == "onnx" and settings.warmup is True
    assert settings.ort_threads == usable_cores()


def test_environment_strings_are_parsed(tmp_path: Path) -> None:
    settings = Settings.from_mapping({"MODEL_DIR": str(tmp_path), "PORT": "0", "THREADS": " 8 ",
                                      "ORT_THREADS": "1", "MAX_BATCH": "64", "BACKEND": "PyTorch",
                                      "WARMUP": "false"})
    assert (settings.port, settings.threads, settings.ort_threads, settings.max_batch) == (0, 8, 1, 64)
    assert settings.backend == "pytorch" and settings.warmup is False


@pytest.mark.parametrize(("key", "value", "message"), [
    ("PORT", "abc", "SERVICE_PORT must be an integer 0-65535 (0: any free port), got 'abc'"),
    ("PORT", True, "SERVICE_PORT must be an integer 0-65535 (0: any free port), got True"),
    ("PORT", "-1", "SERVICE_PORT must be an integer 0-65535 (0: any free port), got '-1'"),
    ("THREADS", "2.5", "SERVICE_THREADS must be an integer 1-1024, got '2.5'"),
    ("ORT_THREADS", "0", "SERVICE_ORT_THREADS must be an integer 1-1024, got '0'"),
    ("MAX_BATCH", "", "SERVICE_MAX_BATCH must be an integer 1-100000, got ''"),
    ("MAX_CONTENT_LENGTH", "2MB", "SERVICE_MAX_CONTENT_LENGTH must be a positive integer (bytes), got '2MB'"),
    ("BACKEND", "tf", "SERVICE_BACKEND must be one of onnx, pytorch, optimum, got 'tf'"),
    ("WARMUP", "maybe", "SERVICE_WARMUP must be true or false, got 'maybe'"),
    ("HOST", " ", "SERVICE_HOST must be a host name or IP address, got ' '"),
])
def test_bad_values_name_the_variable(tmp_path: Path, key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_mapping({"MODEL_DIR": str(tmp_path), key: value})
    assert str(caught.value) == message


def test_relative_model_dir_falls_back_to_the_repo_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_model_dir("onnx_models") == (REPO / "onnx_models").resolve()
    (tmp_path / "onnx_models").mkdir()
    assert resolve_model_dir("onnx_models") == (tmp_path / "onnx_models").resolve()  # cwd first
    with pytest.raises(ConfigError, match="SERVICE_MODEL_DIR 'missing' is not a folder"):
        resolve_model_dir("missing")


def test_usable_cores_respects_the_affinity_mask() -> None:
    assert 1 <= usable_cores() <= len(os.sched_getaffinity(0))
