"""Where a request's time goes: wrk drives a server while py-spy samples every thread, bucketed by phase.

    python -m bench.profile                             # this checkout at its defaults, 1 and 8 clients
    python -m bench.profile --checkout ../old --connections 1 --env SERVICE_BATCH_WORKERS=1
    python -m bench.profile --cpus 0                    # the server on one core

For each client count: a fresh server, a warm-up, one wrk run without the profiler (latency and
throughput as they are), then one with py-spy attached (--idle, so waits count too). A sample of a
request thread lands in the bucket of its innermost known frame; a bucket's milliseconds per request
are its samples / sampling rate / requests answered under the profiler. The event loop waiting for
sockets, Waitress threads waiting for a request and background threads waiting for work are idle
time, not request time, and are left out; a request thread's own waits are counted. py-spy
slows the server it samples, so the shares are what to read, scaled to the unprofiled latency.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from bench.load import LoadError, run_wrk
from bench.servers import REPO, ServerError, ServerSpec, start, stop
from bench.workloads import WORKLOADS

RATE = 250  # samples per second per thread: enough for per-phase shares, light enough on 2 cores
# (bucket, frame markers): the first bucket with a marker in a frame wins, frames read leaf to root
BUCKETS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("model: session.run", ("onnxruntime/capi", "Classifier.run ", "ORTModel", "InferenceSession.run")),
    ("tokenize", ("tokenizers", "Classifier.encode", "Classifier.tokens", "_clip")),
    ("collate (numpy feeds)", ("Classifier.collate", "collate (")),
    ("post-process (softmax, labels)", ("Classifier.postprocess", "apply_function", "postprocess")),
    ("wait: queue / batch hand-off", ("Event.wait", "Condition.wait", "_await", "Scheduler.logits")),
    ("scheduler bookkeeping", ("service/batching.py",)),
    ("request JSON parse + validation", ("service/schemas.py", "json_ob", "get_json", "loads (json")),
    ("response JSON", ("jsonify", "dumps (json", "flask/json")),
    ("metrics", ("service/metrics.py", "prometheus_client")),
    ("Flask + Werkzeug dispatch", ("flask/", "werkzeug/")),
    ("service glue (api, auth, errors)", ("service/",)),
    ("Waitress (HTTP parse, write, threads)", ("waitress/",)),
)
WAITING_FOR_A_TASK = "ThreadedTaskDispatcher.handler_thread (waitress/task.py:71)"  # queue_cv.wait()
LOOP_WAITS = ("Selector.select (selectors.py", "poll (waitress/wasyncore.py", "poll2 (waitress/wasyncore.py")
THREAD_WAITS = ("Condition.wait (threading.py", "Event.wait (threading.py")


def bucket(stack: str) -> str | None:
    """Return the phase a sampled stack belongs to, or None for an idle thread."""
    frames = stack.split(";")
    if any(wait in frames[-1] for wait in LOOP_WAITS) or (len(frames) > 1 and frames[-2] == WAITING_FOR_A_TASK):
        return None  # the event loop waiting for sockets, a Waitress thread waiting for a request
    if frames[-1].startswith(THREAD_WAITS) and not any(f.startswith("HTTPChannel.service") for f in frames):
        return None  # a background thread (a batch worker) waiting for work: no request is waiting
    for frame in reversed(frames):
        for name, markers in BUCKETS:
            if any(marker in frame for marker in markers):
                return name
    return "other"


def py_spy() -> str:
    """Return the py-spy executable: beside this Python (make install-dev), else on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if found is None:
        raise ServerError("py-spy is not installed: make install-dev (requirements-dev.txt pins it)")
    return found


def profile(spec: ServerSpec, connections: int, duration: int, workload: str, log_dir: Path) -> dict:
    """Measure one server at one client count without, then with, py-spy; return figures and buckets."""
    server = start(spec, log_dir)
    try:
        run_wrk(server.port, WORKLOADS[workload], connections, 3)  # warm-up
        plain = run_wrk(server.port, WORKLOADS[workload], connections, duration)
        raw = log_dir / f"pyspy-{connections}.txt"
        spy = subprocess.Popen([py_spy(), "record", "--nonblocking", "--idle",
                                "-r", str(RATE), "-d", str(duration), "-f", "raw", "-o", str(raw),
                                "-p", str(server.pid)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        sampled = run_wrk(server.port, WORKLOADS[workload], connections, duration)
        _, errors = spy.communicate(timeout=duration + 60)
        if spy.returncode != 0 or not raw.exists():
            raise ServerError(f"py-spy failed (run as root, or allow ptrace): {errors.decode()[-300:]}")
    finally:
        stop(server)
    samples: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        name = bucket(stack)
        if name is not None:
            samples[name] += int(count)
    requests = max(1, sampled["requests"])
    return {"connections": connections, "p50_ms": plain["p50_us"] / 1000,
            "rps": plain["throughput_rps"], "sampled_rps": sampled["throughput_rps"],
            "ms": {name: n / RATE / requests * 1000 for name, n in samples.items()}}


def markdown(label: str, runs: list[dict]) -> str:
    """Return one table: a row per phase, a column per client count (ms of thread time per request)."""
    names = [name for name, _ in BUCKETS] + ["other"]
    head = " | ".join(f"{run['connections']} client{'s' * (run['connections'] > 1)}" for run in runs)
    lines = [f"**{label}**", "", f"| thread time per request, ms | {head} |", "|---" * (len(runs) + 1) + "|"]
    for name in names:
        if any(run["ms"].get(name, 0) >= 0.005 for run in runs):
            lines.append(f"| {name} | " + " | ".join(f"{run['ms'].get(name, 0):.2f}" for run in runs) + " |")
    lines.append("| **sum of request threads** | " + " | ".join(f"**{sum(run['ms'].values()):.2f}**" for run in runs)
                 + " |")
    lines.append("| unprofiled p50 latency, ms | " + " | ".join(f"{run['p50_ms']:.2f}" for run in runs) + " |")
    lines.append("| unprofiled throughput, req/s | " + " | ".join(f"{run['rps']:.0f}" for run in runs) + " |")
    lines.append("| throughput under py-spy, req/s | " + " | ".join(f"{run['sampled_rps']:.0f}" for run in runs)
                 + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Profile a checkout's service at each client count and print the Markdown table."""
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout", type=Path, default=REPO, help="the project folder whose service to run")
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--duration", type=int, default=10, help="seconds of each wrk run")
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="short")
    parser.add_argument("--env", nargs="*", default=[], metavar="NAME=VALUE", help="SERVICE_* settings")
    parser.add_argument("--cpus", default=None, help="run the server on these CPUs only (taskset -c, e.g. 0)")
    parser.add_argument("--label", default=None, help="the table's title (default: the checkout and settings)")
    args = parser.parse_args(argv)
    env = dict(item.split("=", 1) for item in args.env)
    pin = ("taskset", "-c", args.cpus) if args.cpus else ()  # taskset execs the server: the pid stays
    spec = ServerSpec("profiled", env=env, argv=(*pin, sys.executable, "-m", "service"), cwd=args.checkout.resolve())
    try:
        with tempfile.TemporaryDirectory(prefix="bench-profile-") as folder:
            runs = [profile(spec, c, args.duration, args.workload, Path(folder)) for c in args.connections]
    except (ServerError, LoadError, subprocess.TimeoutExpired) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    where = f" on CPUs {args.cpus}" if args.cpus else ""
    print(markdown(args.label or f"{args.checkout} {' '.join(args.env) or '(defaults)'}{where}", runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
