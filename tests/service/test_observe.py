"""Observing the service: TEI's timing headers, access records, JSON logs and OpenTelemetry traces."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from service.app import create_app
from service.classifier import Classifier, InferenceError
from service.config import ConfigError, Settings
from service.logs import ACCESS, JsonFormatter, TextFormatter
from tests.testkit import NEGATIVE, POSITIVE, REPO, running_server, service_env

TIMING = ("x-compute-time", "x-total-time", "x-tokenization-time", "x-queue-time", "x-inference-time")
COUNTS = ("x-compute-tokens", "x-compute-characters")
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
STAGES = {"parse", "tokenize", "queue", "model run", "postprocess"}


def headers_of(response: Any) -> dict[str, int]:
    """Return the timing headers and counts of an answer as integers."""
    return {name: int(response.headers[name]) for name in TIMING + COUNTS}


def tokens_of(client: FlaskClient, texts: list[str]) -> int:
    """Return how many tokens the model sees for texts, special tokens included (TEI's /tokenize)."""
    return sum(len(tokens) for tokens in client.post("/tokenize", json={"inputs": texts}).get_json())


# --- TEI's timing headers ---------------------------------------------------------------------------

@pytest.mark.parametrize("batching", [True, False])
def test_inference_answers_carry_teis_timing_headers(model_dir: Path, classifier: Classifier,
                                                     monkeypatch: pytest.MonkeyPatch, batching: bool) -> None:
    for key in [k for k in os.environ if k.startswith("SERVICE_")]:
        monkeypatch.delenv(key)
    client = create_app({"MODEL_DIR": str(model_dir), "TESTING": True, "BATCHING": batching},
                        classifier=classifier).test_client()
    texts = [POSITIVE * 20, NEGATIVE * 20] * 16  # 32 texts cut to 256 tokens: the run takes milliseconds
    response = client.post("/sentiment", json={"texts": texts})
    assert response.status_code == 200
    timing = headers_of(response)
    assert timing["x-compute-time"] == timing["x-total-time"]  # TEI sends the whole time under both names
    parts = timing["x-queue-time"] + timing["x-tokenization-time"] + timing["x-inference-time"]
    assert parts <= timing["x-total-time"]
    assert timing["x-inference-time"] >= 1
    assert timing["x-compute-characters"] == sum(len(text) for text in texts)
    assert timing["x-compute-tokens"] == 32 * 256  # each text truncated to max_length
    if not batching:
        assert timing["x-queue-time"] == 0


def test_every_inference_route_has_the_headers_and_sentiments_body_is_unchanged(client: FlaskClient) -> None:
    pair = {"text": "The film was great.", "text_pair": "I loved it."}
    v2 = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["Loved it."]}]}
    answers = {"/sentiment": client.post("/sentiment", json={"text": "Loved it."}),
               "/": client.post("/", json={"inputs": pair}),
               "/predict": client.post("/predict", json={"inputs": ["Loved it.", "What a film."]}),
               "/v2": client.post("/v2/models/minilm-l6-sentiment/infer", json=v2)}
    for route, response in answers.items():
        assert response.status_code == 200, route
        timing = headers_of(response)
        assert timing["x-queue-time"] + timing["x-tokenization-time"] + timing["x-inference-time"] \
            <= timing["x-total-time"], route
    assert int(answers["/"].headers["x-compute-characters"]) == len(pair["text"]) + len(pair["text_pair"])
    assert int(answers["/sentiment"].headers["x-compute-tokens"]) == tokens_of(client, ["Loved it."])
    assert set(answers["/sentiment"].get_json()) == {"label", "score"}


def test_other_answers_have_no_timing_headers(client: FlaskClient) -> None:
    answers = [client.get("/health"), client.post("/sentiment", json={"text": ""}),
               client.post("/predict", json={"inputs": []}), client.post("/tokenize", json={"inputs": "hi"})]
    for response in answers:
        assert not {name for name in TIMING + COUNTS if name in response.headers}, response.request.path


# --- access records ---------------------------------------------------------------------------------

