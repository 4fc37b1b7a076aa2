"""Summarise the measurements: medians and spread, ratios, targets; write JSON, markdown and plots."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

REFERENCE = "pytorch"  # the original service, the denominator of the ratio columns
OURS = "onnx"
OPTIMUM = "optimum"
INFINITY = "infinity"
FLOOR = "floor"  # Flask + Waitress answering a constant: what the HTTP stack alone costs
JSON_LOGS = "onnx-json"  # this service with SERVICE_LOG_FORMAT=json
TRACED = "onnx-traced"  # this service tracing every request to a local OTLP/HTTP sink
PEERS = {REFERENCE: "PyTorch service", OPTIMUM: "Optimum pipeline", INFINITY: "Infinity"}
RSS_BOUND_MB = 185.0
COLD_START_BOUND_S = 1.0
BUSY_SHARE = 0.25  # cores' worth of other jobs during a cell worth naming in a miss


def spread(values: Iterable[float]) -> dict[str, float] | None:
    """Return the median, min and max of the values (None when there are none)."""
    numbers = sorted(values)
    if not numbers:
        return None
    return {"median": statistics.median(numbers), "min": numbers[0], "max": numbers[-1], "n": len(numbers)}


def summarise(runs: list[dict[str, Any]], servers: list[dict[str, Any]],
              inprocess: list[dict[str, Any]]) -> dict[str, Any]:
    """Return per-cell, per-server and in-process statistics over the repetitions, with ratios."""
    cells: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        cells.setdefault(cell_key(run["backend"], run["workload"], run["connections"]), []).append(run)
    limit = _limits(inprocess)
    summary_cells = {}
    for key, group in cells.items():
        backend, workload, connections = group[0]["backend"], group[0]["workload"], group[0]["connections"]
        answered = [r for r in group if r["requests"] > 0]  # wrk's percentiles are 0 without an answer
        entry = {
            "backend": backend, "workload": workload, "connections": connections,
            "p50_ms": spread(r["p50_us"] / 1e3 for r in answered),
            "p90_ms": spread(r["p90_us"] / 1e3 for r in answered),
            "p99_ms": spread(r["p99_us"] / 1e3 for r in answered),
            "throughput_rps": spread(r["throughput_rps"] for r in group),
            "requests": sum(r["requests"] for r in group),
            "errors": sum(r["errors"] for r in group),
            "client_cpu_share": spread(r["client_cpu_share"] for r in group),
            "foreign_cpu_share": spread(r["foreign_cpu_share"] for r in group),
            "server_cpu_ms_per_request": spread(r["server_cpu_s"] * 1e3 / max(r["requests"], 1) for r in group),
        }
        reference = cells.get(cell_key(REFERENCE, workload, connections))
        if reference and backend != REFERENCE:
            entry["throughput_vs_pytorch"] = _paired(group, reference,
                                                     lambda a, b: a["throughput_rps"] / b["throughput_rps"])
            entry["p50_vs_pytorch"] = _paired(group, reference, lambda a, b: a["p50_us"] / b["p50_us"])
        ours = cells.get(cell_key(OURS, workload, connections))
        if ours and backend.startswith(f"{OURS}-"):  # a settings variant of this service: the lever
            entry["throughput_vs_onnx"] = _paired(group, ours,
                                                  lambda a, b: a["throughput_rps"] / b["throughput_rps"])
            entry["p50_vs_onnx"] = _paired(group, ours, lambda a, b: a["p50_us"] / b["p50_us"])
        if workload in limit and backend != FLOOR:
            entry["throughput_vs_limit"] = spread(
                r["throughput_rps"] / limit[workload]["by_rep"][r["rep"]]["texts_per_s"]
                for r in group if r["rep"] in limit[workload]["by_rep"])
        summary_cells[key] = entry
    by_backend: dict[str, list[dict[str, Any]]] = {}
    for server in servers:
        by_backend.setdefault(server["backend"], []).append(server)
    summary_servers = {name: {"cold_start_s": spread(s["cold_start_s"] for s in group
                                                     if s["cold_start_s"] is not None),
                              "rss_mb": spread(s["rss_mb"] for s in group),
                              "peak_rss_mb": spread(s["peak_rss_mb"] for s in group),
                              "pss_mb": spread(s["pss_mb"] for s in group if "pss_mb" in s)}
                       for name, group in by_backend.items()}
    return {"cells": summary_cells, "servers": summary_servers,
            "limit": {name: {k: v for k, v in entry.items() if k != "by_rep"} for name, entry in limit.items()}}


def cell_key(backend: str, workload: str, connections: int) -> str:
    """Return the summary key of one backend x workload x concurrency cell."""
    return f"{backend}/{workload}/c{connections}"


def describe_setting(setting: dict[str, Any]) -> str:
    """Return an in-process setting in words, e.g. 'intra 1, spinning off, 2 threads, batch 8'."""
    threads = f"{setting['threads']} thread{'s' if setting['threads'] > 1 else ''}"
    words = (f"intra {setting['intra_op']}, spinning {'on' if setting['spinning'] else 'off'}, {threads}, "
             f"batch {setting['batch']}")
    return f"service session: {words}" if setting.get("session") == "service" else words


def _paired(group: list[dict[str, Any]], reference: list[dict[str, Any]],
            ratio: Callable[[dict[str, Any], dict[str, Any]], float]) -> dict[str, float] | None:
    """Return the spread of a ratio between runs of the same repetition (measured seconds apart)."""
    by_rep = {r["rep"]: r for r in reference if r["requests"] > 0}  # no answer in time: no ratio
    return spread(ratio(r, by_rep[r["rep"]]) for r in group if r["rep"] in by_rep and r["requests"] > 0)


def _limits(inprocess: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Return per workload the in-process limits: the sweep's best and the service's own setting."""
    limits: dict[str, dict[str, Any]] = {}
    swept: dict[str, list[list[dict[str, Any]]]] = {}  # per workload, each repetition's sweep rows
    fields = ("session", "intra_op", "spinning", "threads", "batch")
    for entry in inprocess:
        for workload, result in entry["result"]["workloads"].items():
            best, service = result["best"], result["service"]
            limit = limits.setdefault(workload, {"by_rep": {}, "rows": {}})
            limit["by_rep"][entry["rep"]] = {
                "texts_per_s": best["throughput"]["texts_per_s"], "p50_ms": best["latency"]["p50_ms"],
                "service_texts_per_s": service["throughput"]["texts_per_s"],
                "service_p50_ms": service["latency"]["p50_ms"],
                "throughput_setting": {k: best["throughput"][k] for k in fields},
                "latency_setting": {k: best["latency"][k] for k in fields},
                "service_throughput_setting": {k: service["throughput"][k] for k in fields},
                "service_latency_setting": {k: service["latency"][k] for k in fields}}
            for row in result["settings"]:
                limit["rows"].setdefault(describe_setting(row), []).append(row)
            swept.setdefault(workload, []).append([r for r in result["settings"] if r["session"] == "bench"])
    for workload, limit in limits.items():
        # the model's best with at most n texts in flight (calling threads x batch), for each n swept:
        # what a server whose clients keep n texts in flight could reach at most
        caps = sorted({in_flight(r) for rows in swept[workload] for r in rows})
        fastest = [best_in_flight(rows, caps) for rows in swept[workload]]
        limit["in_flight"] = {str(cap): spread(found[cap]["texts_per_s"] for found in fastest if cap in found)
                              for cap in caps}
        reps = [limit["by_rep"][rep] for rep in sorted(limit["by_rep"])]
        for key in ("texts_per_s", "p50_ms", "service_texts_per_s", "service_p50_ms"):
            limit[key] = spread(r[key] for r in reps)
        for key in ("throughput_setting", "latency_setting", "service_throughput_setting",
                    "service_latency_setting"):
            limit[key + "s"] = [r[key] for r in reps]
        limit["sweep"] = {name: {"texts_per_s": spread(r["texts_per_s"] for r in rows),
                                 "p50_ms": spread(r["p50_ms"] for r in rows)}
                          for name, rows in limit.pop("rows").items()}
    return limits


