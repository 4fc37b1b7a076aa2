"""`python -m bench`: this service against the PyTorch service, Optimum, Infinity, the HTTP floor and the model."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import collector, infinity, inprocess, report
from bench.load import LoadError, Protocol, run_wrk, wrk_path
from bench.servers import REPO, Server, ServerError, ServerSpec, machine_busy_seconds, serving_libraries, start, stop
from bench.sizes import footprint, venv_footprint
from bench.workloads import WORKLOADS
from service.config import usable_cores

DEFAULT_MODEL = "onnx_models/minilm-l6-sentiment"
CONNECTIONS = (1, 8, 32)  # short text
LONG_CONNECTIONS = (8,)  # long and mixed text: one concurrency each keeps `make bench` under 10 min
# This service with settings on top of its defaults: name -> (label, SERVICE_* settings); "{cores}" is
# replaced by the usable cores. The opt-in ones are the levers the defaults were chosen against.
VARIANTS: dict[str, tuple[str, dict[str, str]]] = {
    "onnx": ("this service (onnx)", {}),
    "onnx-p1": ("onnx, one server process", {"SERVICE_PROCESSES": "1"}),
    "onnx-nopin": ("onnx, processes not pinned", {"SERVICE_PIN_PROCESSES": "false"}),
    "onnx-noexpress": ("onnx, no express slot", {"SERVICE_BATCH_EXPRESS": "false"}),
    "onnx-w2": ("onnx, 2 model slots per process", {"SERVICE_BATCH_WORKERS": "2", "SERVICE_ORT_THREADS": "1"}),
    "onnx-nogather": ("onnx, no gathering", {"SERVICE_BATCH_GATHER_MS": "0"}),
    "onnx-lone": ("onnx, a session of every core for a run alone", {"SERVICE_ORT_LONE_THREADS": "{cores}"}),
    "onnx-p1-shared": ("onnx, one process, intra-op threads = every core for each slot",
                       {"SERVICE_PROCESSES": "1", "SERVICE_ORT_THREADS": "{cores}"}),
    "onnx-t256": ("onnx, at most 256 tokens a run", {"SERVICE_BATCH_MAX_TOKENS": "256"}),
    "onnx-t512": ("onnx, at most 512 tokens a run", {"SERVICE_BATCH_MAX_TOKENS": "512"}),
    "onnx-t2o1": ("onnx unbatched, THREADS=2 ORT_THREADS=1",
                  {"SERVICE_THREADS": "2", "SERVICE_ORT_THREADS": "1", "SERVICE_BATCHING": "false"}),
}
ALL_BACKENDS = ("pytorch", "optimum", "infinity", "floor", *VARIANTS, "onnx-json", "onnx-traced",
                "onnx-baseline")  # opt-in: the service of another checkout (--baseline), for before/after
DEFAULT_BACKENDS = ("pytorch", "optimum", "infinity", "floor", "onnx",
                    "onnx-json", "onnx-traced")  # the cost of observing: one cell each
FLOOR_WORKLOADS = ("short",)  # the floor answers a constant: longer bodies add little but time
OBSERVED_CELL = {"workloads": ("short",), "connections": (8,)}  # where the observability targets are set


def backend_specs(names: list[str], model_dir: str, work_dir: Path,
                  baseline: Path | None = None) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Return each backend's label, server spec, serving-set key and workloads, and those skipped with why."""
    specs: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for name in names:
        if name == "pytorch":
            from export.recipe import ensure_checkpoint  # the default model's fp32 checkpoint (cached)

            env = {"SERVICE_BACKEND": "pytorch", "SERVICE_MODEL_DIR": str(ensure_checkpoint())}
            specs[name] = {"label": "PyTorch service", "server": ServerSpec(name, env), "size_key": "pytorch"}
        elif name == "optimum":
            env = {"SERVICE_BACKEND": "optimum", "SERVICE_MODEL_DIR": model_dir}
            specs[name] = {"label": "Optimum pipeline", "server": ServerSpec(name, env), "size_key": "optimum"}
        elif name == "infinity":
            try:
                program = infinity.ensure_installed(announce=progress)
            except infinity.InstallError as exc:
                progress(f"warning: {exc}; going on without Infinity")
                skipped[name] = str(exc)
                continue
            folder = infinity.prepare_model(REPO / model_dir, work_dir)
            served = Path(model_dir).name
            server = ServerSpec(name, infinity.environment(), tuple(infinity.command(program, served, "{port}")),
                                cwd=folder, protocol=Protocol("/classify", served))
            specs[name] = {"label": f"Infinity {infinity.INFINITY.split('==')[1]}", "server": server,
                           "size_key": "infinity"}
        elif name == "floor":
            server = ServerSpec(name, {}, (sys.executable, "-m", "bench.floor"))
            specs[name] = {"label": "HTTP floor (Flask + Waitress, constant answer)", "server": server,
                           "size_key": None, "workloads": FLOOR_WORKLOADS}
        elif name == "onnx-json":
            # the cost of JSON logs: an access record per request, as JSON (the defaults write it as text)
            env = {"SERVICE_MODEL_DIR": model_dir, "SERVICE_LOG_FORMAT": "json"}
            specs[name] = {"label": "onnx, JSON logs", "size_key": "onnx", "server": ServerSpec(name, env),
                           **OBSERVED_CELL}
        elif name == "onnx-traced":
            # the cost of tracing every request, exported to a collector on loopback that takes it at once
            sink = collector.Sink()
            env = {"SERVICE_MODEL_DIR": model_dir, "SERVICE_OTLP_ENDPOINT": sink.url,
                   "OTEL_TRACES_SAMPLER": "always_on"}
            specs[name] = {"label": "onnx, traced (every request)", "size_key": "onnx",
                           "server": ServerSpec(name, env), "sink": sink, **OBSERVED_CELL}
        elif name in VARIANTS:
            label, settings = VARIANTS[name]
            env = {"SERVICE_MODEL_DIR": model_dir,
                   **{key: value.replace("{cores}", str(usable_cores())) for key, value in settings.items()}}
            specs[name] = {"label": label, "size_key": "onnx", "server": ServerSpec(name, env)}
        elif name == "onnx-baseline" and baseline is not None:
            # another checkout's service at its defaults, on this checkout's model files
            env = {"SERVICE_MODEL_DIR": str(REPO / model_dir)}
            specs[name] = {"label": f"this service at {git_commit(baseline)[:7]} (baseline)", "size_key": "onnx",
                           "server": ServerSpec(name, env, cwd=baseline)}
    return specs, skipped


