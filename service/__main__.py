"""Serve the app with Waitress: `python -m service`, configured by SERVICE_* environment variables."""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any


def _stopped_while_importing(signum: int, frame: Any) -> None:
    """Exit on Ctrl-C during the imports of `python -m service`, without Python's traceback."""
    message = "stopped before serving"
    if os.environ.get("SERVICE_LOG_FORMAT", "").strip().lower() == "json":  # logging is not set up yet
        # written by hand: importing json before the handler is set would widen the window it closes
        now = time.time()
        stamp = f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(now))}.{int(now * 1000) % 1000:03d}Z"
        message = f'{{"time": "{stamp}", "level": "WARNING", "logger": "service", "message": "{message}"}}'
    print(message, file=sys.stderr, flush=True)
    os._exit(128 + signum)  # nothing runs yet: no thread to stop, no file to flush


# Importing the serving libraries is most of the start: a Ctrl-C meanwhile ends in one line. The
# handler goes back to Python's once they are in (below), and main() catches KeyboardInterrupt.
if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _stopped_while_importing)
# SIGTERM too: as a container's PID 1 the kernel drops a signal that has no handler, so a pod deleted while
# the service starts would run on until its SIGKILL. A child the parent started (--listen-fd) keeps the
# default: the parent takes its death by SIGTERM before serving as a clean stop.
if __name__ == "__main__" and "--listen-fd" not in sys.argv[1:] \
        and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
    signal.signal(signal.SIGTERM, _stopped_while_importing)

import argparse  # noqa: E402
import gc  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

from flask import Config, Flask  # noqa: E402

from service import logs, observe, state  # noqa: E402
from service import models as repository  # noqa: E402
from service.app import configure, create_app  # noqa: E402
from service.classifier import InferenceError, ModelLoadError  # noqa: E402
from service.config import ConfigError, Settings, help_text, markdown_table, usable_cores  # noqa: E402
from service.processes import LISTEN_FD_FLAG, PARENT_FLAG, Shares, Supervisor, can_fork, inherited  # noqa: E402
from service.serve import GracefulServer, raise_open_files_limit  # noqa: E402

logger = logging.getLogger("service")


def describe(value: Any) -> str:
    """Return a short one-line text for an opaque manifest value such as quantization."""
    if value is None:
        return "none"
    if isinstance(value, dict):
        scalars = [f"{k}={v}" for k, v in value.items() if isinstance(v, (str, int, float, bool))]
        return ", ".join(scalars) or "see /info"
    return str(value)


