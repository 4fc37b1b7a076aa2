"""Helpers shared by the tests: texts, tiny model folders, a real server runner, a schema check."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
import urllib.request
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "onnx_models" / "minilm-l6-sentiment"
START_TIMEOUT = 60.0  # seconds; loading the model takes ~1 s, but the CI machine may be busy
POSITIVE = "An absolutely wonderful film: moving, funny and beautifully acted. I loved every minute."
NEGATIVE = "A dull, tedious mess. The plot is stupid and the acting is awful; a total waste of time."


def sha256(path: Path) -> str:
    """Return a file's sha256 hex digest."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_manifest(folder: Path, name: str) -> None:
    """Write a manifest.json listing every file of the folder with its sha256."""
    files = {p.name: sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != "manifest.json"}
    manifest = {"name": name, "created_at": "2025-01-01T00:00:00Z", "source": {"model": "tiny-random-bert"},
                "versions": {}, "quantization": None, "validation": {"note": "random weights"}, "files": files}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))


def build_tiny_model(folder: Path, labels: list[str], model_max_length: int = 32) -> Path:
    """Export a tiny random BERT classifier (tests/export/tiny.py's) with optimum, with a manifest."""
    from optimum.exporters.onnx import main_export

    from tests.export.tiny import build_checkpoint

    checkpoint = build_checkpoint(folder.parent / f"{folder.name}-checkpoint", "bert", dict(enumerate(labels)),
                                  model_max_length=model_max_length)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings of torch.onnx, not ours
        main_export(model_name_or_path=str(checkpoint), output=folder, task="text-classification")
    write_manifest(folder, folder.name)
    return folder


@dataclass
class Server:
    """A running `python -m service` process."""

    url: str
    process: subprocess.Popen
    log: list[str] = field(default_factory=list)


