"""Waitress with a graceful stop: on SIGTERM stop accepting, finish requests in flight, then return.

Waitress' own `server.run()` turns KeyboardInterrupt into `task_dispatcher.shutdown()`: the socket
loop stops at once, so a request not yet read (or half uploaded) is never read, requests waiting
for a thread are cancelled, a response a thread could not send whole is never flushed, a
keep-alive client may send its next request into a connection about to close, and connections
still in the listen backlog are reset at exit. This runner keeps the loop running while it
drains instead, like Go's `http.Server.Shutdown`.

It also answers the errors Waitress raises itself (bad framing, a declared body over
SERVICE_MAX_CONTENT_LENGTH, oversized headers) as JSON, and after such an error reads and drops
what the client still sends before closing (nginx's lingering close), so the client gets the answer
instead of a reset.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from typing import Any

from flask import Flask
from waitress import create_server, wasyncore
from waitress.channel import HTTPChannel
from waitress.server import BaseWSGIServer
from waitress.task import ErrorTask, WSGITask

from service.config import Settings

logger = logging.getLogger(__name__)

_TICK = 0.1  # seconds the socket loop may sleep before it looks at the stop flag
_DRAIN_TICK = 0.02  # the same while draining, to exit soon after the last response
_IDLE_GRACE = 0.5  # seconds a keep-alive connection must have been quiet before a stop closes it
_BACKLOG = 2048  # connections the kernel holds for accept(): bursts land here first
_LINGER = 2.0  # seconds to read and drop what a client still sends after an early error response


class GracefulServer:
    """One Waitress server whose run() returns after a requested stop has drained the connections."""

    def __init__(self, app: Flask, settings: Settings) -> None:
        """Bind the listening socket(s); raise OSError or ValueError when that is impossible."""
        self.app = app
        self.settings = settings
        self.draining: threading.Event = app.extensions["service.draining"]
        self.server = create_server(app, host=settings.host, port=settings.port, threads=settings.threads,
                                    connection_limit=settings.connection_limit, backlog=_BACKLOG,
                                    # refuse a declared body over the limit before reading it (Waitress'
                                    # own limit is 1 GiB, spooled to disk); the limit itself still passes
                                    max_request_body_size=settings.max_content_length + 1,
                                    # select() cannot watch descriptors above 1023; poll() can
                                    asyncore_use_poll=True, expose_tracebacks=False, ident="onnx-classifier")
        # a MultiSocketServer (a host with several addresses) keeps its map public, a single server not
        self.map: dict[int, Any] = getattr(self.server, "map", None) or self.server._map
        self.listeners = [d for d in self.map.values() if isinstance(d, BaseWSGIServer)]
        channel_class = _channel_class(self.draining, settings.max_content_length)
        for listener in self.listeners:
            listener.channel_class = channel_class
        self._stop = threading.Event()

    def urls(self) -> list[str]:
        """Return the URLs Waitress actually listens on (the bound port when SERVICE_PORT=0)."""
        listen = getattr(self.server, "effective_listen", None) or [
            (self.server.effective_host, self.server.effective_port)]
        return [f"http://[{host}]:{port}" if ":" in str(host) else f"http://{host}:{port}" for host, port in listen]

    def request_stop(self, signum: int | None = None, frame: Any = None) -> None:
        """Ask run() to drain and return; a second request stops at once (signal handler)."""
        if self._stop.is_set():
            raise KeyboardInterrupt  # the operator insists: main() exits without draining
        self._stop.set()

    def run(self) -> bool:
        """Serve until request_stop(), then drain; return whether every request in flight finished."""
        adj = self.server.adj
        sweep = 0.0
        while not self._stop.is_set():
            wasyncore.loop(timeout=_TICK, map=self.map, use_poll=adj.asyncore_use_poll, count=1)
            if time.monotonic() >= sweep:  # not after every event: the scan is O(connections)
                _close_expired_lingering(self._channels())
                sweep = time.monotonic() + _TICK
        return self._drain()

    def _drain(self) -> bool:
        """Stop accepting, serve what was accepted, close the connections and the request threads."""
        deadline = time.monotonic() + self.settings.shutdown_timeout
        self.draining.set()
        accepted = self._stop_accepting()
        logger.info("stopping: no longer accepting connections (%d more accepted from the backlog), "
                    "finishing requests in flight (at most %g s)", accepted, self.settings.shutdown_timeout)
        adj = self.server.adj
        while self._channels() and time.monotonic() < deadline:
            wasyncore.loop(timeout=_DRAIN_TICK, map=self.map, use_poll=adj.asyncore_use_poll, count=1)
            # Responses now say Connection: close, and Waitress closes those connections once sent.
            # A keep-alive connection idle since before the stop is closed after a grace period: a
            # client that just sent a request on it would see a reset if it were closed at once.
            quiet_since = time.time() - _IDLE_GRACE
            _close_expired_lingering(self._channels())
            for channel in self._channels():
                if not _busy(channel) and channel.last_activity < quiet_since:
                    channel.handle_close()
        unfinished = self._channels()
        if unfinished:
            logger.warning("stopping: %d connection(s) still busy after %g s are closed unanswered",
                           len(unfinished), self.settings.shutdown_timeout)
            for channel in unfinished:
                channel.handle_close()
        self.server.task_dispatcher.shutdown(timeout=max(0.1, deadline - time.monotonic()))
        scheduler = self.app.extensions.get("service.scheduler")
        if scheduler is not None:
            scheduler.stop(timeout=max(0.1, deadline - time.monotonic()))
        wasyncore.close_all(self.map)
        return not unfinished

    def _stop_accepting(self) -> int:
        """Accept what already waits in the backlog (those clients connected in time), then close."""
        accepted = 0
        for listener in self.listeners:
            room = max(0, self.settings.connection_limit - len(self._channels()))
            for _ in range(room):
                before = len(self.map)
                listener.handle_accept()
                if len(self.map) == before:  # nothing was waiting (or accept failed)
                    break
                accepted += 1
            # the base close: BaseWSGIServer.close would also close the trigger that task threads
            # pull to wake this loop when a response is ready
            wasyncore.dispatcher.close(listener)
        return accepted

    def _channels(self) -> list[HTTPChannel]:
        """Return the open client connections."""
        return [d for d in list(self.map.values()) if isinstance(d, HTTPChannel)]


def _busy(channel: HTTPChannel) -> bool:
    """Return whether a connection has a request in progress or unsent output."""
    return bool(channel.requests or channel.request is not None or channel.total_outbufs_len)


def _channel_class(draining: threading.Event, max_content_length: int) -> type[HTTPChannel]:
    """Return Waitress' channel with JSON errors, lingering close and `Connection: close` when draining."""

    class ClosingTask(WSGITask):
        def build_response_header(self) -> bytes:
            # A WSGI app may not set hop-by-hop headers (PEP 3333), so the server must: a keep-alive
            # client then opens a new connection (refused: the listener is closed) instead of
            # sending another request on one about to be closed under it.
            if draining.is_set():
                self.set_close_on_finish()
            return super().build_response_header()

    class JsonErrorTask(ErrorTask):
        def execute(self) -> None:
            # Waitress answers what it cannot parse (bad framing, a declared body over the limit,
            # huge headers) itself, before Flask runs: in the service's JSON error format too.
            error = self.request.error
            if error.code == 413:
                message = f"request body too large: the limit is {max_content_length} bytes"
            elif error.code >= 500:
                message = "internal error"
            else:  # waitress' parse message, e.g. "Invalid chunk size": about the request, no internals
                message = f"{error.reason.lower()}: {str(error.body)[:200]}"
            body = json.dumps({"error": message}).encode()
            self.status = f"{error.code} {error.reason}"
            self.response_headers.append(("Content-Type", "application/json"))
            self.set_close_on_finish()
            self.content_length = len(body)
            self.channel.linger = True
            self.write(body)

    class Channel(HTTPChannel):
        task_class = ClosingTask
        error_task_class = JsonErrorTask
        linger = False  # set by an error answered before the request was read whole
        linger_until = 0.0

        def handle_close(self) -> None:
            # Closing a socket with unread input makes the kernel send a reset, which can destroy
            # the error response on its way and fails a client still sending its body. So, like
            # nginx's lingering close: shut down our side, then read and drop for a while.
            if self.linger and not self.linger_until and self.connected:
                try:
                    self.socket.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                else:
                    self.linger_until = time.monotonic() + _LINGER
                    self.will_close = self.close_when_flushed = False
                    return
            super().handle_close()

        def readable(self) -> bool:
            return bool(self.linger_until) or super().readable()

        def writable(self) -> bool:
            return not self.linger_until and super().writable()

        def handle_read(self) -> None:
            if not self.linger_until:
                super().handle_read()
                return
            try:
                data = self.socket.recv(65536)
            except OSError:
                data = b""
            if not data or time.monotonic() > self.linger_until:
                super().handle_close()

    return Channel


def _close_expired_lingering(channels: list[HTTPChannel]) -> None:
    """Close connections that lingered after an error longer than _LINGER without closing."""
    now = time.monotonic()
    for channel in channels:
        if getattr(channel, "linger_until", 0.0) and now > channel.linger_until:
            HTTPChannel.handle_close(channel)