def main(argv: list[str] | None = None) -> int:
    """Validate settings, load the model, then serve until SIGTERM or Ctrl-C; return the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m service", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve an exported text classifier with Waitress. SIGTERM or Ctrl-C stops accepting, "
                    "finishes the requests in flight and exits 0; a second one exits at once.",
        epilog=help_text())
    parser.add_argument("--settings-markdown", action="store_true",
                        help="print the settings as the Markdown table of docs/serving.md and exit")
    parser.add_argument("--prepare", action="store_true",
                        help="write the memory-mapped copy of the model (MAP_WEIGHTS) into CACHE_DIR and exit, "
                             "so a start with a read-only cache (an image) finds it")
    # how the parent of SERVICE_PROCESSES children hands them its listening sockets
    parser.add_argument(LISTEN_FD_FLAG, type=int, action="append", dest="listen_fds", help=argparse.SUPPRESS)
    parser.add_argument(PARENT_FLAG, type=int, dest="parent", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.settings_markdown:
        print(markdown_table())
        return 0
    processes = os.environ.get("SERVICE_PROCESSES", "").strip()
    several = bool(args.listen_fds) or (processes != "1" if processes else usable_cores() > 1)
    logs.setup(os.environ, several)
    if args.prepare:
        return prepare()
    watcher = _ParentWatch(args.parent) if args.listen_fds else None
    raise_open_files_limit()  # before the settings check SERVICE_CONNECTION_LIMIT against it
    try:
        _check_spool_folder()
        settings = None  # a child started with the parent's sockets reads them in create_app
        if not args.listen_fds:
            settings = configure(Config(os.getcwd()))
            repository.check_layout(settings)  # before any process starts or any model loads
            if settings.processes > 1:
                return supervise(settings)
        app = create_app(settings=settings)
    except (ConfigError, ModelLoadError, InferenceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sockets = inherited(args.listen_fds) if args.listen_fds else None
    return serve(app, sockets, watcher)


def serve(app: Flask, sockets: list[socket.socket] | None = None, watcher: _ParentWatch | None = None,
          shares: Shares | None = None) -> int:
    """Serve app with Waitress (on the parent's sockets, if given) until stopped; return the exit code."""
    settings = state.settings(app)
    model = state.classifier(app).info()
    try:
        server = GracefulServer(app, settings, sockets, shares)
    except (OSError, ValueError) as exc:  # port in use, unknown host, ...
        print(f"error: cannot listen on {settings.host}:{settings.port}: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, server.request_stop)
    signal.signal(signal.SIGINT, server.request_stop)
    if watcher is not None:
        watcher.server = server
    models = state.models(app)
    if models.repository is not None:
        logger.info("models of %s: %s", models.repository, ", ".join(
            f"{row['name']} ({row['state']}{', default' if row['name'] == models.default else ''})"
            for row in models.index()))
    batching = (f"batching up to {settings.batch_max_texts} texts" if state.scheduler(app)
                else "no batching")
    served = getattr(state.classifier(app), "model_path", None)
    mapped = f", weights memory-mapped from {served.parent}" if served and served.parent != settings.model_dir else ""
    logger.info("serving model %s (%s backend, quantization: %s) with %d waitress threads, %s, %d ORT "
                "intra-op threads%s%s%s on %s", model["name"], settings.backend, describe(model.get("quantization")),
                settings.threads, batching, settings.ort_threads,
                f" ({settings.ort_lone_threads} for a lone run)" if settings.ort_lone_threads else "", mapped,
                ", API key required" if settings.api_key else "", " ".join(server.urls()))
    try:
        drained = server.run()
    except KeyboardInterrupt:
        logger.warning("stopped at once by a second signal: requests in flight were dropped")
        _exit_now(1)
    observe.finish(app)  # the spans still queued: a forked child exits without the interpreter's exit hooks
    if not drained:
        logger.info("stopped; some requests in flight were dropped")
        _exit_now(0)
    logger.info("stopped")
    return 0


def supervise(settings: Settings) -> int:
    """Serve with settings.processes children on sockets bound here; return the exit code."""
    try:
        supervisor = Supervisor(settings)
    except (OSError, ValueError) as exc:  # port in use, unknown host, ...
        print(f"error: cannot listen on {settings.host}:{settings.port}: {exc}", file=sys.stderr)
        return 2
    how = "each loading the model"
    names = repository.repository_names(settings.model_dir)
    sync = None
    if names is not None:  # the children share the repository's loads and unloads through this folder
        sync = tempfile.mkdtemp(prefix="onnx-classifier-repository-")
        os.environ[repository.SYNC_FOLDER] = sync
    try:
        if can_fork(settings):
            try:
                loaded = preload(settings)
            except (ConfigError, ModelLoadError, InferenceError) as exc:
                supervisor.close()
                print(f"error: {exc}", file=sys.stderr)
                return 2
            if names is not None:
                names = [model.name for model in loaded if model.classifier is not None]
            supervisor.serve = lambda sockets, shares: serve_forked(loaded, settings, sockets, shares)
            how = "forked after loading the model" + ("s" if len(loaded) > 1 else "")
        if sync is not None and names is not None:
            repository.Sync.create(Path(sync), names)
        signal.signal(signal.SIGTERM, supervisor.request_stop)
        signal.signal(signal.SIGINT, supervisor.request_stop)
        logger.info("starting %d server processes (%s) on %s: %s", settings.processes, how,
                    " ".join(supervisor.urls()), supervisor.layout())
        code = supervisor.run()
    finally:
        if sync is not None:
            shutil.rmtree(sync, ignore_errors=True)
    if code == 0:
        logger.info("stopped")
    else:
        logger.info("stopped with exit code %d", code)
    return code


def preload(settings: Settings) -> list[repository.Loaded]:
    """Load and warm the model(s) in the parent of forked children; return what they share."""
    # Each child has its own share of the cores; encoding in parallel would also leave tokenizers'
    # thread pool in the parent, which a fork does not copy.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from service import api, tei, v2, v2_repository  # noqa: F401 - imported once, shared by the children

    loaded = repository.load_repository(settings)
    if settings.warmup:
        for model in loaded:
            if model.classifier is not None:
                model.classifier.warmup()
    # Objects that exist now are left out of the children's collections, so collecting does not write
    # to (and copy) the pages they share with the parent.
    gc.collect()
    gc.freeze()
    return loaded


def serve_forked(loaded: list[repository.Loaded], settings: Settings, sockets: list[socket.socket],
                 shares: Shares) -> int:
    """Serve the parent's loaded model(s) with its settings on its sockets in a forked child; return the exit code."""
    watcher = _ParentWatch(None)
    try:
        app = create_app(loaded=loaded, settings=settings)
    except (ConfigError, ModelLoadError, InferenceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return serve(app, sockets, watcher, shares)


class _ParentWatch:
    """Stop a child of SERVICE_PROCESSES if its parent dies without stopping it (killed with SIGKILL)."""

    def __init__(self, parent: int | None) -> None:
        """Watch from now on: the parent may die while this child is still loading the model."""
        self.parent = parent if parent is not None else os.getppid()
        self.server: GracefulServer | None = None
        threading.Thread(target=self._watch, name="parent-watch", daemon=True).start()

    def _watch(self) -> None:
        while os.getppid() == self.parent:
            time.sleep(0.5)
        logger.warning("the parent process %d is gone: stopping", self.parent)
        if self.server is None:  # not serving yet: nothing to drain
            _exit_now(1)
        try:
            self.server.request_stop()
        except KeyboardInterrupt:  # a stop was already under way: this counts as a second one
            pass


def prepare() -> int:
    """Load the configured model(s) as the service would, writing their memory-mapped copies; return the exit code."""
    from dataclasses import replace

    from service.app import load_classifier
    from service.weights import has_inline_weights

    try:
        settings = configure(Config(os.getcwd()))
        names = repository.repository_names(settings.model_dir)
        folders = [settings.model_dir] if names is None else [settings.model_dir / name for name in names]
        code = 0
        for folder in folders:
            classifier = load_classifier(replace(settings, model_dir=folder))
            source = folder / "model.onnx"
            served = classifier.model_path or source
            if served != source:
                print(f"serving {source} from {served}")
            elif settings.backend == "onnx" and settings.cache_dir is not None and has_inline_weights(source):
                code = 1  # the copy could not be written: the warning above says why
            else:
                print(f"serving {source} as it is (SERVICE_MAP_WEIGHTS is false, or its weights are not inline)")
    except (ConfigError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return code


def _check_spool_folder() -> None:
    """Fail start-up if Waitress cannot spool a large request body (over 512 KiB) to a temporary file."""
    try:
        with tempfile.TemporaryFile():  # gettempdir() raises too when no candidate folder is writable
            pass
    except OSError:
        raise ConfigError("no writable temporary folder (TMPDIR, /tmp, /var/tmp or the working folder): "
                          "request bodies over 512 KiB are spooled there; mount a tmpfs on /tmp or set "
                          "TMPDIR") from None


def _exit_now(code: int) -> None:
    """Exit without the interpreter's teardown, which aborts while a thread is inside session.run."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


_stopped_by = signal.SIGINT  # the signal that stopped a start, for its exit code (128 + its number)


def _stop_starting(signum: int, frame: Any) -> None:
    """Stop a start that is loading the model on SIGTERM as on Ctrl-C: a KeyboardInterrupt, caught below.

    Serving replaces this handler with the server's, which drains instead.
    """
    global _stopped_by
    _stopped_by = signal.Signals(signum)
    raise KeyboardInterrupt


if __name__ == "__main__":
    # the imports are in: from here a Ctrl-C or SIGTERM raises KeyboardInterrupt, which main() handles
    if signal.getsignal(signal.SIGINT) is _stopped_while_importing:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGTERM) is _stopped_while_importing:
        signal.signal(signal.SIGTERM, _stop_starting)
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM before serving (while the model loads): no traceback
        print("stopped before serving", file=sys.stderr)
        raise SystemExit(128 + _stopped_by) from None
