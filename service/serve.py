"""Waitress on its own event loop: bounded waits for slow clients, HTTP/1.1 whole, a graceful stop.

Waitress' socket loop (wasyncore) asks every connection whether it wants to read or write on every
turn, so each idle connection slows every request; its one clock, channel_timeout, restarts on
every byte a client sends; and once clients that never finish a request fill its connection limit,
every other client waits in the listen backlog. This runner keeps Waitress' channels, parser and
request threads but drives them itself:
- a selector (epoll) in which a connection waiting for its client stays registered and is not
  looked at again until it has something to read, and one a request thread serves is looked at
  only when that thread has changed it (the thread marks it as it wakes the loop);
- a clock per request phase: the head, the body, the keep-alive wait between requests. A client
  too slow with its head or body gets a JSON 408 and a lingering close; an idle one is closed;
- at the connection limit, the accept path closes the connections that cost least to lose
  (lingering after an answer, idle between requests, then the oldest without a whole request yet,
  which get a 408) so a new client is served instead of waiting in the backlog;
- request threads woken last idle first (LastIdleFirst), so the work stays on few, warm threads;
- with several server processes, a share of the connections each: one that has held two more
  keep-alive connections than another for a while answers one with `Connection: close`.

On the connection (HTTP/1.1): a request with `Expect: 100-continue` is first shown to the app's
routing and API-key check, so a refusal (401, 404, 405) is answered without reading the body, and a
body declared over the limit gets its 413 (Waitress sent 100 Continue and then never answered).
Pipelined requests are Waitress' own: parsed from one read, answered in order, one at a time.

The stop: Waitress' own `server.run()` turns KeyboardInterrupt into `task_dispatcher.shutdown()`,
which stops the socket loop at once, so a request not yet read is never read, requests waiting for a
thread are cancelled and connections still in the listen backlog are reset. On SIGTERM this runner
stops accepting, answers what was received, closes each connection once it is quiet and returns,
like Go's `http.Server.Shutdown`.

Errors Waitress raises itself (bad framing, a declared body over SERVICE_MAX_CONTENT_LENGTH, a head
over SERVICE_MAX_HEADER_BYTES) are answered as JSON, and after such an error the runner reads and
drops what the client still sends before closing (nginx's lingering close), so the client gets the
answer instead of a reset.
"""

from __future__ import annotations

import errno
import heapq
import io
import json
import logging
import math
import resource
import selectors
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from flask import Flask
from flask import request as flask_request
from waitress import create_server, utilities, wasyncore
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.server import BaseWSGIServer
from waitress.task import ErrorTask, ThreadedTaskDispatcher, WSGITask
from werkzeug.wrappers import Response

from service import state
from service.config import Settings
from service.processes import refuse_new_connections

if TYPE_CHECKING:
    from service.processes import Shares

logger = logging.getLogger(__name__)

_TICK = 0.1  # seconds the socket loop may sleep before it looks at the stop flag
_DRAIN_TICK = 0.02  # the same while draining, to exit soon after the last response
_SWEEP = 0.5  # seconds between two looks at every connection's clock
_SAME_STOP = 1.0  # seconds within which a second stop signal is taken for the same stop
_HANDSHAKE_GRACE = 0.2  # seconds a stopping server still accepts the handshakes begun before it stopped
_IDLE_GRACE = 0.5  # seconds a keep-alive connection must have been quiet before a stop closes it
_BACKLOG = 2048  # connections the kernel holds for accept(): bursts land here first
_LINGER = 2.0  # seconds to read and drop what a client still sends after an early error response
_ACCEPT_BATCH = 64  # connections accepted per wake-up of a listener
_LEAVE = 0.005  # seconds a process with more connections than another leaves a new one to it
_REBALANCE = 0.05  # seconds between two keep-alive connections a process hands back for balance
_REBALANCE_RETRY = 1.0  # the same when the last one handed back was not taken by another process
_UNEVEN = 0.5  # seconds an imbalance of connections lasts before a process hands one back
_SHED_BATCH = 16  # connections closed at once at the connection limit (one scan, several slots)
_EXPIRE_BATCH = 128  # connections answered or closed per sweep: a mass timeout must not stall the loop
_REPORT_EVERY = 10.0  # seconds between two log lines about slow clients or a full connection budget
_DISCONNECTED = frozenset({errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN, errno.ECONNABORTED,
                           errno.EPIPE, errno.EBADF})
READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE

