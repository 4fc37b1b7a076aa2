"""The container image on a real docker daemon: same answers as the service, non-root, healthy, drains
on `docker stop`, read-only root, a mounted model, a mounted repository of models, settings by SERVICE_*,
no trace of the host's pip."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from service.app import create_app
from tests.deploy.conftest import Container, docker, request, running
from tests.testkit import DEFAULT_MODEL, NEGATIVE, POSITIVE, post_in_flight

pytestmark = pytest.mark.slow  # builds the image: minutes from scratch (debootstrap), seconds when cached

LONG = NEGATIVE + " It drags on and on." * 60  # 256 tokens: a batch of these takes a while
IMAGE_LIMIT = 500e6  # bytes


def test_image_is_at_most_500_mb(image: str) -> None:
    size = int(docker("image", "inspect", "--format", "{{.Size}}", image).stdout)
    assert size <= IMAGE_LIMIT, f"{size / 1e6:.0f} MB"


@pytest.fixture(scope="module")
def direct() -> Any:
    """Return a Flask test client of the service run in this process on the same model."""
    app = create_app({"MODEL_DIR": str(DEFAULT_MODEL), "TESTING": True})
    return app.test_client()


@pytest.mark.parametrize("body", [{"text": POSITIVE}, {"text": NEGATIVE}, {"texts": [POSITIVE, NEGATIVE, "ok."]},
                                  {"text": LONG}])
def test_sentiment_answers_as_the_service_run_directly(served: Container, direct: Any, body: dict) -> None:
    status, answer = request(f"{served.url}/sentiment", body)
    expected = direct.post("/sentiment", json=body)
    assert (status, expected.status_code) == (200, 200)
    answers, references = (answer, expected.json) if "texts" in body else ([answer], [expected.json])
    assert [a["label"] for a in answers] == [r["label"] for r in references]
    assert [a["score"] for a in answers] == pytest.approx([r["score"] for r in references], abs=1e-5)
    if body == {"text": POSITIVE}:  # and they are the model's answers, not two equal wrong ones
        assert answer["label"] == "POSITIVE" and answer["score"] > 0.9


def test_the_service_is_pid_1_and_not_root(served: Container) -> None:
    status = docker("exec", served.id, "cat", "/proc/1/status").stdout
    uids = re.search(r"^Uid:\s+(.*)$", status, re.MULTILINE).group(1).split()
    gids = re.search(r"^Gid:\s+(.*)$", status, re.MULTILINE).group(1).split()
    assert set(uids) == set(gids) == {"10001"}  # real, effective, saved and file-system ids
    command = docker("exec", served.id, "cat", "/proc/1/cmdline").stdout.split("\0")
    assert command[:3] == ["python", "-m", "service"]  # so SIGTERM goes to the service itself


def test_healthcheck_turns_healthy(served: Container) -> None:
    deadline = time.monotonic() + 60  # the first check runs one interval (10 s) after the start
    while (health := served.inspect()["State"]["Health"])["Status"] != "healthy":
        assert health["Status"] == "starting", health
        assert time.monotonic() < deadline, health
        time.sleep(0.5)
    assert health["Log"][-1]["ExitCode"] == 0


def test_the_listening_address_and_settings_come_from_service_env(image: str) -> None:
    with running(image, SERVICE_MAX_BATCH="3", SERVICE_BATCHING="false") as container:
        status, info = request(f"{container.url}/info")
        assert status == 200
        assert info["limits"]["max_batch"] == 3 and info["batching"]["enabled"] is False
        status, answer = request(f"{container.url}/sentiment", {"texts": ["a", "b", "c", "d"]})
        assert status == 413 and "the limit is 3" in answer["error"]
        assert "on http://0.0.0.0:" in container.logs()  # the image listens on every address


def test_a_bad_setting_exits_2_with_a_one_line_error(image: str) -> None:
    result = docker("run", "--rm", "--network", "none", "--env", "SERVICE_PORT=eighty", image, check=False)
    assert result.returncode == 2
    assert "error: SERVICE_PORT must be an integer" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_docker_stop_finishes_requests_in_flight_and_exits_0(image: str) -> None:
    with running(image) as container:
        port = urlsplit(container.url).port
        in_flight = 12  # long texts: under a second of work, well within SERVICE_SHUTDOWN_TIMEOUT (8 s)
        sent = threading.Barrier(in_flight + 1)
        answers: list[Any] = [None] * in_flight

        def client(index: int) -> None:
            answers[index] = post_in_flight(port, LONG, sent)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(in_flight)]
        for thread in threads:
            thread.start()
        sent.wait(timeout=30)
        time.sleep(0.05)  # every request is on the wire; the service has read some of them
        stopping = time.monotonic()
        docker("stop", container.id, timeout=60)  # SIGTERM, then SIGKILL after 10 s
        stopped_after = time.monotonic() - stopping
        for thread in threads:
            thread.join(timeout=30)
        state, log = container.inspect()["State"], container.logs()

    assert state["ExitCode"] == 0, log[-2000:]
    assert stopped_after < 10, f"docker stop took {stopped_after:.1f} s: the signal did not stop the service"
    failures = [answer for answer in answers if not isinstance(answer, tuple)]
    assert not failures, f"requests in flight failed: {failures[:3]}\n{log[-2000:]}"
    assert all(status == 200 and body["label"] == "NEGATIVE" for status, body, _ in answers)
    assert max(answered for _, _, answered in answers) > stopping  # they really were in flight
    assert "stopping: no longer accepting connections" in log
    assert re.search(r"INFO service(\[\d+\])?: stopped$", log, re.MULTILINE)  # the last process to stop
    assert "dropped" not in log


# ~1 MiB, under SERVICE_MAX_CONTENT_LENGTH (2 MiB) but over what Waitress keeps in memory (512 KiB)
BIG = {"texts": ["a long review that says it was good " * 3000] * 10}


def test_read_only_root_with_a_tmpfs_serves_every_request(image: str) -> None:
    assert len(json.dumps(BIG)) > 1024 * 1024
    with running(image, "--read-only", "--tmpfs", "/tmp") as container:
        assert request(f"{container.url}/sentiment", {"text": POSITIVE})[0] == 200
        status, answer = request(f"{container.url}/sentiment", BIG)
        assert status == 200 and len(answer) == 10
        log = container.logs()
        assert "Failed to persist telemetry" not in log  # ORT_DISABLE_TELEMETRY=1
        # the copy `python -m service --prepare` wrote at build time: mapped, though nothing can be written
        assert "weights memory-mapped from /app/cache/" in log and "could not be written" not in log


def test_read_only_root_without_tmp_stops_start_up_in_one_line(image: str) -> None:
    # what docs/deployment.md says the tmpfs is for: Waitress spools bodies over 512 KiB to /tmp,
    # so without one the service refuses to start rather than fail such requests later
    result = docker("run", "--rm", "--network", "host", "--read-only", image, timeout=60, check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: no writable temporary folder"), result.stderr


def test_a_mounted_model_folder_is_served(image: str, tmp_path: Path) -> None:
    folder = tmp_path / "mounted"
    shutil.copytree(DEFAULT_MODEL, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["name"] = "mounted-model"  # manifest.json is not among the files it checksums
    (folder / "manifest.json").write_text(json.dumps(manifest))
    for path in (tmp_path, folder, *folder.iterdir()):  # readable by the image's user, 10001
        path.chmod(0o755 if path.is_dir() else 0o644)
    with running(image, f"--volume={folder}:/models/mounted:ro", SERVICE_MODEL_DIR="/models/mounted") as container:
        status, info = request(f"{container.url}/info")
        assert status == 200 and info["model"]["name"] == "mounted-model"
        assert request(f"{container.url}/sentiment", {"text": POSITIVE})[1]["label"] == "POSITIVE"


def _link_or_copy(source: str, target: str) -> None:
    """Hard-link a model file into a repository, or copy it (another file system, or not readable by 10001)."""
    if os.stat(source).st_mode & 0o004:
        try:
            os.link(source, target)
            return
        except OSError:
            pass
    shutil.copyfile(source, target)
    os.chmod(target, 0o644)


def test_a_repository_mounted_at_models_serves_each_model_and_the_default(image: str, tmp_path: Path) -> None:
    # the path docs/deployment.md and the multi-model manifests (deploy/kubernetes/multi-model) use
    repository, default, other = tmp_path / "repository", DEFAULT_MODEL.name, "second-model"
    for name in (default, other):
        shutil.copytree(DEFAULT_MODEL, repository / name, copy_function=_link_or_copy)
    for folder in (tmp_path, repository, repository / default, repository / other):  # 10001 may enter them
        folder.chmod(0o755)
    with running(image, f"--volume={repository}:/models:ro", SERVICE_MODEL_DIR="/models",
                 SERVICE_DEFAULT_MODEL=default) as container:
        status, info = request(f"{container.url}/info")
        assert status == 200 and info["default_model"] == default
        assert sorted((m["name"], m["state"]) for m in info["models"]) == [(default, "READY"), (other, "READY")]
        for prefix in (f"/models/{default}", f"/models/{other}", ""):  # "": the default model's routes
            status, answer = request(f"{container.url}{prefix}/sentiment", {"text": POSITIVE})
            assert status == 200 and answer["label"] == "POSITIVE" and answer["score"] > 0.9, (prefix, answer)
            assert request(f"{container.url}{prefix}/ready")[0] == 200
        assert request(f"{container.url}/models/missing/sentiment", {"text": POSITIVE})[0] == 404


def test_onnxruntime_threads_follow_the_containers_cpu_set(image: str) -> None:
    with running(image, "--cpuset-cpus=0") as container:
        assert request(f"{container.url}/info")[1]["threads"]["ort_intra_op"] == 1


def test_onnxruntime_threads_follow_the_containers_cpu_quota(image: str) -> None:
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs 2 cores to tell a quota of 1 from the machine")
    with running(image, "--cpus=1") as container:
        assert request(f"{container.url}/info")[1]["threads"]["ort_intra_op"] == 1


def _host_pip_settings() -> list[str]:
    """Return the values of this machine's pip settings (config files and PIP_* variables)."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    values = [value for line in listed.splitlines() for value in line.partition("=")[2].strip("'\"").split()]
    values += [value for key, text in os.environ.items() if key.startswith("PIP_") for value in text.split()]
    # paths and URLs only: a setting like default-timeout=180 could appear anywhere by chance
    return sorted({value for value in values if "/" in value})


def test_no_trace_of_the_host_pip_settings(image: str) -> None:
    settings = _host_pip_settings()
    history = docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", image).stdout
    config = json.dumps(json.loads(docker("image", "inspect", image).stdout)[0]["Config"])
    for value in settings:
        assert value not in history and value not in config, value
    assert "PIP_" not in config
    # pip inside the image has no configuration at all, and the wheels stayed in the build stage
    inside = docker("run", "--rm", "--network", "none", "--entrypoint", "sh", image, "-c",
                    "pip config list; pip config debug; ls /tmp/build 2>&1; env").stdout
    assert "exists: True" not in inside, inside
    assert "No such file or directory" in inside, inside  # /tmp/build
    assert not [line for line in inside.splitlines() if line.startswith("PIP_")], inside