def access_records(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """Return the fields of the access records captured so far."""
    return [record.fields for record in caplog.records if record.name == ACCESS]


def test_each_request_gets_one_access_record(client: FlaskClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)
    ok = client.post("/sentiment", json={"texts": ["Loved it.", "Dull."]}, headers={"X-Request-Id": "abc-1"})
    assert ok.headers["X-Request-Id"] == "abc-1"
    bad = client.post("/sentiment", data=b"{not json")
    v2 = client.post("/v2/models/minilm-l6-sentiment/infer",
                     json={"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hi"]}]})
    missing = client.get("/nowhere")
    records = access_records(caplog)
    assert [record["status"] for record in records] == [200, 400, 200, 404]
    assert records[0] == {"request_id": "abc-1", "method": "POST", "route": "/sentiment",
                          "model": "minilm-l6-sentiment", "status": 200, "duration_ms": records[0]["duration_ms"],
                          "texts": 2, "tokens": tokens_of(client, ["Loved it.", "Dull."])}
    assert records[0]["duration_ms"] > 0
    assert records[1]["request_id"] == bad.headers["X-Request-Id"] and records[1]["texts"] is None
    assert records[2]["route"] == "/v2/models/<model_name>/infer"  # the template, never the raw path
    assert records[2]["request_id"] == v2.headers["X-Request-Id"]
    assert records[3]["route"] == "<unmatched>" and missing.status_code == 404


def test_access_records_can_be_turned_off(model_dir: Path, classifier: Classifier,
                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)
    app = create_app({"MODEL_DIR": str(model_dir), "TESTING": True, "ACCESS_LOG": "false"}, classifier=classifier)
    assert app.test_client().post("/sentiment", json={"text": "Loved it."}).status_code == 200
    assert access_records(caplog) == []


def test_an_access_record_as_text_and_as_json(client: FlaskClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)
    client.post("/sentiment", json={"text": "Loved it."}, headers={"X-Request-Id": "r-7"})
    (record,) = [record for record in caplog.records if record.name == ACCESS]
    text = TextFormatter("%(levelname)s %(name)s: %(message)s").format(record)
    assert re.fullmatch(r"INFO service\.access: POST /sentiment 200 [0-9.]+ ms request_id=r-7 "
                        r"model=minilm-l6-sentiment texts=1 tokens=\d+", text), text
    entry = json.loads(JsonFormatter().format(record))
    assert entry["logger"] == ACCESS and entry["level"] == "INFO" and entry["request_id"] == "r-7"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"])
    assert (entry["route"], entry["status"], entry["texts"]) == ("/sentiment", 200, 1)


