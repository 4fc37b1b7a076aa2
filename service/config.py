"""Service settings: defaults, validation and the CPU budget, checked once at start-up."""

from __future__ import annotations

import math
import os
import resource
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("onnx", "pytorch", "optimum")

# Flask config keys, as `app.config.from_prefixed_env("SERVICE")` names them (SERVICE_PORT -> PORT).
DEFAULTS: dict[str, Any] = {
    "MODEL_DIR": "onnx_models/minilm-l6-sentiment",
    "HOST": "127.0.0.1",
    "PORT": 8000,
    "THREADS": None,  # None: see default_threads()
    "ORT_THREADS": None,  # None: the usable cores, see usable_cores()
    # Idle intra-op threads spin briefly between a run's parallel sections, never between runs
    # (see service/classifier.py): the latency of spinning without burning the cores under load.
    "ORT_SPINNING": True,
    "MAX_BATCH": 32,  # TEI's client batch limit
    "MAX_CONTENT_LENGTH": 2 * 1024 * 1024,  # 2 MiB, TEI's payload limit
    "BACKEND": "onnx",
    "WARMUP": True,
    "BATCHING": True,
    "BATCH_MAX_TEXTS": 32,  # texts one worker batch takes from the queue
    # padded tokens of one session.run: past ~700 the time per text rose on 2 cores (cache), README
    "BATCH_MAX_TOKENS": 512,
    "BATCH_WAIT_MS": 0,  # no artificial wait: take what is queued when the worker is free
    # model runs at once; None: 2 when 2 or more cores are usable, else 1 (see default_workers())
    "BATCH_WORKERS": None,
    "MAX_QUEUE": 64,  # texts waiting for the worker; more is answered 503 at once
    "QUEUE_TIMEOUT": 5.0,  # seconds a request may wait in the queue before a 503
    "CONNECTION_LIMIT": 512,  # open connections Waitress serves at once (TEI: 512 concurrent requests)
    "SHUTDOWN_TIMEOUT": 8.0,  # seconds to finish in-flight requests after SIGTERM
    "API_KEY": None,  # None: no authentication
    # -- network bounds (service/serve.py; docs/reliability.md, Network) --
    # a request head in one write takes well under a second; nginx's CIS benchmark sets 10 s
    # (nginx 60 s, hyper 30 s by default)
    "HEADER_TIMEOUT": 10.0,
    "BODY_TIMEOUT": 30.0,  # seconds for the whole body: a 2 MiB body at 70 KB/s
    # Waitress' own channel_timeout; above the idle time of common client pools (Go's 90 s), so a
    # pooled connection is given up by its client before the server closes it under a new request
    "KEEPALIVE_TIMEOUT": 120.0,
    "MAX_HEADER_BYTES": 32 * 1024,  # nginx's large_client_header_buffers: 4 x 8 KiB
}
# Open file descriptors the process needs besides client connections (model, pipes, logs, ...).
_SPARE_FILES = 64


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
    ort_spinning: bool
    max_batch: int
    max_content_length: int
    backend: str
    warmup: bool
    batching: bool
    batch_max_texts: int
    batch_max_tokens: int
    batch_wait_ms: int
    batch_workers: int
    max_queue: int
    queue_timeout: float
    connection_limit: int
    shutdown_timeout: float
    api_key: str | None = field(repr=False)  # never in a log line or a traceback
    # -- network bounds (service/serve.py) --
    header_timeout: float = DEFAULTS["HEADER_TIMEOUT"]
    body_timeout: float = DEFAULTS["BODY_TIMEOUT"]
    keepalive_timeout: float = DEFAULTS["KEEPALIVE_TIMEOUT"]
    max_header_bytes: int = DEFAULTS["MAX_HEADER_BYTES"]

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
            threads=(default_threads(config) if config.get("THREADS") in (None, "")
                     else _integer(config, "THREADS", 1, 1024, "an integer 1-1024")),
            ort_threads=(usable_cores() if ort_threads in (None, "")
                         else _integer(config, "ORT_THREADS", 1, 1024, "an integer 1-1024")),
            ort_spinning=_boolean(config, "ORT_SPINNING"),
            max_batch=_integer(config, "MAX_BATCH", 1, 100_000, "an integer 1-100000"),
            max_content_length=_integer(config, "MAX_CONTENT_LENGTH", 1, 2**40,
                                        "a positive integer (bytes)"),
            backend=backend,
            warmup=_boolean(config, "WARMUP"),
            batching=_boolean(config, "BATCHING"),
            batch_max_texts=_integer(config, "BATCH_MAX_TEXTS", 1, 100_000, "an integer 1-100000"),
            batch_max_tokens=_integer(config, "BATCH_MAX_TOKENS", 1, 10_000_000, "an integer 1-10000000"),
            batch_wait_ms=_integer(config, "BATCH_WAIT_MS", 0, 1000, "an integer 0-1000 (milliseconds)"),
            batch_workers=_workers(config),
            max_queue=_max_queue(config),
            queue_timeout=_seconds(config, "QUEUE_TIMEOUT"),
            connection_limit=_connection_limit(config),
            shutdown_timeout=_seconds(config, "SHUTDOWN_TIMEOUT"),
            api_key=_api_key(config.get("API_KEY")),
            # -- network bounds (service/serve.py) --
            header_timeout=_seconds(config, "HEADER_TIMEOUT"),
            body_timeout=_seconds(config, "BODY_TIMEOUT"),
            keepalive_timeout=_seconds(config, "KEEPALIVE_TIMEOUT"),
            max_header_bytes=_integer(config, "MAX_HEADER_BYTES", 1024, 1024 * 1024,
                                      "an integer 1024-1048576 (bytes)"),
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