# What this runner relies on beyond Waitress' documented API (create_server, a listener's channel_class,
# a channel's task_class and error_task_class, Adjustments), for the Waitress version pinned in
# requirements.txt: (where, name, what for). tests/service/test_server.py fails when one moves.
WAITRESS_VERSION = "3.0.2"
WAITRESS_INTERNALS = (
    ("waitress.server.create_server", "_dispatcher", "request threads woken latest idle first (a test shim)"),
    ("waitress.task.ThreadedTaskDispatcher", "queue_cv", "the condition idle request threads wait on"),
    ("waitress.task.ThreadedTaskDispatcher", "lock", "the lock under that condition"),
    ("waitress.server.BaseWSGIServer", "_map", "a single server's socket map, driven by this runner's loop"),
    ("waitress.server.BaseWSGIServer", "active_channels", "the open connections, to count, sweep and drain"),
    ("waitress.server.BaseWSGIServer", "fix_addr", "a new connection's address, as Waitress' accept sets it"),
    ("waitress.server.BaseWSGIServer", "set_socket_options", "a new connection's socket options"),
    ("waitress.server.BaseWSGIServer", "pull_trigger", "how a request thread wakes the loop after changing its "
     "connection's state: the runner marks that connection first"),
    ("waitress.server.MultiSocketServer", "effective_listen", "the bound addresses when a host has several"),
    ("waitress.channel.HTTPChannel", "requests", "requests received and not yet answered (pipelined)"),
    ("waitress.channel.HTTPChannel", "request", "the request being received"),
    ("waitress.channel.HTTPChannel", "requests_lock", "guards those two against request threads"),
    ("waitress.channel.HTTPChannel", "total_outbufs_len", "output not yet sent"),
    ("waitress.channel.HTTPChannel", "will_close", "a close after the output"),
    ("waitress.channel.HTTPChannel", "close_when_flushed", "likewise"),
    ("waitress.channel.HTTPChannel", "last_activity", "the keep-alive clock, read while draining"),
    ("waitress.channel.HTTPChannel", "send_continue", "100 Continue, answered from the head instead when refused"),
    ("waitress.channel.HTTPChannel", "received", "bytes into requests: the phase clocks start here"),
    ("waitress.channel.HTTPChannel", "service", "runs a channel's tasks (a 408 on the loop's thread)"),
    ("waitress.parser.HTTPRequestParser", "headers_finished", "the head is whole: the body's clock starts"),
    ("waitress.parser.HTTPRequestParser", "expect_continue", "the client waits for 100 Continue"),
    ("waitress.parser.HTTPRequestParser", "completed", "a request whole, or answered from its head"),
    ("waitress.parser.HTTPRequestParser", "error", "the error a request is answered with (408)"),
    ("waitress.wasyncore.dispatcher", "_fileno", "a dispatcher's descriptor, for the selector"),
    ("waitress.wasyncore.dispatcher", "accepting", "a listener that accepts"),
)

# The connection a request thread is serving (Channel.service), marked when the thread wakes the loop.
_serving = threading.local()

# What a connection waits for from its client (None: the server is working on it).
FRESH, HEAD, BODY, IDLE, SEND = "fresh", "head", "body", "idle", "send"


class RequestTimeout(utilities.Error):
    """A request whose head or body did not arrive in time, answered like Waitress' own errors."""

    code = 408
    reason = "Request Timeout"


class _LatestWaiterFirst:
    """A condition variable over a lock that wakes its most recent waiter first (a stack, not a queue)."""

    def __init__(self, lock: threading.Lock) -> None:
        """Wait and notify with `lock` held, as with threading.Condition(lock)."""
        self._lock = lock
        self._waiters: list[threading.Condition] = []  # one per waiting thread, the latest on top
        self._local = threading.local()

    def wait(self) -> None:
        """Release the lock until notified, then hold it again."""
        mine = getattr(self._local, "condition", None)
        if mine is None:
            mine = self._local.condition = threading.Condition(self._lock)
        self._waiters.append(mine)
        mine.wait()  # whoever notifies it has taken it off the stack

    def notify(self, n: int = 1) -> None:
        """Wake the n most recent waiters."""
        for _ in range(min(n, len(self._waiters))):
            self._waiters.pop().notify()

    def notify_all(self) -> None:
        """Wake every waiter."""
        self.notify(len(self._waiters))


class LastIdleFirst(ThreadedTaskDispatcher):
    """Waitress' request threads, each request given to the thread that went idle last.

    Waitress wakes the thread idle longest (a threading.Condition wakes its waiters in order), so
    even one client at a time cycles through every request thread. Each thread that runs the model
    keeps onnxruntime's and malloc's per-thread buffers, and none stays warm in the CPU caches.
    Waking the thread idle shortest keeps the work on as few threads as the concurrency needs; the
    others sleep untouched, and the thread count still bounds the requests in progress. Only the
    order of waking changes: the loop, the queue and the stop are Waitress' own.
    """

    def __init__(self) -> None:
        """Start with no threads (set_thread_count starts them), idle ones woken latest first."""
        super().__init__()
        self.queue_cv = _LatestWaiterFirst(self.lock)  # type: ignore[assignment]