def service_env(**overrides: str) -> dict[str, str]:
    """Return the environment for a service subprocess: the caller's, minus its SERVICE_* values."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVICE_")}
    env.update({"SERVICE_HOST": "127.0.0.1", "SERVICE_PORT": "0", **overrides})
    return env


@contextmanager
def flooding(url: str, path: str, body: bytes, clients: int) -> Iterator[list[int]]:
    """POST body to path from `clients` kept-alive connections, back to back, until the block ends.

    Yields the list of statuses answered so far (appended as answers come); the clients have
    stopped and their connections closed when the block is left.
    """
    address = urlsplit(url)
    stop, statuses = threading.Event(), []

    def flood() -> None:
        connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
        try:
            while not stop.is_set():
                connection.request("POST", path, body=body, headers={"Content-Type": "application/json"})
                response = connection.getresponse()
                response.read()
                statuses.append(response.status)
        finally:
            connection.close()

    threads = [threading.Thread(target=flood) for _ in range(clients)]
    for thread in threads:
        thread.start()
    try:
        yield statuses
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)


@contextmanager
def running_server(timeout: float = START_TIMEOUT, **overrides: str) -> Iterator[Server]:
    """Start `python -m service` on a free port (SERVICE_PORT=0), wait for /ready, stop it at exit."""
    process = subprocess.Popen([sys.executable, "-m", "service"], cwd=REPO, env=service_env(**overrides),
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    urls: queue.Queue[str | None] = queue.Queue()

    def drain() -> None:
        # keep reading so a chatty server never blocks on a full pipe
        processes, serving = 1, 0
        for line in process.stderr:
            log.append(line)
            several = re.search(r"starting (\d+) server processes", line)
            if several:
                processes = int(several.group(1))
            found = re.search(r"serving model .* on (http://[^\s\"]+)", line)  # text or JSON lines
            if found:
                serving += 1
                if serving == processes:  # every process serves: their threads and sockets are all there
                    urls.put(found.group(1))
        process.stderr.close()  # at end of file: the process has exited
        urls.put(None)

    threading.Thread(target=drain, daemon=True).start()
    try:
        try:
            url = urls.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"the server did not log its URL within {timeout} s:\n{''.join(log)}", pytrace=False)
        if url is None:
            pytest.fail(f"the server exited with {process.wait(timeout=10)}:\n{''.join(log)}", pytrace=False)
        wait_ready(url, deadline=time.monotonic() + timeout)
        yield Server(url, process, log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def wait_ready(url: str, deadline: float) -> None:
    """Poll GET /ready until 200 or the deadline."""
    while True:
        try:
            with urllib.request.urlopen(f"{url}/ready", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass  # not listening yet, or 503 while warming up: poll again
        if time.monotonic() > deadline:
            pytest.fail(f"{url}/ready did not answer 200 in time", pytrace=False)
        time.sleep(0.1)



_TYPES: dict[str, Any] = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def schema_errors(value: Any, schema: dict[str, Any], document: dict[str, Any], where: str = "$") -> list[str]:
    """Return where value breaks schema: the JSON Schema subset the service's OpenAPI document uses."""
    if "$ref" in schema:
        name = schema["$ref"].removeprefix("#/components/schemas/")
        return schema_errors(value, document["components"]["schemas"][name], document, where)
    problems: list[str] = []
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is_type(value, t) for t in types):
            return [f"{where}: {value!r:.60} is not {types}"]
    if "const" in schema and value != schema["const"]:
        problems.append(f"{where}: {value!r} != {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{where}: {value!r} not in {schema['enum']}")
    for key in ("anyOf", "oneOf"):
        if key in schema:
            matches = sum(not schema_errors(value, option, document, where) for option in schema[key])
            if matches == 0 or (key == "oneOf" and matches > 1):
                problems.append(f"{where}: {matches} of the {key} options match {value!r:.60}")
    if isinstance(value, str) and len(value) < schema.get("minLength", 0):
        problems.append(f"{where}: shorter than {schema['minLength']}")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value < schema.get("minimum", value):
        problems.append(f"{where}: below {schema['minimum']}")
    if isinstance(value, list):
        if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value)):
            problems.append(f"{where}: {len(value)} items")
        for index, item in enumerate(value):
            problems += schema_errors(item, schema.get("items", {}), document, f"{where}[{index}]")
    if isinstance(value, dict):
        problems += [f"{where}: missing {key!r}" for key in schema.get("required", []) if key not in value]
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in properties:
                problems += schema_errors(item, properties[key], document, f"{where}.{key}")
            elif extra is False:
                problems.append(f"{where}: unexpected key {key!r}")
            elif isinstance(extra, dict):
                problems += schema_errors(item, extra, document, f"{where}.{key}")
    return problems


def _is_type(value: Any, name: str) -> bool:
    """Return whether value has the JSON Schema type name (bool is not a number)."""
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES[name])


def post_in_flight(port: int, text: str, sent: threading.Barrier) -> tuple[int, Any, float] | Exception:
    """POST /sentiment one text, wait at `sent` (so every such request is on the wire), then read the answer.

    Return (status, JSON body, monotonic time of the answer), or the exception a reset or cut-off body raised.
    """
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("POST", "/sentiment", body=json.dumps({"text": text}),
                           headers={"Content-Type": "application/json"})
        sent.wait()
        response = connection.getresponse()
        return response.status, json.loads(response.read()), time.monotonic()
    except Exception as exc:  # a reset or a cut-off body is what the stop tests look for
        return exc
    finally:
        connection.close()


def pytorch_pair_logits(checkpoint: Path, pairs: list[tuple[str, str]]) -> Any:
    """Return the original PyTorch model's logits [pairs, labels] for text pairs, encoded as the pipeline does."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    encoded = tokenizer([a for a, _ in pairs], [b for _, b in pairs], padding=True, truncation=True,
                        return_tensors="pt")
    with torch.inference_mode():
        return model(**encoded).logits.numpy()
