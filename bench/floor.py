"""The HTTP floor: the service's Flask + Waitress stack answering a constant, to show what the stack costs.

`python -m bench.floor` parses the JSON body of POST /sentiment and answers
{"label": "POSITIVE", "score": 0.99} without a model, with as many Waitress threads as the
service runs by default. Like the service it listens on SERVICE_HOST:SERVICE_PORT.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from flask import Flask, Response, jsonify, request
from waitress import create_server
from werkzeug.exceptions import BadRequest, HTTPException

from service.config import Settings

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "onnx_models" / "minilm-l6-sentiment"
ANSWER = {"label": "POSITIVE", "score": 0.99}


def create_app() -> Flask:
    """Return the app: POST /sentiment parses {"text": str} and answers ANSWER; errors as JSON."""
    app = Flask(__name__, static_folder=None)

    @app.post("/sentiment")
    def sentiment() -> Response:
        body = request.get_json()  # Werkzeug: 415 without a JSON content type, 400 on bad JSON
        if not isinstance(body, dict) or not isinstance(body.get("text"), str):
            raise BadRequest('the body must be a JSON object with a string "text"')
        return jsonify(ANSWER)

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> tuple[Response, int]:
        return jsonify(error=error.description), error.code or 500

    return app


def server_settings() -> Settings:
    """Return the service's default settings (its Waitress threads and connection limit)."""
    return Settings.from_mapping({"MODEL_DIR": str(DEFAULT_MODEL)})


def main(argv: list[str] | None = None) -> int:
    """Serve the floor until SIGTERM or Ctrl-C; return the exit code."""
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=os.environ.get("SERVICE_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("SERVICE_PORT", "8000")))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = server_settings()
    try:
        server = create_server(create_app(), host=args.host, port=args.port, threads=settings.threads,
                               connection_limit=settings.connection_limit, asyncore_use_poll=True,
                               expose_tracebacks=False, ident="bench-floor")
    except (OSError, ValueError) as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)  # Waitress' run() stops cleanly on KeyboardInterrupt
    logging.getLogger("bench.floor").info("HTTP floor with %d waitress threads on http://%s:%s",
                                          settings.threads, server.effective_host, server.effective_port)
    server.run()
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    """Turn SIGTERM into KeyboardInterrupt."""
    raise KeyboardInterrupt


if __name__ == "__main__":
    raise SystemExit(main())