def test_a_line_logged_while_serving_carries_the_request_id(client: FlaskClient, classifier: Classifier,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(feeds: Any, alone: bool = True) -> Any:
        raise InferenceError("injected")

    monkeypatch.setattr(classifier, "run", failing)
    lines = io.StringIO()
    handler = logging.StreamHandler(lines)
    handler.setFormatter(JsonFormatter())
    logging.getLogger("service").addHandler(handler)  # formatted as it is logged, inside the request
    try:
        response = client.post("/sentiment", json={"text": "Loved it."}, headers={"X-Request-Id": "failing-1"})
    finally:
        logging.getLogger("service").removeHandler(handler)
    assert response.status_code == 500 and "Traceback" not in response.get_data(as_text=True)
    entries = [json.loads(line) for line in lines.getvalue().splitlines()]
    (failure,) = [entry for entry in entries if entry["level"] == "ERROR"]
    assert failure["request_id"] == "failing-1" and failure["logger"] == "service.errors"
    assert "InferenceError: injected" in failure["exception"]  # the cause, inside the one JSON line


# --- settings ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("config", "environ", "endpoint"), [
    ({}, {}, None),
    ({"OTLP_ENDPOINT": "http://collector:4318"}, {}, "http://collector:4318/v1/traces"),
    ({"OTLP_ENDPOINT": "http://collector:4318/"}, {}, "http://collector:4318/v1/traces"),
    ({}, {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://otel:4318"}, "https://otel:4318/v1/traces"),
    ({}, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:1", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://b:2/t"},
     "http://b:2/t"),
    ({"OTLP_ENDPOINT": "http://collector:4318"}, {"OTEL_SDK_DISABLED": "true"}, None),
    ({}, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:1", "OTEL_TRACES_EXPORTER": "none"}, None),
])
def test_the_trace_endpoint_follows_the_service_and_opentelemetry_variables(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: dict[str, str], environ: dict[str, str],
        endpoint: str | None) -> None:
    for key in [k for k in os.environ if k.startswith("OTEL_")]:
        monkeypatch.delenv(key)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    assert Settings.from_mapping({"MODEL_DIR": str(tmp_path), **config}).otlp_endpoint == endpoint


@pytest.mark.parametrize(("key", "value", "message"), [
    ("LOG_FORMAT", "yaml", "SERVICE_LOG_FORMAT must be text or json, got 'yaml'"),
    ("ACCESS_LOG", "maybe", "SERVICE_ACCESS_LOG must be true or false, got 'maybe'"),
    ("OTLP_ENDPOINT", "collector:4318", "SERVICE_OTLP_ENDPOINT must be an http or https URL such as "
                                        "http://collector:4318, got 'collector:4318'"),
])
def test_bad_observability_settings_name_the_variable(tmp_path: Path, key: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_mapping({"MODEL_DIR": str(tmp_path), key: value})
    assert str(caught.value) == message


# --- JSON logs of a real server process -------------------------------------------------------------

@dataclass
class Started:
    """A `python -m service` process whose stderr lines are collected."""

    process: subprocess.Popen
    lines: list[str] = field(default_factory=list)
    url: str = ""


@contextmanager
def started_service(**overrides: str) -> Iterator[Started]:
    """Start `python -m service` and return once it logs its URL; it need not be ready (WARMUP=false)."""
    process = subprocess.Popen([sys.executable, "-m", "service"], cwd=REPO, env=service_env(**overrides),
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    started = Started(process)
    found = threading.Event()

    def read() -> None:
        for line in process.stderr:
            started.lines.append(line)
            match = re.search(r"serving model .* on (http://[^\s\"]+)", line)
            if match and not found.is_set():
                started.url = match.group(1)
                found.set()
        found.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert found.wait(60) and started.url, "".join(started.lines)
        yield started
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        reader.join(10)


def status_of(url: str, body: bytes | None = None) -> int:
    """Return the status of a GET (or a POST of body) to url."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def assert_json_lines(lines: list[str]) -> list[dict[str, Any]]:
    """Assert every line is one JSON object with time, level, logger and message; return them."""
    entries = []
    for line in lines:
        entry = json.loads(line)
        assert isinstance(entry, dict) and {"time", "level", "logger", "message"} <= set(entry), line
        entries.append(entry)
    return entries


def test_every_line_is_json_from_start_to_sigterm(model_dir: Path) -> None:
    with started_service(SERVICE_MODEL_DIR=str(model_dir), SERVICE_LOG_FORMAT="json", SERVICE_WARMUP="false",
                         SERVICE_THREADS="4") as service:
        assert status_of(f"{service.url}/ready") == 503  # not warmed up: the model has not answered yet
        assert status_of(f"{service.url}/sentiment", b'{"text": "Loved it."}') == 200
        assert status_of(f"{service.url}/sentiment", b'{"text": ""}') == 400
        service.process.send_signal(signal.SIGTERM)
        assert service.process.wait(timeout=30) == 0
    entries = assert_json_lines(service.lines)
    messages = [entry["message"] for entry in entries]
    assert any(message.startswith("serving model") for message in messages)
    assert [entry["status"] for entry in entries if entry["logger"] == ACCESS] == [503, 200, 400]
    assert all(re.fullmatch(r"[0-9a-f]{16}", entry["request_id"]) for entry in entries if entry["logger"] == ACCESS)
    assert messages[-1] == "stopped"
    assert not any("Traceback" in line for line in service.lines)


@pytest.mark.parametrize("delay", [0.1, 0.2, 0.5])
def test_ctrl_c_while_starting_is_json_too(model_dir: Path, delay: float) -> None:
    process = subprocess.Popen([sys.executable, "-m", "service"], cwd=REPO, stdin=subprocess.DEVNULL,
                               env=service_env(SERVICE_MODEL_DIR=str(model_dir), SERVICE_LOG_FORMAT="json"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)  # in the imports, the model load or, on a fast machine, serving
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    if process.returncode == -signal.SIGINT:  # before Python had a handler: killed by the signal itself
        assert err == ""
        return
    entries = assert_json_lines(err.splitlines())
    assert entries[-1]["message"] == ("stopped" if process.returncode == 0 else "stopped before serving")


def test_a_bad_setting_is_one_json_line() -> None:
    result = subprocess.run([sys.executable, "-m", "service"], cwd=REPO, capture_output=True, text=True, timeout=60,
                            env=service_env(SERVICE_LOG_FORMAT="json", SERVICE_PORT="abc"))
    assert result.returncode == 2
    (entry,) = assert_json_lines(result.stderr.splitlines())
    assert entry["level"] == "ERROR"
    assert entry["message"] == "error: SERVICE_PORT must be an integer 0-65535 (0: any free port), got 'abc'"


def test_several_processes_and_their_parent_log_json_and_export_their_spans_at_exit(
        model_dir: Path, collector: Collector) -> None:
    # spans wait for a batch of 512 or a minute: what arrives was exported when the server process stopped
    with started_service(SERVICE_MODEL_DIR=str(model_dir), SERVICE_LOG_FORMAT="json", SERVICE_PROCESSES="2",
                         SERVICE_THREADS="4", SERVICE_OTLP_ENDPOINT=collector.url,
                         OTEL_BSP_SCHEDULE_DELAY="60000") as service:
        deadline = time.monotonic() + 60
        while sum("serving model" in line for line in service.lines) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        status, _ = post(f"{service.url}/sentiment", {"text": "Loved it."},
                         {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
        assert status == 200 and collector.spans() == []
        service.process.send_signal(signal.SIGTERM)
        assert service.process.wait(timeout=30) == 0
    entries = assert_json_lines(service.lines)
    serving = {entry["process"] for entry in entries if entry["message"].startswith("serving model")}
    assert len(serving) == 2 and service.process.pid not in serving
    assert any(entry["process"] == service.process.pid and entry["message"].startswith("starting 2 server")
               for entry in entries)
    names = {span.name for _, span in collector.spans() if span.trace_id.hex() == TRACE_ID}
    assert names == {"POST /sentiment"} | STAGES


# --- OpenTelemetry traces, to a real OTLP/HTTP receiver --------------------------------------------

class Collector:
    """An OTLP/HTTP receiver on a free port: decodes each POST /v1/traces with opentelemetry-proto."""

    def __init__(self) -> None:
        """Listen on 127.0.0.1; answer each export as a collector does."""
        self.requests: list[ExportTraceServiceRequest] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                exported = ExportTraceServiceRequest()
                exported.ParseFromString(body)
                collector.requests.append(exported)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200 if self.path == "/v1/traces" else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass  # the test reads what arrived, not the receiver's access log

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def spans(self) -> list[tuple[dict[str, Any], Any]]:
        """Return every span received, each with its resource's attributes."""
        found = []
        for exported in self.requests:
            for resource_spans in exported.resource_spans:
                resource = attributes_of(resource_spans.resource.attributes)
                found += [(resource, span) for scope in resource_spans.scope_spans for span in scope.spans]
        return found

    def close(self) -> None:
        """Stop listening."""
        self.server.shutdown()
        self.server.server_close()


def attributes_of(values: Any) -> dict[str, Any]:
    """Return OTLP key-values as a dict of plain values."""
    return {item.key: getattr(item.value, item.value.WhichOneof("value")) for item in values}


@pytest.fixture
def collector() -> Iterator[Collector]:
    """Return a running OTLP/HTTP receiver."""
    receiver = Collector()
    yield receiver
    receiver.close()


def post(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """POST JSON; return the status and the answer's headers (names in any case)."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(request, timeout=30) as response:
        response.read()
        return response.status, response.headers


def test_spans_reach_the_collector_and_continue_the_callers_trace(model_dir: Path, collector: Collector) -> None:
    traceparent = f"00-{TRACE_ID}-{PARENT_ID}-01"
    with running_server(SERVICE_MODEL_DIR=str(model_dir), SERVICE_OTLP_ENDPOINT=collector.url,
                        OTEL_BSP_SCHEDULE_DELAY="100") as server:
        status, headers = post(f"{server.url}/sentiment", {"texts": ["Loved it.", "Dull and far too long."]},
                               {"traceparent": traceparent})
        assert status == 200
        deadline = time.monotonic() + 30
        while len([span for _, span in collector.spans() if span.trace_id.hex() == TRACE_ID]) < 1 + len(STAGES):
            assert time.monotonic() < deadline, f"the request's spans did not reach the collector: {collector.spans()}"
            time.sleep(0.05)
    spans = [(resource, span) for resource, span in collector.spans() if span.trace_id.hex() == TRACE_ID]
    (root,) = [span for _, span in spans if span.parent_span_id.hex() == PARENT_ID]
    assert spans[0][0]["service.name"] == "onnx-text-classify"
    assert root.name == "POST /sentiment" and root.kind == root.SPAN_KIND_SERVER
    attributes = attributes_of(root.attributes)
    assert attributes["http.route"] == "/sentiment" and attributes["http.response.status_code"] == 200
    assert attributes["request.id"] == headers["X-Request-Id"]
    assert attributes["model.name"] == "minilm-l6-sentiment"
    assert attributes["classify.texts"] == 2 and attributes["classify.tokens"] == int(headers["x-compute-tokens"])
    children = [span for _, span in spans if span.parent_span_id == root.span_id]
    assert {span.name for span in children} == STAGES
    for span in children:
        assert root.start_time_unix_nano <= span.start_time_unix_nano <= span.end_time_unix_nano \
            <= root.end_time_unix_nano, span.name
    (run,) = [span for span in children if span.name == "model run"]
    sizes = attributes_of(run.attributes)
    assert sizes["batch.size"] >= 2 and sizes["batch.tokens"] >= attributes["classify.tokens"]
    order = {span.name: span.start_time_unix_nano for span in children}
    assert order["parse"] <= order["tokenize"] <= order["queue"] <= order["model run"] <= order["postprocess"]


def test_each_requests_spans_and_record_name_its_own_model(model_dir: Path, collector: Collector, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    from service import state
    from tests.service.conftest import link_copy

    for name in ("a", "b"):
        link_copy(model_dir, tmp_path / name)
    app = create_app({"MODEL_DIR": str(tmp_path), "DEFAULT_MODEL": "a", "OTLP_ENDPOINT": collector.url})
    client = app.test_client()
    caplog.set_level(logging.INFO, logger=ACCESS)
    asked = {"/models/b/sentiment": "b", "/sentiment": "a", "/models/nope/sentiment": "nope",
             "/models/b%0A2026-12-06 INFO service.access forged/sentiment": "b\n2026-12-06 INFO service.access forged"}
    for path in asked:
        client.post(path, json={"text": "Loved it."})
    state.tracing(app).shutdown()  # exports what is queued
    spans = [attributes_of(span.attributes) for _, span in collector.spans()
             if span.kind == span.SPAN_KIND_SERVER]
    assert [attributes["model.name"] for attributes in spans] == list(asked.values())
    records = [record for record in caplog.records if record.name == ACCESS]
    assert [record.fields["model"] for record in records] == list(asked.values())
    # as a text line, a name a client sent cannot end the record's line or forge another
    forged = TextFormatter("%(levelname)s %(name)s: %(message)s").format(records[-1])
    assert "\n" not in forged and "model=b\\n2026-12-06 INFO service.access forged texts=-" in forged


def test_with_tracing_off_opentelemetry_is_never_imported(model_dir: Path) -> None:
    probe = ("import json, sys\nimport service.__main__\nfrom service.app import create_app\n"
             "client = create_app().test_client()\n"
             "assert client.post('/sentiment', json={'text': 'fine'}).status_code == 200\n"
             "print(json.dumps(sorted(m for m in sys.modules if m.startswith('opentelemetry'))))\n")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={k: v for k, v in service_env(SERVICE_MODEL_DIR=str(model_dir)).items()
                                 if not k.startswith("OTEL_")})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == []


@contextmanager
def hanging_collector() -> Iterator[str]:
    """Return the URL of a collector that accepts connections and never answers."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)  # the kernel accepts; nobody reads
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


def closed_port() -> str:
    """Return the URL of a port nothing listens on."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


@pytest.mark.parametrize("down", ["hanging", "refusing"])
def test_a_slow_or_absent_collector_neither_slows_nor_fails_requests(model_dir: Path, down: str) -> None:
    with hanging_collector() as hanging:
        endpoint = hanging if down == "hanging" else closed_port()
        with running_server(SERVICE_MODEL_DIR=str(model_dir), SERVICE_OTLP_ENDPOINT=endpoint,
                            OTEL_BSP_SCHEDULE_DELAY="20", OTEL_BSP_MAX_EXPORT_BATCH_SIZE="4") as server:
            slowest = 0.0
            for _ in range(30):  # many small export batches: the exporter is busy with the collector throughout
                began = time.monotonic()
                status, _ = post(f"{server.url}/sentiment", {"text": "Loved it."})
                slowest = max(slowest, time.monotonic() - began)
                assert status == 200
            # a request takes milliseconds; the exporter waits 10 s for a hanging collector, and retries
            # a refused connection after about 1 s, then 2 s
            assert slowest < 2.0
            stopping = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            assert server.process.wait(timeout=30) == 0
            assert time.monotonic() - stopping < 6.0  # the spans left are given up after a bounded wait
    assert not any("Traceback" in line for line in server.log)
