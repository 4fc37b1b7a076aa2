"""Several server processes on one port (SERVICE_PROCESSES): a parent that binds and supervises.

One process runs its request threads' Python under one GIL, so a second core adds little to it
(docs/performance.md#cores). With SERVICE_PROCESSES=N (by default, one per usable core) the parent
binds the listening socket(s) and starts N children that share them, each with its own model slots,
queue and threads, and with SERVICE_PIN_PROCESSES each pinned to every N-th CPU of the parent's
mask. The parent works out the core-dependent defaults once and hands them to the children. The
kernel wakes every child for a new connection, and the first to accept it serves it.

How the children get the model:
- forked (an ONNX model run on one intra-op thread, as with the defaults): the parent loads
  and warms the model, then forks the children, which share its pages copy-on-write: the session's
  weights, the tokenizer and the imported code. A start takes about as long as one process', and
  each child adds only what it writes (its heap, its threads' stacks, its run buffers). Forked
  children also share their connection counts (Shares), so that a burst of connections is split
  between them. A session on more intra-op threads owns a thread pool that a fork does not copy, so then:
- started (`python -m service` children): each loads the model itself, at the same time.

The parent serves nothing: it watches. On SIGTERM or Ctrl-C its loop passes the signal on; each child
drains as a single server does, and the parent exits 0 once all have. A second signal is passed on
too, and they stop at once. A child that fails to start (its error line is on stderr) stops the
others and the parent exits with the child's code. A child that dies while serving (killed, out of
memory) is replaced, at most RESTARTS times in RESTART_WINDOW seconds; beyond that the parent stops.

Metrics: the parent gives the children a fresh PROMETHEUS_MULTIPROC_DIR, so /metrics sums every
process' counters, whichever child answers (service/metrics.py).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from typing import Any, NoReturn

from waitress.adjustments import Adjustments

from service.config import Settings, available_cpus
from service.metrics import MULTIPROCESS_DIR, share_values

logger = logging.getLogger("service")

LISTEN_FD_FLAG = "--listen-fd"  # how a child learns the parent's sockets (repeated for each)
PARENT_FLAG = "--parent"  # and the parent's pid, so it stops if the parent dies
BACKLOG = 2048
RESTARTS = 5
RESTART_WINDOW = 60.0
_POLL = 0.1  # seconds between two looks at the children
_STOPS = {signal.SIGTERM, signal.SIGINT}  # the signals that stop the service
_STOP_MARGIN = 5.0  # seconds beyond SHUTDOWN_TIMEOUT a child may take to exit before it is killed
_LINUX = sys.platform.startswith("linux")
_SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)  # Linux's value; Python names it on few builds
_BPF_LDB_ABS, _BPF_JSET_K, _BPF_RET_K = 0x30, 0x45, 0x06  # BPF_LD|BPF_B|BPF_ABS, BPF_JMP|BPF_JSET|BPF_K, BPF_RET|BPF_K
_TCP_SYN, _TCP_ACK = 0x02, 0x10


def can_fork(settings: Settings) -> bool:
    """Return whether children may be forked from a parent holding the loaded model."""
    # onnxruntime makes no threads for a session of one intra-op thread (and sequential execution);
    # a fork copies only the calling thread, so a pool's threads would be missing in the children.
    return settings.backend == "onnx" and settings.ort_threads == 1 and settings.ort_lone_threads <= 1


class Supervisor:
    """The parent of SERVICE_PROCESSES children that serve the sockets it binds."""

    def __init__(self, settings: Settings) -> None:
        """Bind the listening socket(s); raise OSError or ValueError when that is impossible."""
        self.settings = settings
        self.sockets = bind(settings.host, settings.port)
        self.children: dict[int, subprocess.Popen | Forked] = {}  # child number -> process
        self.metrics_dir = tempfile.mkdtemp(prefix="onnx-classifier-metrics-")
        # Set with the model loaded here: each child is forked and calls it with the sockets; it
        # returns the child's exit code. Unset, each child is a `python -m service` of its own.
        self.serve: Callable[[list[socket.socket], Shares], int] | None = None
        self.shares = Shares(settings.processes)
        self._signals = 0
        # written by a stop: ends the watch loop's wait between two looks (a pipe, which a signal
        # handler may write whatever the loop was doing; an Event's lock could be held by the loop)
        self._wake = os.pipe()
        for fd in self._wake:
            os.set_blocking(fd, False)
        self._restarts: deque[float] = deque()
        self._affinity = available_cpus()
        # Children must not work the core-dependent defaults out again: a pinned child sees only its
        # own part of the mask. They get the values resolved here.
        os.environ.update(resolved_environment(settings))

    def urls(self) -> list[str]:
        """Return the URLs the sockets are bound to (the bound port when SERVICE_PORT=0)."""
        urls = []
        for sock in self.sockets:
            host, port = sock.getsockname()[:2]
            urls.append(f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}")
        return urls

    def layout(self) -> str:
        """Return how the processes split the cores, for the start-up line."""
        settings = self.settings
        each = (f"{settings.batch_workers} model slot(s) of {settings.ort_threads} intra-op thread(s) and "
                f"{settings.threads} request threads each")
        if settings.pin_processes and self._cpus(0) is not None:
            shares = "; ".join(f"process {n} on CPU {_cpu_list(self._cpus(n) or set())}"
                               for n in range(settings.processes))
            return f"{len(self._affinity)} CPUs, {each}; {shares}"
        return f"{len(self._affinity)} CPUs shared by every process, {each}"

    def request_stop(self, signum: int | None = None, frame: Any = None) -> None:
        """Count a stop (signal handler); the watch loop passes it on to every child and waits for them."""
        # Passed on from the loop, not from here: a handler runs between any two lines, for example
        # after a child is started and before it is recorded, which would then never be told.
        self._signals += 1
        try:  # the watch loop passes it on now, not after its poll interval
            os.write(self._wake[1], b"\0")
        except OSError:  # the pipe is full: the loop is woken already
            pass

    def run(self) -> int:
        """Start the children and watch them until they have stopped; return the exit code."""
        try:
            for number in range(self.settings.processes):
                self._start(number)
            return self._watch()
        finally:
            self.close()

    def close(self) -> None:
        """Close the sockets and remove the metrics folder (the parent, once its children are gone)."""
        for sock in self.sockets:
            sock.close()
        for fd in self._wake:
            os.close(fd)
        shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def _start(self, number: int) -> None:
        """Start child `number` on the parent's sockets."""
        if self.serve is not None:
            self.shares.reset(number)
            # A stop signal between the fork and the child's own handlers would run the parent's
            # handler in the child, where nothing passes it on: held until the child has its own.
            held = signal.pthread_sigmask(signal.SIG_BLOCK, _STOPS)
            pid = os.fork()
            if pid == 0:
                self.shares.index = number
                self._forked_child(held)
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
            self.children[number] = Forked(pid)
            return
        env = {**os.environ, MULTIPROCESS_DIR: self.metrics_dir}
        fds = [sock.fileno() for sock in self.sockets]
        argv = [sys.executable, "-m", "service", PARENT_FLAG, str(os.getpid())]
        for fd in fds:
            argv += [LISTEN_FD_FLAG, str(fd)]
        cpus, everything = self._cpus(number), self._affinity
        if cpus:  # a started process inherits the mask of the thread that starts it
            os.sched_setaffinity(0, cpus)
        try:
            # its own process group: a Ctrl-C in the terminal reaches the parent only, which passes it on once
            self.children[number] = subprocess.Popen(argv, env=env, pass_fds=fds, stdin=subprocess.DEVNULL,
                                                      process_group=0)
        finally:
            if cpus:
                os.sched_setaffinity(0, everything)

    def _cpus(self, number: int) -> set[int] | None:
        """Return the CPUs child `number` is pinned to, or None when children are not pinned."""
        if not self.settings.pin_processes:
            return None
        return cpu_share(sorted(self._affinity), number, self.settings.processes)

    def _forked_child(self, signals: set[signal.Signals]) -> NoReturn:
        """Serve as a forked child until stopped, then exit with its code (never return to the parent's code).

        `signals` is the signal mask to restore once the parent's handlers are replaced.
        """
        code = 1
        try:
            # the parent's handler would count a stop that nothing here watches; Waitress' runner sets its own
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.pthread_sigmask(signal.SIG_SETMASK, signals)  # a stop that came meanwhile ends it now
            for fd in self._wake:  # the parent's
                os.close(fd)
            os.setpgid(0, 0)  # as a started child: a Ctrl-C in the terminal reaches the parent only
            cpus = self._cpus(self.shares.index)
            if cpus:  # before any thread starts: the threads it makes inherit the mask
                os.sched_setaffinity(0, cpus)
            share_values(self.metrics_dir)
            assert self.serve is not None
            code = self.serve(self.sockets, self.shares)
        except KeyboardInterrupt:
            code = 1
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException as exc:  # noqa: BLE001 - one line, never a traceback, and never the parent's code
            logger.error("server process failed: %s: %s", type(exc).__name__, exc)
        finally:
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def _watch(self) -> int:
        """Wait for the children; replace one that dies while serving; return the exit code."""
        stopping_since: float | None = None
        killed = False
        passed = 0  # stop signals passed on to the children
        while True:
            if self._signals > passed:
                passed = self._signals
                self._stop_all()  # a second signal too: the children stop at once
            if self._signals and stopping_since is None:
                stopping_since = time.monotonic()
            running = {n: p for n, p in self.children.items() if p.poll() is None}
            if not running:
                codes = [p.returncode for p in self.children.values()]
                if stopping_since is None:  # all gone at once, unasked: a bad setting or model
                    logger.error("every server process exited (%s); stopping",
                                 ", ".join(_describe(code) for code in codes))
                    return 2 if 2 in codes else 1
                # -SIGTERM: a child still starting when the stop came, killed before it served anything
                if self._signals == 1 and not killed and all(code in (0, -signal.SIGTERM) for code in codes):
                    return 0
                return 1
            for number, process in self.children.items():
                if number in running or stopping_since is not None:
                    continue
                code = process.returncode
                self.shares.gone(number)
                if code == 2:  # a bad setting or model: its error line is on stderr already
                    logger.error("server process %d (pid %d) could not start; stopping", number, process.pid)
                    self._stop_all()
                    self._wait_all()
                    return 2
                if not self._may_restart():
                    logger.error("server process %d (pid %d) exited with %s; it was restarted %d times in "
                                 "%.0f s, stopping", number, process.pid, _describe(code), RESTARTS,
                                 RESTART_WINDOW)
                    self._stop_all()
                    self._wait_all()
                    return 1
                logger.warning("server process %d (pid %d) exited with %s; starting another",
                               number, process.pid, _describe(code))
                _forget_process(process.pid, self.metrics_dir)
                self._start(number)
                break  # children changed: look again
            if stopping_since is not None and not killed:
                if time.monotonic() - stopping_since > self.settings.shutdown_timeout + _STOP_MARGIN:
                    for process in running.values():
                        process.kill()
                    killed = True
            if select.select([self._wake[0]], [], [], _POLL)[0]:
                while len(os.read(self._wake[0], 64)) == 64:
                    pass

    def _may_restart(self) -> bool:
        """Return whether another restart fits in the window."""
        now = time.monotonic()
        while self._restarts and now - self._restarts[0] > RESTART_WINDOW:
            self._restarts.popleft()
        if len(self._restarts) >= RESTARTS:
            return False
        self._restarts.append(now)
        return True

    def _stop_all(self) -> None:
        """Drop new connections on the shared sockets, then ask every running child to drain."""
        for sock in self.sockets:  # the children's too: a child stopped alone never touches them
            refuse_new_connections(sock)
        for process in self.children.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)

    def _wait_all(self) -> None:
        """Wait for every child to exit, killing those that outlast the drain."""
        deadline = time.monotonic() + self.settings.shutdown_timeout + _STOP_MARGIN
        for process in self.children.values():
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