def in_flight(row: dict[str, Any]) -> int:
    """Return the texts an in-process setting keeps in the model at once: calling threads x batch."""
    return int(row["threads"]) * int(row["batch"])


def best_in_flight(rows: list[dict[str, Any]], caps: Iterable[int] | None = None) -> dict[int, dict[str, Any]]:
    """Return, per number n of texts in flight (by default each one in the rows), the fastest row with at
    most n; an n that no row fits is left out."""
    best: dict[int, dict[str, Any]] = {}
    for cap in sorted({in_flight(r) for r in rows} if caps is None else set(caps)):
        within = [r for r in rows if in_flight(r) <= cap]
        if within:
            best[cap] = max(within, key=lambda r: r["texts_per_s"])
    return best


def most_common(settings: list[dict[str, Any]]) -> str:
    """Return the setting chosen most often over the repetitions, with how often, in words."""
    if not settings:
        return "n/a"
    words, count = Counter(describe_setting(s) for s in settings).most_common(1)[0]
    return words if len(settings) == 1 else f"{words} ({count} of {len(settings)})"


# The targets as data: what each compares with, and by how much (read by _Targets' sections).
LATENCY_MARGIN_MS = 0.5  # short text, one client: p50 at most the model's best in-process p50 plus this
LATENCY_PEERS = (OPTIMUM, INFINITY)  # ... and below theirs
TAIL_FACTOR = 2.0  # short text, one client: p99 at most this x p50
LIMIT_SHARE = {"short": 0.85, "long": 0.9, "mixed": 0.9}  # req/s at least this x the in-process limit
LIMIT_CONNECTIONS = (8, 32)  # short text: the concurrencies always checked (not measured: said so)
PEER_FACTORS = {INFINITY: 2.0, OPTIMUM: 2.0, REFERENCE: 6.0}  # short text: req/s at least this x the peer's
OBSERVING = {JSON_LOGS: (0.97, "JSON logs"), TRACED: (0.85, "every request traced")}  # short c=8: x the defaults


