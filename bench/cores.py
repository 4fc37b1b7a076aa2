"""`python -m bench.cores`: the service and the model alone, pinned to 1, 2, 4, ... and all usable cores.

For each number of cores n, taskset pins both the in-process limit (`bench.inprocess`: tokenize +
session.run, no HTTP, its best setting) and `python -m service` at its defaults to the first n usable
CPUs; the defaults follow the CPU affinity, so the service sets itself up for n cores. wrk runs on
the other CPUs when there are any, else beside the server. On all the cores the single-process
service (SERVICE_PROCESSES=1) joins as the reference for the one-client latency and the memory.
Each repetition measures every configuration once, in a rotated order, so the ratios compare
measurements taken minutes apart at most. Writes bench/results/<name>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.load import LoadError, run_wrk, taskset, wrk_path
from bench.servers import REPO, ServerError, ServerSpec, start, stop
from bench.workloads import WORKLOADS
from service.config import available_cpus

CELLS = (("short", 1), ("short", 8), ("short", 32), ("mixed", 8))
DEFAULT_MODEL = "onnx_models/minilm-l6-sentiment"
SCALING = 0.9  # n cores must serve at least this share of n times what one core serves
LIMIT_SHARE = 0.75  # short text at 32 clients on every core, against the model alone on them
TAIL = 2.5  # p99 over p50, short text at 8 clients
MEMORY = 1.4  # the whole service's PSS against the single process'


@dataclass(frozen=True)
class Configuration:
    """One server to measure: its number of cores and its settings on top of the defaults."""

    cores: int
    variant: str  # "defaults", or "one process" (SERVICE_PROCESSES=1)

    @property
    def key(self) -> str:
        """Return a short name, e.g. 2-defaults."""
        return f"{self.cores}-{self.variant.replace(' ', '-')}"

    def env(self, model_dir: str) -> dict[str, str]:
        """Return the server's SERVICE_* variables."""
        extra = {"SERVICE_PROCESSES": "1"} if self.variant == "one process" else {}
        return {"SERVICE_MODEL_DIR": model_dir, **extra}


def core_counts(cores: int) -> list[int]:
    """Return 1, 2, 4, ... below `cores`, and `cores` itself."""
    counts, n = [], 1
    while n < cores:
        counts.append(n)
        n *= 2
    return [*counts, cores]


def in_process_limit(model_dir: str, cpus: list[int], seconds: float, turn: int) -> dict[str, float]:
    """Return the model's best texts/s per workload, alone on cpus (bench.inprocess, pinned)."""
    workloads = sorted({workload for workload, _ in CELLS})
    command = [*taskset(cpus), sys.executable, "-m", "bench.inprocess", "--model-dir", str(REPO / model_dir),
               "--seconds", f"{seconds:g}", "--turn", str(turn), "--workloads", *workloads]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"bench.inprocess exited with {result.returncode}: {result.stderr[-800:]}")
    found = json.loads(result.stdout)["workloads"]
    return {workload: found[workload]["best"]["throughput"]["texts_per_s"] for workload in workloads}


def measure_server(configuration: Configuration, cpus: list[int], client_cpus: list[int], model_dir: str,
                   duration: int, log_dir: Path) -> dict[str, Any]:
    """Start the service pinned to cpus, run every cell, read its memory; return the measurements."""
    argv = (*taskset(cpus), sys.executable, "-m", "service")
    server = start(ServerSpec(configuration.key, configuration.env(model_dir), argv), log_dir)
    try:
        for workload in ("short", "mixed"):  # unrecorded: ORT's arena and the caches grow on first use
            run_wrk(server.port, WORKLOADS[workload], 8, 1, cpus=client_cpus)
        cells = {}
        for workload, connections in CELLS:
            before = server.cpu_seconds()
            run = run_wrk(server.port, WORKLOADS[workload], connections, duration, cpus=client_cpus)
            run.pop("raw")
            run["server_cpu_ms_per_request"] = (server.cpu_seconds() - before) * 1e3 / max(run["requests"], 1)
            cells[f"{workload}-c{connections}"] = run
        serving = max(1, len(server.pids()) - 1)  # a parent that supervises serves none
        return {"cold_start_s": server.cold_start_s, "processes": serving, "cells": cells,
                **server.memory_mb()}
    finally:
        stop(server)


def median(values: list[float]) -> float | None:
    """Return the median, or None without values."""
    return statistics.median(values) if values else None