def _marking(pull_trigger: Callable[[], None]) -> Callable[[], None]:
    """Wrap a listener's pull_trigger: mark the connection the calling request thread serves, then wake the loop.

    Waitress' request threads call it after each change of their connection's state (output queued,
    request done); the mark tells the loop which connection to look at, so it need not look at every
    connection in service on every turn.
    """

    def pull() -> None:
        channel = getattr(_serving, "channel", None)
        if channel is not None:
            channel.pulled += 1
        pull_trigger()

    return pull


def raise_open_files_limit() -> int:
    """Raise the soft open-files limit to the hard one, as Go does at start-up; return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):  # e.g. macOS refuses an unlimited hard limit: keep the soft one
            return soft
    return hard


class GracefulServer:
    """One Waitress server whose run() returns after a requested stop has drained the connections."""

    def __init__(self, app: Flask, settings: Settings, sockets: list[socket.socket] | None = None,
                 shares: Shares | None = None) -> None:
        """Bind the listening socket(s), or serve `sockets` bound by the parent of several processes.

        With `shares` (forked processes), a process leaves a new connection to one with fewer open.
        Raise OSError or ValueError when binding is impossible.
        """
        self.app = app
        self.settings = settings
        # CONNECTION_LIMIT is the service's: each of several processes (given the parent's sockets) takes its share
        self.connection_limit = (settings.connection_limit if sockets is None
                                 else math.ceil(settings.connection_limit / settings.processes))
        self.draining: threading.Event = state.draining(app)
        self.shared = sockets is not None  # the listening sockets are the parent's, shared with siblings
        dispatcher = LastIdleFirst()
        where: dict[str, Any] = {"sockets": sockets} if sockets else {"host": settings.host, "port": settings.port}
        # A socket shared with other processes wakes all of them for each connection: accepting one
        # at a time lets them take turns instead of the quickest one taking a whole burst.
        self._accept_batch = 1 if sockets else _ACCEPT_BATCH
        self.server = create_server(_answer_refusals(app), _dispatcher=dispatcher, **where,
                                    threads=settings.threads, connection_limit=self.connection_limit,
                                    backlog=_BACKLOG, channel_timeout=settings.keepalive_timeout,
                                    max_request_header_size=settings.max_header_bytes,
                                    # refuse a declared body over the limit before reading it (Waitress'
                                    # own limit is 1 GiB, spooled to disk); the limit itself still passes
                                    max_request_body_size=settings.max_content_length + 1,
                                    expose_tracebacks=False, ident="onnx-classifier")
        dispatcher.set_thread_count(settings.threads)  # Waitress starts them only for its own dispatcher
        # a MultiSocketServer (a host with several addresses) keeps its map public, a single server not
        self.map: dict[int, Any] = getattr(self.server, "map", None) or self.server._map
        self.listeners = [d for d in self.map.values() if isinstance(d, BaseWSGIServer)]
        for listener in self.listeners:  # Waitress' own extension point, and the way back to this runner
            listener.channel_class = Channel
            listener.runner = self
            listener.pull_trigger = _marking(listener.pull_trigger)
        self.selector = selectors.DefaultSelector()
        self._registered: dict[int, tuple[int, Any]] = {}  # fd -> the events and dispatcher registered
        self._watch: set[int] = set(self.map)  # fds whose interest must be looked at on the next turn
        self._stirred: set[int] = set()  # those changed by this loop's thread: looked at even while in service
        self._accept_paused_until = 0.0
        self.shares = shares
        # when this process last left a connection to the others, and how many they had accepted then
        self._left: tuple[float, int] | None = None
        # when this process last closed a connection for balance (hand_back), and the others' accepts then
        self._handed_back: tuple[float, int] | None = None
        self._hand_back_lock = threading.Lock()
        self._uneven_since: float | None = None  # since when hand_back has found two connections more here
        self._tally: Counter[str] = Counter()  # slow clients answered or shed since the last report
        self._next_report = 0.0
        self._loop_thread = threading.get_ident()  # the selector and the watch set are this thread's
        self._stop = threading.Event()
        self._stopped_at = 0.0

    def urls(self) -> list[str]:
        """Return the URLs Waitress actually listens on (the bound port when SERVICE_PORT=0)."""
        listen = getattr(self.server, "effective_listen", None) or [
            (self.server.effective_host, self.server.effective_port)]
        return [f"http://[{host}]:{port}" if ":" in str(host) else f"http://{host}:{port}" for host, port in listen]

    def request_stop(self, signum: int | None = None, frame: Any = None) -> None:
        """Ask run() to drain and return; a second request stops at once (signal handler).

        A second one within _SAME_STOP seconds is the same stop: a stop sent to every process of the
        service at once (systemd's control-group kill, `pkill`) also reaches a child from its parent.
        """
        if self._stop.is_set():
            if time.monotonic() - self._stopped_at < _SAME_STOP:
                return
            raise KeyboardInterrupt  # the operator insists: main() exits without draining
        self._stopped_at = time.monotonic()
        self._stop.set()

    def run(self) -> bool:
        """Serve until request_stop(), then drain; return whether every request in flight finished."""
        self._loop_thread = threading.get_ident()
        sweep = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            pause = self._accept_paused_until - now  # a pause of accepting ends on time, not at an event
            self._turn(0 if sweep <= now else min(_TICK, pause) if pause > 0 else _TICK)
            if time.monotonic() >= sweep:  # not after every event: the sweep is O(connections)
                # more expired than one sweep handles: the rest after the next turn's events
                sweep = time.monotonic() + (0 if self._sweep() else _SWEEP)
        return self._drain()

    # ---- the event loop ------------------------------------------------------------------------

    def watch(self, fd: int | None) -> None:
        """Look at a connection's interest on the next turn (its state changed outside its events)."""
        # A connection a request thread serves is looked at when that thread marks it (see _marking).
        if fd is not None and threading.get_ident() == self._loop_thread:
            self._watch.add(fd)
            self._stirred.add(fd)

    def forget(self, fd: int | None) -> None:
        """Drop a closing connection from the selector."""
        if threading.get_ident() != self._loop_thread:
            return  # closed by a request thread (a send failed): _register copes with the stale entry
        self._watch.discard(fd)
        if self._registered.pop(fd, None):
            try:
                self.selector.unregister(fd)
            except (KeyError, ValueError):
                pass

    def _turn(self, timeout: float) -> None:
        """Update the interest of the connections that may have changed, wait for events, handle them."""
        watch, self._watch = self._watch, set()
        if self.shares is not None:  # closed connections too, for the other processes' next accept
            self.shares.publish(self._open())
        for fd in watch:
            dispatcher = self.map.get(fd)
            if dispatcher is None:
                self.forget(fd)
                continue
            if fd not in self._stirred and isinstance(dispatcher, Channel) and dispatcher.requests:
                # A request thread serves it: its state changes only in that thread, which wakes the loop
                # after each change and marks it first (Channel.pulled). Not marked since the last look:
                # nothing to look at (looking costs Python for every connection in service, every turn).
                if dispatcher.pulled == dispatcher.seen:
                    self._watch.add(fd)
                    continue
                dispatcher.seen = dispatcher.pulled  # before looking: a change after this marks it again
            events = self._interest(dispatcher)
            self._register(fd, dispatcher, events)
            # A connection that only waits to read and has no request in a thread changes state only
            # through its own events or this loop's sweeps: it needs no look until then.
            if not (events == READ and isinstance(dispatcher, HTTPChannel) and not dispatcher.requests):
                self._watch.add(fd)
        self._stirred = set()
        for key, events in self.selector.select(timeout):
            dispatcher = key.data
            if self.map.get(key.fd) is not dispatcher:  # closed (and its fd maybe reused) this turn
                continue
            self._watch.add(key.fd)
            self._stirred.add(key.fd)  # changed on this thread: looked at next turn whatever its marks
            if dispatcher in self.listeners:
                if self.shares is None or not self._leave():
                    self._accept(dispatcher, self._accept_batch)
            else:
                _handle(dispatcher, events, lambda fd=key.fd, d=dispatcher: self.map.get(fd) is d)
        if self.shares is not None:  # connections closed by these events: before the others' next accept
            self.shares.publish(self._open())

    def _interest(self, dispatcher: Any) -> int:
        """Return the events a dispatcher waits for, as wasyncore's poll loop would ask it."""
        if dispatcher in self.listeners:
            return READ if dispatcher.accepting and time.monotonic() >= self._accept_paused_until else 0
        events = READ if dispatcher.readable() else 0
        if dispatcher.writable() and not dispatcher.accepting:
            events |= WRITE
        return events

    def _register(self, fd: int, dispatcher: Any, events: int) -> None:
        """Bring the selector's registration of fd to `events`."""
        old, registered = self._registered.get(fd, (0, None))
        if (events == old and dispatcher is registered) or not (old or events):
            return
        try:
            if old and dispatcher is not registered:
                # the fd was closed without forget() (by a request thread) and is now another
                # connection's: the kernel dropped the old registration, so start afresh
                self.selector.unregister(fd)
                old = 0
            if old and events:
                self.selector.modify(fd, events, dispatcher)
            elif events:
                self.selector.register(fd, events, dispatcher)
            else:
                self.selector.unregister(fd)
        except (OSError, KeyError, ValueError):  # out of step with the selector: register afresh
            try:
                self.selector.unregister(fd)
            except (KeyError, ValueError):
                pass
            if events:
                self.selector.register(fd, events, dispatcher)
        if events:
            self._registered[fd] = (events, dispatcher)
        else:
            self._registered.pop(fd, None)

    # ---- accepting, and making room at the connection limit -------------------------------------

    def _open(self) -> int:
        """Return the number of open client connections."""
        return sum(len(listener.active_channels) for listener in self.listeners)

    def _accept(self, listener: BaseWSGIServer, most: int, make_room: bool = True) -> int:
        """Accept up to `most` waiting connections; return how many were accepted."""
        accepted = 0
        while accepted < most:
            if self._open() >= self.connection_limit and not (make_room and self._make_room()):
                self._accept_paused_until = time.monotonic() + _TICK  # they wait in the backlog
                self._count("accepting paused at the connection limit (every connection busy)")
                break
            try:
                pair = listener.accept()  # None when nothing waits
            except OSError as exc:  # out of descriptors or memory: retry later, without a traceback
                self._accept_paused_until = time.monotonic() + _TICK
                self._count(f"accept failed ({exc.strerror})")
                break
            if pair is None:
                break
            connection, address = pair
            try:
                listener.set_socket_options(connection)
                listener.channel_class(listener, connection, listener.fix_addr(address), listener.adj,
                                       map=self.map)
            except OSError:  # the client hung up before we got to it
                connection.close()
                continue
            accepted += 1
            if self.shares is not None:
                self.shares.accepted()
                self.shares.publish(self._open())
        return accepted

    def _leave(self) -> bool:
        """Return whether to leave the waiting connection to a process with fewer open ones, for a moment.

        A process leaves it once; if the others accepted nothing meanwhile (busy, or gone), it takes
        the connection when it finds it still waiting.
        """
        assert self.shares is not None
        now, others = time.monotonic(), self.shares.others_accepted()
        left, self._left = self._left, None
        if self.shares.fewest(self._open()):
            return False
        if left is not None and now - left[0] < _LEAVE * 10 and others == left[1]:
            return False  # still waiting after a moment: nobody else takes it
        self._left = (now, others)
        self._accept_paused_until = now + _LEAVE
        return True

    def hand_back(self) -> bool:
        """Return whether to close a keep-alive connection after its answer, for its client to reconnect
        to a process with fewer connections (request threads call it; at most one every _REBALANCE s).

        Accepting balances a burst only as far as the counts it reads are current: connections whose
        client has gone but whose answers are still being written count, and a busy process may take
        a while to accept. A client's keep-alive connection would stay where it landed; handing one
        back while this process has had two more than another for _UNEVEN s evens them out within a
        few answers.
        """
        if self.shares is None:
            return False
        uneven = self.shares.surplus(self._open()) >= 2
        if not uneven and self._uneven_since is None:
            return False  # even now and before: every answer asks, so no lock on this path
        with self._hand_back_lock:
            now, others = time.monotonic(), self.shares.others_accepted()
            # only an imbalance that lasts: connections just closed by their clients count for a moment
            if not uneven or self._uneven_since is None:
                self._uneven_since = now if uneven else None
                return False
            if now - self._uneven_since < _UNEVEN:
                return False
            if self._handed_back is not None:
                at, before = self._handed_back
                # the last client handed back came back here (the others are busy or stopped): wait longer
                if now - at < (_REBALANCE if others > before else _REBALANCE_RETRY):
                    return False
            self._handed_back = (now, others)
            return True

    def _make_room(self) -> bool:
        """Close the connections that cost least to lose to admit new clients; return whether any was."""
        ranked = [(rank, channel.waiting_since, id(channel), channel) for channel in self._channels()
                  if (rank := _shed_rank(channel)) is not None]
        closed = 0
        for rank, *_, channel in heapq.nsmallest(_SHED_BATCH, ranked):
            closed += self._shed(channel, rank)
        if closed:
            self._tally["closed to make room at the connection limit"] += closed
        return bool(closed)

    def _shed(self, channel: HTTPChannel, rank: int) -> bool:
        """Close one connection to make room; return False when it turns out to carry a whole request."""
        fd = channel._fileno
        if rank and _has_input(channel):
            # Bytes this loop has not read yet (a new connection's request, or the next request on a
            # kept-alive one): read them first, so a request that arrived whole is served, not lost.
            channel.handle_read()
            self.watch(fd)
            if self.map.get(fd) is not channel:  # the client had closed it
                return True
        phase = _phase(channel)
        if not rank or phase in (FRESH, IDLE):
            HTTPChannel.handle_close(channel)
        elif phase == HEAD:
            self._answer_timeout(channel, "the server needed the connection for another client", linger=False)
        else:
            return False
        return True

    # ---- clocks ---------------------------------------------------------------------------------

    def _sweep(self) -> bool:
        """Close lingering connections whose time is up, answer or close clients that waited too long.

        Return whether it stopped at _EXPIRE_BATCH with connections left to look at.
        """
        now, wall = time.monotonic(), time.time()
        budget = _EXPIRE_BATCH
        limits = {FRESH: self.settings.header_timeout, HEAD: self.settings.header_timeout,
                  BODY: self.settings.body_timeout, IDLE: self.settings.keepalive_timeout}
        for channel in self._channels():
            if not budget:
                return True
            if channel.linger_until:
                if now > channel.linger_until:
                    HTTPChannel.handle_close(channel)
                    budget -= 1
                continue
            phase = _phase(channel)
            if phase is None:  # the server is working on it: the client's clock starts afterwards
                channel.waiting_since = now
                continue
            if phase == SEND:  # a client not reading its answer: no progress for the keep-alive time
                waited, limit = wall - channel.last_activity, self.settings.keepalive_timeout
            else:
                waited, limit = now - channel.waiting_since, limits[phase]
            if waited <= limit:
                continue
            budget -= 1
            if phase in (HEAD, BODY):
                self._answer_timeout(channel, f"the request {phase} was not received within {limit:g} s",
                                     linger=True)
                self._count(f"408 for a request {phase} too slow")
            else:
                channel.handle_close()
        if self._tally and now >= self._next_report:
            logger.warning("slow clients and the connection limit, since the last report: %s",
                           "; ".join(f"{what}: {count}" for what, count in self._tally.items()))
            self._tally.clear()
            self._next_report = now + _REPORT_EVERY
        return False

    def _answer_timeout(self, channel: HTTPChannel, message: str, linger: bool) -> None:
        """Answer a client's unfinished request with a JSON 408 and close its connection."""
        request = channel.request
        request.error = RequestTimeout(message)
        request.completed = True
        with channel.requests_lock:
            channel.request = None
            channel.requests.append(request)
        channel.service()  # the error task, on this thread: no request of this connection is running
        if linger:
            self.watch(channel._fileno)
            return
        channel.linger = False
        channel.handle_write()  # what the socket takes now; then close at once, the slot is needed
        if self.map.get(channel._fileno) is channel:
            HTTPChannel.handle_close(channel)

    def _count(self, what: str) -> None:
        """Tally an event about slow clients or the connection budget for the next report."""
        self._tally[what] += 1

    # ---- the stop -------------------------------------------------------------------------------

    def _drain(self) -> bool:
        """Stop accepting, serve what was accepted, close the connections and the request threads."""
        deadline = time.monotonic() + self.settings.shutdown_timeout
        self.draining.set()
        # Dropping new connections' SYNs lets the handshakes already under way finish: accepted
        # while the rest drains, they are answered, with Connection: close, like the backlog. A socket
        # shared with sibling processes is the parent's to close that way, when the whole service stops
        # (service/processes.py); a child stopped alone leaves new connections to its siblings.
        refused = self.shared or all([refuse_new_connections(listener.socket) for listener in self.listeners])
        close_listeners_at = time.monotonic() + (_HANDSHAKE_GRACE if refused else 0)
        listening = True
        logger.info("stopping: no longer accepting connections, finishing requests in flight (at most %g s)",
                    self.settings.shutdown_timeout)
        sweep = 0.0
        while time.monotonic() < deadline:
            if listening and time.monotonic() >= close_listeners_at:
                accepted = self._stop_accepting()
                listening = False
                if accepted:
                    logger.info("stopping: %d more connection(s) accepted from the backlog", accepted)
            if not listening and not self._channels():
                break
            self._turn(_DRAIN_TICK)
            if time.monotonic() >= sweep:
                sweep = time.monotonic() + (0 if self._sweep() else _SWEEP)
            # Responses now say Connection: close, and Waitress closes those connections once sent.
            # A keep-alive connection idle since before the stop is closed after a grace period: a
            # client that just sent a request on it would see a reset if it were closed at once.
            quiet_since = time.time() - _IDLE_GRACE
            for channel in self._channels():
                if not _busy(channel) and not channel.linger_until and channel.last_activity < quiet_since:
                    channel.handle_close()
        if listening:
            self._stop_accepting()
        unfinished = self._channels()
        if unfinished:
            logger.warning("stopping: %d connection(s) still busy after %g s are closed unanswered",
                           len(unfinished), self.settings.shutdown_timeout)
            for channel in unfinished:
                HTTPChannel.handle_close(channel)
        self.server.task_dispatcher.shutdown(timeout=max(0.1, deadline - time.monotonic()))
        scheduler = state.scheduler(self.app)
        if scheduler is not None:
            scheduler.stop(timeout=max(0.1, deadline - time.monotonic()))
        self.selector.close()
        wasyncore.close_all(self.map)
        return not unfinished

    def _stop_accepting(self) -> int:
        """Accept what still waits in the backlog (those clients connected in time), then close."""
        accepted = 0
        for listener in self.listeners:
            room = max(0, self.connection_limit - self._open())
            accepted += self._accept(listener, room, make_room=False)
            self.forget(listener._fileno)
            # the base close: BaseWSGIServer.close would also close the trigger that task threads
            # pull to wake this loop when a response is ready
            wasyncore.dispatcher.close(listener)
        return accepted

    def _channels(self) -> list[HTTPChannel]:
        """Return the open client connections."""
        return [channel for listener in self.listeners for channel in list(listener.active_channels.values())]

    def refusal(self, channel: HTTPChannel, request: HTTPRequestParser) -> Response | None:
        """Return the app's answer to a request head alone, or None when it needs the body to answer."""
        environ = WSGITask(channel, request).get_environment()
        environ["wsgi.input"] = io.BytesIO()  # the body is not here yet, and is not read for this
        with self.app.request_context(environ):
            try:
                answer = self.app.preprocess_request()  # before_request hooks: the API key check
                if answer is None:
                    if flask_request.routing_exception is None:
                        return None
                    raise flask_request.routing_exception  # 404, 405: the route does not take it
            except Exception as exc:  # the app's own error handlers make it a JSON answer
                answer = self.app.handle_user_exception(exc)
            return self.app.finalize_request(answer)


def _handle(dispatcher: Any, events: int, still_open: Callable[[], bool]) -> None:
    """Run a dispatcher's read and write handlers for the events it got, as wasyncore's loop does."""
    try:
        if events & READ:
            dispatcher.handle_read_event()
        if events & WRITE and still_open():
            dispatcher.handle_write_event()
    except OSError as exc:
        if exc.args[0] in _DISCONNECTED:
            dispatcher.handle_close()
        else:
            dispatcher.handle_error()
    except Exception:
        dispatcher.handle_error()


def _phase(channel: HTTPChannel) -> str | None:
    """Return what a connection waits for from its client, or None while the server works on it."""
    if channel.requests or channel.will_close or channel.close_when_flushed:
        return None
    if channel.total_outbufs_len:
        return SEND
    request = channel.request
    if request is None:
        return FRESH if channel.fresh else IDLE
    return BODY if request.headers_finished else HEAD


def _shed_rank(channel: HTTPChannel) -> int | None:
    """Return how cheaply a connection can be closed for a new one (lowest first), None if it cannot."""
    if channel.linger_until:
        return 0  # answered already
    phase = _phase(channel)
    if phase == IDLE:
        return 1  # between requests: a client reconnects
    if phase in (FRESH, HEAD):
        return 2  # no whole request yet; the oldest first, so a just accepted client is the last
    return None  # a request in a thread, a body on its way, an answer on its way


def _has_input(channel: HTTPChannel) -> bool:
    """Return whether a connection has received bytes not read yet."""
    try:
        return bool(channel.socket.recv(1, socket.MSG_PEEK))
    except OSError:  # nothing yet (the socket does not block), or the connection is gone
        return False


def _busy(channel: HTTPChannel) -> bool:
    """Return whether a connection has a request in progress or unsent output."""
    return bool(channel.requests or channel.request is not None or channel.total_outbufs_len)


def _answer_refusals(app: Flask) -> Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]:
    """Return the WSGI app Waitress calls: the app, or the answer it already gave to a request's head."""

    def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        refusal = environ.get("service.refusal")
        return (app if refusal is None else refusal)(environ, start_response)

    return application


