"""Summarise the measurements: medians and spread, ratios, targets; write JSON, markdown and plots."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

REFERENCE = "pytorch"  # backend 1: the original service, the denominator of the ratios
OURS = "onnx"
PEER = "optimum"


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
        entry = {
            "backend": backend, "workload": workload, "connections": connections,
            "p50_ms": spread(r["p50_us"] / 1e3 for r in group),
            "p90_ms": spread(r["p90_us"] / 1e3 for r in group),
            "p99_ms": spread(r["p99_us"] / 1e3 for r in group),
            "throughput_rps": spread(r["throughput_rps"] for r in group),
            "requests": sum(r["requests"] for r in group),
            "errors": sum(r["errors"] for r in group),
            "client_cpu_share": spread(r["client_cpu_share"] for r in group),
            # None for results written before this column existed
            "foreign_cpu_share": (spread(r["foreign_cpu_share"] for r in group)
                                  if all("foreign_cpu_share" in r for r in group) else None),
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
        if workload in limit:
            entry["throughput_vs_limit"] = spread(
                r["throughput_rps"] / limit[workload]["by_rep"][r["rep"]]["texts_per_s"]
                for r in group if r["rep"] in limit[workload]["by_rep"])
        summary_cells[key] = entry
    by_backend: dict[str, list[dict[str, Any]]] = {}
    for server in servers:
        by_backend.setdefault(server["backend"], []).append(server)
    summary_servers = {name: {"cold_start_s": spread(s["cold_start_s"] for s in group),
                              "rss_mb": spread(s["rss_mb"] for s in group),
                              "peak_rss_mb": spread(s["peak_rss_mb"] for s in group)}
                       for name, group in by_backend.items()}
    return {"cells": summary_cells, "servers": summary_servers,
            "limit": {name: {k: v for k, v in entry.items() if k != "by_rep"} for name, entry in limit.items()}}


def cell_key(backend: str, workload: str, connections: int) -> str:
    """Return the summary key of one backend x workload x concurrency cell."""
    return f"{backend}/{workload}/c{connections}"


def _paired(group: list[dict[str, Any]], reference: list[dict[str, Any]],
            ratio: Callable[[dict[str, Any], dict[str, Any]], float]) -> dict[str, float] | None:
    """Return the spread of a ratio between runs of the same repetition (measured seconds apart)."""
    by_rep = {r["rep"]: r for r in reference if r["requests"] > 0}  # no answer in time: no ratio
    return spread(ratio(r, by_rep[r["rep"]]) for r in group if r["rep"] in by_rep and r["requests"] > 0)


def _limits(inprocess: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Return per workload the in-process limit: best throughput and best single-request p50."""
    limits: dict[str, dict[str, Any]] = {}
    for entry in inprocess:
        for workload, result in entry["result"].items():
            limits.setdefault(workload, {"by_rep": {}})["by_rep"][entry["rep"]] = {
                "texts_per_s": result["best_throughput"]["texts_per_s"],
                "p50_ms": result["best_latency"]["p50_ms"],
                "setting": {k: result["best_throughput"][k] for k in ("intra_op", "threads", "batch")}}
    for entry in limits.values():
        reps = list(entry["by_rep"].values())
        entry["texts_per_s"] = spread(r["texts_per_s"] for r in reps)
        entry["p50_ms"] = spread(r["p50_ms"] for r in reps)
        entry["best_settings"] = [r["setting"] for r in reps]
    return limits


