"""A flood of huge texts must not hold up short requests: each text costs what a max-length one does.

Texts near the 2 MiB body limit are cut to what the model can use before they are tokenized, and
short texts overtake queued long ones, so a short request's latency beside the flood stays within
20x its quiet latency (issue 14's bound).
"""

from __future__ import annotations

import http.client
import json
import statistics
import time
from collections.abc import Iterator

import pytest

from tests.reliability.kit import NEGATIVE, POSITIVE, Server, port_of, running_server
from tests.testkit import flooding

FLOODERS = 4  # clients sending near-limit texts back to back
SAMPLES = 25  # short requests measured quiet, then beside the flood
HUGE = json.dumps({"text": (NEGATIVE + " ") * 21_000}).encode()  # ~1.9 MiB, under the 2 MiB limit
SHORT = json.dumps({"text": POSITIVE}).encode()


@pytest.fixture(scope="module")
def server(default_model: str) -> Iterator[Server]:
    """Return a real service with the default settings on the default model."""
    with running_server(SERVICE_MODEL_DIR=default_model) as started:
        yield started


def _post(connection: http.client.HTTPConnection, body: bytes) -> tuple[int, float]:
    """Send one POST /sentiment on a kept-alive connection; return its status and latency."""
    started = time.perf_counter()
    connection.request("POST", "/sentiment", body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    response.read()
    return response.status, time.perf_counter() - started


def _short_latencies(server: Server) -> list[float]:
    """Return the latencies of SAMPLES short requests sent one after another."""
    connection = http.client.HTTPConnection("127.0.0.1", port_of(server), timeout=60)
    try:
        results = [_post(connection, SHORT) for _ in range(SAMPLES)]
    finally:
        connection.close()
    assert all(status == 200 for status, _ in results), results
    return [seconds for _, seconds in results]


def test_short_requests_stay_fast_beside_a_flood_of_huge_texts(server: Server) -> None:
    _short_latencies(server)  # warm: the first requests of a connection pay for set-up
    quiet = statistics.median(_short_latencies(server))
    with flooding(server.url, "/sentiment", HUGE, FLOODERS) as statuses:
        time.sleep(1.0)  # the flood is under way
        loaded = statistics.median(_short_latencies(server))
    print(f"\nshort p50 quiet {quiet * 1e3:.1f} ms, beside {FLOODERS} clients sending ~1.9 MiB texts "
          f"{loaded * 1e3:.1f} ms ({loaded / quiet:.1f}x); {len(statuses)} huge texts answered")
    assert statuses and set(statuses) <= {200, 503}, set(statuses)  # answered, or refused clearly
    assert statuses.count(200) >= FLOODERS
    assert loaded <= 20 * quiet
