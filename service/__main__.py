"""Serve the app with Waitress: `python -m service`, configured by SERVICE_* environment variables."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Any

from service import create_app
from service.classifier import InferenceError, ModelLoadError
from service.config import DEFAULTS, ConfigError, Settings, default_threads
from service.serve import GracefulServer, raise_open_files_limit

logger = logging.getLogger("service")

SETTINGS_HELP = """\
settings (environment variables; defaults in brackets):
  SERVICE_MODEL_DIR           exported model folder [{MODEL_DIR}]
  SERVICE_HOST                listen address [{HOST}]; 0.0.0.0 accepts other machines
  SERVICE_PORT                listen port [{PORT}]; 0 takes a free one, shown in the start-up line
  SERVICE_THREADS             Waitress request threads [batching: MAX_QUEUE + BATCH_MAX_TEXTS x
                              BATCH_WORKERS + 32 = {threads}; without batching or with
                              another backend than onnx: 4]
  SERVICE_ORT_THREADS         onnxruntime intra-op threads [usable cores]
  SERVICE_ORT_SPINNING        let idle onnxruntime threads spin briefly within a run [{ORT_SPINNING}]
  SERVICE_MAX_BATCH           most texts in one request [{MAX_BATCH}]
  SERVICE_MAX_CONTENT_LENGTH  largest request body in bytes [{MAX_CONTENT_LENGTH}]
  SERVICE_BACKEND             onnx, pytorch or optimum [{BACKEND}]
  SERVICE_WARMUP              run the model once before serving [{WARMUP}]
  SERVICE_BATCHING            batch concurrent requests into one model run [{BATCHING}]
  SERVICE_BATCH_MAX_TEXTS     most texts one model batch takes from the queue [{BATCH_MAX_TEXTS}]
  SERVICE_BATCH_MAX_TOKENS    most padded tokens in one model run [{BATCH_MAX_TOKENS}]
  SERVICE_BATCH_WAIT_MS       wait this long for more requests before a batch [{BATCH_WAIT_MS}]
  SERVICE_BATCH_WORKERS       model runs at once [2, or 1 on a single usable core]
  SERVICE_MAX_QUEUE           texts that may wait for the model; more get 503 at once [{MAX_QUEUE}]
  SERVICE_QUEUE_TIMEOUT       seconds a request may wait in the queue before a 503 [{QUEUE_TIMEOUT}]
  SERVICE_CONNECTION_LIMIT    open client connections served at once [{CONNECTION_LIMIT}]
  SERVICE_HEADER_TIMEOUT      seconds a client has to send a request head; then 408 [{HEADER_TIMEOUT}]
  SERVICE_BODY_TIMEOUT        seconds a client has to send a request body; then 408 [{BODY_TIMEOUT}]
  SERVICE_KEEPALIVE_TIMEOUT   seconds an idle kept-alive connection stays open [{KEEPALIVE_TIMEOUT}]
  SERVICE_MAX_HEADER_BYTES    largest request head (request line + headers); more: 431 [{MAX_HEADER_BYTES}]
  SERVICE_SHUTDOWN_TIMEOUT    seconds to finish requests in flight after SIGTERM [{SHUTDOWN_TIMEOUT}]
  SERVICE_API_KEY             require "Authorization: Bearer <key>" (not on /health, /ready,
                              /openapi.json) [unset: no key]
"""


def describe(value: Any) -> str:
    """Return a short one-line text for an opaque manifest value such as quantization."""
    if value is None:
        return "none"
    if isinstance(value, dict):
        scalars = [f"{k}={v}" for k, v in value.items() if isinstance(v, (str, int, float, bool))]
        return ", ".join(scalars) or "see /info"
    return str(value)


def main(argv: list[str] | None = None) -> int:
    """Validate settings, load the model, then serve until SIGTERM or Ctrl-C; return the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m service", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve an exported text classifier with Waitress. SIGTERM or Ctrl-C stops accepting, "
                    "finishes the requests in flight and exits 0; a second one exits at once.",
        epilog=SETTINGS_HELP.format(threads=default_threads(DEFAULTS),
                                    **{key: str(value).lower() if isinstance(value, bool) else value
                                       for key, value in DEFAULTS.items()}))
    parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    raise_open_files_limit()  # before the settings check SERVICE_CONNECTION_LIMIT against it
    try:
        app = create_app()
    except (ConfigError, ModelLoadError, InferenceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    settings: Settings = app.extensions["service.settings"]
    model = app.extensions["service.classifier"].info()
    try:
        server = GracefulServer(app, settings)
    except (OSError, ValueError) as exc:  # port in use, unknown host, ...
        print(f"error: cannot listen on {settings.host}:{settings.port}: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, server.request_stop)
    signal.signal(signal.SIGINT, server.request_stop)
    batching = (f"batching up to {settings.batch_max_texts} texts" if app.extensions["service.scheduler"]
                else "no batching")
    logger.info("serving model %s (%s backend, quantization: %s) with %d waitress threads, %s, %d ORT "
                "intra-op threads%s on %s", model["name"], settings.backend, describe(model.get("quantization")),
                settings.threads, batching, settings.ort_threads,
                ", API key required" if settings.api_key else "", " ".join(server.urls()))
    try:
        drained = server.run()
    except KeyboardInterrupt:
        logger.warning("stopped at once by a second signal: requests in flight were dropped")
        return 1
    logger.info("stopped" if drained else "stopped; some requests in flight were dropped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