class Shares:
    """Each forked child's open connections and accepts so far, in memory the children share.

    A kernel wakes every child for a new connection and the quickest takes it; a child already
    running (or that just accepted) is often quickest, so a burst of keep-alive connections (a
    client pool opening at once) would mostly land on one child and stay there, leaving the other's
    core idle. With these counts, a child that has more open connections than another leaves a new
    one to it, unless that one accepted nothing while it waited (busy or gone).
    """

    _SLOT = 2  # open connections, connections accepted since start

    def __init__(self, processes: int) -> None:
        """Make room for `processes` children (shared with those forked after this)."""
        self._memory = mmap.mmap(-1, 8 * self._SLOT * processes)  # anonymous and shared
        self._values = memoryview(self._memory).cast("q")
        self.processes = processes
        self.index = 0  # this child's number, set in the child

    def reset(self, index: int) -> None:
        """Clear a child's counts before it is (re)started."""
        self._values[index * self._SLOT] = 0
        self._values[index * self._SLOT + 1] = 0

    def gone(self, index: int) -> None:
        """Mark a dead child's slot, so the others stop leaving connections to it."""
        self._values[index * self._SLOT] = 2**62

    def publish(self, open_connections: int) -> None:
        """Record this child's open connections now."""
        self._values[self.index * self._SLOT] = open_connections

    def accepted(self) -> None:
        """Count one connection accepted by this child."""
        self._values[self.index * self._SLOT + 1] += 1

    def others_accepted(self) -> int:
        """Return the connections the other children have accepted so far."""
        return sum(self._values[i * self._SLOT + 1] for i in range(self.processes) if i != self.index)

    def fewest(self, open_connections: int) -> bool:
        """Return whether no other child has fewer open connections than this one's."""
        return all(open_connections <= self._values[i * self._SLOT]
                   for i in range(self.processes) if i != self.index)

    def surplus(self, open_connections: int) -> int:
        """Return how many more open connections this child has than the child with fewest (0 alone)."""
        others = [self._values[i * self._SLOT] for i in range(self.processes) if i != self.index]
        return open_connections - min(others) if others else 0