def summarise(reps: list[dict[str, Any]], configurations: list[Configuration]) -> dict[str, Any]:
    """Return each configuration's medians over the repetitions and the paired ratios."""
    summary: dict[str, Any] = {}
    one = configurations[0].key  # one core, defaults
    for configuration in configurations:
        key, cores = configuration.key, configuration.cores
        rows = [rep["servers"][key] for rep in reps]
        entry: dict[str, Any] = {"cores": cores, "variant": configuration.variant,
                                 "pss_mb": median([row["pss_mb"] for row in rows]),
                                 "processes": rows[0]["processes"], "cells": {}}
        for workload, connections in CELLS:
            cell = f"{workload}-c{connections}"
            runs = [row["cells"][cell] for row in rows]
            rates = [run["throughput_rps"] for run in runs]
            stats = {"rps": median(rates), "rps_min": min(rates), "rps_max": max(rates),
                     "p50_ms": median([run["p50_us"] / 1e3 for run in runs]),
                     "p99_ms": median([run["p99_us"] / 1e3 for run in runs]),
                     "errors": sum(run["errors"] for run in runs),
                     "server_cpu_ms_per_request": median([run["server_cpu_ms_per_request"] for run in runs])}
            stats["rps_per_core"] = stats["rps"] / cores
            stats["vs_one_core"] = median([rep["servers"][key]["cells"][cell]["throughput_rps"]
                                           / rep["servers"][one]["cells"][cell]["throughput_rps"] for rep in reps])
            if connections > 1:
                stats["vs_limit"] = median([rep["servers"][key]["cells"][cell]["throughput_rps"]
                                            / rep["limit"][str(cores)][workload] for rep in reps])
            entry["cells"][cell] = stats
        summary[key] = entry
    summary["limit"] = {str(n): {workload: median([rep["limit"][str(n)][workload] for rep in reps])
                                 for workload in reps[0]["limit"][str(n)]}
                        for n in sorted({c.cores for c in configurations})}
    return summary


def targets(summary: dict[str, Any], configurations: list[Configuration]) -> list[dict[str, Any]]:
    """Return issue 31's targets for the largest number of cores: what, measured, bound, met."""
    most = max(c.cores for c in configurations)
    if most < 2:
        return []
    ours = summary[f"{most}-defaults"]
    single = summary.get(f"{most}-one-process")
    one_core = summary["1-defaults"]
    checks = []
    for cell in ("short-c8", "short-c32", "mixed-c8"):
        ratio = ours["cells"][cell]["vs_one_core"]
        checks.append({"target": f"{cell}: {most} cores / 1 core >= {SCALING * most:g}x req/s",
                       "measured": round(ratio, 2), "bound": SCALING * most, "met": ratio >= SCALING * most})
    share = ours["cells"]["short-c32"]["vs_limit"]
    checks.append({"target": f"short-c32 on {most} cores >= {LIMIT_SHARE}x the in-process limit on them",
                   "measured": round(share, 2), "bound": LIMIT_SHARE, "met": share >= LIMIT_SHARE})
    p50, p50_one_core = ours["cells"]["short-c1"]["p50_ms"], one_core["cells"]["short-c1"]["p50_ms"]
    checks.append({"target": f"one client: p50 on {most} cores <= on 1 core (ms)",
                   "measured": round(p50, 2), "bound": round(p50_one_core, 2), "met": p50 <= p50_one_core})
    if single is not None:
        p50_single = single["cells"]["short-c1"]["p50_ms"]
        checks.append({"target": f"one client: p50 on {most} cores <= the single process' (ms)",
                       "measured": round(p50, 2), "bound": round(p50_single, 2), "met": p50 <= p50_single})
        bound = MEMORY * single["pss_mb"]
        checks.append({"target": f"PSS of every process <= {MEMORY}x the single process' (MiB)",
                       "measured": round(ours["pss_mb"], 1), "bound": round(bound, 1),
                       "met": ours["pss_mb"] <= bound})
    tail = ours["cells"]["short-c8"]["p99_ms"] / ours["cells"]["short-c8"]["p50_ms"]
    checks.append({"target": f"short-c8 on {most} cores: p99 <= {TAIL}x p50", "measured": round(tail, 2),
                   "bound": TAIL, "met": tail <= TAIL})
    return checks


