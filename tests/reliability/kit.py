"""Helpers of the reliability tests: raw HTTP exchanges, the leak check and server metrics."""

from __future__ import annotations

import http.client
import re
import socket
import time
from urllib.parse import urlsplit

# The shared helpers (a real Waitress runner, the schema check) are reused, not copied.
from bench.netload import Answer
from tests.testkit import (
    DEFAULT_MODEL,
    NEGATIVE,
    POSITIVE,
    REPO,
    Server,
    running_server,
    schema_errors,
    service_env,
    sha256,
)

__all__ = ["DEFAULT_MODEL", "LABELS", "NEGATIVE", "POSITIVE", "REPO", "Reply", "Server", "assert_no_leak",
           "exchange", "health_ok", "metric_counts", "port_of", "raw_exchange", "running_server", "schema_errors",
           "send", "service_env", "sha256"]

LABELS = {"NEGATIVE", "POSITIVE"}
TIMEOUT = 60.0  # seconds per request; a 2 MiB text takes a few seconds on 2 busy cores
# What must never reach a client: tracebacks, source or install paths, framework banners.
LEAKS = re.compile(r"Traceback|File \"|site-packages|/work/|/root/|/usr/lib|\.py\b|Werkzeug/|"
                   r"waitress/|Python/\d|onnxruntime \d", re.IGNORECASE)


Reply = Answer  # one HTTP answer: status, headers (lower-case names) and body bytes


def port_of(server: Server) -> int:
    """Return the port a running server listens on."""
    return int(urlsplit(server.url).port)


def send(server: Server, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None, timeout: float = TIMEOUT) -> Reply:
    """Send one request on a fresh connection with http.client and return the reply."""
    connection = http.client.HTTPConnection("127.0.0.1", port_of(server), timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        connection.close()


def exchange(connection: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> Reply:
    """Send one request on a kept-alive connection and return the reply."""
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())


def raw_exchange(server: Server, data: bytes, timeout: float = 10.0) -> tuple[Reply | None, float]:
    """Write raw bytes to a new socket; return the parsed reply (None if none came) and the seconds taken."""
    started = time.monotonic()
    received = b""
    with socket.create_connection(("127.0.0.1", port_of(server)), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer and close before reading everything we send
        sock.settimeout(max(timeout - (time.monotonic() - started), 0.1))
        try:
            while not _complete(received):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return _parse(received), time.monotonic() - started


def _complete(data: bytes) -> bool:
    """Return whether data holds a whole response with a Content-Length body."""
    head, separator, body = data.partition(b"\r\n\r\n")
    found = re.search(rb"\r\ncontent-length:\s*(\d+)", head, re.IGNORECASE)
    return bool(separator and found and len(body) >= int(found.group(1)))


def _parse(data: bytes) -> Reply | None:
    """Parse a raw HTTP/1.1 response with a Content-Length body, or return None."""
    if not _complete(data):
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return Reply(int(status_line.split()[1]), headers, body[: int(headers["content-length"])])


def assert_no_leak(reply: Reply, versions: list[str]) -> None:
    """Fail if a reply's headers or body carry a traceback, an internal path or a library version."""
    text = reply.body.decode("utf-8", "replace") + "\n" + "\n".join(f"{k}: {v}" for k, v in reply.headers.items())
    found = LEAKS.search(text)
    assert found is None, f"leak {found.group(0)!r} in {text[:300]!r}"
    leaked = [version for version in versions if version in text]
    assert not leaked, f"library version {leaked} in {text[:300]!r}"
    assert reply.headers.get("server", "onnx-classifier") == "onnx-classifier", reply.headers


def health_ok(server: Server) -> bool:
    """Return whether the server still answers GET /health with 200 {"status": "ok"}."""
    reply = send(server, "GET", "/health", timeout=30)
    return reply.status == 200 and reply.json() == {"status": "ok"}


def metric_counts(server: Server) -> dict[tuple[str, str, str], float]:
    """Return service_requests_total by (route, method, status) from the server's /metrics."""
    text = send(server, "GET", "/metrics").body.decode()
    counts = {}
    for line in text.splitlines():
        found = re.fullmatch(r'service_requests_total\{method="([^"]*)",route="([^"]*)",status="(\d+)"\} (\S+)',
                             line)
        if found:
            method, route, status, value = found.groups()
            counts[(route, method, status)] = float(value)
    return counts
