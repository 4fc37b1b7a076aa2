"""Several models in one process: a model repository, each model served under its folder's name.

`SERVICE_MODEL_DIR` names one model folder (it holds manifest.json or model.onnx), served as today, or a
repository: a folder of model folders, Triton's layout, each served under its folder name. `Models` holds
every model of the app with its state (Triton's READY, UNAVAILABLE, LOADING, UNLOADING), its batch
scheduler and the count of its requests in flight, so that unloading waits for them. The routes reach the
request's model through service.state, which asks `Models.enter` for it once per request.

Rules, documented in docs/serving.md#several-models:
- A repository of several models needs SERVICE_DEFAULT_MODEL (the model of the unprefixed routes); of one
  model, that one is the default.
- A model folder that fails to load at start is logged with its reason and listed as UNAVAILABLE; the
  others are served. If the default model fails, or every model does, start-up fails.
- Only a folder directly inside the repository can be loaded: its name is one path component of
  letters, digits, '.', '_' and '-', and it must resolve inside the repository (no symlink out).
- Model runs share one budget per process (`RunGate`): at most BATCH_WORKERS (+1 with the express slot)
  at once, except that a model with no run in progress may always start one, so a flood on one model
  never makes another wait for a slot.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import threading
import time
from collections import Counter as Tally
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Histogram

from service.classifier import InferenceError, ModelLoadError
from service.config import ConfigError, Settings
from service.errors import ApiError

if TYPE_CHECKING:
    from service.batching import Scheduler
    from service.metrics import Metrics

logger = logging.getLogger("service")

READY, UNAVAILABLE, LOADING, UNLOADING = "READY", "UNAVAILABLE", "LOADING", "UNLOADING"  # Triton's states
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# The folder the parent of several server processes shares with them: the repository's wanted state.
SYNC_FOLDER = "ONNX_CLASSIFIER_REPOSITORY_SYNC"
_SYNC_POLL = 0.2  # seconds between two looks at the wanted state
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def is_model_folder(folder: Path) -> bool:
    """Return whether a folder is one exported model (it holds manifest.json or model.onnx)."""
    return (folder / "manifest.json").exists() or (folder / "model.onnx").exists()


def repository_names(folder: Path) -> list[str] | None:
    """Return the model names of a repository (its subfolders, hidden ones left out), or None for one model."""
    if is_model_folder(folder):
        return None
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    return names or None  # no subfolder: a model folder missing its files, which its own error names


def folder_in(repository: Path, name: str) -> Path:
    """Return the folder of model `name` inside the repository; raise ApiError when it is not one."""
    if not NAME.fullmatch(name) or name in (".", ".."):
        raise ApiError(400, f"invalid model name {name[:64]!r}: a model is a folder directly inside the repository, "
                            "named with letters, digits, '.', '_' and '-'")
    root = repository.resolve()
    folder = (root / name).resolve()
    if folder.parent != root:  # a symlink that leads out of the repository, or deeper into it
        raise ApiError(400, f"model folder '{name}' is not inside the repository (a link out of it is not served)")
    if not folder.is_dir():
        raise ApiError(404, f"Request for unknown model: '{name}' is not in the repository")
    return folder


def default_model(settings: Settings, names: list[str]) -> str:
    """Return the model of the unprefixed routes, or raise ConfigError saying what to set."""
    chosen = settings.default_model
    if chosen is None:
        if len(names) == 1:
            return names[0]
        raise ConfigError(f"SERVICE_MODEL_DIR {str(settings.model_dir)!r} is a repository of {len(names)} models "
                          f"({', '.join(names)}): set SERVICE_DEFAULT_MODEL to the one the unprefixed routes "
                          "(/, /sentiment, /predict, /rerank, /tokenize, /v2's default) serve")
    if chosen not in names:
        raise ConfigError(f"SERVICE_DEFAULT_MODEL {chosen!r} is not a model of {str(settings.model_dir)!r} "
                          f"(it has {', '.join(names)})")
    return chosen


def check_layout(settings: Settings) -> None:
    """Fail fast on a repository whose default model is not set or not there (before loading anything)."""
    names = repository_names(settings.model_dir)
    if names is not None:
        default_model(settings, names)
    elif settings.default_model is not None:
        raise ConfigError(f"SERVICE_DEFAULT_MODEL is set but SERVICE_MODEL_DIR {str(settings.model_dir)!r} is one "
                          "model folder, not a repository of model folders: unset it")


@dataclass
class Loaded:
    """A model folder loaded (or not) at start: its classifier or why it failed, and what loading it cost."""

    name: str
    folder: Path
    classifier: Any | None
    error: str | None = None
    memory: dict[str, int | None] = field(default_factory=dict)


def load_model(settings: Settings, name: str, folder: Path) -> Loaded:
    """Load one model folder of a repository under `name`; a bad folder gives a Loaded with its error, never raises."""
    from service.app import load_classifier

    before = _rss()
    try:
        classifier = load_classifier(replace(settings, model_dir=folder))
    except (ModelLoadError, ConfigError, OSError, ValueError) as exc:
        reason = f"{type(exc).__name__}: {exc}" if isinstance(exc, OSError) else str(exc)
        # clients read the reason (/info, the index, a load's 400): the folder is named as in the repository
        for path in {str(folder), str(settings.model_dir / name)}:
            reason = reason.replace(path, name)
        return Loaded(name, folder, None, reason)
    classifier.name = name  # served under its folder's name, whatever its manifest says
    after = _rss()
    return Loaded(name, folder, classifier, None, {
        "weights_bytes": _weights_bytes(classifier.model_path),
        "loaded_rss_bytes": after - before if before is not None and after is not None else None})


def load_repository(settings: Settings) -> list[Loaded]:
    """Load the model folder, or every model of the repository; raise ConfigError when start-up must fail."""
    names = repository_names(settings.model_dir)
    if names is None:
        check_layout(settings)
        from service.app import load_classifier

        before = _rss()
        classifier = load_classifier(settings)  # one folder: its errors end start-up, as they always have
        after = _rss()
        return [Loaded(classifier.name, settings.model_dir, classifier, None, {
            "weights_bytes": _weights_bytes(classifier.model_path),
            "loaded_rss_bytes": after - before if before is not None and after is not None else None})]
    default = default_model(settings, names)
    loaded = []
    for name in names:
        try:
            folder = folder_in(settings.model_dir, name)
        except ApiError as exc:
            loaded.append(Loaded(name, settings.model_dir / name, None, exc.message))
            continue
        loaded.append(load_model(settings, name, folder))
    failed = [model for model in loaded if model.classifier is None]
    for model in failed:
        logger.error("model folder %s is not served: %s", model.folder, model.error)
    broken = {model.name: model.error for model in failed}
    if default in broken:
        raise ConfigError(f"the default model {default!r} (SERVICE_DEFAULT_MODEL) cannot be loaded: {broken[default]}")
    return loaded


class RunGate:
    """One budget of model runs at once in a process, shared by every model (see the module's rules)."""

    def __init__(self, budget: int) -> None:
        """Allow `budget` runs at once, beyond which only a model with no run in progress may start one."""
        self.budget = budget
        self._cond = threading.Condition()
        self._running: Tally[str] = Tally()
        self._total = 0

    @contextlib.contextmanager
    def turn(self, name: str) -> Iterator[None]:
        """Hold one of the budget's runs for model `name` while the block runs."""
        with self._cond:
            while self._running[name] and self._total >= self.budget:
                self._cond.wait()
            self._running[name] += 1
            self._total += 1
        try:
            yield
        finally:
            with self._cond:
                self._running[name] -= 1
                self._total -= 1
                self._cond.notify_all()


class Gated:
    """A classifier whose runs take a turn of the process' RunGate; everything else is the classifier's."""

    def __init__(self, classifier: Any, gate: RunGate, name: str) -> None:
        """Wrap classifier; its scheduler calls run() through the gate."""
        object.__setattr__(self, "_classifier", classifier)
        object.__setattr__(self, "_gate", gate)
        object.__setattr__(self, "_name", name)

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self._classifier, attribute)

    def __setattr__(self, attribute: str, value: Any) -> None:
        setattr(self._classifier, attribute, value)  # `ready`, set by the scheduler, is the classifier's

    def run(self, feeds: Any, alone: bool = True) -> Any:
        """Run the model once the gate gives this model a turn."""
        with self._gate.turn(self._name):
            return self._classifier.run(feeds, alone=alone)