class Forked:
    """A child forked from this process, behind the part of subprocess.Popen's interface used here."""

    def __init__(self, pid: int) -> None:
        """Follow the child `pid`."""
        self.pid = pid
        self.returncode: int | None = None  # as Popen's: the exit code, or -N when signal N ended it

    def poll(self) -> int | None:
        """Return the exit code once the child has exited (reaping it), else None."""
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere
                self.returncode = 1
            else:
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Return the exit code, waiting at most timeout seconds (subprocess.TimeoutExpired beyond)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0.0)
            time.sleep(0.02)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, signum: int) -> None:
        """Send signum unless the child has been reaped (its pid may be another process' by now)."""
        if self.poll() is None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """Kill the child."""
        self.send_signal(signal.SIGKILL)


def cpu_share(cpus: list[int], number: int, processes: int) -> set[int] | None:
    """Return child `number`'s part of `cpus` (every processes-th CPU), or None if they are fewer than the children."""
    if not hasattr(os, "sched_setaffinity") or len(cpus) < processes or processes < 2:
        return None  # two children on one core would have to share it anyway: leave it to the kernel
    return set(cpus[number::processes])


def resolved_environment(settings: Settings) -> dict[str, str]:
    """Return the SERVICE_* variables that fix the settings whose defaults depend on the usable cores."""
    return {"SERVICE_PROCESSES": str(settings.processes), "SERVICE_THREADS": str(settings.threads),
            "SERVICE_BATCH_WORKERS": str(settings.batch_workers), "SERVICE_ORT_THREADS": str(settings.ort_threads)}


