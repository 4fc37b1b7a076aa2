"""An OTLP/HTTP sink for the traced variant: takes every export at once, as a healthy collector does."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Sink:
    """A receiver on a free loopback port that reads each POST /v1/traces and answers 200, counting them."""

    def __init__(self) -> None:
        """Listen and serve in a daemon thread of this process for as long as it runs."""
        self.exports = 0
        self.bytes = 0
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep the exporter's connection open between exports

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                sink.bytes += len(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                sink.exports += 1
                # an empty ExportTraceServiceResponse: zero bytes of protobuf, every span accepted
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass  # one line per export would only add noise to the run's output

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, name="otlp-sink", daemon=True).start()
