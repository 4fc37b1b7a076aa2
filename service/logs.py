"""The service's log lines on stderr: text, or one JSON object per line (SERVICE_LOG_FORMAT=json).

In JSON mode every line is an object with time, level, logger and message, and request_id when the
line was written while serving a request. Lines that bypass logging (a start-up error printed to
stderr, a warning, an exception escaping a thread) are turned into such objects too.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
import threading
from collections.abc import Mapping
from types import TracebackType
from typing import Any, TextIO

from flask import g, has_request_context

from service.config import ConfigError, log_format

ACCESS = "service.access"  # the logger of the per-request access records
_TEXT = "%(asctime)s %(levelname)s %(name)s{process}: %(message)s"
_IN_MESSAGE = {"method", "route", "status", "duration_ms"}  # an access record's text message shows these


def setup(environ: Mapping[str, str], several: bool) -> str:
    """Configure the root logger for SERVICE_LOG_FORMAT in environ; return the format in effect.

    An invalid value leaves text logging on: the settings check then stops start-up naming it.
    """
    try:
        chosen = log_format({"LOG_FORMAT": environ.get("SERVICE_LOG_FORMAT", "text")}, "LOG_FORMAT")
    except ConfigError:
        chosen = "text"
    stream = sys.__stderr__ if isinstance(sys.stderr, JsonLines) else sys.stderr
    handler = logging.StreamHandler(stream)
    if chosen == "json":
        handler.setFormatter(JsonFormatter(several))
        sys.stderr = JsonLines(stream)
        logging.captureWarnings(True)  # warnings.warn goes through logging, one object per warning
        sys.excepthook = _log_uncaught
        threading.excepthook = _log_uncaught_in_thread
    else:
        handler.setFormatter(TextFormatter(_TEXT.format(process="[%(process)d]" if several else "")))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    return chosen


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON object: time, level, logger, message, request_id and its extra fields."""

    def __init__(self, several: bool = False) -> None:
        """Name the process in each object when several serve together (SERVICE_PROCESSES), as text does."""
        super().__init__()
        self.several = several

    def format(self, record: logging.LogRecord) -> str:
        """Return the record as one line of JSON."""
        entry: dict[str, Any] = {"time": _utc(record.created), "level": record.levelname, "logger": record.name,
                                 "message": record.getMessage()}
        if self.several:
            entry["process"] = record.process
        request_id = _current_request_id()
        if request_id is not None:
            entry["request_id"] = request_id
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """Format a record as one line of text, an access record's fields after its message as key=value."""

    def format(self, record: logging.LogRecord) -> str:
        """Return the record as text."""
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if not fields:
            return line
        return line + "".join(f" {key}={'-' if value is None else _one_line(value)}" for key, value in fields.items()
                              if key not in _IN_MESSAGE)


def _one_line(value: Any) -> str:
    """Return a field's value as text that cannot end its line or forge another: a client's model name may hold
    a newline. Characters that are not printable are escaped (\\n)."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else char.encode("unicode_escape").decode("ascii") for char in text)


class JsonLines:
    """A stand-in for sys.stderr that writes every line not already JSON as a JSON object."""

    def __init__(self, stream: TextIO) -> None:
        """Write to stream, one object per complete line."""
        self.stream = stream
        self._partial = ""
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        """Buffer text and write each complete line as JSON."""
        with self._lock:
            *lines, self._partial = (self._partial + text).split("\n")
            for line in lines:
                if line.strip():
                    self.stream.write(_as_json(line) + "\n")
        return len(text)

    def flush(self) -> None:
        """Write a pending partial line, then flush the stream."""
        with self._lock:
            if self._partial.strip():
                self.stream.write(_as_json(self._partial) + "\n")
            self._partial = ""
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        """Answer everything else (fileno, isatty, encoding) as the stream does."""
        return getattr(self.stream, name)


def _as_json(line: str) -> str:
    """Return a line as it is if it is a JSON object, else as one: "error: ..." lines as errors."""
    if line.startswith("{"):
        try:
            if isinstance(json.loads(line), dict):
                return line
        except ValueError:
            pass
    level = "ERROR" if line.startswith("error:") else "WARNING"
    return json.dumps({"time": _utc(None), "level": level, "logger": "stderr", "message": line.rstrip()},
                      ensure_ascii=False)


def _utc(created: float | None) -> str:
    """Return an epoch time (None: now) as ISO 8601 UTC with milliseconds."""
    moment = dt.datetime.now(dt.UTC) if created is None else dt.datetime.fromtimestamp(created, dt.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _current_request_id() -> str | None:
    """Return the id of the request being served by this thread, if any."""
    if not has_request_context():
        return None
    return g.get("request_id")


def _log_uncaught(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    """Log an exception that reached the top of the main thread as one JSON object."""
    if issubclass(kind, KeyboardInterrupt):
        logging.getLogger("service").warning("interrupted")
        return
    logging.getLogger("service").critical("uncaught %s", kind.__name__, exc_info=(kind, exc, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    """Log an exception that ended a thread as one JSON object."""
    if args.exc_type is SystemExit:
        return
    logging.getLogger("service").error("thread %s stopped: uncaught %s", getattr(args.thread, "name", "?"),
                                       args.exc_type.__name__, exc_info=(args.exc_type, args.exc_value,
                                                                         args.exc_traceback))