def targets(summary: dict[str, Any], cores: int = 2) -> list[dict[str, Any]]:
    """Return the issue's targets as met / missed with the measured numbers (medians of the repetitions).

    A missed target carries `why`: figures of the same run that account for the miss (the model's
    own time, at its best and at the service's setting; what the HTTP floor costs; server CPU per
    request against what the bound allows on the cores; other jobs' CPU during the cell).
    """
    run = _Targets(summary, cores)
    for section in (run.latency, run.throughput, run.workloads, run.observing, run.processes):
        section()
    return run.checks


class _Targets:
    """One run's figures that the targets compare, the checks so far, and why a missed one was missed."""

    def __init__(self, summary: dict[str, Any], cores: int) -> None:
        """Read the run's summary; `cores`: what the server had (the CPU a request a bound allows)."""
        self.summary, self.cores = summary, cores
        self.cells, self.servers, self.limit = summary["cells"], summary["servers"], summary["limit"]
        self.skipped: dict[str, str] = summary.get("skipped", {})
        self.checks: list[dict[str, Any]] = []

    @staticmethod
    def median(entry: dict[str, Any] | None, key: str) -> float | None:
        """Return a cell's statistic's median, or None when the cell or the statistic is missing."""
        return entry[key]["median"] if entry and entry.get(key) else None

    def cell(self, backend: str, workload: str, connections: int) -> dict[str, Any] | None:
        """Return one cell's statistics, or None when it was not measured."""
        return self.cells.get(cell_key(backend, workload, connections))

    def limit_of(self, workload: str, key: str) -> float | None:
        """Return a median of the model alone (the in-process limit) for a workload, or None."""
        entry = self.limit.get(workload, {}).get(key)
        return entry["median"] if entry else None

    def check(self, name: str, measured: float | None, bound: float | None, relation: str, unit: str, detail: str,
              why: Iterable[str] = (), cell_of: tuple[str, int, str] | None = None,
              missing: str = "") -> None:
        """Record a target: met, missed (with `why` and this service's variants of the cell) or not measured."""
        if measured is None or bound is None:
            self.checks.append({"target": name, "met": None, "unit": unit, "detail": missing or "not measured",
                                "measured": None if measured is None else round(measured, 3),
                                "bound": None if bound is None else round(bound, 3), "why": ""})
            return
        met = {"<=": measured <= bound, "<": measured < bound, ">=": measured >= bound}[relation]
        reasons = [] if met else [*why, self.tried(*cell_of) if cell_of else ""]
        self.checks.append({"target": name, "met": met, "measured": round(measured, 3), "bound": round(bound, 3),
                            "unit": unit, "detail": detail, "why": "; ".join(filter(None, reasons))})

    def absent(self, *backends: str) -> str:
        """Say why a backend has no figure: skipped with a reason, or not chosen."""
        for backend in backends:
            if backend in self.skipped:
                return f"not measured: {self.skipped[backend]}"
        return ""

    def tried(self, workload: str, connections: int, key: str) -> str:
        """Return the settings variants of this service measured on the same cell, with their figure."""
        found = []
        for entry in self.cells.values():
            if (entry["backend"].startswith(f"{OURS}-") and entry["workload"] == workload
                    and entry["connections"] == connections and entry.get(key)):
                unit = "ms" if key.endswith("_ms") else "req/s"
                found.append(f"{entry['backend']} {_fmt(entry[key]['median'])} {unit}")
        return f"variants in this run: {', '.join(found)}" if found else ""

    def busy(self, workload: str, connections: int) -> str:
        """Name other jobs' CPU during our cell when it was large enough to matter."""
        share = self.cell(OURS, workload, connections)
        worst = share["foreign_cpu_share"]["max"] if share and share.get("foreign_cpu_share") else None
        if worst is None or worst < BUSY_SHARE:
            return ""
        return f"other jobs took up to {worst:.1f} cores during this cell"

    def added(self, ours: float | None, model: float | None) -> str:
        """Say what the service adds to the model's own in-process p50."""
        if None in (ours, model):
            return ""
        if ours - model < 0.05:  # the two run in different processes and moments: noise can invert them
            return f"the service adds nothing measurable (p50 {ours:.1f} ms, model alone {model:.1f} ms)"
        return f"the service adds {ours - model:.1f} ms to the model's best in-process p50 ({model:.1f} ms)"

    def model_at_service(self, workload: str, what: str) -> str:
        """Say what the model alone does at the service's own session setting."""
        settings = self.limit.get(workload, {}).get(f"service_{what}_settings")
        key = "service_p50_ms" if what == "latency" else "service_texts_per_s"
        value = self.limit_of(workload, key)
        if value is None or not settings:
            return ""
        words = most_common(settings).removeprefix("service session: ")
        figure = f"takes {value:.1f} ms" if what == "latency" else f"does {value:.0f} texts/s"
        return f"at the service's own session setting ({words}) the model alone {figure}"

    def floor_latency(self) -> str:
        """Say what the HTTP floor (Flask + Waitress answering a constant) takes for one client."""
        floor_p50 = self.median(self.cell(FLOOR, "short", 1), "p50_ms")
        return "" if floor_p50 is None else f"the HTTP floor answers in {floor_p50:.2f} ms (p50)"

    def floor_tail(self) -> str:
        """Say how far the HTTP floor's own p99 is from its p50."""
        floor1 = self.cell(FLOOR, "short", 1)
        p50, p99 = self.median(floor1, "p50_ms"), self.median(floor1, "p99_ms")
        return "" if None in (p50, p99) else f"the HTTP floor's p99 is {p99:.2f} ms ({p99 / p50:.1f}x its p50)"

    def cpu_why(self, workload: str, connections: int, bound_rps: float | None, of: str) -> str:
        """Explain a throughput miss by server CPU per request against what bound_rps allows on the cores."""
        cpu = self.median(self.cell(OURS, workload, connections), "server_cpu_ms_per_request")
        if cpu is None or not bound_rps:
            return ""
        text = (f"{cpu:.1f} ms of server CPU per request; {of} needs at most {1000 * self.cores / bound_rps:.1f} ms "
                f"on {self.cores} cores")
        floor_cpu = self.median(self.cell(FLOOR, "short", connections), "server_cpu_ms_per_request")
        return text if floor_cpu is None else f"{text}, of which the HTTP floor takes {floor_cpu:.2f} ms"

    def ceiling(self, workload: str, connections: int, limit_rps: float | None, factor: float) -> str:
        """Say what no server on this stack can pass at this concurrency: the model's best with at most
        `connections` texts in flight, plus the HTTP floor's CPU a request (short bodies) on the cores."""
        found = self.limit.get(workload, {}).get("in_flight", {})
        caps = [int(cap) for cap in found if int(cap) <= connections]
        if not caps or not limit_rps:
            return ""
        model = found[str(max(caps))]["median"]
        text = (f"with at most {connections} texts in flight the model alone does {model:.0f} texts/s "
                f"({model / limit_rps:.2f} x the limit)")
        floor_cpu = self.median(self.cell(FLOOR, "short", connections), "server_cpu_ms_per_request")
        if floor_cpu is None:
            return text
        top = self.cores / (self.cores / model + floor_cpu / 1000)
        text = (f"{text}; adding the HTTP floor's {floor_cpu:.2f} ms of CPU a request, a server that cost "
                f"nothing else would serve {top:.0f} req/s ({top / limit_rps:.2f} x the limit)")
        if top < factor * limit_rps:
            return f"{text}: out of reach on this stack"
        left = 1000 * (self.cores / (factor * limit_rps) - self.cores / model) - floor_cpu
        return f"{text}, which leaves {left:.2f} ms of CPU a request for the rest of the server's work"

    def peer_cpu(self, backend: str, workload: str, connections: int) -> str:
        """Say what a peer spends in server CPU a request on the cell."""
        theirs = self.median(self.cell(backend, workload, connections), "server_cpu_ms_per_request")
        return "" if theirs is None else f"{PEERS[backend]} uses {theirs:.1f} ms of server CPU per request"

    def extra_cpu(self, backend: str) -> str:
        """Say what a variant costs in server CPU per request over the defaults, short text at 8 clients."""
        theirs = self.median(self.cell(backend, "short", 8), "server_cpu_ms_per_request")
        ours = self.median(self.cell(OURS, "short", 8), "server_cpu_ms_per_request")
        return "" if None in (theirs, ours) else \
            f"{theirs:.2f} ms of server CPU per request against {ours:.2f} ms at the defaults"

    def latency(self) -> None:
        """Short text, one client: p50 against the model alone and the peers, p99 against p50."""
        ours1 = self.cell(OURS, "short", 1)
        ours_p50, ours_p99 = self.median(ours1, "p50_ms"), self.median(ours1, "p99_ms")
        best_p50 = self.limit_of("short", "p50_ms")
        latency_setting = most_common(self.limit.get("short", {}).get("latency_settings", []))
        why = [self.added(ours_p50, best_p50), self.model_at_service("short", "latency"), self.floor_latency(),
               self.busy("short", 1)]
        self.check(f"short c=1: p50 <= in-process best p50 + {LATENCY_MARGIN_MS:g} ms", ours_p50,
                   None if best_p50 is None else best_p50 + LATENCY_MARGIN_MS, "<=", "ms",
                   f"best one-call p50 {_fmt(best_p50, 2)} ms: {latency_setting}", why, ("short", 1, "p50_ms"))
        for backend in LATENCY_PEERS:
            theirs = self.median(self.cell(backend, "short", 1), "p50_ms")
            self.check(f"short c=1: p50 < {PEERS[backend]}'s", ours_p50, theirs, "<", "ms",
                       f"{PEERS[backend]} p50 {_fmt(theirs)} ms", why, ("short", 1, "p50_ms"), self.absent(backend))
        self.check(f"short c=1: p99 <= {TAIL_FACTOR:g} x p50", ours_p99,
                   None if ours_p50 is None else TAIL_FACTOR * ours_p50, "<=", "ms", f"p50 {_fmt(ours_p50)} ms",
                   [f"p90 {_fmt(self.median(ours1, 'p90_ms'))} ms", self.floor_tail(), self.busy("short", 1)],
                   ("short", 1, "p99_ms"))

    def throughput(self) -> None:
        """Short text, 8 and 32 clients (and any other measured): req/s against the limit and the peers."""
        best_rps = self.limit_of("short", "texts_per_s")
        throughput_setting = most_common(self.limit.get("short", {}).get("throughput_settings", []))
        share = LIMIT_SHARE["short"]
        # the concurrencies (not measured when left out), and any other one measured
        measured = {c["connections"] for c in self.cells.values()
                    if c["backend"] == OURS and c["workload"] == "short" and c["connections"] > 1}
        for connections in sorted(set(LIMIT_CONNECTIONS) | measured):
            ours_rps = self.median(self.cell(OURS, "short", connections), "throughput_rps")
            bound = None if best_rps is None else share * best_rps
            self.check(f"short c={connections}: req/s >= {share:g} x in-process limit", ours_rps, bound, ">=",
                       "req/s", f"limit {_fmt(best_rps, 0)} texts/s: {throughput_setting}",
                       [self.ceiling("short", connections, best_rps, share),
                        self.cpu_why("short", connections, bound, f"{share:g} x the limit"),
                        self.model_at_service("short", "throughput"), self.busy("short", connections)],
                       ("short", connections, "throughput_rps"))
            for backend, factor in PEER_FACTORS.items():
                theirs = self.median(self.cell(backend, "short", connections), "throughput_rps")
                bound = None if theirs is None else factor * theirs
                self.check(f"short c={connections}: req/s >= {factor:g} x {PEERS[backend]}", ours_rps, bound, ">=",
                           "req/s", f"{PEERS[backend]} {_fmt(theirs)} req/s",
                           [self.cpu_why("short", connections, bound, f"{factor:g} x {PEERS[backend]}"),
                            self.peer_cpu(backend, "short", connections), self.busy("short", connections)],
                           ("short", connections, "throughput_rps"), self.absent(backend))

    def workloads(self) -> None:
        """Long and mixed text, 8 clients: req/s against the workload's own in-process limit."""
        for workload in ("long", "mixed"):
            share = LIMIT_SHARE[workload]
            ours_rps = self.median(self.cell(OURS, workload, 8), "throughput_rps")
            workload_rps = self.limit_of(workload, "texts_per_s")
            bound = None if workload_rps is None else share * workload_rps
            setting = most_common(self.limit.get(workload, {}).get("throughput_settings", []))
            self.check(f"{workload} c=8: req/s >= {share:g} x in-process limit", ours_rps, bound, ">=", "req/s",
                       f"limit {_fmt(workload_rps)} texts/s: {setting}",
                       [self.ceiling(workload, 8, workload_rps, share),
                        self.cpu_why(workload, 8, bound, f"{share:g} x the limit"),
                        self.model_at_service(workload, "throughput"), self.busy(workload, 8)],
                       (workload, 8, "throughput_rps"))

    def observing(self) -> None:
        """The cost of JSON logs and of tracing, against the defaults in the same repetitions (short, c=8)."""
        defaults = _fmt(self.median(self.cell(OURS, "short", 8), "throughput_rps"))
        for backend, (factor, what) in OBSERVING.items():
            variant = self.cell(backend, "short", 8)
            self.check(f"short c=8 with {what}: req/s >= {factor:g} x the defaults",
                       self.median(variant, "throughput_vs_onnx"), factor, ">=", "x",
                       f"{_fmt(self.median(variant, 'throughput_rps'))} against {defaults} req/s",
                       [self.extra_cpu(backend), self.busy("short", 8)],
                       missing=self.absent(backend) or f"{backend} not among the backends")

    def processes(self) -> None:
        """The server's PSS (the pages forked processes share counted once, unlike a sum of RSS) and cold start."""
        ours_pss = (self.servers.get(OURS, {}).get("pss_mb") or {}).get("median")
        libraries = self.summary.get("libraries", {})
        self.check(f"server PSS <= {RSS_BOUND_MB:g} MiB", ours_pss, RSS_BOUND_MB, "<=", "MiB",
                   "after the load, summed over the server's processes",
                   [] if "rss_mb" not in libraries or ours_pss is None else
                   [f"Python with the serving libraries imported, before any model, takes "
                    f"{libraries['rss_mb']:.0f} MiB (RSS, one process)"])
        cold = self.servers.get(OURS, {}).get("cold_start_s")
        self.check(f"cold start <= {COLD_START_BOUND_S:g} s", cold["median"] if cold else None, COLD_START_BOUND_S,
                   "<=", "s", f"min-max {_fmt(cold['min'], 2)}-{_fmt(cold['max'], 2)} s" if cold else "",
                   [] if "import_s" not in libraries else
                   [f"importing the serving libraries alone takes {libraries['import_s']:.2f} s"])