@dataclass
class Model:
    """One model of the repository: its state, and while READY its classifier and scheduler."""

    name: str
    folder: Path
    state: str
    reason: str = ""
    classifier: Any | None = None
    scheduler: Scheduler | None = None
    memory: dict[str, int | None] = field(default_factory=dict)
    in_flight: int = 0

    def describe(self, default: str) -> dict[str, Any]:
        """Return what /info says about this model."""
        described: dict[str, Any] = {"name": self.name, "state": self.state, "default": self.name == default}
        if self.reason:
            described["reason"] = self.reason
        if self.classifier is not None:
            info = self.classifier.info()
            described |= {"task": info.get("task", self.classifier.task.name), "labels": list(self.classifier.labels),
                          "ready": bool(self.classifier.ready), "max_length": self.classifier.max_length}
        described["memory"] = self.memory
        return described


class Models:
    """Every model of the app: which is the default, each one's state, and loading and unloading them."""

    def __init__(self, settings: Settings, metrics: Metrics, loaded: list[Loaded], default: str,
                 repository: Path | None) -> None:
        """Start a scheduler for each loaded model (threads: after a fork); the others are UNAVAILABLE."""
        self.settings = settings
        self.metrics = metrics
        self.repository = repository  # None: one model folder, nothing to load or unload
        self.default = default
        # several models share one budget of runs; one model alone runs as it always has
        self.gate = RunGate(settings.batch_workers + (1 if settings.batch_express else 0)) if repository else None
        self._cond = threading.Condition()
        self._busy: set[str] = set()  # names being loaded or unloaded here: one change at a time per model
        self.entries: dict[str, Model] = {}
        self.requests = Counter("service_model_requests", "HTTP requests that reached a model, by model and status",
                                ["model", "status"], registry=metrics.registry)
        self.latency = Histogram("service_model_request_duration_seconds", "Latency of the requests of each model",
                                 ["model"], buckets=_LATENCY_BUCKETS, registry=metrics.registry)
        for model in loaded:
            self.entries[model.name] = self._model(model)
        self.sync = Sync.from_environment()
        self._applied = -1
        # the generation whose load each model here comes from (0: start-up); a later one wants a reload
        self._stamps: dict[str, int] = {}
        self._sync_lock = threading.Lock()  # a change this process publishes is its own, not one to follow
        if self.sync is not None and repository is not None:
            self.reconcile()  # a server process restarted after loads or unloads catches up before serving
            threading.Thread(target=self._follow, name="repository-sync", daemon=True).start()

    def _model(self, loaded: Loaded) -> Model:
        """Return the Model of a load's outcome, its scheduler started and warmed up."""
        if loaded.classifier is None:
            return Model(loaded.name, loaded.folder, UNAVAILABLE, loaded.error or "failed to load",
                         memory=loaded.memory)
        from service.app import start_scheduler

        classifier = loaded.classifier
        runs = Gated(classifier, self.gate, loaded.name) if self.gate is not None else classifier
        scheduler = start_scheduler(self.settings, runs, self.metrics)
        if self.settings.warmup and not classifier.ready:
            try:
                if scheduler is None:
                    classifier.warmup()
                else:  # through the queue, so the worker's first batch is not a client's
                    scheduler.warmup()
            except InferenceError as exc:
                if self.repository is None:  # one model: start-up fails, as it always has
                    raise
                if scheduler is not None:
                    scheduler.stop(timeout=0.1)
                return Model(loaded.name, loaded.folder, UNAVAILABLE, f"its warm-up run failed: {exc}")
        self.requests.labels(loaded.name, "200")  # exported from the start
        return Model(loaded.name, loaded.folder, READY, classifier=classifier, scheduler=scheduler,
                     memory=loaded.memory)

    def names(self) -> list[str]:
        """Return every model's name: those loaded or known, and the repository's other folders."""
        names = set(self.entries)
        if self.repository is not None and self.repository.is_dir():
            names |= set(repository_names(self.repository) or ())
        return sorted(names)

    def enter(self, name: str) -> Model:
        """Return a READY model, counted as in flight until leave(); raise 404 (unknown) or 503 (not loaded)."""
        with self._cond:
            model = self.entries.get(name)
            if model is not None and model.state == READY:
                model.in_flight += 1
                return model
        if model is None and name not in self.names():
            shown = name if len(name) <= 64 else name[:64] + "..."
            raise ApiError(404, f"Request for unknown model: '{shown}' is not found")
        state = model.state if model is not None else UNAVAILABLE
        reason = (model.reason if model is not None else "") or "not loaded"
        raise ApiError(503, f"model '{name}' is not available ({state}: {reason}); "
                            f"POST /v2/repository/models/{name}/load loads it")

    def leave(self, model: Model) -> None:
        """End one request of model."""
        with self._cond:
            model.in_flight -= 1
            self._cond.notify_all()

    def get(self, name: str) -> Model | None:
        """Return the model named so, in whatever state, or None."""
        with self._cond:
            return self.entries.get(name)

    def loaded(self) -> list[Model]:
        """Return the READY models."""
        with self._cond:
            return [model for model in self.entries.values() if model.state == READY]

    def describe(self) -> list[dict[str, Any]]:
        """Return what /info says about every model, the repository's folders not loaded included."""
        described = []
        for name in self.names():
            model = self.get(name)
            described.append(model.describe(self.default) if model is not None else
                             {"name": name, "state": UNAVAILABLE, "default": False, "reason": "not loaded"})
        return described

    def index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """Return Triton's repository index: every model with its version, state and reason."""
        rows = []
        for name in self.names():
            model = self.get(name)
            state = model.state if model is not None else UNAVAILABLE
            if ready_only and state != READY:
                continue
            row = {"name": name, "version": "1", "state": state}
            reason = model.reason if model is not None else "not loaded"
            if state != READY and reason:
                row["reason"] = reason
            rows.append(row)
        return rows

    @contextlib.contextmanager
    def _changing(self, name: str) -> Iterator[None]:
        """Hold model `name` for one load or unload at a time in this process."""
        with self._cond:
            while name in self._busy:
                self._cond.wait()
            self._busy.add(name)
        try:
            yield
        finally:
            with self._cond:
                self._busy.discard(name)
                self._cond.notify_all()

    def load(self, name: str, share: bool = True) -> Model:
        """Load (or reload) model `name` from the repository; with share, every server process then does."""
        if self.repository is None:
            raise ApiError(400, "SERVICE_MODEL_DIR is one model folder, not a repository: nothing to load")
        folder = folder_in(self.repository, name)
        with self._changing(name):
            old = self.get(name)
            if old is not None and old.state == READY:
                self._unload_here(old, "reloaded")
            with self._cond:
                self.entries[name] = Model(name, folder, LOADING)
            model = self._model(load_model(self.settings, name, folder))
            with self._cond:
                self.entries[name] = model
        if model.state == READY:
            logger.info("model %s loaded from %s", name, folder)
        else:
            logger.error("model %s failed to load: %s", name, model.reason)
        if share:  # every process (re)loads it from the folder too, and fails alike if it is broken
            self._share(name, True)
        if model.state != READY:
            raise ApiError(400, f"failed to load '{name}': {model.reason}")
        return model

    def unload(self, name: str, share: bool = True) -> None:
        """Unload model `name` once its requests in flight are answered; with share, every server process does."""
        if self.repository is None:
            raise ApiError(400, "SERVICE_MODEL_DIR is one model folder, not a repository: nothing to unload")
        folder_in(self.repository, name)
        with self._changing(name):
            model = self.get(name)
            if model is not None and model.state == READY:
                self._unload_here(model, "unloaded")
        if share:
            self._share(name, False)

    def _unload_here(self, model: Model, reason: str) -> None:
        """Refuse model's new requests, wait for those in flight, then stop its scheduler and drop it."""
        deadline = time.monotonic() + self.settings.shutdown_timeout
        with self._cond:
            model.state, model.reason = UNLOADING, reason
            while model.in_flight and time.monotonic() < deadline:
                self._cond.wait(max(0.01, deadline - time.monotonic()))
            left = model.in_flight
        if left:
            logger.warning("model %s: %d request(s) still in flight after %g s are left to finish", model.name, left,
                           self.settings.shutdown_timeout)
        if model.scheduler is not None:
            model.scheduler.stop(timeout=max(0.1, deadline - time.monotonic()))
        with self._cond:
            model.state = UNAVAILABLE
            if not model.in_flight:  # the memory goes with the last reference (a request may still hold it)
                model.classifier, model.scheduler = None, None
        logger.info("model %s %s", model.name, reason)

    def _share(self, name: str, loaded: bool) -> None:
        """Tell the other server processes, and wait until each has applied the change."""
        if self.sync is None:
            return
        with self._sync_lock:
            generation = self.sync.publish(name, loaded)
            self._applied = max(self._applied, generation)
            self._stamps[name] = generation
            self.sync.acknowledge(generation)
        if not self.sync.wait_applied(generation, timeout=self.settings.shutdown_timeout + 60):
            logger.warning("model %s: not every server process had applied the %s within the time allowed",
                           name, "load" if loaded else "unload")

    def reconcile(self) -> None:
        """Load and unload models here until this process matches the wanted state the others share."""
        assert self.sync is not None
        with self._sync_lock:
            generation, wanted = self.sync.wanted()
            if generation <= self._applied:
                return
            for name in self.names():
                model = self.get(name)
                here = model is not None and model.state == READY
                stamp = wanted.get(name)
                try:
                    # a load published after the one this process applied: load, or reload from the folder
                    if stamp is not None and stamp > self._stamps.get(name, 0):
                        self._stamps[name] = stamp
                        self.load(name, share=False)
                    elif stamp is None and here:
                        self.unload(name, share=False)
                except ApiError as exc:  # logged by load(); this process serves the others
                    logger.error("model %s: %s", name, exc.message)
            self._applied = generation
            self.sync.acknowledge(generation)

    def _follow(self) -> None:
        """Apply the other processes' loads and unloads as they come (a daemon thread)."""
        while True:
            time.sleep(_SYNC_POLL)
            try:
                self.reconcile()
            except Exception:  # noqa: BLE001 - never end the thread: the next look may succeed
                logger.exception("repository sync failed")

    def observe(self, name: str, status: int, seconds: float) -> None:
        """Count one answered request of the model named so."""
        self.requests.labels(name, str(status)).inc()
        self.latency.labels(name).observe(seconds)