class ClosingTask(WSGITask):
    """Waitress' WSGI task: a refusal answered from the head, and Connection: close while the server stops."""

    def get_environment(self) -> dict[str, Any]:
        environ = super().get_environment()
        refusal = getattr(self.request, "refusal", None)
        if refusal is not None:
            environ["service.refusal"] = refusal
        return environ

    def execute(self) -> None:
        if getattr(self.request, "refusal", None) is not None:
            # answered from the head: the body was not read, so nothing more can be read as a request
            self.set_close_on_finish()
            self.channel.linger = True
        super().execute()

    def build_response_header(self) -> bytes:
        # A WSGI app may not set hop-by-hop headers (PEP 3333), so the server must: a keep-alive
        # client then opens a new connection (refused: the listener is closed) instead of
        # sending another request on one about to be closed under it. Requests already received
        # behind this one (pipelined) are answered first; the last answer carries the close.
        runner = self.channel.server.runner
        if len(self.channel.requests) <= 1 and (runner.draining.is_set() or runner.hand_back()):
            self.set_close_on_finish()
        return super().build_response_header()


class JsonErrorTask(ErrorTask):
    """Waitress' own errors (bad framing, a body or head over the limit) answered in the service's JSON."""

    def execute(self) -> None:
        # Waitress answers what it cannot parse (bad framing, a declared body over the limit,
        # huge headers) itself, before Flask runs: in the service's JSON error format too.
        error = self.request.error
        if error.code == 413:
            limit = self.channel.server.runner.settings.max_content_length
            message = f"request body too large: the limit is {limit} bytes"
        elif error.code == 500:
            message = "internal error"
        else:  # waitress' parse message, e.g. "Invalid chunk size" or 501's "Transfer-Encoding requested is
            # not supported": about the request, no internals
            message = f"{error.reason.lower()}: {str(error.body)[:200]}"
        body = json.dumps({"error": message}).encode()
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.channel.linger = True
        self.write(body)


