"""Start a server process (this service, the HTTP floor, Infinity), time its cold start, read its CPU and RSS."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.load import SENTIMENT, Protocol
from bench.workloads import SHORT

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 120.0  # seconds; torch + transformers import slowly on a busy machine
POLL_INTERVAL = 0.01  # seconds between cold-start probes: the resolution of the cold-start figure
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class ServerError(RuntimeError):
    """A service process did not start or answer; the message carries the tail of its log."""


@dataclass(frozen=True)
class ServerSpec:
    """One backend: its command ("{port}" is replaced), working folder, variables and request shape."""

    name: str
    env: dict[str, str] = field(default_factory=dict)  # SERVICE_* settings on top of the defaults, ...
    argv: tuple[str, ...] = (sys.executable, "-m", "service")
    cwd: Path = REPO
    protocol: Protocol = SENTIMENT


@dataclass
class Server:
    """A running `python -m service` process and its measured cold start."""

    spec: ServerSpec
    process: subprocess.Popen
    port: int
    log_path: Path
    cold_start_s: float = 0.0
    label: str = ""  # the top label of its first answer (the short review: POSITIVE)

    @property
    def pid(self) -> int:
        """Return the server's process id."""
        return self.process.pid

    def pids(self) -> list[int]:
        """Return the server's process and its descendants (the children of SERVICE_PROCESSES)."""
        found, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            for children in Path(f"/proc/{pid}/task").glob("*/children"):
                try:
                    todo += [int(child) for child in children.read_text().split()]
                except OSError:  # the thread or the process ended meanwhile
                    continue
        return found

    def cpu_seconds(self) -> float:
        """Return the user + system CPU time of the server's processes so far, from /proc/<pid>/stat."""
        total = 0.0
        for pid in self.pids():
            try:
                # the command name may hold spaces, so split after its closing parenthesis
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime (fields 14, 15)
        return total

    def memory_mb(self) -> dict[str, float]:
        """Return VmRSS (now), VmHWM (peak) and Pss (now) in MiB, each summed over the server's processes.

        For several processes the RSS sum counts the pages they share (the mapped weights, the
        libraries, what forked children share with their parent) once for each: an upper bound of
        what they take together. Pss (/proc/<pid>/smaps_rollup) charges a shared page to each of the
        processes mapping it by its share, so its sum counts such a page once.
        """
        values = {"VmRSS": 0.0, "VmHWM": 0.0, "Pss": 0.0}
        for pid in self.pids():
            try:
                lines = Path(f"/proc/{pid}/status").read_text().splitlines()
                lines += Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
            except OSError:
                continue
            for line in lines:
                key, _, rest = line.partition(":")
                if key in values:
                    values[key] += int(rest.split()[0]) / 1024  # kB -> MiB
        return {"rss_mb": values["VmRSS"], "peak_rss_mb": values["VmHWM"], "pss_mb": values["Pss"]}

    def log_tail(self, lines: int = 15) -> str:
        """Return the last lines of the server's log."""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def machine_busy_seconds() -> float:
    """Return the CPU time all processes of this machine have used, from /proc/stat's cpu line."""
    # user nice system idle iowait irq softirq steal: everything but idle and iowait is busy
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return (sum(values) - values[3] - values[4]) / _CLOCK_TICKS


def serving_libraries() -> dict[str, float]:
    """Return RSS (MiB) and import time (s) of a Python process that imported the service, no model."""
    code = ("import time\nbegan = time.perf_counter()\n"
            "import numpy, onnxruntime, tokenizers, flask, waitress, prometheus_client, service, service.api, "
            "service.classifier, service.batching\n"
            "took = time.perf_counter() - began\n"
            "rss = next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmRSS:'))\n"
            "print(rss, took)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise ServerError(f"importing the serving libraries failed: {result.stderr.strip()[-500:]}")
    rss_kb, seconds = result.stdout.split()
    return {"rss_mb": int(rss_kb) / 1024, "import_s": float(seconds)}


def free_port() -> int:
    """Return a loopback port that is free now (the server binds it a moment later)."""
    # Known before the spawn, so cold-start polling can begin at once instead of waiting for the log.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def service_env(spec: ServerSpec, port: int) -> dict[str, str]:
    """Return the server's environment: the caller's without SERVICE_*, loopback, the spec's variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVICE_")}
    # the Hub is unreachable here: fail at once instead of waiting for timeouts
    env.update({"HF_HUB_OFFLINE": "1", "SERVICE_HOST": "127.0.0.1", "SERVICE_PORT": str(port), **spec.env})
    return env


def start(spec: ServerSpec, log_dir: Path, timeout: float = START_TIMEOUT) -> Server:
    """Spawn the server and poll it with the short review until the first 200; that time is the cold start."""
    port = free_port()
    log_path = log_dir / f"{spec.name}-{port}.log"
    with log_path.open("w") as log:
        started = time.perf_counter()
        process = subprocess.Popen([arg.replace("{port}", str(port)) for arg in spec.argv], cwd=spec.cwd,
                                   env=service_env(spec, port), stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT)
    server = Server(spec, process, port, log_path)
    deadline = started + timeout
    while time.perf_counter() < deadline:
        if process.poll() is not None:
            raise ServerError(f"{spec.name} exited with {process.returncode}:\n{server.log_tail()}")
        status, body = classify_once(port, spec.protocol)
        if status == 200:
            server.cold_start_s = time.perf_counter() - started
            try:  # a 200 in another shape would make every measured request a wrong one
                server.label = spec.protocol.label(json.loads(body))
            except (ValueError, LookupError, TypeError):
                stop(server)
                raise ServerError(f"{spec.name} answered 200 with an unexpected body: {body[:200]!r}") from None
            return server
        time.sleep(POLL_INTERVAL)
    stop(server)
    raise ServerError(f"{spec.name} did not answer 200 within {timeout:.0f} s:\n{server.log_tail()}")


def classify_once(port: int, protocol: Protocol = SENTIMENT, timeout: float = 5.0) -> tuple[int | None, bytes]:
    """Return the status and body of one request for the short review, or (None, b"") when nothing listens."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", protocol.path, body=protocol.body(SHORT),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read()
    except OSError:
        return None, b""  # not listening yet (refused) or reset while starting: poll again
    finally:
        connection.close()


def stop(server: Server, timeout: float = 15.0) -> None:
    """Stop the server with SIGTERM (Waitress shuts down cleanly), SIGKILL if it hangs."""
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(timeout=5)
