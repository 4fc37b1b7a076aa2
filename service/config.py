"""Service settings: defaults, validation and the CPU budget, checked once at start-up."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("onnx", "pytorch", "optimum")

# Flask config keys, as `app.config.from_prefixed_env("SERVICE")` names them (SERVICE_PORT -> PORT).
DEFAULTS: dict[str, Any] = {
    "MODEL_DIR": "onnx_models/minilm-l6-sentiment",
    "HOST": "127.0.0.1",
    "PORT": 8000,
    "THREADS": 4,  # Waitress' own default
    "ORT_THREADS": None,  # None: the usable cores, see usable_cores()
    "MAX_BATCH": 32,  # TEI's client batch limit
    "MAX_CONTENT_LENGTH": 2 * 1024 * 1024,  # 2 MiB, TEI's payload limit
    "BACKEND": "onnx",
    "WARMUP": True,
}


class ConfigError(ValueError):
    """A setting is invalid; the message names the environment variable and the bad value."""


@dataclass(frozen=True)
class Settings:
    """Validated settings of one service process."""

    model_dir: Path
    host: str
    port: int
    threads: int
    ort_threads: int
    max_batch: int
    max_content_length: int
    backend: str
    warmup: bool

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any]) -> Settings:
        """Validate a Flask-style config mapping (keys without the SERVICE_ prefix)."""
        ort_threads = config.get("ORT_THREADS")
        backend = str(config.get("BACKEND", DEFAULTS["BACKEND"])).strip().lower()
        if backend not in BACKENDS:
            raise ConfigError(f"SERVICE_BACKEND must be one of {', '.join(BACKENDS)}, got {backend!r}")
        return cls(
            model_dir=resolve_model_dir(config.get("MODEL_DIR", DEFAULTS["MODEL_DIR"])),
            host=_host(config.get("HOST", DEFAULTS["HOST"])),
            port=_integer(config, "PORT", 0, 65535, "an integer 0-65535 (0: any free port)"),
            threads=_integer(config, "THREADS", 1, 1024, "an integer 1-1024"),
            ort_threads=(usable_cores() if ort_threads in (None, "")
                         else _integer(config, "ORT_THREADS", 1, 1024, "an integer 1-1024")),
            max_batch=_integer(config, "MAX_BATCH", 1, 100_000, "an integer 1-100000"),
            max_content_length=_integer(config, "MAX_CONTENT_LENGTH", 1, 2**40,
                                        "a positive integer (bytes)"),
            backend=backend,
            warmup=_boolean(config, "WARMUP"),
        )


def _integer(config: Mapping[str, Any], key: str, low: int, high: int, expected: str) -> int:
    """Return config[key] as an int within [low, high] or raise ConfigError naming the variable."""
    value = config.get(key, DEFAULTS[key])
    # bool is an int subclass: SERVICE_PORT=true must not become port 1
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.strip().isdigit():
        number = int(value.strip())
    else:
        raise ConfigError(f"SERVICE_{key} must be {expected}, got {value!r}")
    if not low <= number <= high:
        raise ConfigError(f"SERVICE_{key} must be {expected}, got {value!r}")
    return number


def _boolean(config: Mapping[str, Any], key: str) -> bool:
    """Return config[key] as a bool, accepting the usual spellings of true and false."""
    value = config.get(key, DEFAULTS[key])
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"SERVICE_{key} must be true or false, got {value!r}")


def _host(value: Any) -> str:
    """Return a non-empty host string."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"SERVICE_HOST must be a host name or IP address, got {value!r}")
    return value.strip()


def resolve_model_dir(value: Any) -> Path:
    """Return the model folder: as given, or relative to the repo root when not found from cwd."""
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise ConfigError(f"SERVICE_MODEL_DIR must be a folder path, got {value!r}")
    path = Path(value).expanduser()
    if not path.is_absolute() and not path.exists() and (REPO_ROOT / path).exists():
        path = REPO_ROOT / path
    if not path.is_dir():
        raise ConfigError(f"SERVICE_MODEL_DIR {str(value)!r} is not a folder "
                          f"(looked in {Path.cwd()} and {REPO_ROOT})")
    return path.resolve()


def usable_cores() -> int:
    """Return the cores this process may use: CPU affinity, capped by a cgroup v2 cpu.max quota."""
    # ORT sizes its pool from the host's cores, not from the affinity mask or the container quota.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return max(cores, 1)
    if quota != "max" and quota.isdigit() and period.isdigit() and int(period) > 0:
        cores = min(cores, math.ceil(int(quota) / int(period)))
    return max(cores, 1)