def bind(host: str, port: int) -> list[socket.socket]:
    """Return listening sockets for host:port, resolved as Waitress resolves them."""
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, address in Adjustments(host=host, port=port).listen:
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:  # every address on the port the first one was given
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
            sock.listen(BACKLOG)
            sock.set_inheritable(True)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def refuse_new_connections(sock: socket.socket) -> bool:
    """Make a listening TCP socket drop every new connection's SYN; return whether it could (Linux).

    The kernel completes a client's handshake before anyone calls accept(), so a connection that
    arrives between a server's last accept() and its close() is reset with its request unanswered.
    With this filter on, a new client's SYN goes unanswered (its connect is refused once the socket
    is closed), while the last ACK of a handshake already under way still completes it, and
    connections already queued are sockets of their own, which the filter does not reach. It covers
    the socket, so every process sharing it is covered: the parent of several processes attaches it
    when the whole service stops, a single server when it stops.
    """
    if not _LINUX:
        return False
    # A classic BPF program, attached with SO_ATTACH_FILTER; a TCP socket's filter sees the segment
    # from its TCP header, whose byte 13 holds the flags.
    program = [(_BPF_LDB_ABS, 0, 0, 13),  # A = flags
               (_BPF_JSET_K, 2, 0, _TCP_ACK),  # any ACK (a handshake's last segment): keep
               (_BPF_JSET_K, 0, 1, _TCP_SYN),  # a SYN without ACK (a new connection): drop
               (_BPF_RET_K, 0, 0, 0),  # drop: keep no byte
               (_BPF_RET_K, 0, 0, 0xFFFFFFFF)]  # keep the whole segment
    instructions = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *step) for step in program))
    fprog = struct.pack("HL", len(program), ctypes.addressof(instructions))  # struct sock_fprog
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)
    except OSError:
        return False
    return True


def inherited(fds: list[int]) -> list[socket.socket]:
    """Return the listening sockets a child was given by its parent."""
    return [socket.socket(fileno=fd) for fd in fds]


def _forget_process(pid: int, metrics_dir: str) -> None:
    """Drop a dead child's live gauges from the metrics folder (its counters still count)."""
    from prometheus_client import multiprocess

    try:
        multiprocess.mark_process_dead(pid, metrics_dir)
    except OSError:
        pass


def _cpu_list(cpus: set[int]) -> str:
    """Return CPU numbers as a short list, e.g. 0,2,4."""
    return ",".join(str(cpu) for cpu in sorted(cpus))


def _describe(code: int | None) -> str:
    """Return an exit code, or the signal that ended a process, in words."""
    if code is not None and code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"