def _fmt(value: float | None, digits: int = 1) -> str:
    """Return a number for a table cell, or n/a."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def _median(entry: dict[str, Any], key: str) -> float | None:
    """Return entry[key]'s median, or None when the statistic is missing."""
    return entry[key]["median"] if entry.get(key) else None


def _range(stats: dict[str, float] | None, digits: int = 1) -> str:
    """Return 'median (min-max)' for a table cell."""
    if not stats:
        return "n/a"
    if stats["n"] == 1:
        return _fmt(stats["median"], digits)
    return f"{_fmt(stats['median'], digits)} ({_fmt(stats['min'], digits)}-{_fmt(stats['max'], digits)})"


def markdown(result: dict[str, Any]) -> str:
    """Return the results as markdown tables: the run, its targets, the cells, the processes, the
    in-process limit and the installed sizes."""
    lines = [*_run_section(result), *_targets_section(result), *_cells_section(result), *_processes_section(result),
             *_limit_section(result), *_sizes_section(result)]
    return "\n".join(lines) + "\n"


def _run_section(result: dict[str, Any]) -> list[str]:
    """Return the title and how the run was made, and what it left out."""
    meta = result["meta"]
    lines = [f"# Benchmark {meta['date']}", "",
             f"`{meta['command']}`: {meta['repetitions']} repetition(s) of {meta['duration_s']:g} s per cell, "
             f"backends alternating cell by cell; model `{meta['model']['dir']}` (model.onnx sha256 "
             f"{str(meta['model']['model_sha256'])[:12]}, created {meta['model']['created_at']}); "
             f"commit {meta.get('commit')}; wrk {meta['wrk']} (1 thread) on loopback; "
             f"{meta['machine']['cores']} cores ({meta['machine']['cpu']}); load average "
             f"{meta['load']['before']} before, {meta['load']['after']} after; total {meta['wall_s']:.0f} s. "
             "Cells: median (min-max) over the repetitions. wrk CPU: the load generator's share of one "
             "core; other CPU: cores' worth used by neither server nor wrk (other jobs on this shared "
             "machine), the worst repetition. Targets compare medians of the repetitions of this run.", ""]
    for name, reason in result.get("skipped", {}).items():
        lines += [f"Not measured in this run: **{name}**: {reason}.", ""]
    return lines


