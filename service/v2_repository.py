"""The Open Inference Protocol's model repository extension, as Triton speaks it.

`POST /v2/repository/index` lists every model of the repository (`SERVICE_MODEL_DIR`) with its state;
`POST /v2/repository/models/{name}/load` loads (or reloads) a folder of the repository and answers once
every server process serves it; `.../unload` refuses the model's new requests, waits for those in flight,
then frees it in every process. Loading takes only a folder directly inside the repository (service.models).
Triton's load parameters that carry a config or files are refused: the folder is the model. Errors are
`{"error"}`: 400 for a bad name, a folder that fails to load or a single model folder, 404 for a name with
no folder. The API key guards these routes as every other.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from service import state
from service.errors import ApiError
from service.schemas import check_readable

bp = Blueprint("v2_repository", __name__, url_prefix="/v2/repository")


def _body() -> dict[str, Any]:
    """Return the request's JSON object; tritonclient sends an empty body to the index."""
    check_readable("unsupported media type: send a JSON body (Content-Type: application/json)")
    data = request.get_data(cache=False)
    if not data.strip():
        return {}
    try:
        body = current_app.json.loads(data)
    except (ValueError, RecursionError):
        raise ApiError(400, "invalid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request must be a JSON object")
    parameters = body.get("parameters", {})
    if parameters is not None and not isinstance(parameters, dict):
        raise ApiError(400, "'parameters' must be an object")
    return body


@bp.post("/index")
def index() -> Response:
    """List every model with its version, state (READY, UNAVAILABLE, LOADING, UNLOADING) and reason."""
    ready = _body().get("ready", False)
    if not isinstance(ready, bool):
        raise ApiError(400, "'ready' must be true or false")
    return jsonify(state.models().index(ready_only=ready))


@bp.post("/models/<model_name>/load")
def load(model_name: str) -> Response:
    """Load a model folder of the repository in every server process; 200 once they all serve it."""
    state.select(model_name)  # the request's records name it
    parameters = _body().get("parameters") or {}
    overrides = sorted(key for key in parameters if key == "config" or key.startswith("file:"))
    if overrides:
        raise ApiError(400, f"load parameters {', '.join(overrides)} are not supported: a model is its folder in "
                            "the repository, loaded as it is")
    state.models().load(model_name)
    return jsonify({})


@bp.post("/models/<model_name>/unload")
def unload(model_name: str) -> Response:
    """Unload a model in every server process once its requests in flight are answered."""
    state.select(model_name)  # the request's records name it
    _body()  # Triton's unload_dependents has no meaning here: a model has no dependents
    state.models().unload(model_name)
    return jsonify({})
