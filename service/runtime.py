"""onnxruntime, imported with its usage telemetry off.

onnxruntime's Linux builds start their telemetry when the module is first imported: a device id and
an event store for upload under ~/.cache/Microsoft/DeveloperTools/.onnxruntime. ORT_DISABLE_TELEMETRY=1
stops that, but only if it is set before that import (onnxruntime's Privacy.md); neither setting it
later nor `onnxruntime.disable_telemetry_events()` stops the files. So the service and the export
import onnxruntime through `onnxruntime()` below, when they first need it, not when their modules
are imported; a value the user set is kept.
"""

from __future__ import annotations

import os
from types import ModuleType

TELEMETRY_VARIABLE = "ORT_DISABLE_TELEMETRY"


def telemetry_off() -> None:
    """Set ORT_DISABLE_TELEMETRY=1 unless it is set: call it before anything imports onnxruntime."""
    os.environ.setdefault(TELEMETRY_VARIABLE, "1")


def onnxruntime() -> ModuleType:
    """Return the onnxruntime module, imported (the first time) with its telemetry off."""
    telemetry_off()
    import onnxruntime

    return onnxruntime