def _targets_section(result: dict[str, Any]) -> list[str]:
    """Return the targets table: each target, what was measured, its bound and the verdict."""
    lines = ["## Targets", "", "| target | measured | bound | result | why, where missed (same run) |",
             "|---|---|---|---|---|"]
    for check in result["targets"]:
        verdict = {True: "met", False: "**missed**", None: "not measured"}[check["met"]]
        measured = "n/a" if check["measured"] is None else f"{check['measured']:g} {check['unit']}"
        bound = "n/a" if check["bound"] is None else f"{check['bound']:g} {check['unit']}"
        lines.append(f"| {check['target']} | {measured} | {bound} ({check['detail']}) | {verdict} "
                     f"| {check.get('why', '')} |")
    return lines


def _cells_section(result: dict[str, Any]) -> list[str]:
    """Return the latency and throughput of every cell, then the variants of this service against its defaults."""
    summary = result["summary"]
    labels = {name: spec["label"] for name, spec in result["backends"].items()}
    lines = ["", "## Latency and throughput", "",
             "| workload | c | backend | p50 ms | p90 ms | p99 ms | req/s | req/s ÷ PyTorch | p50 ÷ PyTorch "
             "| req/s ÷ limit | errors | wrk CPU | server CPU ms/req | other CPU (max) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    ordered = sorted(summary["cells"].values(), key=lambda c: (
        list(result["workloads"]).index(c["workload"]), c["connections"], list(labels).index(c["backend"])))
    for c in ordered:
        lines.append(" | ".join([
            f"| {c['workload']}", str(c["connections"]), labels[c["backend"]], _range(c["p50_ms"]),
            _range(c["p90_ms"]), _range(c["p99_ms"]), _range(c["throughput_rps"], 0),
            _range(c.get("throughput_vs_pytorch"), 2), _range(c.get("p50_vs_pytorch"), 2),
            _range(c.get("throughput_vs_limit"), 2), f"{c['errors']} / {c['requests']}",
            f"{100 * c['client_cpu_share']['median']:.0f} %",
            _fmt(c["server_cpu_ms_per_request"]["median"], 2),
            f"{100 * c['foreign_cpu_share']['max']:.0f} %" if c["foreign_cpu_share"] else "n/a"]) + " |")
    variants = [c for c in ordered if "throughput_vs_onnx" in c]
    if variants:
        lines += ["", "## Lever: settings variants of this service against its defaults (same run)", "",
                  "| workload | c | variant | req/s ÷ defaults | p50 ÷ defaults | p99 ms: variant / defaults |",
                  "|---|---|---|---|---|---|"]
        for c in variants:
            ours = summary["cells"][cell_key(OURS, c["workload"], c["connections"])]
            lines.append(f"| {c['workload']} | {c['connections']} | {labels[c['backend']]} | "
                         f"{_range(c['throughput_vs_onnx'], 2)} | {_range(c['p50_vs_onnx'], 2)} | "
                         f"{_fmt(_median(c, 'p99_ms'))} / {_fmt(_median(ours, 'p99_ms'))} |")
    return lines


