"""Progress of the export's long phases, so that the export is never silent for more than a few seconds.

Work is announced as an activity: Progress for work that can be counted (inputs scored, MatMuls
ranked), heartbeat for a library call that cannot (Optimum's export, a quantizer's build). On a
terminal Progress shows a tqdm bar with the time left. Otherwise, and for heartbeats, the watchdog
process (export/watchdog.py) writes the innermost activity's status whenever the export has written
nothing for INTERVAL seconds. The command line starts it (start()); `--quiet` does not, and turns the
bars and stage lines off too. Library use without start() is silent apart from the log lines.
"""

from __future__ import annotations

import itertools
import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger("export.progress")

INTERVAL = 5.0  # seconds of quiet after which the running activity says where it is

_lock = threading.Lock()
_child: list[subprocess.Popen] = []
_ids = itertools.count()


def _send(*fields: object) -> None:
    if not _child:
        return
    with _lock:
        try:
            _child[0].stdin.write("\t".join(str(f) for f in fields) + "\n")
            _child[0].stdin.flush()
        except (BrokenPipeError, OSError, ValueError):  # the watchdog is gone: progress is not worth a failure
            _child.clear()


class _Clock(logging.Handler):
    """Tell the watchdog each time the export writes a line (any logger under "export")."""

    def emit(self, record: logging.LogRecord) -> None:
        _send("line")


def start() -> None:
    """Start the watchdog process (once); lines go to this process's standard error."""
    if _child:
        return
    _child.append(subprocess.Popen([sys.executable, "-m", "export.watchdog", str(INTERVAL)], stdin=subprocess.PIPE,
                                   stdout=subprocess.DEVNULL, text=True, bufsize=1))
    logging.getLogger("export").addHandler(_Clock())


def stop() -> None:
    """End the watchdog process."""
    if _child:
        child = _child.pop()
        try:
            child.stdin.close()
            child.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            child.kill()


def _enabled() -> bool:
    return logger.isEnabledFor(logging.INFO)


class Progress:
    """Count a phase's work: `with Progress("scoring fp32", total) as p: ... p.update(n)`.

    work, when given, is what the time left is estimated from (tokens, when inputs of growing length are
    scored shortest first); otherwise the count is.
    """

    def __init__(self, what: str, total: int, unit: str = "inputs", work: float | None = None) -> None:
        self.what, self.total, self.unit, self.work = what, total, unit, work
        self.done, self.work_done = 0, 0.0
        self.id = str(next(_ids))
        self._bar = None
        if not _enabled():
            return
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=f"      {what}", unit=f" {unit}", file=sys.stderr, leave=False,
                             dynamic_ncols=True, mininterval=0.5)
        _send("push", json.dumps({"id": self.id, "what": what, "total": total, "unit": unit, "work": work,
                                  "started": time.monotonic(), "bar": self._bar is not None}))

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, count: int = 1, work: float = 0.0) -> None:
        self.done += count
        self.work_done += work
        if self._bar is not None:
            self._bar.update(count)
        else:
            _send("count", self.id, self.done, self.work_done)

    def close(self) -> None:
        _send("pop", self.id)
        if self._bar is not None:
            self._bar.close()
            self._bar = None


@contextmanager
def heartbeat(what: str, expected: float | None = None) -> Iterator[None]:
    """Announce a step that cannot count its work; the watchdog says it is still working.

    expected: the seconds such a step took before, if known; the status then gives the time left.
    """
    ident = begin(what, expected)
    try:
        yield
    finally:
        end(ident)


def begin(what: str, expected: float | None = None) -> str:
    """Announce a step that cannot count its work until end(returned id) (heartbeat, without a block)."""
    ident = str(next(_ids))
    _send("push", json.dumps({"id": ident, "what": what, "total": None, "started": time.monotonic(),
                              "expected": expected}))
    return ident


def end(ident: str) -> None:
    _send("pop", ident)
