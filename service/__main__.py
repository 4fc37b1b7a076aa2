"""Serve the app with Waitress: `python -m service`, configured by SERVICE_* environment variables."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Any

from waitress import create_server

from service import create_app
from service.classifier import InferenceError, ModelLoadError
from service.config import ConfigError, Settings

logger = logging.getLogger("service")


def describe(value: Any) -> str:
    """Return a short one-line text for an opaque manifest value such as quantization."""
    if value is None:
        return "none"
    if isinstance(value, dict):
        scalars = [f"{k}={v}" for k, v in value.items() if isinstance(v, (str, int, float, bool))]
        return ", ".join(scalars) or "see /info"
    return str(value)


def listen_urls(server: Any) -> list[str]:
    """Return the URLs Waitress actually listens on (the bound port when SERVICE_PORT=0)."""
    # create_server returns one TcpWSGIServer, or a MultiSocketServer when the host has several addresses
    listen = getattr(server, "effective_listen", None) or [(server.effective_host, server.effective_port)]
    return [f"http://[{host}]:{port}" if ":" in str(host) else f"http://{host}:{port}" for host, port in listen]


def main(argv: list[str] | None = None) -> int:
    """Validate settings, load the model, then serve until interrupted; return the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description="Serve an exported text classifier. Configure with SERVICE_MODEL_DIR, SERVICE_HOST, "
                    "SERVICE_PORT (0: any free port), SERVICE_THREADS, SERVICE_ORT_THREADS, SERVICE_MAX_BATCH, "
                    "SERVICE_MAX_CONTENT_LENGTH, SERVICE_BACKEND (onnx|pytorch|optimum), SERVICE_WARMUP.")
    parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app = create_app()
    except (ConfigError, ModelLoadError, InferenceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    settings: Settings = app.extensions["service.settings"]
    model = app.extensions["service.classifier"].info()
    try:
        server = create_server(app, host=settings.host, port=settings.port, threads=settings.threads,
                               expose_tracebacks=False, ident="onnx-classifier")
    except (OSError, ValueError) as exc:  # port in use, unknown host, ...
        print(f"error: cannot listen on {settings.host}:{settings.port}: {exc}", file=sys.stderr)
        return 2
    # Waitress shuts down cleanly (finishing in-flight requests) on KeyboardInterrupt; make SIGTERM do the same.
    signal.signal(signal.SIGTERM, _interrupt)
    logger.info("serving model %s (%s backend, quantization: %s) with %d waitress threads and %d ORT "
                "intra-op threads on %s", model["name"], settings.backend,
                describe(model.get("quantization")), settings.threads, settings.ort_threads,
                " ".join(listen_urls(server)))
    server.run()
    logger.info("stopped")
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    """Turn SIGTERM into the KeyboardInterrupt Waitress handles as a clean shutdown."""
    raise KeyboardInterrupt


if __name__ == "__main__":
    raise SystemExit(main())