def _processes_section(result: dict[str, Any]) -> list[str]:
    """Return each server's start-up time, memory and installed size."""
    summary = result["summary"]
    lines = ["", "## Processes", "",
             "RSS and PSS are summed over a server's processes: the RSS sum counts a page that several of "
             "them share once for each, the PSS sum once in all.", "",
             "| backend | cold start s | RSS after load MiB | peak RSS MiB | PSS after load MiB | RSS ÷ PyTorch "
             "| installed MiB |",
             "|---|---|---|---|---|---|---|"]
    reference_rss = summary["servers"].get(REFERENCE, {}).get("rss_mb", {}).get("median")
    for name, spec in result["backends"].items():
        server = summary["servers"].get(name)
        if not server:
            continue
        size = result["sizes"].get(spec.get("size_key") or "", {}).get("total_mb")
        ratio = _fmt(server["rss_mb"]["median"] / reference_rss, 2) if reference_rss else "n/a"
        lines.append(f"| {spec['label']} | {_range(server['cold_start_s'], 2)} | {_range(server['rss_mb'], 0)} | "
                     f"{_range(server['peak_rss_mb'], 0)} | {_range(server.get('pss_mb'), 0)} | {ratio} | "
                     f"{_fmt(size, 0)} |")
    return lines


def _limit_section(result: dict[str, Any]) -> list[str]:
    """Return the in-process limit: the best of the sweep and the service's session, by texts in flight,
    then every setting of the sweep."""
    limits = result["summary"]["limit"]
    lines = ["", "## In-process limit (tokenize + session.run, no HTTP)", "",
             "Best of the sweep (intra-op threads x spinning x calling threads x batch, each setting its own "
             "session) and the session the service itself builds, at its default setting. Setting: the one "
             "chosen most often over the repetitions.", "",
             "| workload | session | texts/s (throughput limit) | its setting | one-call p50 ms (latency limit) "
             "| its setting |", "|---|---|---|---|---|---|"]
    for workload, limit in limits.items():
        lines.append(f"| {workload} | best of the sweep | {_range(limit['texts_per_s'], 0)} "
                     f"| {most_common(limit['throughput_settings'])} | {_range(limit['p50_ms'], 2)} "
                     f"| {most_common(limit['latency_settings'])} |")
        lines.append(f"| {workload} | the service's, at its defaults | {_range(limit['service_texts_per_s'], 0)} "
                     f"| {most_common(limit['service_throughput_settings']).removeprefix('service session: ')} "
                     f"| {_range(limit['service_p50_ms'], 2)} "
                     f"| {most_common(limit['service_latency_settings']).removeprefix('service session: ')} |")
    caps = sorted({int(cap) for limit in limits.values() for cap in limit.get("in_flight", {})})
    if caps:
        lines += ["", "### The model's best with at most n texts in flight (texts/s)", "",
                  "n = calling threads x batch. A server whose clients keep n texts in flight cannot give "
                  "the model more: 8 clients at most 8.", "",
                  "| workload | " + " | ".join(f"n <= {cap}" for cap in caps) + " |", "|---|" + "---|" * len(caps)]
        for workload, limit in limits.items():
            found = limit.get("in_flight", {})
            lines.append(f"| {workload} | " + " | ".join(_range(found.get(str(cap)), 0) for cap in caps) + " |")
    return lines + (_sweep_table(limits) if limits else [])


