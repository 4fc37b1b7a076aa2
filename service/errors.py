"""One API error type, and handlers that turn every failure into a JSON {"error": ...} body."""

from __future__ import annotations

import logging
import re
import uuid

from flask import Flask, Response, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException

from service.classifier import InferenceError

logger = logging.getLogger(__name__)

_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


class ApiError(Exception):
    """A client-facing error: an HTTP status, a message safe to show and, for TEI's routes, a type."""

    def __init__(self, status: int, message: str, error_type: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        """Store the status, the message, TEI's error_type (None: the body has no such key) and extra headers."""
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.headers = headers or {}


def request_id() -> str:
    """Return this request's id: the caller's X-Request-ID if sane, else a new one."""
    if "request_id" not in g:
        given = request.headers.get("X-Request-ID", "")
        g.request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex[:16]
    return g.request_id


def _json_error(status: int, message: str, error_type: str | None = None) -> tuple[Response, int]:
    """Return the error body every route uses: {"error"}, plus "error_type" on TEI's routes."""
    body = {"error": message} if error_type is None else {"error": message, "error_type": error_type}
    return jsonify(body), status


def handle_api_error(exc: ApiError) -> tuple[Response, int]:
    """Return an ApiError as JSON, with its headers."""
    response, status = _json_error(exc.status, exc.message, exc.error_type)
    response.headers.update(exc.headers)
    return response, status


def handle_http_exception(exc: HTTPException) -> Response:
    """Return Werkzeug's HTTP errors (404, 405, 413, ...) as JSON, keeping headers such as Allow."""
    response = exc.get_response()
    if exc.code == 413:
        message = f"request body too large: the limit is {current_app.config['MAX_CONTENT_LENGTH']} bytes"
    else:
        message = (exc.name or "error").lower()
    response.set_data(current_app.json.dumps({"error": message}))
    response.content_type = "application/json"
    return response


def handle_inference_error(exc: InferenceError) -> tuple[Response, int]:
    """Log a model failure with its cause and answer a generic 500."""
    logger.error("request %s: inference failed: %s", request_id(), exc, exc_info=exc)
    return _json_error(500, "inference failed")


def handle_unexpected(exc: Exception) -> tuple[Response, int]:
    """Log anything else with its traceback and answer a generic 500, never the details."""
    logger.exception("request %s: unhandled %s", request_id(), type(exc).__name__)
    return _json_error(500, "internal error")


def add_request_id(response: Response) -> Response:
    """Echo the request id so a client report can be matched to the server log."""
    response.headers["X-Request-ID"] = request_id()
    return response


def init_app(app: Flask) -> None:
    """Register the error handlers and the request id header."""
    app.register_error_handler(ApiError, handle_api_error)
    app.register_error_handler(HTTPException, handle_http_exception)
    app.register_error_handler(InferenceError, handle_inference_error)
    app.register_error_handler(Exception, handle_unexpected)
    app.after_request(add_request_id)
