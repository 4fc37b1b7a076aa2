"""Raw-socket clients (the network tests use them), and the command that measures docs/reliability.md's figures.

    .venv/bin/python -m bench.netload --help
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import socket
import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

HALF_SENT = b"GET /health HT"  # half a request line, then nothing
GET_HEALTH = b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n"


@dataclass
class Answer:
    """One raw HTTP answer: status, headers (lower-case names) and body bytes."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """Return the body parsed as JSON."""
        return json.loads(self.body)


class Answers:
    """Read consecutive HTTP/1.1 answers from one socket, as a client of pipelined requests must."""

    def __init__(self, sock: socket.socket) -> None:
        """Read from `sock`, keeping the bytes that belong to the next answer."""
        self.sock = sock
        self.buffer = b""
        self.closed = False

    def next(self, method: str = "GET", timeout: float = 10.0, interim: bool = False) -> Answer:
        """Return the next answer (1xx skipped unless `interim`); raise TimeoutError, or EOFError on close."""
        deadline = time.monotonic() + timeout
        while True:
            answer = self._parse(method)
            if answer is not None:
                if 100 <= answer.status < 200 and not interim:
                    continue
                return answer
            if self.closed:
                raise EOFError(f"connection closed after {self.buffer[:200]!r}")
            self._fill(deadline)

    def _fill(self, deadline: float) -> None:
        """Receive more bytes before the deadline."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no whole answer in time; got {self.buffer[:200]!r}")
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        except TimeoutError as exc:
            raise TimeoutError(f"no whole answer in time; got {self.buffer[:200]!r}") from exc
        self.closed = not data
        self.buffer += data

    def _parse(self, method: str) -> Answer | None:
        """Take one whole answer off the buffer, or return None."""
        head, separator, rest = self.buffer.partition(b"\r\n\r\n")
        if not separator:
            return None
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {name.strip().lower(): value.strip()
                   for name, _, value in (line.partition(":") for line in lines)}
        status = int(status_line.split()[1])
        length = 0 if method == "HEAD" or status < 200 else int(headers.get("content-length", 0))
        if len(rest) < length:
            return None
        self.buffer = rest[length:]
        return Answer(status, headers, rest[:length])

    def nothing_more(self, wait: float = 0.3) -> bool:
        """Return whether no further byte arrives within `wait` seconds (a close counts as nothing)."""
        if self.buffer:
            return False
        try:
            self._fill(time.monotonic() + wait)
        except TimeoutError:
            return True
        return not self.buffer


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    """Open a loopback TCP connection."""
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def hold(port: int, count: int, first: bytes = HALF_SENT) -> list[socket.socket]:
    """Open `count` connections that each send `first` (b"": nothing) and then stay silent."""
    held: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = connect(port)
            held.append(sock)
            if first:
                sock.sendall(first)
    except BaseException:
        close_all(held)
        raise
    return held


def hold_idle(port: int, count: int) -> list[socket.socket]:
    """Open `count` kept-alive connections that each had one request answered and now wait."""
    held = hold(port, count, GET_HEALTH)
    for sock in held:
        answer = Answers(sock).next()
        assert answer.status == 200, answer
    return held


def close_all(sockets: Sequence[socket.socket]) -> None:
    """Close every socket."""
    for sock in sockets:
        sock.close()


def state(sock: socket.socket) -> str:
    """Return 'open' (nothing to read), 'answered' (bytes wait to be read) or 'closed' (closed, no bytes)."""
    poller = select.poll()  # not select.select: it cannot watch descriptors above 1023
    poller.register(sock, select.POLLIN)
    if not poller.poll(0):
        return "open"
    try:
        data = sock.recv(1, socket.MSG_PEEK)
    except OSError:
        return "closed"
    return "answered" if data else "closed"


def states(held: Sequence[socket.socket]) -> dict[str, int]:
    """Count the held connections by state()."""
    counts = {"open": 0, "answered": 0, "closed": 0}
    for sock in held:
        counts[state(sock)] += 1
    return counts


def answered_408(sock: socket.socket) -> bool:
    """Return whether a held connection's waiting answer is the service's JSON 408."""
    try:
        answer = Answers(sock).next(timeout=2)
    except (TimeoutError, EOFError, OSError):
        return False
    return (answer.status == 408 and answer.headers.get("content-type") == "application/json"
            and "error" in answer.json())


def timed_requests(port: int, count: int, path: str = "/health") -> tuple[list[float], list[float]]:
    """Time `count` GETs on a new connection each and `count` on one kept-alive connection (seconds)."""
    request = f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode()
    fresh, kept = [], []
    with connect(port, timeout=30) as keep:
        answers = Answers(keep)
        for _ in range(count):
            started = time.monotonic()
            with connect(port, timeout=30) as sock:
                sock.sendall(request)
                assert Answers(sock).next(timeout=30).status == 200
            fresh.append(time.monotonic() - started)
            started = time.monotonic()
            keep.sendall(request)
            assert answers.next(timeout=30).status == 200
            kept.append(time.monotonic() - started)
    return fresh, kept


