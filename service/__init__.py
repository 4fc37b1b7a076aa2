"""ONNX Runtime inference service for Hugging Face text classifiers.

The app is built by service.app.create_app(); `python -m service` (service/__main__.py) serves it.
Importing this package loads nothing: `python -m service` imports it before its own first line, and
a Ctrl-C during the imports that follow is handled there. `from service import create_app` still
works: the names of service.app below are looked up when first asked for (PEP 562).
"""

from __future__ import annotations

from typing import Any

_APP_NAMES = frozenset({"create_app", "configure", "load_classifier", "start_scheduler", "MODEL_PREFIX"})


def __getattr__(name: str) -> Any:
    """Return one of service.app's names, importing it then (the Flask app and its libraries)."""
    if name in _APP_NAMES:
        from service import app

        return getattr(app, name)
    raise AttributeError(f"module 'service' has no attribute {name!r}")