def _sweep_table(limits: dict[str, Any]) -> list[str]:
    """Return every in-process setting's texts/s and p50 per workload."""
    workloads = list(limits)
    lines = ["", "### Every in-process setting (median over the repetitions: texts/s, p50 ms per call)", "",
             "The first repetition measures every setting; the others re-measure its finalists (the two "
             "fastest, the two lowest one-call p50s and the fastest at each n texts in flight of each "
             "workload) and the service's rows. "
             "A figure marked * comes from the first repetition alone.", "",
             "| setting | " + " | ".join(f"{w} texts/s | {w} p50 ms" for w in workloads) + " |",
             "|---|" + "---|---|" * len(workloads)]
    for setting in limits[workloads[0]]["sweep"]:
        figures = []
        for workload in workloads:
            row = limits[workload]["sweep"].get(setting, {})
            rate, p50 = row.get("texts_per_s") or {}, row.get("p50_ms") or {}
            repetitions = (limits[workload]["texts_per_s"] or {}).get("n", 1)
            once = "*" if repetitions > 1 and rate.get("n") == 1 else ""
            figures += [_fmt(rate.get("median"), 0) + once, _fmt(p50.get("median"), 2) + once]
        lines.append(f"| {setting} | " + " | ".join(figures) + " |")
    return lines


