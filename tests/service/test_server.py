"""End to end: the real `python -m service` Waitress process on the real default model."""

from __future__ import annotations

import http.client
import importlib
import inspect
import json
import re
import shutil
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPMessage
from importlib.metadata import version
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from service.serve import WAITRESS_INTERNALS, WAITRESS_VERSION
from tests.testkit import NEGATIVE, POSITIVE, REPO, Server, running_server, service_env, write_manifest

TIMEOUT = 30  # seconds, for every request


def request(server: Server, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, HTTPMessage, Any]:
    """Send one request on a fresh connection; return status, headers (case-insensitive) and JSON body."""
    address = urlsplit(server.url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=TIMEOUT)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        data = response.read()
        assert response.getheader("Content-Type", "").startswith("application/json"), data[:200]
        return response.status, response.headers, json.loads(data)
    finally:
        connection.close()


def post(server: Server, path: str, payload: Any) -> tuple[int, Any]:
    """POST a JSON payload; return status and JSON body."""
    status, _, body = request(server, "POST", path, json.dumps(payload).encode(),
                              {"Content-Type": "application/json"})
    return status, body


def test_positive_and_negative(server: Server) -> None:
    status, body = post(server, "/sentiment", {"text": POSITIVE})
    assert status == 200 and body["label"] == "POSITIVE" and set(body) == {"label", "score"}
    status, body = post(server, "/sentiment", {"text": NEGATIVE})
    assert status == 200 and body["label"] == "NEGATIVE" and 0.5 < body["score"] <= 1.0