class Sync:
    """The repository's wanted state, shared by the server processes through files in one folder.

    The parent of several server processes makes the folder before it starts them (SYNC_FOLDER names
    it) and writes `wanted.json` with the models loaded at start, as generation 0. A process that loads
    or unloads a model writes the next generation, under a lock; every process looks at it every
    _SYNC_POLL seconds, applies it, and writes the generation it has applied to `applied-<pid>`, which
    the process that made the change waits for before it answers.
    """

    def __init__(self, folder: Path) -> None:
        """Use the shared folder."""
        self.folder = folder

    @classmethod
    def from_environment(cls) -> Sync | None:
        """Return the shared state of this server process' siblings, or None when it serves alone."""
        folder = os.environ.get(SYNC_FOLDER)
        return cls(Path(folder)) if folder and Path(folder).is_dir() else None

    @staticmethod
    def create(folder: Path, loaded: list[str]) -> None:
        """Write generation 0: the models loaded at start, each from generation 0."""
        (folder / "wanted.json").write_text(json.dumps({"generation": 0, "loaded": dict.fromkeys(sorted(loaded), 0)}))

    def wanted(self) -> tuple[int, dict[str, int]]:
        """Return the current generation and the models it wants loaded, each with the generation of its last load."""
        try:
            data = json.loads((self.folder / "wanted.json").read_text())
        except (OSError, ValueError):
            return -1, {}
        return int(data["generation"]), {name: int(stamp) for name, stamp in data["loaded"].items()}

    def publish(self, name: str, loaded: bool) -> int:
        """Write the next generation with model `name` (re)loaded from it, or not loaded; return its number."""
        with open(self.folder / "lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            generation, wanted = self.wanted()
            if loaded:
                wanted[name] = generation + 1
            else:
                wanted.pop(name, None)
            temporary = self.folder / f"wanted.{os.getpid()}.tmp"
            temporary.write_text(json.dumps({"generation": generation + 1, "loaded": dict(sorted(wanted.items()))}))
            temporary.replace(self.folder / "wanted.json")  # atomic: a reader sees one generation or the next
            return generation + 1

    def acknowledge(self, generation: int) -> None:
        """Record the generation this process has applied."""
        path = self.folder / f"applied-{os.getpid()}"
        temporary = path.with_suffix(".tmp")
        temporary.write_text(str(generation))
        temporary.replace(path)

    def wait_applied(self, generation: int, timeout: float) -> bool:
        """Wait until every live server process has applied generation; return whether they did in time."""
        deadline = time.monotonic() + timeout
        while True:
            behind = [pid for pid, applied in self._applied().items() if applied < generation and _alive(pid)]
            if not behind:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(_SYNC_POLL / 4)

    def _applied(self) -> dict[int, int]:
        """Return each process' applied generation."""
        applied = {}
        for path in self.folder.glob("applied-*"):
            if path.suffix == ".tmp":
                continue
            try:
                applied[int(path.name.split("-", 1)[1])] = int(path.read_text())
            except (OSError, ValueError):
                continue
        return applied


def _alive(pid: int) -> bool:
    """Return whether a process exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _rss() -> int | None:
    """Return this process' resident memory in bytes (Linux), else None."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _weights_bytes(model_path: Path | None) -> int | None:
    """Return the size of the model file the session loaded, with its external weights."""
    if model_path is None or not model_path.is_file():
        return None
    return sum(path.stat().st_size for path in model_path.parent.glob(model_path.name + "*") if path.is_file())
