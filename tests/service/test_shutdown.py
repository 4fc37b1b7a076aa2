"""SIGTERM under load on a real `python -m service`: requests in flight finish, then exit 0 in time."""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.testkit import NEGATIVE, POSITIVE, REPO, post_in_flight, running_server, service_env

IN_FLIGHT = 12  # requests on the wire when SIGTERM comes: 11 long texts and one upload half sent
LONG = NEGATIVE + " It drags on and on." * 60  # 256 tokens: each batch of these takes a while


def _post(connection: http.client.HTTPConnection, text: str) -> tuple[int, str | None, Any]:
    """POST one text; return the status, the Connection header and the JSON body (read whole)."""
    connection.request("POST", "/sentiment", body=json.dumps({"text": text}),
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    return response.status, response.getheader("Connection"), json.loads(response.read())


# From the interpreter's start through the package imports to the model load. SIGTERM as Ctrl-C: as a
# container's PID 1 a signal without a handler would be dropped, and the start would run on.
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
@pytest.mark.parametrize("delay", [0.05, 0.1, 0.15, 0.2, 0.3, 0.5])
def test_ctrl_c_while_starting_stops_without_a_traceback(model_dir: Path, delay: float,
                                                         stop: signal.Signals) -> None:
    process = subprocess.Popen([sys.executable, "-m", "service"], cwd=REPO,
                               env=service_env(SERVICE_MODEL_DIR=str(model_dir)), stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    process.send_signal(stop)
    out, err = process.communicate(timeout=60)
    assert "Traceback" not in out + err, err
    if process.returncode == -stop:  # before Python had a handler: killed by the signal itself
        assert err == "" and delay < 0.2  # the interpreter's first milliseconds only
    elif "serving model" not in err and "server processes" not in err:  # it stopped before serving, and says so
        assert process.returncode == 128 + stop and err.strip().endswith("stopped before serving"), err
    else:  # it was already serving, or its parent of several processes was: a graceful stop
        assert process.returncode == 0 and err.strip().endswith("stopped"), err


def test_sigterm_finishes_requests_in_flight_and_exits_0_within_10_s(model_dir: Path) -> None:
    with running_server(SERVICE_MODEL_DIR=str(model_dir)) as server:
        port = urlsplit(server.url).port
        sent = threading.Barrier(IN_FLIGHT + 1)
        answers: list[Any] = [None] * (IN_FLIGHT - 1)

        def in_flight(index: int) -> None:
            answers[index] = post_in_flight(port, LONG, sent)

        # a keep-alive client that goes on sending until the server says it closes the connection
        keep_alive: list[Any] = []

        def sequential() -> None:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            try:
                while not keep_alive or keep_alive[-1][1] != "close":
                    keep_alive.append(_post(connection, POSITIVE))
            except Exception as exc:
                keep_alive.append(exc)
            finally:
                connection.close()

        # an upload in progress: half the body before the signal, the rest after it
        signal_sent = threading.Event()
        upload: list[Any] = []

        def slow_upload() -> None:
            body = json.dumps({"texts": [POSITIVE, NEGATIVE] * 8}).encode()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=60) as raw:
                    raw.sendall(b"POST /sentiment HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                b"Content-Length: %d\r\n\r\n" % len(body) + body[:100])
                    sent.wait()
                    signal_sent.wait(timeout=30)
                    raw.sendall(body[100:])
                    connection = http.client.HTTPResponse(raw)
                    connection.begin()
                    upload.append((connection.status, json.loads(connection.read())))
            except Exception as exc:
                upload.append(exc)

        clients = [threading.Thread(target=sequential)]
        clients[0].start()
        while not keep_alive:
            time.sleep(0.01)
        clients += [threading.Thread(target=in_flight, args=(i,)) for i in range(IN_FLIGHT - 1)]
        clients.append(threading.Thread(target=slow_upload))
        for client in clients[1:]:
            client.start()
        sent.wait(timeout=30)  # every request is on the wire, none can be answered yet
        server.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        signal_sent.set()
        code = server.process.wait(timeout=15)
        exited_after = time.monotonic() - signalled
        for client in clients:
            client.join(timeout=30)

    log = "".join(server.log)
    assert code == 0, log[-2000:]
    assert exited_after < 10, f"exit took {exited_after:.1f} s"
    failures = [answer for answer in answers if not isinstance(answer, tuple)]
    assert not failures, f"requests in flight failed: {failures[:3]}\n{log[-2000:]}"
    assert all(status == 200 and body["label"] == "NEGATIVE" for status, body, _ in answers)
    assert max(answered for _, _, answered in answers) > signalled  # they really were in flight
    assert len(upload) == 1 and isinstance(upload[0], tuple), upload
    assert upload[0][0] == 200 and [p["label"] for p in upload[0][1]] == ["POSITIVE", "NEGATIVE"] * 8
    # the keep-alive client got only complete 200s, the last one announcing the close
    assert all(isinstance(answer, tuple) and answer[0] == 200 for answer in keep_alive), keep_alive[-3:]
    assert keep_alive[-1][1] == "close"
    assert "stopping: no longer accepting connections" in log
    assert re.search(r"INFO service(\[\d+\])?: stopped$", log, re.MULTILINE)  # the last process to stop
    with socket.socket() as probe:  # and nothing listens any more
        assert probe.connect_ex(("127.0.0.1", port)) != 0


CHURN_CLIENTS = 12  # each opens a new connection for every request, as a client without a pool does


def _one_request_on_a_new_connection(port: int) -> str:
    """Send one request on a new connection; return "answered", "never accepted" or what went wrong."""
    body = json.dumps({"text": POSITIVE}).encode()
    try:
        raw = socket.create_connection(("127.0.0.1", port), timeout=3)
    except OSError:  # refused, or the SYN went unanswered: the service never took this connection
        return "never accepted"
    with raw:
        raw.settimeout(20)
        try:
            raw.sendall(b"POST /sentiment HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            response = http.client.HTTPResponse(raw)
            response.begin()
            answer = json.loads(response.read())
        except (OSError, http.client.HTTPException, ValueError) as exc:
            return f"accepted, then {type(exc).__name__}: {exc}"
    if response.status == 200 and answer.get("label") == "POSITIVE":
        return "answered"
    if response.status == 503 and "error" in answer:
        return "answered"  # shutting down, said in JSON
    return f"accepted, then {response.status} {answer}"


@pytest.mark.parametrize("processes", ["1", "2"])
def test_a_stop_under_connection_churn_answers_every_connection_it_accepted(model_dir: Path,
                                                                            processes: str) -> None:
    with running_server(SERVICE_MODEL_DIR=str(model_dir), SERVICE_PROCESSES=processes) as server:
        port = urlsplit(server.url).port
        outcomes: list[str] = []
        stop = threading.Event()

        def churn() -> None:
            # until the service is gone: a refused connect after the stop, or a bound in time
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                outcome = _one_request_on_a_new_connection(port)
                outcomes.append(outcome)
                if stop.is_set() and outcome == "never accepted":
                    return

        clients = [threading.Thread(target=churn) for _ in range(CHURN_CLIENTS)]
        for client in clients:
            client.start()
        time.sleep(1.5)  # connections opening and closing all the time
        stop.set()
        server.process.send_signal(signal.SIGTERM)
        code = server.process.wait(timeout=20)
        for client in clients:
            client.join(timeout=40)

    log = "".join(server.log)
    assert code == 0, log[-2000:]
    lost = [outcome for outcome in outcomes if outcome not in ("answered", "never accepted")]
    assert not lost, f"{len(lost)} of {len(outcomes)} connections lost: {lost[:3]}\n{log[-1500:]}"
    assert outcomes.count("answered") > 100, outcomes.count("answered")  # the churn was real