def process_stats(pid: int) -> dict[str, float]:
    """Return a server's RSS (MiB), CPU time (s), threads and open descriptors, summed over its processes."""
    totals = {"rss_mib": 0.0, "cpu_s": 0.0, "threads": 0, "fds": 0}
    todo = [pid]
    while todo:
        current = todo.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            totals["fds"] += len(os.listdir(f"/proc/{current}/fd"))
            for listing in Path(f"/proc/{current}/task").glob("*/children"):
                todo += [int(child) for child in listing.read_text().split()]
        except OSError:  # the process ended meanwhile
            continue
        totals["rss_mib"] += int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024
        totals["cpu_s"] += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        totals["threads"] += int(re.search(r"Threads:\s+(\d+)", status).group(1))
    return totals


def seconds_until_answer(port: int, first: bytes, timeout: float) -> tuple[float, Answer | None]:
    """Send `first` and stall; return the seconds until the server answers or closes, and the answer."""
    with connect(port) as sock:
        started = time.monotonic()
        if first:
            sock.sendall(first)
        try:
            answer: Answer | None = Answers(sock).next(timeout=timeout)
        except EOFError:
            answer = None
        return time.monotonic() - started, answer


def percentile(values: Sequence[float], share: float) -> float:
    """Return the nearest-rank percentile of values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


def _ms(values: Sequence[float]) -> str:
    """Return p50 / p99 / max of seconds, in milliseconds."""
    return (f"p50 {statistics.median(values) * 1000:.2f} ms, p99 {percentile(values, 0.99) * 1000:.2f} ms, "
            f"max {max(values) * 1000:.1f} ms")


@contextmanager
def _server(settings: list[str]) -> Iterator[tuple[int, int]]:
    """Start `python -m service` with SERVICE_* settings; yield its port and pid."""
    from tests.reliability.kit import running_server

    overrides = dict(setting.split("=", 1) for setting in settings)
    with running_server(**overrides) as server:
        yield int(urlsplit(server.url).port), server.process.pid


def main(argv: list[str] | None = None) -> int:
    """Time a normal client beside held connections, and how long slow clients are kept."""
    parser = argparse.ArgumentParser(prog="python -m bench.netload", description=main.__doc__)
    parser.add_argument("--set", action="append", default=[], metavar="SERVICE_X=VALUE",
                        help="a setting of the server this command starts (repeatable)")
    parser.add_argument("--half", type=int, nargs="*", default=[],
                        help="numbers of half-sent connections to hold, one measurement each")
    parser.add_argument("--idle", type=int, nargs="*", default=[],
                        help="numbers of idle kept-alive connections to hold, one measurement each")
    parser.add_argument("--requests", type=int, default=200, help="timed requests per measurement")
    parser.add_argument("--wait", type=float, default=6.0,
                        help="seconds between opening the held connections and the timed requests (the "
                             "server's CPU is measured over the last 5 of them)")
    parser.add_argument("--shed", action="store_true",
                        help="time how long a stalled head, a stalled body and a silent connection are kept")
    args = parser.parse_args(argv)
    with _server(args.set) as (port, pid):
        print(f"server pid {pid} on port {port} with {' '.join(args.set) or 'the defaults'}")
        runs = [("half-sent", n) for n in args.half] + [("idle kept-alive", n) for n in args.idle]
        for kind, count in runs:
            before = process_stats(pid)
            held = hold(port, count) if kind == "half-sent" else hold_idle(port, count)
            try:
                window = min(5.0, args.wait)
                time.sleep(args.wait - window)
                quiet = process_stats(pid)
                time.sleep(window)
                after_quiet = process_stats(pid)
                fresh, kept = timed_requests(port, args.requests)
                counts = states(held)
            finally:
                close_all(held)
            print(f"{count} {kind} connections: new connection per request {_ms(fresh)}; kept-alive {_ms(kept)}")
            cpu = (after_quiet["cpu_s"] - quiet["cpu_s"]) / max(window, 0.01) * 100
            print(f"  held connections {counts}; server RSS {before['rss_mib']:.0f} -> {quiet['rss_mib']:.0f} MiB, "
                  f"threads {before['threads']:.0f} -> {quiet['threads']:.0f}, "
                  f"CPU while holding them quietly {cpu:.1f} %")
            time.sleep(3)  # let the server close them before the next measurement
        if args.shed:
            head = b"POST /sentiment HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{\"text\": "
            for what, first in (("a half-sent head", HALF_SENT), ("a stalled body", head),
                                ("a silent new connection", b"")):
                seconds, answer = seconds_until_answer(port, first, timeout=300)
                print(f"{what}: {answer.status if answer else 'closed without an answer'} after {seconds:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