def targets(summary: dict[str, Any], cores: int = 2) -> list[dict[str, Any]]:
    """Return the issue's targets as met / missed with the measured numbers (medians).

    A missed target carries `why`: the figures of the same run that account for the miss (how much
    of the time the model itself takes, or the server CPU per request against what the bound needs).
    """
    cells, servers, limit = summary["cells"], summary["servers"], summary["limit"]

    def median(entry: dict[str, Any] | None, key: str) -> float | None:
        return entry[key]["median"] if entry and entry.get(key) else None

    def cell(backend: str, workload: str, connections: int) -> dict[str, Any] | None:
        return cells.get(cell_key(backend, workload, connections))

    checks: list[dict[str, Any]] = []

    def check(name: str, measured: float | None, bound: float | None, at_most: bool, unit: str,
              detail: str, why: str = "", cell_of: tuple[str, int, str] | None = None) -> None:
        if measured is None or bound is None:
            checks.append({"target": name, "met": None, "measured": None, "bound": None, "detail": "not measured"})
            return
        met = measured <= bound if at_most else measured >= bound
        if not met and cell_of:
            why = "; ".join(filter(None, (why, tried(*cell_of))))
        checks.append({"target": name, "met": met, "measured": round(measured, 3), "bound": round(bound, 3),
                       "unit": unit, "detail": detail, "why": "" if met else why})

    def tried(workload: str, connections: int, key: str) -> str:
        """Return the settings variants of this service measured on the same cell, with their figure."""
        found = []
        for entry in cells.values():
            if (entry["backend"].startswith(f"{OURS}-") and entry["workload"] == workload
                    and entry["connections"] == connections and entry.get(key)):
                unit = "ms" if key == "p50_ms" else "req/s"
                found.append(f"{entry['backend']} {_fmt(entry[key]['median'])} {unit}")
        return f"variants in this run: {', '.join(found)}" if found else ""

    def added(ours: float | None, model: float | None) -> str:
        """Say what the service adds to the model's own in-process p50."""
        if None in (ours, model):
            return ""
        if ours - model < 0.05:  # the two run in different processes and moments: noise can invert them
            return f"the service adds nothing measurable (p50 {ours:.1f} ms, in-process {model:.1f} ms)"
        return f"the service adds {ours - model:.1f} ms (HTTP, JSON, hand-off to the batch worker)"

    def latency_why(ours: float | None, model: float | None, reference: float | None, factor: float) -> str:
        """Explain a p50 against factor x PyTorch's: the model alone, and what the service adds."""
        if None in (ours, model, reference):
            return ""
        floor = model / reference
        head = (f"the model alone (in-process p50 {model:.1f} ms) is already {floor:.2f}x PyTorch's p50"
                if floor > factor else f"the model alone would be {floor:.2f}x PyTorch's p50")
        return f"{head}; {added(ours, model)}"

    def cpu_why(ours_cell: dict[str, Any] | None, bound_rps: float | None, of: str) -> str:
        """Explain a throughput miss by server CPU per request against what bound_rps allows on the cores."""
        cpu = median(ours_cell, "server_cpu_ms_per_request")
        if cpu is None or not bound_rps:
            return ""
        return (f"{cpu:.1f} ms of server CPU per request; {of} needs at most {1000 * cores / bound_rps:.1f} ms "
                f"on {cores} cores")

    ours_short1, ref_short1 = cell(OURS, "short", 1), cell(REFERENCE, "short", 1)
    ours_p50, ref_p50 = median(ours_short1, "p50_ms"), median(ref_short1, "p50_ms")
    limit_p50 = limit["short"]["p50_ms"]["median"] if "short" in limit else None
    check("c=1 short: p50 <= in-process limit + 0.5 ms", ours_p50,
          None if limit_p50 is None else limit_p50 + 0.5, True, "ms", f"limit p50 {_fmt(limit_p50)} ms",
          added(ours_p50, limit_p50), ("short", 1, "p50_ms"))
    check("c=1 short: p50 <= 0.15 x PyTorch service", ours_p50, None if ref_p50 is None else 0.15 * ref_p50,
          True, "ms", f"PyTorch p50 {_fmt(ref_p50)} ms", latency_why(ours_p50, limit_p50, ref_p50, 0.15),
          ("short", 1, "p50_ms"))
    ours8 = cell(OURS, "short", 8)
    ours_rps = median(ours8, "throughput_rps")
    limit_rps = limit["short"]["texts_per_s"]["median"] if "short" in limit else None
    bound = None if limit_rps is None else 0.85 * limit_rps
    check("c=8 short: throughput >= 0.85 x in-process limit", ours_rps, bound, False, "req/s",
          f"limit {_fmt(limit_rps)} texts/s",
          cpu_why(ours8, bound, "0.85 x the limit"),
          ("short", 8, "throughput_rps"))
    for backend, factor, label in ((REFERENCE, 6.0, "PyTorch service"), (PEER, 1.5, "Optimum pipeline")):
        other = cell(backend, "short", 8)
        other_rps = median(other, "throughput_rps")
        bound = None if other_rps is None else factor * other_rps
        check(f"c=8 short: throughput >= {factor:g} x {label}", ours_rps, bound, False, "req/s",
              f"{label} {_fmt(other_rps)} req/s",
              cpu_why(ours8, bound, f"{factor:g} x {label}"),
              ("short", 8, "throughput_rps"))
    ours_long, ref_long = cell(OURS, "long", 1), cell(REFERENCE, "long", 1)
    ours_long_p50, ref_long_p50 = median(ours_long, "p50_ms"), median(ref_long, "p50_ms")
    limit_long = limit["long"]["p50_ms"]["median"] if "long" in limit else None
    check("c=1 long: p50 <= 0.35 x PyTorch service", ours_long_p50,
          None if ref_long_p50 is None else 0.35 * ref_long_p50, True, "ms",
          f"PyTorch p50 {_fmt(ref_long_p50)} ms", latency_why(ours_long_p50, limit_long, ref_long_p50, 0.35),
          ("long", 1, "p50_ms"))
    ours_rss = servers.get(OURS, {}).get("rss_mb", {}).get("median")
    ref_rss = servers.get(REFERENCE, {}).get("rss_mb", {}).get("median")
    libraries = summary.get("libraries_rss_mb")
    check("server RSS <= 0.3 x PyTorch's", ours_rss, None if ref_rss is None else 0.3 * ref_rss, True, "MiB",
          f"PyTorch {_fmt(ref_rss)} MiB", "" if libraries is None or ours_rss is None else
          f"Python with the serving libraries imported, before any model, takes {libraries:.0f} MiB; the "
          f"model session and its buffers the other {ours_rss - libraries:.0f}")
    cold = servers.get(OURS, {}).get("cold_start_s")
    check("cold start <= 1 s", cold["median"] if cold else None, 1.0, True, "s",
          f"min-max {_fmt(cold['min'], 2)}-{_fmt(cold['max'], 2)} s" if cold else "")
    return checks