def run_inprocess(model_dir: str, seconds: float, workloads: list[str], turn: int,
                  only: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """Run the in-process sweep (`only`: these settings per workload) in its own process; return its JSON."""
    command = [sys.executable, "-m", "bench.inprocess", "--model-dir", model_dir, "--seconds", f"{seconds:g}",
               "--turn", str(turn), "--workloads", *workloads]
    if only:
        command += ["--only", *(f"{workload}={key}" for workload, keys in only.items() for key in keys)]
    # a bound in case the machine stalls: a window is at least one call, and a batch of 8 long texts is slow
    limit = 120 + 60 * len(workloads)
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=limit)
    if result.returncode != 0:
        raise RuntimeError(f"bench.inprocess exited with {result.returncode}: {result.stderr[-800:]}")
    return json.loads(result.stdout)


def cells(workloads: list[str], connections: list[int], long_connections: list[int]) -> list[tuple[str, int]]:
    """Return the (workload, concurrency) cells: short text at `connections`, long and mixed at `long_connections`."""
    return [(workload, c) for workload in workloads
            for c in (connections if workload == "short" else long_connections)]


def model_identity(model_dir: str) -> dict[str, Any]:
    """Return the served model's folder, creation time and model.onnx sha256 from its manifest."""
    manifest = json.loads((REPO / model_dir / "manifest.json").read_text())
    return {"dir": model_dir, "created_at": manifest.get("created_at"),
            "model_sha256": manifest.get("files", {}).get("model.onnx")}


