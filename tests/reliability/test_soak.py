"""Soak: 32 concurrent clients for 60 s of mixed valid and invalid requests; every answer and the memory hold."""

from __future__ import annotations

import http.client
import json
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.kit import (
    LABELS,
    NEGATIVE,
    POSITIVE,
    Reply,
    Server,
    exchange,
    health_ok,
    metric_counts,
    port_of,
    running_server,
)

CLIENTS = 32
WARM_UP = 10.0  # seconds of the same load before the memory baseline: arenas and per-thread tokenizers fill
DURATION = 60.0  # seconds measured after the warm-up
RSS_GROWTH = 0.10  # issue #5: under 10 % after warm-up
JSON = {"Content-Type": "application/json"}


def prediction(answer: Any) -> bool:
    """Return whether answer is one {"label", "score"} with a known label and a score in [0, 1]."""
    return (isinstance(answer, dict) and set(answer) == {"label", "score"} and answer["label"] in LABELS
            and 0.0 <= answer["score"] <= 1.0)


def error(message: str) -> Callable[[Any], bool]:
    """Return a check for exactly {"error": message}."""
    return lambda answer: answer == {"error": message}


@dataclass(frozen=True)
class Kind:
    """One request of the mix and what its answer must be."""

    name: str
    method: str
    path: str
    body: bytes | None
    status: int
    check: Callable[[Any], bool]
    sheddable: bool = False  # reaches the model's queue, so an overload 503 with Retry-After is allowed


def post(name: str, path: str, payload: Any, status: int, check: Callable[[Any], bool]) -> Kind:
    """Return a JSON POST kind; a 200 kind reaches the model."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return Kind(name, "POST", path, body, status, check, sheddable=status == 200)


LONG = (NEGATIVE + " ") * 30  # ~700 tokens: truncated to the model's 256
MIXED = ["Loved it.", POSITIVE, LONG, "Fine, I guess. " * 20]
KINDS = [
    post("short", "/sentiment", {"text": "Loved it."}, 200, prediction),
    post("review", "/sentiment", {"text": POSITIVE}, 200, lambda a: prediction(a) and a["label"] == "POSITIVE"),
    post("long", "/sentiment", {"text": LONG}, 200, lambda a: prediction(a) and a["label"] == "NEGATIVE"),
    post("batch-of-4-lengths", "/sentiment", {"texts": MIXED}, 200,
         lambda a: isinstance(a, list) and len(a) == 4 and all(map(prediction, a))),
    post("inference-api-top-1", "/", {"inputs": NEGATIVE, "parameters": {"top_k": 1}}, 200,
         lambda a: len(a) == 1 and len(a[0]) == 1 and prediction(a[0][0])),
    post("inference-api-pair", "/", {"inputs": [POSITIVE, NEGATIVE]}, 200,
         lambda a: [[p["label"] for p in r][0] for r in a] == ["POSITIVE", "NEGATIVE"]),
    Kind("health", "GET", "/health", None, 200, lambda a: a == {"status": "ok"}),
    Kind("ready", "GET", "/ready", None, 200, lambda a: a == {"status": "ready"}),
    post("empty-text", "/sentiment", {"text": ""}, 400, error("text cannot be empty")),
    post("bad-json", "/sentiment", b"{not json", 400, error("invalid JSON")),
    post("nested-json", "/sentiment", b"[" * 10_000, 400, error("invalid JSON")),
    post("lone-surrogate", "/sentiment", {"text": "ok \ud800"}, 400,
         error("text is not valid Unicode: lone surrogate at character 3")),
    post("33-texts", "/sentiment", {"texts": ["x"] * 33}, 413,
         error("batch too large: 33 texts, the limit is 32 per request")),
    post("top-k-0", "/", {"inputs": "ok", "parameters": {"top_k": 0}}, 400,
         error("'top_k' must be an integer >= 1 or null")),
    Kind("wrong-method", "GET", "/sentiment", None, 405, error("method not allowed")),
    Kind("unknown-path", "GET", "/nowhere", None, 404, error("not found")),
    Kind("multipart", "POST", "/sentiment", b"--b--\r\n", 415,
         error("unsupported media type: send a JSON body (Content-Type: application/json)")),
]


@dataclass
class Tally:
    """What all clients saw, under one lock."""

    lock: threading.Lock
    statuses: Counter
    unexpected: list[str]
    latencies: list[float]


def client(port: int, first: int, stop_at: float, tally: Tally) -> None:
    """Send the mix in turn on one kept-alive connection until stop_at, checking every answer."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    index = first
    try:
        while time.monotonic() < stop_at:
            kind = KINDS[index % len(KINDS)]
            index += 1
            headers = {"Content-Type": "multipart/form-data; boundary=b"} if kind.name == "multipart" else JSON
            started = time.monotonic()
            try:
                reply: Reply | None = exchange(connection, kind.method, kind.path, kind.body, headers)
            except (OSError, http.client.HTTPException) as exc:
                reply, problem = None, f"{kind.name}: {type(exc).__name__}: {exc}"
                connection.close()
            seconds = time.monotonic() - started
            if reply is not None:
                problem = verdict(kind, reply)
            with tally.lock:
                tally.statuses[(kind.name, reply.status if reply else "error")] += 1
                tally.latencies.append(seconds)
                if problem:
                    tally.unexpected.append(problem)
    except Exception as exc:  # a dead client thread must fail the test, not just send less
        with tally.lock:
            tally.unexpected.append(f"client {first} crashed: {exc!r}")
    finally:
        connection.close()