def markdown(result: dict[str, Any]) -> str:
    """Return the report: the table by cores, the limits and the targets."""
    meta, summary = result["meta"], result["summary"]
    lines = [f"# Cores: {meta['date']}", "",
             f"`{meta['command']}` at {meta['commit'][:12]} on {meta['machine']}, {meta['repetitions']} "
             f"repetitions of {meta['duration_s']} s cells (medians; ratios paired within a repetition). "
             f"wrk runs on CPUs {meta['client_cpus'] or 'shared with the server'} when the server has fewer "
             "CPUs than the machine, else beside it. `processes`: those that serve (a supervising parent "
             "serves none).", "",
             "| cores | server | processes | short c=1 p50 ms | short c=8 req/s (p50 / p99 ms) | short c=32 req/s "
             "| mixed c=8 req/s | req/s per core (short c=8) | vs 1 core (c=8 / c=32 / mixed) "
             "| vs the model alone (c=8 / c=32 / mixed) | CPU ms a request (c=8) | PSS MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, entry in summary.items():
        if key == "limit":
            continue
        c = entry["cells"]
        s1, s8, s32, m8 = c["short-c1"], c["short-c8"], c["short-c32"], c["mixed-c8"]
        lines.append(
            f"| {entry['cores']} | {entry['variant']} | {entry['processes']} | {s1['p50_ms']:.2f} "
            f"| {s8['rps']:.0f} ({s8['p50_ms']:.1f} / {s8['p99_ms']:.1f}) | {s32['rps']:.0f} | {m8['rps']:.0f} "
            f"| {s8['rps_per_core']:.0f} | {s8['vs_one_core']:.2f} / {s32['vs_one_core']:.2f} / "
            f"{m8['vs_one_core']:.2f} | {s8['vs_limit']:.2f} / {s32['vs_limit']:.2f} / {m8['vs_limit']:.2f} "
            f"| {s8['server_cpu_ms_per_request']:.2f} | {entry['pss_mb']:.0f} |")
    lines += ["", "The model alone (bench.inprocess, best setting, texts/s):", "",
              "| cores | short | mixed |", "|---|---|---|"]
    lines += [f"| {n} | {limit['short']:.0f} | {limit['mixed']:.0f} |" for n, limit in summary["limit"].items()]
    if result["targets"]:
        lines += ["", "| target | measured | bound | verdict |", "|---|---|---|---|"]
        lines += [f"| {t['target']} | {t['measured']} | {t['bound']} | {'met' if t['met'] else 'MISSED'} |"
                  for t in result["targets"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Measure every configuration, write the results; return the exit code."""
    parser = argparse.ArgumentParser(prog="python -m bench.cores", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=4, help="whole seconds of load per cell (default 4)")
    parser.add_argument("--repetitions", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--inprocess-seconds", type=float, default=0.2, help="window per in-process setting")
    parser.add_argument("--model-dir", default=DEFAULT_MODEL, help=f"default {DEFAULT_MODEL}")
    parser.add_argument("--output-dir", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--name", help="file name stem (default: <date>-cores)")
    args = parser.parse_args(argv)
    if args.duration < 1 or args.repetitions < 1 or args.inprocess_seconds <= 0:
        parser.error("--duration and --repetitions must be at least 1, --inprocess-seconds > 0")
    try:
        wrk_path()
    except LoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cpus = sorted(available_cpus())
    counts = core_counts(len(cpus))
    configurations = [Configuration(n, "defaults") for n in counts]
    if len(cpus) > 1:
        configurations.append(Configuration(len(cpus), "one process"))
    began, today = time.monotonic(), dt.datetime.now(dt.UTC)
    reps: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-cores-") as logs:
        try:
            for rep in range(args.repetitions):
                limit = {str(n): in_process_limit(args.model_dir, cpus[:n], args.inprocess_seconds, rep)
                         for n in counts}
                servers = {}
                order = configurations[rep % len(configurations):] + configurations[:rep % len(configurations)]
                for configuration in order:
                    mine = cpus[:configuration.cores]
                    client = [cpu for cpu in cpus if cpu not in mine] or cpus
                    servers[configuration.key] = measure_server(configuration, mine, client, args.model_dir,
                                                                args.duration, Path(logs))
                    c8 = servers[configuration.key]["cells"]["short-c8"]
                    print(f"[{rep + 1}/{args.repetitions}] {configuration.key}: short c=8 "
                          f"{c8['throughput_rps']:.0f} req/s (model alone on {configuration.cores}: "
                          f"{limit[str(configuration.cores)]['short']:.0f} texts/s)", file=sys.stderr, flush=True)
                reps.append({"rep": rep, "limit": limit, "servers": servers})
        except (ServerError, LoadError, RuntimeError, subprocess.TimeoutExpired) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    from bench.__main__ import git_commit, machine

    host = machine()
    summary = summarise(reps, configurations)
    result = {"meta": {"date": today.strftime("%Y-%m-%d"), "command": " ".join(["python -m bench.cores",
                                                                                 *(argv or sys.argv[1:])]),
                       "commit": git_commit(), "machine": f"{host['cpu']}, {host['cores']} usable cores",
                       "duration_s": args.duration, "repetitions": args.repetitions,
                       "client_cpus": ",".join(str(c) for c in cpus[1:]),
                       "wall_s": round(time.monotonic() - began, 1)},
              "configurations": [c.key for c in configurations], "reps": reps, "summary": summary}
    result["targets"] = targets(summary, configurations)
    stem = args.name or f"{result['meta']['date']}-cores"
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.output_dir / f"{stem}.md").write_text(markdown(result))
    for check in result["targets"]:
        print(f"{'met' if check['met'] else 'MISSED':>8}: {check['target']} ({check['measured']} vs {check['bound']})",
              file=sys.stderr)
    print(f"wrote {args.output_dir / stem}.md and .json in {result['meta']['wall_s']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
