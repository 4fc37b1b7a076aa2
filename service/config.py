"""Service settings, declared once: name, default, validation and help, checked once at start-up.

`SETTINGS` is the one declaration; `Settings.from_mapping` validates it, `python -m service --help`
and the table in docs/serving.md are generated from it (a test keeps the docs equal).
"""

from __future__ import annotations

import math
import os
import resource
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REPO_ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("onnx", "pytorch", "optimum")
# Open file descriptors the process needs besides client connections (model, pipes, logs, ...).
_SPARE_FILES = 64

Parser = Callable[[Mapping[str, Any], str], Any]


class ConfigError(ValueError):
    """A setting is invalid; the message names the environment variable and the bad value."""


@dataclass(frozen=True)
class Setting:
    """One SERVICE_* environment variable: its default, how it is read, and what it does."""

    key: str  # the Flask config key, as from_prefixed_env("SERVICE") names it: SERVICE_PORT -> PORT
    default: Any  # None: unset, or computed as `computed` says
    parse: Parser
    help: str
    computed: str | None = None  # how the default is worked out when it is None

    @property
    def variable(self) -> str:
        """Return the environment variable's name."""
        return f"SERVICE_{self.key}"

    def default_text(self) -> str:
        """Return the default as --help and the docs show it."""
        if self.computed is not None:
            return self.computed
        if isinstance(self.default, bool):
            return str(self.default).lower()
        return "unset" if self.default is None else f"{self.default:g}" if isinstance(self.default, float) \
            else str(self.default)


def _value(config: Mapping[str, Any], key: str) -> Any:
    """Return the configured value of key, or its declared default."""
    return config.get(key, DEFAULTS[key])


def _unset(config: Mapping[str, Any], key: str) -> bool:
    """Return whether key is unset or empty (then a computed default applies)."""
    return config.get(key) in (None, "")


def _integer(config: Mapping[str, Any], key: str, low: int, high: int, expected: str | None = None) -> int:
    """Return config[key] as an int within [low, high] or raise ConfigError naming the variable."""
    value = _value(config, key)
    expected = expected or f"an integer {low}-{high}"
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


def integer(low: int, high: int, expected: str | None = None) -> Parser:
    """Return a parser of integers within [low, high]."""
    return lambda config, key: _integer(config, key, low, high, expected)


def _boolean(config: Mapping[str, Any], key: str) -> bool:
    """Return config[key] as a bool, accepting the usual spellings of true and false."""
    value = _value(config, key)
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"SERVICE_{key} must be true or false, got {value!r}")


def _seconds(config: Mapping[str, Any], key: str) -> float:
    """Return config[key] as a number of seconds, 0 < s <= 3600, or raise ConfigError."""
    value = _value(config, key)
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not 0 < number <= 3600:  # also false for NaN
        raise ConfigError(f"SERVICE_{key} must be a number of seconds > 0 and <= 3600, got {value!r}")
    return number


def _host(config: Mapping[str, Any], key: str) -> str:
    """Return a non-empty host string."""
    value = _value(config, key)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"SERVICE_HOST must be a host name or IP address, got {value!r}")
    return value.strip()


def _backend(config: Mapping[str, Any], key: str) -> str:
    """Return one of BACKENDS."""
    backend = str(_value(config, key)).strip().lower()
    if backend not in BACKENDS:
        raise ConfigError(f"SERVICE_BACKEND must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return backend


def _model_dir(config: Mapping[str, Any], key: str) -> Path:
    """Return the model folder (see resolve_model_dir)."""
    return resolve_model_dir(_value(config, key))


def _default_model(config: Mapping[str, Any], key: str) -> str | None:
    """Return the default model's name, or None when unset (checked against the repository at start-up)."""
    if _unset(config, key):
        return None
    value = _value(config, key)
    if not isinstance(value, str) or "/" in value or value.strip() in (".", ".."):
        raise ConfigError(f"SERVICE_{key} must be the name of a model folder in SERVICE_MODEL_DIR, got {value!r}")
    return value.strip()


def _cache_dir(config: Mapping[str, Any], key: str) -> Path | None:
    """Return the folder of the memory-mapped model copies, or None when MAP_WEIGHTS is off."""
    if not _boolean(config, "MAP_WEIGHTS"):
        return None
    if _unset(config, key):
        from service.weights import default_cache_dir

        return default_cache_dir()
    value = _value(config, key)
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise ConfigError(f"SERVICE_{key} must be a folder path, got {value!r}")
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"SERVICE_{key} {str(value)!r} is not a folder")
    return path