def test_curl_style_form_content_type_is_accepted(server: Server) -> None:
    status, _, body = request(server, "POST", "/sentiment", json.dumps({"text": POSITIVE}).encode(),
                              {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200 and body["label"] == "POSITIVE"


@pytest.mark.parametrize(("body", "status", "message"), [
    (b'{"txt": "typo"}', 400, "missing field 'text'"),
    (b'{"text": ""}', 400, "text cannot be empty"),
    (b'{"text": "unterminated', 400, "invalid JSON"),
])
def test_invalid_requests(server: Server, body: bytes, status: int, message: str) -> None:
    got_status, _, got = request(server, "POST", "/sentiment", body, {"Content-Type": "application/json"})
    assert (got_status, got) == (status, {"error": message})


def test_wrong_method_and_unknown_path(server: Server) -> None:
    status, headers, body = request(server, "GET", "/sentiment")
    assert (status, body) == (405, {"error": "method not allowed"})
    assert set(headers["Allow"].split(", ")) == {"POST", "OPTIONS"}
    status, _, body = request(server, "GET", "/no/such/path")
    assert (status, body) == (404, {"error": "not found"})


def test_large_input_is_truncated(server: Server) -> None:
    text = (POSITIVE + " ") * 1_150  # ~102 KB
    assert len(text.encode()) > 100_000
    status, body = post(server, "/sentiment", {"text": text})
    assert status == 200 and body["label"] == "POSITIVE"


def test_body_over_the_limit_is_413_json(server: Server) -> None:
    status, _, body = request(server, "POST", "/sentiment",
                              json.dumps({"text": "a" * (2 * 1024 * 1024 + 1)}).encode(),
                              {"Content-Type": "application/json"})
    assert (status, body) == (413, {"error": "request body too large: the limit is 2097152 bytes"})


CONCURRENT_TEXTS = [POSITIVE, NEGATIVE, "What a great, delightful movie.", "Terrible. I hated it.",
                    "It was fine, I guess.", NEGATIVE + " really" * 400]


def _concurrent_answers(server: Server) -> tuple[dict[str, Any], list[str], list[tuple[int, Any]]]:
    """Return each text's answer alone, then 96 texts sent by 32 concurrent clients and their answers."""
    expected = {text: post(server, "/sentiment", {"text": text})[1] for text in CONCURRENT_TEXTS}
    jobs = [CONCURRENT_TEXTS[i % len(CONCURRENT_TEXTS)] for i in range(96)]
    with ThreadPoolExecutor(max_workers=32) as pool:
        answers = list(pool.map(lambda text: post(server, "/sentiment", {"text": text}), jobs))
    return expected, jobs, answers


def test_concurrent_clients_get_their_own_answers_batched(server: Server) -> None:
    expected, jobs, answers = _concurrent_answers(server)
    for text, (status, body) in zip(jobs, answers, strict=True):
        assert status == 200
        assert body["label"] == expected[text]["label"]
        # batched with other requests; per-token int8 scores each text as if alone
        assert body["score"] == pytest.approx(expected[text]["score"], abs=1e-6)


def test_without_batching_concurrent_answers_equal_the_single_request_answers(model_dir: Path) -> None:
    with running_server(SERVICE_MODEL_DIR=str(model_dir), SERVICE_BATCHING="false") as unbatched:
        expected, jobs, answers = _concurrent_answers(unbatched)
    for text, (status, body) in zip(jobs, answers, strict=True):
        assert status == 200
        # the same text alone in its run: identical inputs, so identical scores up to float noise
        assert body == {"label": expected[text]["label"], "score": pytest.approx(expected[text]["score"], abs=1e-6)}


def test_metrics_and_request_id_over_http(server: Server) -> None:
    status, headers, _ = request(server, "GET", "/health", headers={"X-Request-ID": "e2e-1"})
    assert status == 200 and headers["X-Request-ID"] == "e2e-1"
    address = urlsplit(server.url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=TIMEOUT)
    try:
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        text = response.read().decode()
    finally:
        connection.close()
    assert response.status == 200 and response.getheader("Content-Type").startswith("text/plain")
    assert 'service_requests_total{method="GET",route="/health",status="200"}' in text


@pytest.mark.parametrize(("env", "message"), [
    ({"SERVICE_PORT": "abc"}, "error: SERVICE_PORT must be an integer 0-65535 (0: any free port), got 'abc'"),
    ({"SERVICE_PORT": "70000"}, "error: SERVICE_PORT must be an integer 0-65535 (0: any free port), got '70000'"),
    ({"SERVICE_THREADS": "0"}, "error: SERVICE_THREADS must be an integer 1-1024, got '0'"),
    ({"SERVICE_BACKEND": "tensorflow"},
     "error: SERVICE_BACKEND must be one of onnx, pytorch, optimum, got 'tensorflow'"),
    ({"SERVICE_MODEL_DIR": "no/such/folder"}, "error: SERVICE_MODEL_DIR 'no/such/folder' is not a folder"),
    ({"SERVICE_MODEL_DIR": "corrupt"}, "does not match its sha256 in manifest.json"),
    ({"SERVICE_HOST": "256.256.256.256"}, "error: cannot listen on 256.256.256.256:0"),
])
def test_bad_settings_stop_start_up_with_one_line(tiny_models: dict[int, Path], tmp_path: Path,
                                                  env: dict[str, str], message: str) -> None:
    if env.get("SERVICE_MODEL_DIR") == "corrupt":
        folder = shutil.copytree(tiny_models[2], tmp_path / "corrupt")
        write_manifest(folder, "corrupt")
        with (folder / "model.onnx").open("r+b") as handle:  # flip bytes after signing: a bad copy
            handle.seek(100)
            handle.write(b"\x00\x01\x02\x03")
        env = {"SERVICE_MODEL_DIR": str(folder)}
    overrides = {"SERVICE_MODEL_DIR": str(tiny_models[2]), **env}
    result = subprocess.run([sys.executable, "-m", "service"], cwd=REPO, env=service_env(**overrides),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and message in lines[0]


def _raw(server: Server, data: bytes, timeout: float = 10) -> tuple[int, dict[str, str], Any]:
    """Send raw bytes on a new connection; return the response's status, headers and JSON body."""
    address = urlsplit(server.url)
    with socket.create_connection((address.hostname, address.port), timeout=timeout) as raw:
        raw.sendall(data)
        response = http.client.HTTPResponse(raw)
        response.begin()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, json.loads(response.read())


@pytest.mark.parametrize(("data", "status", "message"), [
    (b"POST /sentiment HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\nabc\r\n0\r\n\r\n",
     400, "bad request: Invalid chunk size"),
    (b"POST /sentiment HTTP/1.1\r\nHost: t\r\nContent-Length: -5\r\n\r\n", 400,
     "bad request: Content-Length is invalid"),
    # declared far over the limit: answered at once, not after waiting for (and spooling) the body
    (b"POST /sentiment HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000000\r\n\r\n" + b"a" * 4096, 413,
     "request body too large: the limit is 2097152 bytes"),
])
def test_what_waitress_answers_itself_is_json_too(server: Server, data: bytes, status: int, message: str) -> None:
    got_status, headers, body = _raw(server, data)
    assert (got_status, body) == (status, {"error": message})
    assert headers["content-type"] == "application/json" and headers["connection"] == "close"
    assert post(server, "/sentiment", {"text": POSITIVE})[0] == 200


def test_a_body_of_exactly_the_limit_reaches_the_app(server: Server) -> None:
    payload = json.dumps({"text": POSITIVE}).encode()
    payload += b" " * (2 * 1024 * 1024 - len(payload))  # trailing whitespace is valid JSON
    status, _, body = request(server, "POST", "/sentiment", payload, {"Content-Type": "application/json"})
    assert status == 200 and body["label"] == "POSITIVE"


def _mentions(where: str, name: str) -> bool:
    """Return whether a Waitress class or function has `name` as attribute, parameter or self.<name>."""
    module, _, attribute = where.rpartition(".")
    target = getattr(importlib.import_module(module), attribute)
    if hasattr(target, name):
        return True
    if inspect.isfunction(target):
        return name in inspect.signature(target).parameters
    source = "".join(inspect.getsource(cls) for cls in target.__mro__ if cls.__module__.startswith("waitress"))
    return re.search(rf"\bself\.{re.escape(name)}\s*=", source) is not None


@pytest.mark.parametrize(("where", "name", "why"), WAITRESS_INTERNALS,
                         ids=[f"{where}.{name}" for where, name, _ in WAITRESS_INTERNALS])
def test_every_waitress_internal_the_runner_relies_on_is_still_there(where: str, name: str, why: str) -> None:
    assert version("waitress") == WAITRESS_VERSION, "a new Waitress: check service/serve.py's WAITRESS_INTERNALS"
    assert _mentions(where, name), f"{where} no longer has {name} ({why})"
