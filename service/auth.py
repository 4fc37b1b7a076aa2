"""Optional API key: with SERVICE_API_KEY set, requests need `Authorization: Bearer <key>`."""

from __future__ import annotations

import hmac

from flask import Flask, Response, jsonify, request

# Probes must work without the key (TEI and Kubernetes practice); /openapi.json describes how to
# authenticate, so a client needs it before it has the key. /metrics and /info stay closed: they
# describe traffic and versions, and Prometheus sends a bearer token (`authorization` in scrape_config).
OPEN_ENDPOINTS = frozenset({"api.health", "api.ready", "api.openapi",
                            "models_api.ready",  # /models/{name}/ready
                            "v2.live", "v2.ready"})  # the Open Inference Protocol's /health and /ready
REALM = "onnx-classifier"


def init_app(app: Flask, api_key: str | None) -> None:
    """Require the key on every route but OPEN_ENDPOINTS; do nothing when no key is configured."""
    if api_key is None:
        return
    expected = api_key.encode()

    @app.before_request
    def require_api_key() -> tuple[Response, int, dict[str, str]] | None:
        if request.endpoint in OPEN_ENDPOINTS:
            return None
        # Not request.authorization: Werkzeug reads "Bearer a=b" as the auth-param a, losing the token.
        scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return _unauthorized("missing API key: send the header Authorization: Bearer <key>", None)
        # constant time, so response timing does not reveal how much of a guess was right
        if hmac.compare_digest(token.encode(), expected):
            return None
        return _unauthorized("invalid API key", "invalid_token")


def _unauthorized(message: str, error: str | None) -> tuple[Response, int, dict[str, str]]:
    """Return 401 JSON with the RFC 6750 challenge."""
    challenge = f'Bearer realm="{REALM}"' + (f', error="{error}"' if error else "")
    return jsonify(error=message), 401, {"WWW-Authenticate": challenge}