def load_average() -> str:
    """Return the 1, 5 and 15 minute load averages."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def machine() -> dict[str, Any]:
    """Return the CPU model, usable cores and memory of this machine."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
    return {"cpu": cpu, "cores": usable_cores(), "memory_gib": round(memory / 2**20, 1),
            "python": platform.python_version()}


def git_commit(checkout: Path = REPO) -> str:
    """Return the checkout's commit, marked dirty when the tree has changes ("unknown" outside git)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=checkout, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=checkout, capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def progress(message: str) -> None:
    """Print one progress line to stderr."""
    print(message, file=sys.stderr, flush=True)


def restarted(name: str) -> bool:
    """Return whether a backend gets a fresh process every repetition (else one for the whole run)."""
    # this service's cold start is a target and it starts quickly; the peers start slowly (torch, transformers)
    return name == "floor" or name.startswith("onnx")


def repetition(rep: int, specs: dict[str, dict[str, Any]], args: argparse.Namespace, log_dir: Path,
               raw: list[str], result: dict[str, Any], kept: dict[str, Server]) -> None:
    """Measure the in-process limit, then every server on every cell, alternating backends per cell.

    Servers that are not restarted every repetition are taken from, and left in, `kept`.
    """
    result["meta"]["load"]["per_repetition"].append(load_average())
    progress(f"[{rep + 1}/{args.repetitions}] in-process sweep (load {load_average()})")
    began = time.monotonic()
    # the first repetition sweeps every setting; the others re-measure its finalists, which bounds
    # the time and re-measures the winners in windows that did not pick them
    first = result["inprocess"][0]["result"] if result["inprocess"] else None
    limit = run_inprocess(args.model_dir, args.inprocess_seconds, args.workloads, turn=rep,
                          only=inprocess.finalists(first) if first else None)
    result["inprocess"].append({"rep": rep, "wall_s": round(time.monotonic() - began, 1), "result": limit})
    for workload, found in limit["workloads"].items():
        progress(f"[{rep + 1}/{args.repetitions}] in-process {workload:5}: "
                 f"{found['best']['throughput']['texts_per_s']:6.0f} texts/s best, "
                 f"{found['service']['throughput']['texts_per_s']:6.0f} at the service's setting; "
                 f"p50 {found['best']['latency']['p50_ms']:6.2f} ms best, "
                 f"{found['service']['latency']['p50_ms']:6.2f} ms at the service's setting")
    progress(f"[{rep + 1}/{args.repetitions}] in-process sweep took {time.monotonic() - began:.0f} s")
    names = list(specs)
    order = names[rep % len(names):] + names[:rep % len(names)]  # rotate, so no backend always goes first
    servers: dict[str, Server] = {}
    started: set[str] = set()
    try:
        for name in order:
            if name in kept:
                servers[name] = kept[name]
                continue
            servers[name] = start(specs[name]["server"], log_dir)
            started.add(name)
            if not restarted(name):
                kept[name] = servers[name]
            progress(f"[{rep + 1}/{args.repetitions}] {name}: cold start {servers[name].cold_start_s:.2f} s")
            # unrecorded: the first requests of every length grow ORT's arena and warm caches
            warmup = "mixed" if "mixed" in specs[name].get("workloads", WORKLOADS) else "short"
            run_wrk(servers[name].port, WORKLOADS[warmup], 8, args.warmup, servers[name].spec.protocol)
        for workload, connections in cells(args.workloads, args.connections, args.long_connections):
            for name in order:
                if workload not in specs[name].get("workloads", WORKLOADS) or \
                        connections not in specs[name].get("connections", (connections,)):
                    continue
                server = servers[name]
                cpu_before, busy_before = server.cpu_seconds(), machine_busy_seconds()
                run = run_wrk(server.port, WORKLOADS[workload], connections, args.duration, server.spec.protocol)
                server_cpu = server.cpu_seconds() - cpu_before
                # CPU that neither the server nor wrk used: other jobs on this shared machine
                foreign = machine_busy_seconds() - busy_before - server_cpu - run["client_cpu_s"]
                raw.append(f"### rep {rep} {name} {workload} c={connections}\n{run.pop('raw')}")
                result["runs"].append({"rep": rep, "backend": name, "workload": workload,
                                       "server_cpu_s": server_cpu,
                                       "foreign_cpu_share": max(foreign, 0.0) / args.duration, **run})
                progress(f"[{rep + 1}/{args.repetitions}] {workload:5} c={connections:<2} {name:9}: "
                         f"p50 {run['p50_us'] / 1e3:7.1f} ms  p99 {run['p99_us'] / 1e3:7.1f} ms  "
                         f"{run['throughput_rps']:6.0f} req/s  errors {run['errors']}  "
                         f"other CPU {max(foreign, 0.0) / args.duration:4.0%}")
        for name in order:
            cold = servers[name].cold_start_s if name in started else None  # a kept process started once
            result["servers"].append({"rep": rep, "backend": name, "cold_start_s": cold,
                                      "label": servers[name].label, **servers[name].memory_mb()})
    finally:
        for name, server in servers.items():
            if name not in kept:
                stop(server)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write bench/results/<date>.{json,md} and the plots; return the exit code."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--duration", type=int, default=4, help="whole seconds of load per cell (default 4)")
    parser.add_argument("--repetitions", type=int, default=3, help="repetitions of every cell (default 3)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 1 s cells, 1 repetition, short text at c=1 and 8")
    parser.add_argument("--backends", nargs="+", default=list(DEFAULT_BACKENDS), choices=ALL_BACKENDS,
                        help=f"default: {' '.join(DEFAULT_BACKENDS)} (onnx-json: JSON logs, onnx-traced: "
                             "every request traced to a local OTLP sink, both on short text at 8 clients; "
                             "opt-in: "
                             + ", ".join(f"{name}: {label}" for name, (label, _) in VARIANTS.items()
                                         if name not in DEFAULT_BACKENDS) + ")")
    parser.add_argument("--baseline", type=Path, metavar="CHECKOUT",
                        help="another checkout of this project (a git worktree of an older commit): its service "
                             "joins the run as the backend onnx-baseline, for a before/after in one run")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--connections", nargs="+", type=int, default=list(CONNECTIONS),
                        help="concurrencies of the short text (default 1 8 32)")
    parser.add_argument("--long-connections", nargs="+", type=int, default=list(LONG_CONNECTIONS),
                        help="concurrencies of the long and mixed texts (default 8)")
    parser.add_argument("--inprocess-seconds", type=float, default=0.2,
                        help="window per in-process setting and repetition (default 0.2)")
    parser.add_argument("--warmup", type=int, default=1, help="unrecorded whole seconds of load per start")
    parser.add_argument("--model-dir", default=DEFAULT_MODEL,
                        help=f"exported model folder the ONNX backends serve, relative to the repository "
                             f"(default {DEFAULT_MODEL})")
    parser.add_argument("--output-dir", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--name", help="file name stem (default: the date, with -quick in quick mode)")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.repetitions, args.connections = 1, 1, [1, 8]
        args.inprocess_seconds, args.warmup = 0.1, 1
    if (args.duration < 1 or args.warmup < 1 or args.repetitions < 1
            or min(args.connections + args.long_connections) < 1):
        parser.error("--duration, --warmup, --repetitions and the connections must be at least 1")
    if args.inprocess_seconds <= 0:
        parser.error("--inprocess-seconds must be > 0")
    if args.baseline is not None:
        args.baseline = args.baseline.resolve()
        if not (args.baseline / "service" / "__main__.py").is_file():
            parser.error(f"--baseline {args.baseline} is not a checkout of this project (no service/__main__.py)")
        if "onnx-baseline" not in args.backends:
            args.backends.append("onnx-baseline")
    elif "onnx-baseline" in args.backends:
        parser.error("the backend onnx-baseline needs --baseline CHECKOUT")
    args.command = " ".join(["python -m bench", *(sys.argv[1:] if argv is None else argv)])
    began, today = time.monotonic(), dt.datetime.now(dt.UTC)
    try:
        wrk = wrk_path()
    except LoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    wrk_version = subprocess.run([wrk, "--version"], capture_output=True, text=True, timeout=10).stdout.split()
    if not (REPO / args.model_dir / "manifest.json").is_file():
        parser.error(f"--model-dir {args.model_dir} has no manifest.json")
    work_dir = Path(tempfile.mkdtemp(prefix="bench-"))
    log_dir = work_dir / "logs"
    log_dir.mkdir()
    try:
        return measure(args, began, today, wrk_version, work_dir, log_dir)
    finally:  # a successful run removed work_dir; a failed one keeps only the logs
        for path in work_dir.iterdir() if work_dir.is_dir() else ():
            if path != log_dir:
                shutil.rmtree(path, ignore_errors=True)


def measure(args: argparse.Namespace, began: float, today: dt.datetime, wrk_version: list[str], work_dir: Path,
            log_dir: Path) -> int:
    """Run every repetition, then summarise and write the results; return the exit code."""
    specs, skipped = backend_specs(args.backends, args.model_dir, work_dir, args.baseline)
    if not specs:
        print("error: no backend left to measure", file=sys.stderr)
        return 1
    sizes = footprint()
    if "infinity" in specs:
        sizes["infinity"] = venv_footprint(infinity.VENV) or {"total_mb": 0.0, "packages": {}}
    result: dict[str, Any] = {
        "meta": {"date": today.strftime("%Y-%m-%d"), "started_at": today.isoformat(timespec="seconds"),
                 "command": args.command, "duration_s": args.duration, "repetitions": args.repetitions,
                 "connections": args.connections, "long_connections": args.long_connections,
                 "inprocess_seconds": args.inprocess_seconds,
                 "wrk": wrk_version[1] if len(wrk_version) > 1 else "?",
                 "machine": machine(), "commit": git_commit(), "model": model_identity(args.model_dir),
                 "load": {"before": load_average(), "per_repetition": []}},
        "backends": {name: {"label": spec["label"], "env": spec["server"].env,
                            "command": list(spec["server"].argv), "size_key": spec["size_key"],
                            "workloads": list(spec.get("workloads", args.workloads))}
                     for name, spec in specs.items()},
        "skipped": skipped,
        "workloads": {name: list(WORKLOADS[name].texts) for name in args.workloads},
        "sizes": sizes, "runs": [], "servers": [], "inprocess": [],
    }
    raw: list[str] = []
    kept: dict[str, Server] = {}
    try:
        for rep in range(args.repetitions):
            repetition(rep, specs, args, log_dir, raw, result, kept)
    except (ServerError, LoadError, RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"error: {exc}\n(server logs kept in {log_dir})", file=sys.stderr)
        return 1
    finally:
        for server in kept.values():
            stop(server)
    shutil.rmtree(work_dir, ignore_errors=True)
    if "onnx-traced" in specs:  # the spans arrived: the traced variant measured tracing, not its absence
        sink = specs["onnx-traced"]["sink"]
        result["meta"]["otlp_sink"] = {"exports": sink.exports, "bytes": sink.bytes}
        progress(f"the OTLP sink took {sink.exports} exports ({sink.bytes / 1e6:.1f} MB) from onnx-traced")
    result["meta"]["load"]["after"] = load_average()
    if model_identity(args.model_dir) != result["meta"]["model"]:  # an export replaced the model folder mid-run
        print("error: the model folder changed during the run; results discarded", file=sys.stderr)
        return 1
    result["meta"]["wall_s"] = round(time.monotonic() - began, 1)
    result["summary"] = report.summarise(result["runs"], result["servers"], result["inprocess"])
    result["summary"]["libraries"] = serving_libraries()
    result["summary"]["skipped"] = skipped
    result["targets"] = report.targets(result["summary"], cores=usable_cores())
    stem = args.name or result["meta"]["date"] + ("-quick" if args.quick else "")
    paths = report.write(result, args.output_dir, stem)
    (args.output_dir / f"{stem}.raw").write_text("\n".join(raw))  # wrk's own output; git-ignored
    for check in result["targets"]:
        verdict = {True: "met", False: "MISSED", None: "not measured"}[check["met"]]
        progress(f"{verdict:>12}: {check['target']} ({check['measured']} vs {check['bound']})")
    progress(f"wrote {', '.join(str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p) for p in paths)} "
             f"in {result['meta']['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