def _fmt(value: float | None, digits: int = 1) -> str:
    """Return a number for a table cell, or n/a."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def _range(stats: dict[str, float] | None, digits: int = 1) -> str:
    """Return 'median (min-max)' for a table cell."""
    if not stats:
        return "n/a"
    if stats["n"] == 1:
        return _fmt(stats["median"], digits)
    return f"{_fmt(stats['median'], digits)} ({_fmt(stats['min'], digits)}-{_fmt(stats['max'], digits)})"


def markdown(result: dict[str, Any]) -> str:
    """Return the results as markdown tables."""
    meta, summary = result["meta"], result["summary"]
    labels = {name: spec["label"] for name, spec in result["backends"].items()}
    lines = [f"# Benchmark {meta['date']}", "",
             f"`{meta['command']}`: {meta['repetitions']} repetition(s) of {meta['duration_s']:g} s per cell, "
             f"backends alternating cell by cell; model `{meta['model']['dir']}` (model.onnx sha256 "
             f"{str(meta['model']['model_sha256'])[:12]}, created {meta['model']['created_at']}); "
             f"wrk {meta['wrk']} (1 thread) on loopback; "
             f"{meta['machine']['cores']} cores ({meta['machine']['cpu']}); load average "
             f"{meta['load']['before']} before, {meta['load']['after']} after; total {meta['wall_s']:.0f} s. "
             "Cells: median (min-max) over the repetitions. wrk CPU: the load generator's share of one "
             "core; other CPU: cores' worth used by neither server nor wrk (other jobs on this shared "
             "machine), the worst repetition.", "",
             "## Targets", "", "| target | measured | bound | result | why, where missed (same run) |",
             "|---|---|---|---|---|"]
    for check in result["targets"]:
        verdict = {True: "met", False: "**missed**", None: "not measured"}[check["met"]]
        measured = "n/a" if check["measured"] is None else f"{check['measured']:g} {check['unit']}"
        bound = "n/a" if check["bound"] is None else f"{check['bound']:g} {check['unit']} ({check['detail']})"
        lines.append(f"| {check['target']} | {measured} | {bound} | {verdict} | {check.get('why', '')} |")
    lines += ["", "## Latency and throughput", "",
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
                         f"{_fmt(c['p99_ms']['median'])} / {_fmt(ours['p99_ms']['median'])} |")
    lines += ["", "## Processes", "",
              "| backend | cold start s | RSS after load MiB | peak RSS MiB | RSS ÷ PyTorch | installed MiB |",
              "|---|---|---|---|---|---|"]
    reference_rss = summary["servers"].get(REFERENCE, {}).get("rss_mb", {}).get("median")
    for name, label in labels.items():
        server = summary["servers"].get(name)
        if not server:
            continue
        size = result["sizes"].get(result["backends"][name]["size_key"], {}).get("total_mb")
        ratio = _fmt(server["rss_mb"]["median"] / reference_rss, 2) if reference_rss else "n/a"
        lines.append(f"| {label} | {_range(server['cold_start_s'], 2)} | {_range(server['rss_mb'], 0)} | "
                     f"{_range(server['peak_rss_mb'], 0)} | {ratio} | {_fmt(size, 0)} |")
    lines += ["", "## In-process limit (tokenize + session.run, no HTTP)", "",
              "| workload | best texts/s | best setting per repetition | p50 ms, one text, 1 thread |",
              "|---|---|---|---|"]
    for workload, limit in summary["limit"].items():
        settings = ", ".join(f"intra {s['intra_op']} x {s['threads']} thr x batch {s['batch']}"
                             for s in limit["best_settings"])
        lines.append(f"| {workload} | {_range(limit['texts_per_s'], 0)} | {settings} "
                     f"| {_range(limit['p50_ms'], 2)} |")
    lines += ["", "## Installed size of the serving dependencies (MiB on disk)", "",
              "| serving set | total | largest |", "|---|---|---|"]
    for name, size in result["sizes"].items():
        top = ", ".join(f"{pkg} {mb:g}" for pkg, mb in list(size["packages"].items())[:4])
        lines.append(f"| {name} ({len(size['packages'])} distributions) | {size['total_mb']:g} | {top} |")
    return "\n".join(lines) + "\n"


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
                            if c["backend"] == backend and c["workload"] == workload)
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