def _batches(config: Mapping[str, Any]) -> bool:
    """Return whether requests are batched (the reference backends stand for the per-request service)."""
    return _boolean(config, "BATCHING") and _backend(config, "BACKEND") == "onnx"


def _threads(config: Mapping[str, Any], key: str) -> int:
    """Return THREADS: enough for every text queued or running when batching, else 4."""
    if not _unset(config, key):
        return _integer(config, key, 1, 1024)
    if not _batches(config):
        return 4  # each thread runs the model itself: more would oversubscribe the cores
    # Request threads mostly wait for a model slot. With fewer of them than queued + running texts
    # plus a margin, the excess would wait unseen in Waitress' own unbounded task queue instead
    # of reaching SERVICE_MAX_QUEUE, which answers 503 at once.
    batch = _integer(config, "BATCH_MAX_TEXTS", 1, 100_000)
    return min(1024, _max_queue(config, "MAX_QUEUE") + batch * _workers(config, "BATCH_WORKERS") + 32)


def _ort_threads(config: Mapping[str, Any], key: str) -> int:
    """Return ORT_THREADS: by default the usable cores, split between the model slots when batching."""
    if not _unset(config, key):
        return _integer(config, key, 1, 1024)
    cores = max(1, usable_cores() // _processes(config, "PROCESSES"))  # this process' share
    if not _batches(config):
        return cores
    # Concurrent runs of one session share its intra-op pool: two runs on a pool of every core take
    # turns on it, and its threads spin waiting for each other's work. A share of the cores per run
    # costs less CPU per text and serves more under load (docs/performance.md).
    return max(1, cores // _workers(config, "BATCH_WORKERS"))


def _workers(config: Mapping[str, Any], key: str) -> int:
    """Return BATCH_WORKERS, the model runs at once per process: by default 2, or 1 on a single core's share."""
    # Two runs at once keep both cores busy while one batch is collated or answered; more runs on
    # few cores only split the same cores (the intra-op pool is shared by concurrent runs).
    if not _unset(config, key):
        return _integer(config, key, 1, 64)
    return min(2, max(1, usable_cores() // _processes(config, "PROCESSES")))


def _processes(config: Mapping[str, Any], key: str) -> int:
    """Return PROCESSES: by default one server process per usable core, for the batching onnx backend."""
    # One process runs every request's Python under one GIL: a second core then mostly idles
    # (docs/performance.md). A process per core, each forked from the parent that loaded the model,
    # shares the model's pages and serves on its own core.
    if not _unset(config, key):
        return _integer(config, key, 1, 64)
    if not _batches(config):
        return 1  # the reference backends stand for the original single-process service
    return min(64, usable_cores())


def _max_queue(config: Mapping[str, Any], key: str) -> int:
    """Return MAX_QUEUE, which must hold the largest request (MAX_BATCH texts)."""
    max_queue = _integer(config, key, 1, 1_000_000)
    max_batch = _integer(config, "MAX_BATCH", 1, 100_000)
    if max_queue < max_batch:
        raise ConfigError(f"SERVICE_MAX_QUEUE must be at least SERVICE_MAX_BATCH ({max_batch}) so the "
                          f"largest request fits, got {config.get('MAX_QUEUE')!r}")
    return max_queue


def _connection_limit(config: Mapping[str, Any], key: str) -> int:
    """Return CONNECTION_LIMIT, checked against the open-files limit so accept() cannot fail."""
    files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if _unset(config, key):
        # a body over 512 KiB is spooled to a temporary file: two descriptors per connection at worst
        return 4000 if files == resource.RLIM_INFINITY else max(1, min(4000, (files - _SPARE_FILES) // 2))
    limit = _integer(config, key, 1, 1_000_000)
    # Waitress logs and retries a failing accept() in a busy loop when no descriptor is left.
    if files != resource.RLIM_INFINITY and limit + _SPARE_FILES > files:
        raise ConfigError(f"SERVICE_CONNECTION_LIMIT {limit} needs more open files than the limit of "
                          f"{files} (ulimit -n) allows: lower it below {max(files - _SPARE_FILES, 1)} or "
                          "raise the hard limit (ulimit -Hn; the service raises the soft limit to it)")
    return limit


def _api_key(config: Mapping[str, Any], key: str) -> str | None:
    """Return the API key, or None when unset; an empty or unsendable key is an error."""
    value = config.get(key)
    if value is None:
        return None
    # an empty variable is more likely a deployment mistake than a wish to turn authentication off
    if not isinstance(value, str) or not value.strip():
        raise ConfigError("SERVICE_API_KEY must not be empty (unset it to turn authentication off)")
    if not all("!" <= char <= "~" for char in value):
        raise ConfigError("SERVICE_API_KEY must be printable ASCII without spaces (a Bearer token)")
    return value


LOG_FORMATS = ("text", "json")


def log_format(config: Mapping[str, Any], key: str) -> str:
    """Return one of LOG_FORMATS."""
    value = str(_value(config, key)).strip().lower()
    if value not in LOG_FORMATS:
        raise ConfigError(f"SERVICE_LOG_FORMAT must be text or json, got {_value(config, key)!r}")
    return value


def _otlp_endpoint(config: Mapping[str, Any], key: str) -> str | None:
    """Return the OTLP/HTTP URL spans go to, or None: tracing off.

    SERVICE_OTLP_ENDPOINT is a collector's base URL, as OTEL_EXPORTER_OTLP_ENDPOINT is; unset, the
    standard variables apply (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is the full URL). OTEL_SDK_DISABLED=true
    and OTEL_TRACES_EXPORTER=none turn tracing off, as they do in OpenTelemetry's SDK.
    """
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true" or \
            os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return None
    if not _unset(config, key):
        return _url(config.get(key), f"SERVICE_{key}").rstrip("/") + "/v1/traces"
    traces = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    if traces:
        return _url(traces, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    base = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    return _url(base, "OTEL_EXPORTER_OTLP_ENDPOINT").rstrip("/") + "/v1/traces" if base else None


def _url(value: Any, variable: str) -> str:
    """Return an http(s) URL with a host, or raise ConfigError naming the variable."""
    parts = urlsplit(value.strip()) if isinstance(value, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{variable} must be an http or https URL such as http://collector:4318, got {value!r}")
    return value.strip()


SETTINGS: tuple[Setting, ...] = (
    Setting("MODEL_DIR", "onnx_models/minilm-l6-sentiment", _model_dir,
            "exported model folder, or a repository: a folder of model folders, each served under its folder "
            "name (/models/NAME/..., /v2/models/NAME/...); a relative path not found from the working "
            "directory is looked up from the repository root"),
    Setting("DEFAULT_MODEL", None, _default_model,
            "the model of a repository that the unprefixed routes (/, /sentiment, /predict, /rerank, /tokenize) "
            "serve; needed when the repository holds more than one model",
            computed="unset: the repository's only model"),
    Setting("HOST", "127.0.0.1", _host, "listen address; 0.0.0.0 accepts other machines"),
    Setting("PORT", 8000, integer(0, 65535, "an integer 0-65535 (0: any free port)"),
            "listen port; 0 takes a free one, shown in the start-up line"),
    Setting("BACKEND", "onnx", _backend,
            "onnx; pytorch (a transformers checkpoint through the original pipeline) or optimum "
            "(Optimum's ORTModelForSequenceClassification): the references of the tests and the "
            "benchmark, which need the dev dependencies and never batch"),
    Setting("PROCESSES", None, _processes,
            "server processes sharing the port, each with its own model slots, queue, connection budget "
            "and threads (the defaults below split the usable cores between them); forked from a parent "
            "that loaded the model when each runs one intra-op thread, else each loads it; "
            "`python -m service` only",
            computed="usable cores when batching with the onnx backend (one per core, at most 64), else 1"),
    Setting("PIN_PROCESSES", True, _boolean,
            "give each server process its own part of the CPU affinity mask (with PROCESSES processes on "
            "as many cores, one core each), so its request threads and model run share that core's caches "
            "instead of following each other from core to core"),
    Setting("THREADS", None, _threads,
            "Waitress request threads of each server process; with batching they mostly wait for a "
            "model slot, and fewer than the queue holds would leave requests waiting unseen in "
            "Waitress' own queue. A "
            "request goes to the thread idle shortest, so threads beyond the concurrency stay unused",
            computed="batching: MAX_QUEUE + BATCH_MAX_TEXTS x BATCH_WORKERS + 32; else 4"),
    Setting("ORT_THREADS", None, _ort_threads, "onnxruntime intra-op threads of each model slot's session",
            computed="usable cores (CPU affinity, capped by the cgroup's cpu.max) / PROCESSES / "
                     "BATCH_WORKERS when batching, else usable cores / PROCESSES"),
    # Idle intra-op threads spin briefly between a run's parallel sections, never between runs
    # (see service/classifier.py): the latency of spinning without burning the cores under load.
    Setting("ORT_SPINNING", True, _boolean,
            "let idle intra-op threads spin briefly within a run (never between runs) instead of sleeping"),
    # onnxruntime fixes a session's threads when it is built: lone runs need a session of their own
    Setting("ORT_LONE_THREADS", 0, integer(0, 1024),
            "intra-op threads of one more session, which takes a run that starts alone (no other run "
            "in progress, nothing queued): at low load a request gets that many cores, while runs "
            "side by side keep ORT_THREADS each; costs one more session's memory; 0: no such session"),
    Setting("MAP_WEIGHTS", True, _boolean, "serve a model whose weights are inline in model.onnx from a "
            "copy with them in a data file, which onnxruntime memory-maps instead of copying to the heap "
            "(written once in CACHE_DIR; same graph, same scores)"),
    Setting("CACHE_DIR", None, _cache_dir, "folder of those copies, one per model and onnxruntime "
            "version; safe to delete. If it cannot be written, the model is served as it is",
            computed="$XDG_CACHE_HOME/onnx-text-classify, else ~/.cache/onnx-text-classify"),
    Setting("WARMUP", True, _boolean, "run the model before serving; /ready answers 503 until it has"),
    Setting("MAX_BATCH", 32, integer(1, 100_000), "most texts in one request (TEI's client batch limit)"),
    Setting("MAX_CONTENT_LENGTH", 2 * 1024 * 1024, integer(1, 2**40, "a positive integer (bytes)"),
            "largest request body in bytes (TEI's payload limit)"),
    Setting("BATCHING", True, _boolean,
            "batch concurrent requests into shared model runs; false: each request runs the model alone"),
    Setting("BATCH_WORKERS", None, _workers,
            "model runs at once (each run is one batch), each slot with an onnxruntime session of its own",
            computed="2, or 1 when usable cores / PROCESSES is 1"),
    Setting("BATCH_EXPRESS", True, _boolean,
            "one more model slot, for short texts only (64 tokens at most), which runs while every "
            "other slot runs a longer text: a short request never waits for a long run to end"),
    Setting("BATCH_MAX_TEXTS", 32, integer(1, 100_000), "most texts in one model run"),
    # a longer run costs more per text once its activations outgrow the caches, and each model slot's
    # session keeps buffers for the longest run it has made
    Setting("BATCH_MAX_TOKENS", 384, integer(1, 10_000_000), "most padded tokens in one model run "
            "(a longer text runs alone)"),
    Setting("BATCH_WAIT_MS", 0, integer(0, 1000, "an integer 0-1000 (milliseconds)"),
            "a free model slot waits this long for BATCH_MAX_TEXTS texts; 0: run what is queued at once"),
    Setting("BATCH_GATHER_MS", 1, integer(0, 1000, "an integer 0-1000 (milliseconds)"),
            "while another run is in progress, a free model slot waits at most this long for requests "
            "already on their way to the queue (never when it runs alone); 0: never"),
    Setting("MAX_QUEUE", 64, _max_queue, "texts that may wait for a model slot, in each server process; a "
            "request that does not fit gets 503 at once"),
    Setting("QUEUE_TIMEOUT", 5.0, _seconds, "seconds a request may wait in the queue before a 503"),
    Setting("CONNECTION_LIMIT", None, _connection_limit,
            "open client connections of the whole service (each of PROCESSES processes takes an equal "
            "share); at the limit the idlest ones are closed for new clients",
            computed="4000, or (open-files limit - 64) / 2 if lower"),
    # a request head in one write takes well under a second; nginx's CIS benchmark sets 10 s
    # (nginx 60 s, hyper 30 s by default)
    Setting("HEADER_TIMEOUT", 10.0, _seconds, "seconds a client has to send a request head; then 408"),
    Setting("BODY_TIMEOUT", 30.0, _seconds, "seconds a client has to send a request body; then 408"),
    # Waitress' own channel_timeout; above the idle time of common client pools (Go's 90 s), so a
    # pooled connection is given up by its client before the server closes it under a new request
    Setting("KEEPALIVE_TIMEOUT", 120.0, _seconds, "seconds an idle kept-alive connection stays open"),
    # nginx's large_client_header_buffers: 4 x 8 KiB
    Setting("MAX_HEADER_BYTES", 32 * 1024, integer(1024, 1024 * 1024, "an integer 1024-1048576 (bytes)"),
            "largest request head (request line and headers); more gets 431"),
    Setting("SHUTDOWN_TIMEOUT", 8.0, _seconds, "seconds SIGTERM waits for requests in flight"),
    Setting("API_KEY", None, _api_key, 'require "Authorization: Bearer <key>" on every route but /health, '
            "/ready, /openapi.json and the v2 health probes", computed="unset: no key"),
    Setting("LOG_FORMAT", "text", log_format, "text, or json: every line on stderr is one JSON object "
            "(time, level, logger, message, request_id), every server process' and the parent's"),
    Setting("ACCESS_LOG", True, _boolean, "log one access record per request (request id, method, route "
            "template, model, status, duration, texts, tokens) in LOG_FORMAT"),
    Setting("OTLP_ENDPOINT", None, _otlp_endpoint, "OpenTelemetry collector's OTLP/HTTP base URL (such "
            "as http://collector:4318): trace every request to its /v1/traces; OpenTelemetry's OTEL_* "
            "variables (sampler, headers, timeout, service name) apply",
            computed="unset: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, else OTEL_EXPORTER_OTLP_ENDPOINT; "
                     "neither: tracing off"),
)
DEFAULTS: dict[str, Any] = {setting.key: setting.default for setting in SETTINGS}


@dataclass(frozen=True)
class Settings:
    """Validated settings of one service process: one field per entry of SETTINGS."""

    model_dir: Path
    default_model: str | None
    host: str
    port: int
    backend: str
    processes: int
    pin_processes: bool
    threads: int
    ort_threads: int
    ort_spinning: bool
    ort_lone_threads: int
    map_weights: bool
    cache_dir: Path | None
    warmup: bool
    max_batch: int
    max_content_length: int
    batching: bool
    batch_workers: int
    batch_express: bool
    batch_max_texts: int
    batch_max_tokens: int
    batch_wait_ms: int
    batch_gather_ms: int
    max_queue: int
    queue_timeout: float
    connection_limit: int
    header_timeout: float
    body_timeout: float
    keepalive_timeout: float
    max_header_bytes: int
    shutdown_timeout: float
    api_key: str | None = field(repr=False)  # never in a log line or a traceback
    log_format: str
    access_log: bool
    otlp_endpoint: str | None

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any]) -> Settings:
        """Validate a Flask-style config mapping (keys without the SERVICE_ prefix)."""
        return cls(**{setting.key.lower(): setting.parse(config, setting.key) for setting in SETTINGS})



def help_text(width: int = 100) -> str:
    """Return the settings part of `python -m service --help`."""
    lines = ["settings (environment variables; defaults in brackets):"]
    for setting in SETTINGS:
        text = f"{setting.help} [{setting.default_text()}]"
        wrapped = textwrap.wrap(text, width - 30) or [""]
        lines.append(f"  {setting.variable:<27} {wrapped[0]}")
        lines += [f"  {'':<27} {line}" for line in wrapped[1:]]
    return "\n".join(lines)


def markdown_table() -> str:
    """Return the settings as the Markdown table of docs/serving.md."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    rows += [f"| `{s.variable}` | {s.default_text()} | {s.help} |" for s in SETTINGS]
    return "\n".join(rows)


def resolve_model_dir(value: Any) -> Path:
    """Return the model folder: as given, or relative to the repo root when not found from cwd."""
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise ConfigError(f"SERVICE_MODEL_DIR must be a folder path, got {value!r}")
    path = Path(value).expanduser()
    if not path.is_absolute() and not path.exists() and (REPO_ROOT / path).exists():
        path = REPO_ROOT / path
    if not path.is_dir():
        # an absolute path is looked for once; a relative one from the working folder, then the repo root
        places = [] if path.is_absolute() else sorted({str(Path.cwd()), str(REPO_ROOT)})
        raise ConfigError(f"SERVICE_MODEL_DIR {str(value)!r} is not a folder"
                          + (f" (looked in {' and '.join(places)})" if places else ""))
    return path.resolve()


def available_cpus() -> set[int]:
    """Return the CPUs this process may run on (every CPU where affinity is not supported)."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def usable_cores() -> int:
    """Return the cores this process may use: CPU affinity, capped by the cgroup's CPU quota."""
    # ORT sizes its pool from the host's cores, not from the affinity mask or the container quota.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_quota()
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(cores, 1)


def _cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """Return the CPU quota in cores (cgroup v2 cpu.max, else v1 cfs_quota_us), or None if unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:  # cgroup v1: docker --cpus and Kubernetes limits set the CFS quota
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    if not (quota.isdigit() and period.isdigit() and int(period) > 0):
        return None  # "max", or v1's -1: no quota
    return int(quota) / int(period)