def verdict(kind: Kind, reply: Reply) -> str | None:
    """Return what is wrong with a reply to kind, or None."""
    try:
        answer = reply.json()
    except ValueError:
        return f"{kind.name}: {reply.status} with a body that is not JSON: {reply.body[:80]!r}"
    try:
        expected = reply.status == kind.status and kind.check(answer)
    except (KeyError, IndexError, TypeError):  # an answer of the wrong shape
        expected = False
    if expected:
        return None
    if reply.status == 503 and kind.sheddable and "retry-after" in reply.headers and "error" in answer:
        return None  # the documented overload answer, counted in the tally
    return f"{kind.name}: {reply.status} {str(answer)[:120]}"


def rss_kib(pid: int) -> int:
    """Return a process's resident set size (VmRSS) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.fixture(scope="module")
def soak_server(default_model: str) -> Iterator[Server]:
    """Return a server of its own with the default settings, so its memory and metrics are the soak's alone."""
    with running_server(SERVICE_MODEL_DIR=default_model) as server:
        yield server


@pytest.mark.slow
def test_32_clients_for_60_s_of_mixed_requests(soak_server: Server) -> None:
    pid, port = soak_server.process.pid, port_of(soak_server)
    before = metric_counts(soak_server)
    tally = Tally(threading.Lock(), Counter(), [], [])
    started = time.monotonic()
    stop_at = started + WARM_UP + DURATION
    samples: list[tuple[float, int]] = []
    # spread the clients over the mix so every kind is in flight at once
    threads = [threading.Thread(target=client, args=(port, i * 7, stop_at, tally)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    while time.monotonic() < stop_at:
        samples.append((time.monotonic() - started, rss_kib(pid)))
        time.sleep(0.5)
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a client is stuck"
    after = metric_counts(soak_server)

    assert tally.unexpected == [], f"{len(tally.unexpected)} unexpected answers, e.g. {tally.unexpected[:10]}"
    total = sum(tally.statuses.values())
    served = {key: after.get(key, 0) - before.get(key, 0) for key in after}
    served[("/metrics", "GET", "200")] -= 1  # the `before` snapshot
    assert sum(served.values()) == total, "the server counted a different number of requests than were sent"
    shed = sum(n for (_, status), n in tally.statuses.items() if status == 503)
    model_requests = sum(n for (name, _), n in tally.statuses.items()
                         if any(kind.name == name and kind.sheddable for kind in KINDS))
    assert shed <= model_requests / 2, f"{shed} of {model_requests} model requests were shed with 503"
    baseline = next(rss for seconds, rss in samples if seconds >= WARM_UP)
    final = samples[-1][1]
    assert final <= baseline * (1 + RSS_GROWTH), f"RSS grew from {baseline} to {final} KiB after warm-up"
    assert health_ok(soak_server)
    latencies = sorted(tally.latencies)
    statuses: Counter = Counter()
    for (_, status), n in tally.statuses.items():
        statuses[status] += n
    print(f"\nsoak: {total} requests from {CLIENTS} clients in {WARM_UP + DURATION:.0f} s "
          f"({total / (WARM_UP + DURATION):.0f}/s), {shed} shed with 503, 0 unexpected; "
          f"latency p50 {statistics.median(latencies) * 1000:.0f} ms, "
          f"p99 {latencies[int(len(latencies) * 0.99)] * 1000:.0f} ms; server RSS {samples[0][1] / 1024:.0f} MiB "
          f"at start, {baseline / 1024:.0f} MiB after warm-up, {final / 1024:.0f} MiB at the end "
          f"({(final / baseline - 1) * 100:+.1f} %), peak {max(r for _, r in samples) / 1024:.0f} MiB; "
          f"statuses {dict(statuses)}")