def default_threads(config: Mapping[str, Any]) -> int:
    """Return the default THREADS: enough for every text queued or running when batching, else 4."""
    # only the onnx backend batches; the reference backends stand for the original per-request service
    backend = str(config.get("BACKEND", DEFAULTS["BACKEND"])).strip().lower()
    if not _boolean(config, "BATCHING") or backend != "onnx":
        return 4  # each thread runs the model itself: more would oversubscribe the cores
    # Request threads mostly wait for the worker. With fewer of them than queued + running texts
    # plus a margin, the excess would wait unseen in Waitress' own unbounded task queue instead
    # of reaching SERVICE_MAX_QUEUE, which answers 503 at once.
    batch = _integer(config, "BATCH_MAX_TEXTS", 1, 100_000, "an integer 1-100000")
    return min(1024, _max_queue(config) + batch * _workers(config) + 32)


def _workers(config: Mapping[str, Any]) -> int:
    """Return BATCH_WORKERS, the model runs at once: by default 2, or 1 on a single usable core."""
    # Two runs at once keep both cores busy while one batch is collated or answered; more runs on
    # few cores only split the same cores (the intra-op pool is shared by concurrent runs).
    if config.get("BATCH_WORKERS") in (None, ""):
        return min(2, usable_cores())
    return _integer(config, "BATCH_WORKERS", 1, 64, "an integer 1-64")


def _seconds(config: Mapping[str, Any], key: str) -> float:
    """Return config[key] as a number of seconds, 0 < s <= 3600, or raise ConfigError."""
    value = config.get(key, DEFAULTS[key])
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not 0 < number <= 3600:  # also false for NaN
        raise ConfigError(f"SERVICE_{key} must be a number of seconds > 0 and <= 3600, got {value!r}")
    return number


def _max_queue(config: Mapping[str, Any]) -> int:
    """Return MAX_QUEUE, which must hold the largest request (MAX_BATCH texts)."""
    max_queue = _integer(config, "MAX_QUEUE", 1, 1_000_000, "an integer 1-1000000")
    max_batch = _integer(config, "MAX_BATCH", 1, 100_000, "an integer 1-100000")
    if max_queue < max_batch:
        raise ConfigError(f"SERVICE_MAX_QUEUE must be at least SERVICE_MAX_BATCH ({max_batch}) so the "
                          f"largest request fits, got {config.get('MAX_QUEUE')!r}")
    return max_queue


def _connection_limit(config: Mapping[str, Any]) -> int:
    """Return CONNECTION_LIMIT, checked against the open-files limit so accept() cannot fail."""
    limit = _integer(config, "CONNECTION_LIMIT", 1, 1_000_000, "an integer 1-1000000")
    # Waitress logs and retries a failing accept() in a busy loop when no descriptor is left.
    files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if files != resource.RLIM_INFINITY and limit + _SPARE_FILES > files:
        raise ConfigError(f"SERVICE_CONNECTION_LIMIT {limit} needs more open files than the limit of "
                          f"{files} (ulimit -n) allows: lower it below {max(files - _SPARE_FILES, 1)} "
                          "or raise ulimit -n")
    return limit


def _api_key(value: Any) -> str | None:
    """Return the API key, or None when unset; an empty or unsendable key is an error."""
    if value is None:
        return None
    # an empty variable is more likely a deployment mistake than a wish to turn authentication off
    if not isinstance(value, str) or not value.strip():
        raise ConfigError("SERVICE_API_KEY must not be empty (unset it to turn authentication off)")
    if not all("!" <= char <= "~" for char in value):
        raise ConfigError("SERVICE_API_KEY must be printable ASCII without spaces (a Bearer token)")
    return value


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
