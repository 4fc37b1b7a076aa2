"""Drive a server with wrk on loopback: a Lua script for the bodies and a JSON summary, client CPU."""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Any

from bench.workloads import Workload

WRK_TIMEOUT = "10s"  # per request; long texts on the PyTorch service queue for over 1 s at c=32
MARKER = "BENCH_JSON "

# wrk runs one Lua state per thread; `request` cycles through the bodies and `done` prints the
# summary as one JSON line. Latencies are in microseconds; errors.status counts HTTP status > 399.
LUA = """
local bodies = {%(bodies)s}
local next_body = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

request = function()
  next_body = next_body %% #bodies + 1
  return wrk.format(nil, "%(path)s", nil, bodies[next_body])
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%(marker)s{"requests": %%d, "duration_us": %%d, "bytes": %%d, "p50_us": %%d, "p90_us": %%d, ' ..
    '"p99_us": %%d, "mean_us": %%.1f, "max_us": %%d, "errors_status": %%d, "errors_connect": %%d, ' ..
    '"errors_read": %%d, "errors_write": %%d, "errors_timeout": %%d}\\n',
    summary.requests, summary.duration, summary.bytes, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.mean, latency.max, e.status, e.connect, e.read, e.write, e.timeout))
end
"""


class LoadError(RuntimeError):
    """wrk is missing, failed or printed no summary."""


@dataclass(frozen=True)
class Protocol:
    """How one backend is asked to classify one text: the path, the JSON body, where the answer's label is."""

    path: str = "/sentiment"
    model: str | None = None  # set: Infinity's POST /classify {"input": [text], "model": model}

    def body(self, text: str) -> str:
        """Return the request body for one text."""
        if self.model is None:
            return json.dumps({"text": text})
        return json.dumps({"input": [text], "model": self.model})

    def label(self, answer: Any) -> str:
        """Return the top label of the answer to one text; raise KeyError, IndexError or TypeError if malformed."""
        if self.model is None:
            label = answer["label"]
        else:  # {"data": [[{"score", "label"}, ...]], ...}: all labels of the one input
            label = max(answer["data"][0], key=lambda entry: entry["score"])["label"]
        if not isinstance(label, str):
            raise TypeError(f"label {label!r} is not a string")
        return label


SENTIMENT = Protocol()  # this service, the reference backends and the HTTP floor


def lua_script(workload: Workload, protocol: Protocol = SENTIMENT) -> str:
    """Return the wrk Lua script that posts the workload's texts in turn, shaped for the protocol."""
    # a Lua long string [==[...]==] needs no escaping; JSON bodies never contain "]==]"
    bodies = ", ".join(f"[==[{protocol.body(text)}]==]" for text in workload.texts)
    return LUA % {"bodies": bodies, "marker": MARKER, "path": protocol.path}


def taskset(cpus: list[int]) -> list[str]:
    """Return the command prefix that pins a program to cpus."""
    return ["taskset", "-c", ",".join(str(cpu) for cpu in cpus)]


def wrk_path() -> str:
    """Return the wrk executable or raise LoadError saying how to install it."""
    path = shutil.which("wrk")
    if path is None:
        raise LoadError("wrk is not installed: apt-get update && apt-get install -y wrk (make bench does this)")
    return path


def run_wrk(port: int, workload: Workload, connections: int, duration_s: int,
            protocol: Protocol = SENTIMENT, cpus: list[int] | None = None) -> dict[str, Any]:
    """Run wrk against 127.0.0.1:port for duration_s, pinned to cpus if given; return its summary and client CPU."""
    if not isinstance(duration_s, int) or duration_s < 1:
        raise LoadError(f"wrk takes whole seconds >= 1, got {duration_s!r}")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", prefix="bench-") as script:
        script.write(lua_script(workload, protocol))
        script.flush()
        # One wrk thread: it sustains far more requests than these servers answer, and every
        # client core-second is taken from the two cores the server runs on.
        pin = taskset(cpus) if cpus else []
        command = [*pin, wrk_path(), "-t1", f"-c{connections}", f"-d{duration_s}s", f"--timeout={WRK_TIMEOUT}",
                   "--latency", "-s", script.name, f"http://127.0.0.1:{port}{protocol.path}"]
        # wrk is the only child that exits during the run, so the children's rusage delta is its CPU
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=duration_s + 30)
        except subprocess.TimeoutExpired:
            raise LoadError(f"wrk did not finish within {duration_s + 30:g} s") from None
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise LoadError(f"wrk exited with {result.returncode}: {(result.stderr or result.stdout).strip()[-500:]}")
    summary = parse_summary(result.stdout)
    client_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    seconds = summary["duration_us"] / 1e6
    errors = sum(summary[k] for k in ("errors_status", "errors_connect", "errors_read", "errors_write",
                                      "errors_timeout"))
    return {**summary, "connections": connections, "errors": errors,
            "throughput_rps": summary["requests"] / seconds if seconds else 0.0,
            "client_cpu_s": client_cpu, "client_cpu_share": client_cpu / seconds if seconds else 0.0,
            "raw": result.stdout}


def parse_summary(stdout: str) -> dict[str, Any]:
    """Return the JSON summary line that the Lua `done` hook printed."""
    for line in stdout.splitlines():
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER):])
    raise LoadError(f"wrk printed no {MARKER.strip()} line:\n{stdout[-500:]}")
