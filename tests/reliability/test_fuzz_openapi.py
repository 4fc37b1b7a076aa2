"""Schemathesis, driven by the service's own /openapi.json, against a real Waitress process."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.reliability.kit import Server, metric_counts, running_server, schema_errors, send

# Examples per operation and generation mode, and the requests the server must then have counted at
# least: a quick pass in the default tier, a thorough one in the slow tier.
DEPTHS = [pytest.param(50, 300, id="quick"), pytest.param(500, 1000, id="thorough", marks=pytest.mark.slow)]
# The service refuses schema-violating input with these; 413 is documented for too many texts.
# 404: a v2 model route naming another model; 422: TEI's routes refuse invalid fields so.
REJECTIONS = (400, 404, 413, 415, 422)
# Schema-valid requests TEI's routes may still refuse: /rerank on a model with two labels (424), an
# input over max_length with "truncate": false (422).
ACCEPTED = (200, 422, 424)
# Every character str.strip() removes: the service refuses a text made only of them.
BLANK = "".join(ch for ch in map(chr, range(sys.maxunicode + 1)) if ch.isspace())
NON_BLANK = f"[^{BLANK}]"  # none of them is special inside a regex character class


@pytest.fixture(scope="module")
def fuzz_server(default_model: str) -> Iterator[Server]:
    """Return a server of its own, so its /metrics count only the fuzzer's requests."""
    # SERVICE_MAX_BATCH=8 (documented in /openapi.json as maxItems) keeps each generated batch
    # cheap enough for 1,000 requests in about a minute on 2 cores; the limit is fuzzed all the same.
    with running_server(SERVICE_MODEL_DIR=default_model, SERVICE_MAX_BATCH="8") as server:
        yield server


def request_text_schemas(document: dict[str, Any]) -> list[dict[str, Any]]:
    """Return the string schemas of the texts in the two classification request bodies."""
    found: list[dict[str, Any]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "string" and node.get("minLength") == 1:
                found.append(node)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for name in ("SentimentRequest", "InferenceRequest"):
        walk(document["components"]["schemas"][name])
    return found


def with_non_blank_texts(document: dict[str, Any]) -> dict[str, Any]:
    """Return the document with the one rule it lacks: a text must hold a non-whitespace character."""
    patched = copy.deepcopy(document)
    for schema in request_text_schemas(patched):
        schema.setdefault("pattern", NON_BLANK)
    return patched


def test_the_served_document_says_texts_must_not_be_blank(fuzz_server: Server) -> None:
    schemas = request_text_schemas(send(fuzz_server, "GET", "/openapi.json").json())
    for blank in (" ", "\t\n", "\x1d", "\u3000"):
        assert all(not re.search(schema.get("pattern", ""), blank) for schema in schemas), blank


@pytest.mark.parametrize(("max_examples", "min_requests"), DEPTHS)
def test_schemathesis_finds_no_server_error_and_no_schema_break(fuzz_server: Server, tmp_path: Path,
                                                                max_examples: int, min_requests: int) -> None:
    document = send(fuzz_server, "GET", "/openapi.json").json()
    assert len(request_text_schemas(document)) == 4  # text, texts[], inputs (a string), inputs[]
    (tmp_path / "openapi.json").write_text(json.dumps(with_non_blank_texts(document)))
    (tmp_path / "schemathesis.toml").write_text(
        f"[checks.negative_data_rejection]\nexpected-statuses = {list(REJECTIONS)}\n"
        f"[checks.positive_data_acceptance]\nexpected-statuses = {list(ACCEPTED)}\n"
        # JSON Schema cannot tie a v2 tensor's shape to the length of its data: a schema-valid
        # infer request may still be refused with 400
        '[[operations]]\ninclude-path-regex = "/infer$"\n'
        f"checks.positive_data_acceptance.expected-statuses = {[*ACCEPTED, 400]}\n")
    before = metric_counts(fuzz_server)
    # One worker: with -w 2 schemathesis 4.32.5 raised an internal FlakyFailure (KeyError) here.
    result = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "--config-file", str(tmp_path / "schemathesis.toml"),
         "run", str(tmp_path / "openapi.json"), "--url", fuzz_server.url, "--checks", "all",
         "--max-examples", str(max_examples), "--generation-database", "none", "--request-timeout", "60",
         "--report", "json,har", "--report-json-path", str(tmp_path / "run.json"),
         "--report-har-path", str(tmp_path / "run.har"), "--no-color"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900)
    after = metric_counts(fuzz_server)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    report = json.loads((tmp_path / "run.json").read_text())
    assert report["failures"] == [] and report["errors"] == [], report
    assert report["operations"]["tested"] == len({(p, m) for p, item in document["paths"].items() for m in item})

    # Count for real, on the server: every request that reached the app, by route and status.
    seen = Counter({key: after.get(key, 0) - before.get(key, 0) for key in after})
    seen[("/metrics", "GET", "200")] -= 1  # the `before` snapshot itself
    total = sum(seen.values())
    assert total >= min_requests, seen
    assert not [key for key, n in seen.items() if n and key[2].startswith("5")], seen
    # routes are counted by Werkzeug rule (<name>), documented as OpenAPI paths ({name})
    assert {re.sub(r"<([^<>]+)>", r"{\1}", route) for (route, _, _), n in seen.items() if n} >= \
        set(document["paths"]), seen

    # An independent check of every recorded response against the served document's own schemas.
    entries = json.loads((tmp_path / "run.har").read_text())["log"]["entries"]
    broken = []
    for entry in entries:
        path, method = urlsplit(entry["request"]["url"]).path, entry["request"]["method"].lower()
        status = str(entry["response"]["status"])
        documented = document["paths"].get(path, {}).get(method, {}).get("responses", {}).get(status)
        content = (documented or {}).get("content", {}).get("application/json")
        if content is not None:
            broken += schema_errors(json.loads(entry["response"]["content"]["text"]), content["schema"], document)
    assert broken == []
    statuses = Counter(entry["response"]["status"] for entry in entries)
    routes: Counter[str] = Counter()
    for (route, _, _), n in seen.items():
        routes[route] += int(n)
    print(f"\nschemathesis: {report['test_cases']['generated']} test cases, {len(entries)} requests recorded, "
          f"{total} counted by the server; statuses {dict(sorted(statuses.items()))}; routes {dict(routes)}")
