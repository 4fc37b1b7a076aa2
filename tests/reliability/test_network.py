"""An open network against the real server on loopback: slow, idle and pipelining clients, HTTP/1.1 details.

Every test talks raw sockets to a real `python -m service`; each sends a bounded number of connections
and finishes in seconds. The done-when bounds of issue 14: beside hundreds of half-sent connections a
normal request is answered within 1 s; pipelined requests are all answered, in order; nothing a client
sent is silently dropped (each request gets its answer or a clear JSON error).
"""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from bench.netload import (
    Answers,
    answered_408,
    close_all,
    connect,
    hold,
    hold_idle,
    process_stats,
    state,
    states,
    timed_requests,
)
from tests.reliability.kit import NEGATIVE, POSITIVE, REPO, Server, running_server, service_env

HELD = 600  # half-sent connections: more than the default SERVICE_CONNECTION_LIMIT
FAST = 1.0  # seconds a normal request may take beside them (the bound)
TIGHT = {"SERVICE_CONNECTION_LIMIT": "200", "SERVICE_HEADER_TIMEOUT": "1.5", "SERVICE_BODY_TIMEOUT": "1.5",
         "SERVICE_KEEPALIVE_TIMEOUT": "3"}
SWEEP = 0.5  # the server looks at its clocks this often: a timeout fires up to this much late
KEY = "s3cret-key"


def port_of(server: Server) -> int:
    """Return the port a running server listens on."""
    return int(urlsplit(server.url).port)