class Channel(HTTPChannel):
    """Waitress' channel with the runner's loop hooks, phase clocks, JSON errors, lingering close and 100-continue.

    Its listener carries the runner (`server.runner`), set by GracefulServer.
    """

    task_class = ClosingTask
    error_task_class = JsonErrorTask
    pulled = 0  # times a request thread serving it woke the loop after changing its state
    seen = -1  # `pulled` when the loop last looked at its interest
    linger = False  # set by an error answered before the request was read whole
    linger_until = 0.0
    fresh = True  # nothing received yet
    receiving: int | None = None  # the thread inside received(), whose loop queues completed requests

    def __init__(self, server: BaseWSGIServer, sock: socket.socket, addr: Any, adj: Any,
                 map: dict[int, Any] | None = None) -> None:
        self.waiting_since = time.monotonic()  # since when the client's current phase runs
        super().__init__(server, sock, addr, adj, map)

    def service(self) -> None:
        _serving.channel = self  # this thread's pull_trigger marks this connection (see _marking)
        try:
            super().service()
        finally:
            _serving.channel = None

    def add_channel(self, map: dict[int, Any] | None = None) -> None:
        super().add_channel(map)
        self.server.runner.watch(self._fileno)

    def del_channel(self, map: dict[int, Any] | None = None) -> None:
        fd = self._fileno
        super().del_channel(map)
        self.server.runner.forget(fd)

    def _progress(self) -> tuple[Any, bool, int]:
        request = self.request
        return request, bool(request is not None and request.headers_finished), len(self.requests)

    def received(self, data: bytes) -> bool:
        # A phase's clock restarts when the request moves on (a new request, its head complete,
        # a request handed to a thread), not on every byte: a client sending one byte a second
        # must still meet the head timeout. A new connection's first head counts from accept.
        before, fresh = self._progress(), self.fresh
        self.fresh = False
        self.receiving = threading.get_ident()
        try:
            result = super().received(data)
        finally:
            self.receiving = None
        after = self._progress()
        if after != before and not (fresh and after[0] is not None and not after[1]):
            self.waiting_since = time.monotonic()
        return result

    def send_continue(self) -> None:
        request = self.request
        if request.completed:
            # Nothing to wait for: the parser refused the head (a declared body over the limit) or
            # there is no body. Waitress would send 100 Continue and mark the request incomplete,
            # and it was never answered.
            request.expect_continue = False
            return
        refusal = self.server.runner.refusal(self, request)
        if refusal is None:
            super().send_continue()
            return
        request.expect_continue = False
        request.refusal = refusal
        request.completed = True
        if self.receiving != threading.get_ident():  # by a request thread after a pipelined one
            self.request = None
            self.requests.append(request)
            self.server.add_task(self)

    def writable(self) -> bool:
        return not self.linger_until and super().writable()

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
                self.server.runner.watch(self._fileno)
                return
        super().handle_close()

    def readable(self) -> bool:
        return bool(self.linger_until) or super().readable()

    def handle_read(self) -> None:
        if not self.linger_until:
            super().handle_read()
            return
        try:
            data = self.socket.recv(65536)
        except OSError:
            data = b""
        if not data or time.monotonic() > self.linger_until:
            HTTPChannel.handle_close(self)
