"""Settings: defaults, environment variables and one-line errors naming the bad value."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import pytest

from service import state
from service.app import create_app
from service.classifier import Classifier
from service.config import (
    SETTINGS,
    ConfigError,
    Settings,
    _cgroup_quota,
    help_text,
    markdown_table,
    resolve_model_dir,
    usable_cores,
)
from tests.testkit import REPO


def test_defaults(tmp_path: Path) -> None:
    settings = Settings.from_mapping({"MODEL_DIR": str(tmp_path)})
    assert settings.processes == usable_cores() and settings.pin_processes is True  # a process per core
    workers = 1  # each process has one core: one model run at a time, and the express slot
    assert (settings.host, settings.port, settings.threads, settings.max_batch) == \
        ("127.0.0.1", 8000, 64 + 32 * workers + 32, 32)
    assert settings.max_content_length == 2 * 1024 * 1024
    assert settings.backend == "onnx" and settings.warmup is True
    assert settings.ort_threads == 1 and settings.ort_spinning is True
    assert settings.batch_express is True
    assert settings.ort_lone_threads == 0  # no lone-run session unless asked: it costs a session's memory
    assert settings.batching is True
    assert (settings.batch_max_texts, settings.batch_max_tokens, settings.batch_wait_ms, settings.batch_gather_ms,
            settings.batch_workers) == (32, 384, 0, 1, workers)
    files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]  # two per connection at worst, and spares
    limit = 4000 if files == resource.RLIM_INFINITY else min(4000, (files - 64) // 2)
    assert (settings.max_queue, settings.queue_timeout, settings.connection_limit) == (64, 5.0, limit)
    assert settings.shutdown_timeout == 8.0 and settings.api_key is None


@pytest.mark.parametrize(("config", "threads"), [
    ({"BATCH_WORKERS": "1"}, 64 + 32 + 32),  # every text the queue holds and the model runs, plus a margin
    ({"MAX_QUEUE": "200", "BATCH_WORKERS": "2"}, 200 + 2 * 32 + 32),
    ({"BATCHING": "false"}, 4),  # each thread runs the model itself
    ({"BACKEND": "pytorch"}, 4),  # the reference backends never batch
    ({"BATCHING": "false", "THREADS": "2"}, 2),
    ({"THREADS": "16"}, 16),
])
def test_default_threads_follow_the_queue(tmp_path: Path, config: dict[str, str], threads: int) -> None:
    assert Settings.from_mapping({"MODEL_DIR": str(tmp_path), **config}).threads == threads


def test_environment_strings_are_parsed(tmp_path: Path) -> None:
    settings = Settings.from_mapping({"MODEL_DIR": str(tmp_path), "PORT": "0", "THREADS": " 8 ",
                                      "ORT_THREADS": "1", "MAX_BATCH": "64", "BACKEND": "PyTorch",
                                      "WARMUP": "false", "BATCHING": "off", "BATCH_WAIT_MS": "2",
                                      "MAX_QUEUE": "64", "QUEUE_TIMEOUT": "0.5", "SHUTDOWN_TIMEOUT": "9",
                                      "ORT_SPINNING": "yes", "API_KEY": "abc", "ORT_LONE_THREADS": "2"})
    assert (settings.port, settings.threads, settings.ort_threads, settings.max_batch) == (0, 8, 1, 64)
    assert settings.ort_lone_threads == 2
    assert settings.backend == "pytorch" and settings.warmup is False
    assert settings.batching is False and settings.batch_wait_ms == 2 and settings.ort_spinning is True
    assert (settings.queue_timeout, settings.shutdown_timeout, settings.api_key) == (0.5, 9.0, "abc")


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
    ("BATCHING", "sometimes", "SERVICE_BATCHING must be true or false, got 'sometimes'"),
    ("BATCH_MAX_TEXTS", "0", "SERVICE_BATCH_MAX_TEXTS must be an integer 1-100000, got '0'"),
    ("BATCH_MAX_TOKENS", "-5", "SERVICE_BATCH_MAX_TOKENS must be an integer 1-10000000, got '-5'"),
    ("BATCH_WAIT_MS", "1001", "SERVICE_BATCH_WAIT_MS must be an integer 0-1000 (milliseconds), got '1001'"),
    ("BATCH_WORKERS", "0", "SERVICE_BATCH_WORKERS must be an integer 1-64, got '0'"),
    ("MAX_QUEUE", "16", "SERVICE_MAX_QUEUE must be at least SERVICE_MAX_BATCH (32) so the largest request "
                        "fits, got '16'"),
    ("QUEUE_TIMEOUT", "0", "SERVICE_QUEUE_TIMEOUT must be a number of seconds > 0 and <= 3600, got '0'"),
    ("QUEUE_TIMEOUT", "nan", "SERVICE_QUEUE_TIMEOUT must be a number of seconds > 0 and <= 3600, got 'nan'"),
    ("SHUTDOWN_TIMEOUT", "soon", "SERVICE_SHUTDOWN_TIMEOUT must be a number of seconds > 0 and <= 3600, "
                                 "got 'soon'"),
    ("CONNECTION_LIMIT", "0", "SERVICE_CONNECTION_LIMIT must be an integer 1-1000000, got '0'"),
    ("ORT_SPINNING", "2", "SERVICE_ORT_SPINNING must be true or false, got '2'"),
    ("ORT_LONE_THREADS", "-1", "SERVICE_ORT_LONE_THREADS must be an integer 0-1024, got '-1'"),
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
    with pytest.raises(ConfigError, match="SERVICE_MODEL_DIR 'missing' is not a folder") as relative:
        resolve_model_dir("missing")
    assert str(relative.value).endswith(f"(looked in {' and '.join(sorted({str(tmp_path), str(REPO)}))})")
    with pytest.raises(ConfigError) as absolute:  # an absolute path is looked for where it says
        resolve_model_dir(str(tmp_path / "missing"))
    assert str(absolute.value) == f"SERVICE_MODEL_DIR {str(tmp_path / 'missing')!r} is not a folder"


def test_usable_cores_respects_the_affinity_mask() -> None:
    assert 1 <= usable_cores() <= len(os.sched_getaffinity(0))


def test_a_connection_limit_over_the_open_files_limit_is_refused(tmp_path: Path) -> None:
    files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if files == resource.RLIM_INFINITY:
        pytest.fail("this test needs a finite open-files limit (ulimit -n)", pytrace=False)
    with pytest.raises(ConfigError, match=rf"SERVICE_CONNECTION_LIMIT {files} needs more open files than "
                                          rf"the limit of {files} \(ulimit -n\) allows"):
        Settings.from_mapping({"MODEL_DIR": str(tmp_path), "CONNECTION_LIMIT": str(files)})


def test_every_setting_is_declared_once_and_listed_by_help() -> None:
    assert [field.name for field in fields(Settings)] == [setting.key.lower() for setting in SETTINGS]
    result = subprocess.run([sys.executable, "-m", "service", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and help_text() in result.stdout
    for setting in SETTINGS:
        assert setting.variable in result.stdout
        assert setting.default_text() in " ".join(result.stdout.split())  # wrapped over lines


@pytest.mark.parametrize(("files", "cores"), [
    ({"cpu.max": "150000 100000\n"}, 1.5),  # cgroup v2, docker --cpus 1.5
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 0.5),  # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_the_cpu_quota_is_read_from_cgroup_v2_or_v1(tmp_path: Path, files: dict[str, str],
                                                    cores: float | None) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert _cgroup_quota(tmp_path) == cores


@pytest.mark.parametrize(("config", "threads"), [
    ({}, lambda cores: 1),  # a process per core, each with one slot
    ({"PROCESSES": "1"}, lambda cores: max(1, cores // min(2, cores))),  # one process: a share per model slot
    ({"BATCH_WORKERS": "1", "PROCESSES": "1"}, lambda cores: cores),  # one process, one slot: every core
    ({"BATCH_WORKERS": "64"}, lambda cores: 1),  # more slots than cores: one thread each
    ({"BATCHING": "false"}, lambda cores: cores),  # unbatched: the session's calls are the request threads'
    ({"BACKEND": "pytorch"}, lambda cores: cores),  # the reference backends stand for the original service
])
def test_the_default_intra_op_threads_split_the_cores_between_the_model_slots(
        tmp_path: Path, config: dict[str, str], threads: Callable[[int], int]) -> None:
    settings = Settings.from_mapping({"MODEL_DIR": str(tmp_path)} | config)
    assert settings.ort_threads == threads(usable_cores())


@pytest.mark.parametrize(("cores", "processes", "workers", "threads"), [
    (2, 1, 2, 1), (2, 2, 1, 1), (1, 2, 1, 1), (4, 2, 2, 1), (16, 2, 2, 4), (16, 4, 2, 2),
])
def test_several_processes_split_the_cores_between_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        cores: int, processes: int, workers: int, threads: int) -> None:
    monkeypatch.setattr("service.config.usable_cores", lambda: cores)  # machines of other sizes than this one
    settings = Settings.from_mapping({"MODEL_DIR": str(tmp_path), "PROCESSES": str(processes)})
    assert (settings.processes, settings.batch_workers, settings.ort_threads) == (processes, workers, threads)
    for wrong in ("0", "65", "two"):
        with pytest.raises(ConfigError, match="SERVICE_PROCESSES"):
            Settings.from_mapping({"MODEL_DIR": str(tmp_path), "PROCESSES": wrong})


@pytest.mark.parametrize("cores", [1, 2, 4, 8, 16, 96])
def test_the_defaults_give_each_core_a_process_of_one_slot_and_one_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cores: int) -> None:
    monkeypatch.setattr("service.config.usable_cores", lambda: cores)  # machines of other sizes than this one
    settings = Settings.from_mapping({"MODEL_DIR": str(tmp_path)})
    assert (settings.processes, settings.batch_workers, settings.ort_threads) == (min(cores, 64), 1, 1)
    assert settings.threads == 64 + 32 + 32  # per process: its queue and its run, plus a margin
    for reference in ({"BACKEND": "pytorch"}, {"BATCHING": "false"}):  # the original service: one process
        assert Settings.from_mapping({"MODEL_DIR": str(tmp_path), **reference}).processes == 1


def test_the_docs_table_is_generated_from_the_declaration() -> None:
    document = (REPO / "docs" / "serving.md").read_text()
    generated = document.split("<!-- settings: generated by `python -m service --settings-markdown` -->\n")[1]
    assert generated.split("<!-- /settings -->")[0].strip() == markdown_table(), \
        "docs/serving.md: regenerate the table with `python -m service --settings-markdown`"


def test_an_app_given_validated_settings_serves_them_without_reading_the_environment_again(
        model_dir: Path, classifier: Classifier, monkeypatch: pytest.MonkeyPatch) -> None:
    # `python -m service` validates the settings once, before it decides on processes, and hands them on
    settings = Settings.from_mapping({"MODEL_DIR": str(model_dir), "MAX_BATCH": "2", "PROCESSES": "1"})
    monkeypatch.setenv("SERVICE_MAX_BATCH", "not a number")  # read again, this would refuse to start
    app = create_app(settings=settings, classifier=classifier)
    assert state.settings(app) is settings
    assert app.test_client().post("/sentiment", json={"texts": ["good", "bad", "fine"]}).status_code == 413
    assert app.test_client().post("/sentiment", json={"texts": ["good", "bad"]}).status_code == 200
    with pytest.raises(TypeError, match="not both"):
        create_app({"MAX_BATCH": "3"}, settings=settings, classifier=classifier)