def _sizes_section(result: dict[str, Any]) -> list[str]:
    """Return the installed size of each serving set and its largest distributions."""
    lines = ["", "## Installed size of the serving dependencies (MiB on disk)", "",
             "| serving set | total | largest |", "|---|---|---|"]
    for name, size in result["sizes"].items():
        top = ", ".join(f"{pkg} {mb:g}" for pkg, mb in list(size["packages"].items())[:4])
        lines.append(f"| {name} ({len(size['packages'])} distributions) | {size['total_mb']:g} | {top} |")
    return lines


def plot(result: dict[str, Any], folder: Path, stem: str) -> list[Path]:
    """Write latency-vs-concurrency and throughput PNGs; return their paths."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")  # no display on these machines
    import matplotlib.pyplot as plt

    cells = result["summary"]["cells"].values()
    labels = {name: spec["label"] for name, spec in result["backends"].items()}
    workloads = list(result["workloads"])
    figure, axes = plt.subplots(1, len(workloads), figsize=(5 * len(workloads), 4), squeeze=False)
    for axis, workload in zip(axes[0], workloads, strict=True):
        for backend, label in labels.items():
            points = sorted((c["connections"], c["p50_ms"]["median"], c["p99_ms"]["median"]) for c in cells
                            if c["backend"] == backend and c["workload"] == workload and c["p50_ms"])
            if not points:
                continue
            line, = axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{label} p50")
            axis.plot([p[0] for p in points], [p[2] for p in points], linestyle="--", marker="x",
                      color=line.get_color(), alpha=0.6)
        axis.set(title=f"{workload} text (dashed, x: p99)", xlabel="concurrent connections", ylabel="latency, ms",
                 xscale="log", yscale="log")
        connections = sorted({c["connections"] for c in cells if c["workload"] == workload})
        axis.set_xticks(connections, [str(c) for c in connections])
        axis.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())  # no 2x10^0-style labels
        axis.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    latency_path = folder / f"{stem}-latency.png"
    figure.savefig(latency_path, dpi=110)
    plt.close(figure)

    groups = sorted({(c["workload"], c["connections"]) for c in cells},
                    key=lambda g: (workloads.index(g[0]), g[1]))
    figure, axis = plt.subplots(figsize=(max(8, 1.4 * len(groups)), 4.5))
    width = 0.8 / max(len(labels), 1)
    for index, (backend, label) in enumerate(labels.items()):
        values = [result["summary"]["cells"].get(cell_key(backend, w, c), {}).get("throughput_rps", {}).get(
            "median", 0.0) for w, c in groups]
        axis.bar([g + index * width for g in range(len(groups))], values, width, label=label)
    for position, (workload, _) in enumerate(groups):
        limit = result["summary"]["limit"].get(workload)
        if limit:
            axis.hlines(limit["texts_per_s"]["median"], position - width / 2, position + 0.8 - width / 2,
                        colors="black", linestyles=":")
    axis.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], [f"{w}\nc={c}" for w, c in groups])
    axis.set(ylabel="requests per second (median)", yscale="log",
             title="Throughput (dotted: in-process limit, texts/s)")
    axis.legend(fontsize=7)
    axis.grid(True, axis="y", which="both", alpha=0.3)
    figure.tight_layout()
    throughput_path = folder / f"{stem}-throughput.png"
    figure.savefig(throughput_path, dpi=110)
    plt.close(figure)
    return [latency_path, throughput_path]


def write(result: dict[str, Any], folder: Path, stem: str) -> list[Path]:
    """Write <stem>.json, <stem>.md and the PNG plots into folder; return the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = folder / f"{stem}.json", folder / f"{stem}.md"
    images = plot(result, folder, stem)
    text = markdown(result) + "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in images) + "\n"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    md_path.write_text(text)
    return [json_path, md_path, *images]