def request(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    """Return one raw HTTP/1.1 request."""
    headers = dict(headers or {})
    if body or method == "POST":
        headers = {"Content-Type": "application/json", "Content-Length": str(len(body)), **headers}
    lines = [f"{method} {path} HTTP/1.1", "Host: t", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def sentiment(text: str, request_id: str) -> bytes:
    """Return a raw POST /sentiment for one text, tagged with an X-Request-ID."""
    return request("POST", "/sentiment", json.dumps({"text": text}).encode(), {"X-Request-ID": request_id})


@pytest.fixture(scope="module")
def tight(default_model: str) -> Iterator[Server]:
    """Return a server with a small connection budget and short clocks, so the bounds show in seconds."""
    with running_server(SERVICE_MODEL_DIR=default_model, **TIGHT) as server:
        yield server


@pytest.fixture(scope="module")
def keyed(default_model: str) -> Iterator[Server]:
    """Return a server that requires an API key."""
    with running_server(SERVICE_MODEL_DIR=default_model, SERVICE_API_KEY=KEY) as server:
        yield server


# ---- slow and idle clients ---------------------------------------------------------------------

def test_hundreds_of_half_sent_connections_leave_a_normal_client_fast(live: Server) -> None:
    port = port_of(live)
    held = hold(port, HELD)
    try:
        fresh, kept = timed_requests(port, 20)
        post = Answers(connect(port))
        post.sock.sendall(sentiment(POSITIVE, "p"))
        started = time.monotonic()
        assert post.next(timeout=FAST).json()["label"] == "POSITIVE"
        classified = time.monotonic() - started
        post.sock.close()
        counts = states(held)
    finally:
        close_all(held)
    assert max(fresh) < FAST and max(kept) < FAST and classified < FAST, (max(fresh), max(kept), classified)
    # none was dropped unanswered: each is still waiting, or got the JSON 408 that made room for others
    assert counts["closed"] == 0 and counts["open"] + counts["answered"] == HELD, counts


def test_within_the_budget_half_sent_connections_are_held_and_cost_no_thread(tight: Server) -> None:
    port = port_of(tight)
    before = process_stats(tight.process.pid)
    held = hold(port, 150) + hold_idle(port, 40)
    try:
        time.sleep(0.3)  # the server accepts them
        during = process_stats(tight.process.pid)
        counts = states(held)
    finally:
        close_all(held)
    assert counts == {"open": 190, "answered": 0, "closed": 0}
    assert during["fds"] >= before["fds"] + 180  # really held: a socket each (others may close meanwhile)
    assert during["threads"] == before["threads"]  # Waitress' request threads, none per connection


def test_beyond_the_budget_the_oldest_half_sent_connections_get_a_408(tight: Server) -> None:
    time.sleep(1)  # the connections of the test before are closed
    port = port_of(tight)
    held = hold(port, 350)  # past the budget of 200: each new one sheds older ones
    try:
        # the server accepts them, well before the head timeout (several processes take turns,
        # one connection at a time, so a burst takes them longer than one process)
        time.sleep(0.8)
        counts = states(held)
        fresh, _ = timed_requests(port, 5)
        shed = held[:50]  # the oldest
        assert all(answered_408(sock) for sock in shed)
    finally:
        close_all(held)
    assert max(fresh) < FAST
    assert counts["closed"] == 0 and counts["answered"] >= 150 and counts["open"] >= 150, counts


def test_a_stalled_head_gets_a_json_408_in_time(tight: Server) -> None:
    limit = float(TIGHT["SERVICE_HEADER_TIMEOUT"])
    with connect(port_of(tight)) as sock:
        started = time.monotonic()
        sock.sendall(b"POST /sentiment HTTP/1.1\r\nHost: t\r\nContent-Le")
        answer = Answers(sock).next(timeout=limit + 5)
        waited = time.monotonic() - started
    assert (answer.status, answer.headers["content-type"], answer.headers["connection"]) == (
        408, "application/json", "close")
    assert answer.json() == {"error": f"request timeout: the request head was not received within {limit:g} s"}
    assert limit <= waited < limit + SWEEP + 1


def test_a_trickled_head_meets_the_head_timeout_too(tight: Server) -> None:
    limit = float(TIGHT["SERVICE_HEADER_TIMEOUT"])
    trickle = b"GET /health HTTP/1.1\r\n" + b"X-Slow: " + b"a" * 100
    with connect(port_of(tight)) as sock:
        started = time.monotonic()
        for byte in trickle:  # a byte every 0.1 s: never idle, never done
            sock.sendall(bytes([byte]))
            time.sleep(0.1)
            if state(sock) != "open" or time.monotonic() - started > limit + 3:
                break
        answer = Answers(sock).next(timeout=5)
        waited = time.monotonic() - started
    assert answer.status == 408 and waited < limit + SWEEP + 1


def test_a_stalled_body_gets_a_json_408_and_others_are_served(tight: Server) -> None:
    limit = float(TIGHT["SERVICE_BODY_TIMEOUT"])
    port = port_of(tight)
    with connect(port) as sock:
        sock.sendall(b"POST /sentiment HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 200\r\n\r\n{\"text\": \"a lov")
        started = time.monotonic()
        fresh, _ = timed_requests(port, 5)  # served meanwhile
        answer = Answers(sock).next(timeout=limit + 5)
        waited = time.monotonic() - started
        # the lingering close reads what the client still sends: no reset, then the close
        sock.sendall(b"ely film\"}" + b" " * 180)
        assert Answers(sock).nothing_more(3)
    assert max(fresh) < FAST
    assert answer.status == 408 and answer.headers["content-type"] == "application/json"
    assert answer.json() == {"error": f"request timeout: the request body was not received within {limit:g} s"}
    assert limit - 0.1 <= waited < limit + SWEEP + 1


def test_a_silent_connection_is_closed_after_the_head_timeout(tight: Server) -> None:
    limit = float(TIGHT["SERVICE_HEADER_TIMEOUT"])
    with connect(port_of(tight)) as sock:
        started = time.monotonic()
        answers = Answers(sock)
        with pytest.raises(EOFError):  # no request was made, so there is nothing to answer
            answers.next(timeout=limit + 5)
        assert limit <= time.monotonic() - started < limit + SWEEP + 1
        assert answers.buffer == b""


def test_kept_alive_connections_live_while_used_and_close_when_idle(tight: Server) -> None:
    keepalive = float(TIGHT["SERVICE_KEEPALIVE_TIMEOUT"])
    header = float(TIGHT["SERVICE_HEADER_TIMEOUT"])
    with connect(port_of(tight)) as sock:
        answers = Answers(sock)
        started = time.monotonic()
        while time.monotonic() - started < keepalive + header:  # longer than both clocks, in use all along
            last = time.monotonic()
            sock.sendall(request("GET", "/health"))
            assert answers.next().status == 200
            time.sleep(0.4)
        with pytest.raises(EOFError):  # idle since its last request: closed after the keep-alive time
            answers.next(timeout=keepalive + 5)
        assert keepalive <= time.monotonic() - last < keepalive + SWEEP + 1


# ---- HTTP/1.1 ----------------------------------------------------------------------------------

def test_three_pipelined_requests_get_three_answers_in_order(live: Server) -> None:
    with connect(port_of(live)) as sock:
        sock.sendall(b"".join(request("GET", path, headers={"X-Request-ID": rid})
                              for path, rid in (("/health", "one"), ("/info", "two"), ("/ready", "three"))))
        answers = Answers(sock)
        got = [answers.next(timeout=5) for _ in range(3)]
        assert answers.nothing_more()
    assert [(a.status, a.headers["x-request-id"]) for a in got] == [(200, "one"), (200, "two"), (200, "three")]
    assert got[0].json() == {"status": "ok"} and "versions" in got[1].json()


def test_pipelining_across_posts_with_bodies(live: Server) -> None:
    with connect(port_of(live)) as sock:
        sock.sendall(request("GET", "/health", headers={"X-Request-ID": "a"}) + sentiment(POSITIVE, "b")
                     + sentiment(NEGATIVE, "c") + request("GET", "/health", headers={"X-Request-ID": "d"}))
        answers = Answers(sock)
        got = [answers.next(timeout=30) for _ in range(4)]
        # and one more, sent in two writes with the split inside the body
        tail = sentiment(POSITIVE, "e")
        sock.sendall(tail[:-10])
        time.sleep(0.2)
        sock.sendall(tail[-10:])
        last = answers.next(timeout=30)
    assert [a.headers["x-request-id"] for a in got + [last]] == ["a", "b", "c", "d", "e"]
    assert [a.json()["label"] for a in (got[1], got[2], last)] == ["POSITIVE", "NEGATIVE", "POSITIVE"]


def test_a_pipelined_chunked_body_and_an_error_then_close(live: Server) -> None:
    body = json.dumps({"text": POSITIVE}).encode()
    chunked = (b"POST /sentiment HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
               b"Transfer-Encoding: chunked\r\nX-Request-ID: c1\r\n\r\n"
               + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
    bad = b"POST /sentiment HTTP/1.1\r\nHost: t\r\nContent-Length: -5\r\n\r\n"
    with connect(port_of(live)) as sock:
        sock.sendall(chunked + bad + request("GET", "/health"))
        answers = Answers(sock)
        first, second = answers.next(timeout=30), answers.next(timeout=5)
        # after a framing error nothing behind it can be delimited: the answer says the connection closes
        with pytest.raises(EOFError):
            answers.next(timeout=5)
    assert (first.status, first.headers["x-request-id"], first.json()["label"]) == (200, "c1", "POSITIVE")
    assert (second.status, second.headers["connection"]) == (400, "close") and "error" in second.json()


def test_expect_100_continue_gets_100_then_the_answer(live: Server) -> None:
    body = json.dumps({"text": POSITIVE}).encode()
    with connect(port_of(live)) as sock:
        sock.sendall(request("POST", "/sentiment", headers={"Expect": "100-continue",
                                                            "Content-Length": str(len(body))}))
        answers = Answers(sock)
        assert answers.next(timeout=5, interim=True).status == 100
        sock.sendall(body)
        answer = answers.next(timeout=30)
    assert answer.status == 200 and answer.json()["label"] == "POSITIVE"


@pytest.mark.parametrize(("path", "length", "status", "error"), [
    ("/sentiment", 3 * 1024 * 1024, 413, "request body too large: the limit is 2097152 bytes"),
    ("/no/such/path", 100, 404, "not found"),
    ("/health", 100, 405, "method not allowed"),
], ids=["over-the-limit", "unknown-path", "wrong-method"])
def test_expect_100_continue_refused_at_once_without_the_body(live: Server, path: str, length: int, status: int,
                                                              error: str) -> None:
    head = (f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nExpect: 100-continue\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()
    with connect(port_of(live)) as sock:
        started = time.monotonic()
        sock.sendall(head)
        answer = Answers(sock).next(timeout=FAST, interim=True)  # the first answer is the final one
    assert time.monotonic() - started < FAST
    assert (answer.status, answer.headers["connection"], answer.json()) == (status, "close", {"error": error})


def test_expect_100_continue_without_a_body_is_answered(live: Server) -> None:
    with connect(port_of(live)) as sock:
        sock.sendall(b"POST /sentiment HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n")
        answer = Answers(sock).next(timeout=5, interim=True)
    assert (answer.status, answer.json()) == (400, {"error": "invalid JSON"})


def test_expect_100_continue_with_a_missing_or_wrong_key_is_401_at_once(keyed: Server) -> None:
    body = json.dumps({"text": POSITIVE}).encode()
    for authorization, error in ((None, "missing API key: send the header Authorization: Bearer <key>"),
                                 ("Bearer wrong", "invalid API key")):
        head = (b"POST /sentiment HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nExpect: 100-continue\r\n"
                b"Content-Length: %d\r\n" % len(body)
                + (f"Authorization: {authorization}\r\n".encode() if authorization else b"") + b"\r\n")
        with connect(port_of(keyed)) as sock:
            sock.sendall(head)
            answer = Answers(sock).next(timeout=FAST, interim=True)
            sock.sendall(body)  # a client that sends the body anyway is read and dropped, not reset
        assert (answer.status, answer.json()) == (401, {"error": error})
        assert answer.headers["www-authenticate"].startswith("Bearer") and answer.headers["connection"] == "close"
    with connect(port_of(keyed)) as sock:  # the right key: 100, then the answer
        sock.sendall(b"POST /sentiment HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nExpect: 100-continue"
                     b"\r\nAuthorization: Bearer %s\r\nContent-Length: %d\r\n\r\n" % (KEY.encode(), len(body)))
        answers = Answers(sock)
        assert answers.next(timeout=5, interim=True).status == 100
        sock.sendall(body)
        assert answers.next(timeout=30).json()["label"] == "POSITIVE"


@pytest.mark.parametrize("path", ["/health", "/ready", "/info", "/openapi.json", "/metrics"])
def test_head_on_get_routes_has_the_headers_and_no_body(live: Server, path: str) -> None:
    with connect(port_of(live)) as sock:
        sock.sendall(request("GET", path) + request("HEAD", path) + request("GET", "/health"))
        answers = Answers(sock)
        get, head = answers.next(timeout=10), answers.next("HEAD", timeout=10)
        after = answers.next(timeout=10)  # parses only if HEAD sent no body bytes
    assert head.status == 200 and head.body == b""
    assert head.headers["content-type"] == get.headers["content-type"]
    if path != "/metrics":  # the metrics text changes between the two requests
        assert int(head.headers["content-length"]) == len(get.body)
    assert after.json() == {"status": "ok"}


def test_head_on_a_post_route_is_405_without_body(live: Server) -> None:
    with connect(port_of(live)) as sock:
        sock.sendall(request("HEAD", "/sentiment") + request("GET", "/health"))
        answers = Answers(sock)
        head = answers.next("HEAD", timeout=10)
        assert answers.next(timeout=10).json() == {"status": "ok"}
    assert head.status == 405 and set(head.headers["allow"].split(", ")) == {"POST", "OPTIONS"}


@pytest.mark.parametrize("head", [
    b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n",
    b"GET /" + b"a" * 40_000 + b" HTTP/1.1\r\nHost: t\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: t\r\n" + b"X-Many: b\r\n" * 4_000 + b"\r\n",
    b"GET /health HTTP/1.1\r\nHost: t\r\nX-Endless: " + b"a" * 1_000_000,  # and the client keeps sending
], ids=["one-big-header", "long-request-line", "many-headers", "a-megabyte-of-header"])
def test_a_head_over_the_limit_is_a_json_431(live: Server, head: bytes) -> None:
    with connect(port_of(live)) as sock:
        try:
            sock.sendall(head)
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered and lingering closed before it was all sent: the answer must still be there
        answer = Answers(sock).next(timeout=10)
    assert (answer.status, answer.headers["content-type"], answer.headers["connection"]) == (
        431, "application/json", "close")
    assert answer.json() == {"error": "request header fields too large: exceeds max_header of 32768"}


def test_a_head_just_under_the_limit_is_served(live: Server) -> None:
    head = request("GET", "/health", headers={"X-Big": "a" * 32_000})
    assert len(head) < 32 * 1024
    with connect(port_of(live)) as sock:
        sock.sendall(head)
        assert Answers(sock).next(timeout=10).json() == {"status": "ok"}


# ---- the stop and the open-files limit ------------------------------------------------------------

def test_pipelined_requests_during_the_stop_are_all_answered_the_last_says_close(default_model: str) -> None:
    batch = request("POST", "/sentiment", json.dumps({"texts": [NEGATIVE] * 32}).encode(),
                    {"X-Request-ID": "batch"})
    with running_server(SERVICE_MODEL_DIR=default_model) as server:
        with connect(port_of(server), timeout=30) as sock:
            time.sleep(0.1)  # accepted
            server.process.send_signal(signal.SIGTERM)
            time.sleep(0.05)  # draining; a connection quiet for less than the grace period stays open
            sock.sendall(batch + request("GET", "/health", headers={"X-Request-ID": "h1"})
                         + request("GET", "/health", headers={"X-Request-ID": "h2"}))
            answers = Answers(sock)
            got = [answers.next(timeout=30) for _ in range(3)]
            with pytest.raises(EOFError):
                answers.next(timeout=10)
        assert server.process.wait(timeout=15) == 0
    assert [(a.status, a.headers["x-request-id"]) for a in got] == [(200, "batch"), (200, "h1"), (200, "h2")]
    assert "connection" not in got[0].headers and got[2].headers["connection"] == "close"


def _start_with_open_files(soft: int, hard: int, limit: int, model: str) -> subprocess.Popen:
    """Start `python -m service` with the given open-files limits and connection budget."""
    def limits() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return subprocess.Popen([sys.executable, "-m", "service"], cwd=REPO, preexec_fn=limits,
                            env=service_env(SERVICE_MODEL_DIR=model, SERVICE_CONNECTION_LIMIT=str(limit)),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_the_soft_open_files_limit_is_raised_for_the_budget(default_model: str) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY or hard < 2048:
        pytest.fail(f"this test needs a finite hard open-files limit of at least 2048, not {hard}", pytrace=False)
    process = _start_with_open_files(256, hard, 1000, default_model)
    try:
        deadline = time.monotonic() + 60
        while "serving model" not in process.stderr.readline():
            assert process.poll() is None and time.monotonic() < deadline, "the server did not start"
        line = next(line for line in open(f"/proc/{process.pid}/limits") if line.startswith("Max open files"))
        assert int(line.split()[3]) == hard, line
    finally:
        process.terminate()
        process.wait(timeout=15)


def test_a_budget_over_the_hard_open_files_limit_fails_start_up_in_one_line(default_model: str) -> None:
    process = _start_with_open_files(256, 512, 1000, default_model)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: SERVICE_CONNECTION_LIMIT 1000 "), stderr
