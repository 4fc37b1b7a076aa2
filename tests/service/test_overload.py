"""Overload on a real Waitress: a burst far over capacity is served or told to retry, then recovers."""

from __future__ import annotations

import http.client
import json
import re
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from service.app import create_app
from service.classifier import Classifier
from tests.testkit import NEGATIVE, POSITIVE, Server, running_server

BURST = 256
LONG = NEGATIVE + " It drags on and on." * 60  # over 256 tokens: the costliest request there is


def _post(port: int, text: str, timeout: float = 60) -> tuple[Any, ...]:
    """POST one text on a new connection; return (status, Retry-After, JSON body) or the exception."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", "/sentiment", body=json.dumps({"text": text}),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.getheader("Retry-After"), json.loads(response.read())
    except Exception as exc:  # a timeout or a reset is what this test looks for
        return ("failed", repr(exc), None)
    finally:
        connection.close()


def _metric(server: Server, name: str) -> float:
    """Return one sample of GET /metrics."""
    address = urlsplit(server.url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
    connection.request("GET", "/metrics")
    text = connection.getresponse().read().decode()
    connection.close()
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert found, f"{name} is not in /metrics"
    return float(found.group(1))


def test_a_burst_of_256_clients_is_served_or_told_to_retry_and_the_service_recovers(model_dir: Path) -> None:
    with running_server(SERVICE_MODEL_DIR=str(model_dir)) as server:  # the default settings
        port = urlsplit(server.url).port
        answers: list[tuple[Any, ...]] = [()] * BURST
        start = threading.Barrier(BURST)

        def client(index: int) -> None:
            start.wait()
            answers[index] = _post(port, LONG)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(BURST)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        failed = [answer for answer in answers if answer[0] not in (200, 503)]
        assert not failed, f"{len(failed)} clients were neither served nor told to retry: {failed[:3]}"
        served = [body for status, _, body in answers if status == 200]
        refused = [(retry_after, body) for status, retry_after, body in answers if status == 503]
        # far over capacity, so the bounded queue must have refused some, and served some
        assert served and refused, f"{len(served)} served, {len(refused)} refused"
        assert all(body["label"] == "NEGATIVE" for body in served)
        for retry_after, body in refused:
            assert retry_after is not None and retry_after.isdigit() and 1 <= int(retry_after) <= 60
            assert set(body) == {"error"} and body["error"].startswith("overloaded: ")
        rejected = _metric(server, 'service_rejections_total{reason="queue_full"}') + \
            _metric(server, 'service_rejections_total{reason="queue_timeout"}')
        assert rejected == len(refused)

        # afterwards: nothing left queued, ready, and a request is answered without queueing
        assert _metric(server, "service_queue_depth") == 0
        assert _post(port, POSITIVE)[0] == 200
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("GET", "/ready")
        assert connection.getresponse().status == 200
        connection.close()
        slow_before = _metric(server, "service_queue_wait_seconds_count") - \
            _metric(server, 'service_queue_wait_seconds_bucket{le="0.25"}')
        for _ in range(5):
            assert _post(port, POSITIVE)[0] == 200
        # no queue wait over 0.25 s in those five: back to normal (in the burst they waited seconds)
        slow_after = _metric(server, "service_queue_wait_seconds_count") - \
            _metric(server, 'service_queue_wait_seconds_bucket{le="0.25"}')
        assert slow_after == slow_before


def test_a_refused_request_is_503_json_with_retry_after(model_dir: Path, classifier: Classifier) -> None:
    app = create_app({"MODEL_DIR": str(model_dir)}, classifier=classifier)
    app.extensions["service.scheduler"].stop(timeout=10)  # a stopped queue refuses everything
    response = app.test_client().post("/sentiment", json={"text": POSITIVE},
                                      headers={"X-Request-ID": "refused-1"})
    assert response.status_code == 503
    assert response.get_json() == {"error": "the service is shutting down"}
    assert response.headers["Retry-After"] == "1"
    assert response.headers["X-Request-ID"] == "refused-1"
    metrics = app.test_client().get("/metrics").get_data(as_text=True)
    assert 'service_rejections_total{reason="shutting_down"} 1.0' in metrics
