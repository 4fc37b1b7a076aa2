"""The in-process limit: tokenize + session.run with no HTTP, swept over onnxruntime's settings.

Run in its own process (`python -m bench.inprocess`), so it shares nothing with the driver or a
server; it prints one JSON object. Every setting (intra-op threads x spinning x calling threads x
batch) gets sessions built here, one per calling thread (two threads sharing one session ran
slower: docs/performance.md); the settings take turns in short windows, round after
round, so a busy moment of this shared machine falls on all of them alike. A second group of
rows runs the sessions the service itself builds, at the service's defaults.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.report import best_in_flight
from bench.workloads import LONG, WORKLOADS
from service import runtime
from service.classifier import Classifier
from service.config import Settings, usable_cores

if TYPE_CHECKING:
    import onnxruntime as ort

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "onnx_models" / "minilm-l6-sentiment"
CALLING_THREADS = (1, 2)
BATCHES = (1, 8)
MAX_CALLS = 100_000  # per thread and window: a bound besides the time limit
GAP = 0.02  # seconds of idle between windows, so spinning intra-op threads of the last session park


@dataclass(frozen=True)
class Setting:
    """One point of the sweep; `session` is "bench" (built here) or "service" (the service's own)."""

    session: str
    intra_op: int
    spinning: bool
    threads: int
    batch: int

    def key(self) -> str:
        """Return a short unique name, e.g. bench/intra2/spin1/thr1/b8."""
        return (f"{self.session}/intra{self.intra_op}/spin{int(self.spinning)}/thr{self.threads}"
                f"/b{self.batch}")


def bench_session(model: Path, intra_op: int, spinning: bool) -> ort.InferenceSession:
    """Return a CPU session of the model file with the given intra-op threads and spinning."""
    ort = runtime.onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op
    options.inter_op_num_threads = 1
    options.enable_mem_pattern = False  # as the service: every request is a new shape
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(model), sess_options=options,
                                providers=["CPUExecutionProvider"])


def service_settings(model_dir: Path) -> Settings:
    """Return the service's settings for this model folder, all else at its defaults."""
    return Settings.from_mapping({"MODEL_DIR": str(model_dir)})


def settings_grid(cores: int, service: Settings, batches: Sequence[int] = BATCHES) -> list[Setting]:
    """Return the sweep (intra-op 1 and the usable cores) and the service's own rows.

    Besides each batch (by default 1 and 8) on each number of calling threads, the largest batch is
    also split over the most threads (2 x 4): the most texts in flight that 8 clients can give a server.
    """
    shapes = [(threads, batch) for threads in CALLING_THREADS for batch in batches]
    shapes.append((max(CALLING_THREADS), max(batches) // max(CALLING_THREADS)))
    grid = [Setting("bench", intra, spinning, threads, batch)
            for intra in sorted({1, cores}) for spinning in (True, False)
            for threads, batch in dict.fromkeys(shapes)]
    # the service's session at its own setting: its batch workers call it, and one call alone for latency
    grid += [Setting("service", service.ort_threads, service.ort_spinning, threads, batch)
             for threads in sorted({1, service.batch_workers}) for batch in batches]
    return grid


def window(infers: Sequence[Callable[[dict[str, Any]], Any]], classifier: Classifier, texts: tuple[str, ...],
           threads: int, batch: int, seconds: float) -> tuple[float, list[float]]:
    """Return texts per second and per-call seconds of `threads` loops of tokenize + run (infers[i] in loop i)."""
    latencies: list[list[float]] = [[] for _ in range(threads)]
    start_line = threading.Barrier(threads + 1)

    def loop(index: int) -> None:
        # each thread walks the texts from its own offset, like concurrent clients would
        position = index * batch
        start_line.wait()
        deadline = time.perf_counter() + seconds
        for _ in range(MAX_CALLS):
            chunk = [texts[(position + i) % len(texts)] for i in range(batch)]
            position += batch
            began = time.perf_counter()
            infers[index](classifier.tokenize(chunk))
            latencies[index].append(time.perf_counter() - began)
            if began >= deadline:
                break

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    start_line.wait()
    began = time.perf_counter()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - began
    calls = [x for per_thread in latencies for x in per_thread]
    return len(calls) * batch / elapsed, calls


def summarise(setting: Setting, rates: list[float], calls: list[float]) -> dict[str, Any]:
    """Return one setting's row: median texts/s over its windows, p50 and p99 over all its calls."""
    ordered = sorted(calls)
    return {**asdict(setting), "windows": len(rates), "calls": len(calls),
            "texts_per_s": statistics.median(rates), "p50_ms": statistics.median(ordered) * 1e3,
            "p99_ms": ordered[int(0.99 * (len(ordered) - 1))] * 1e3}


def best(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Return the throughput and latency limits of rows and, alike, those at the service's setting."""
    def limits(group: list[dict[str, Any]], throughput_threads: int | None = None) -> dict[str, Any]:
        alone = [r for r in group if r["threads"] == 1 and r["batch"] == 1]  # one call at a time
        busy = [r for r in group if throughput_threads is None or r["threads"] == throughput_threads]
        return {"throughput": max(busy, key=lambda r: r["texts_per_s"]),
                "latency": min(alone, key=lambda r: r["p50_ms"])}

    served = [r for r in rows if r["session"] == "service"]
    workers = max(r["threads"] for r in served)
    return {"best": limits([r for r in rows if r["session"] == "bench"]), "service": limits(served, workers)}


def setting_of(row: dict[str, Any]) -> Setting:
    """Return the Setting a result row was measured at."""
    return Setting(row["session"], row["intra_op"], row["spinning"], row["threads"], row["batch"])


def finalists(result: dict[str, Any], places: int = 2) -> dict[str, list[str]]:
    """Return per workload the keys of the sweep's fastest and lowest-latency settings (the top places
    each), and the fastest at each number of texts in flight."""
    chosen: dict[str, list[str]] = {}
    for name, found in result["workloads"].items():
        rows = [r for r in found["settings"] if r["session"] == "bench"]
        alone = [r for r in rows if r["threads"] == 1 and r["batch"] == 1]
        top = (sorted(rows, key=lambda r: -r["texts_per_s"])[:places]
               + sorted(alone, key=lambda r: r["p50_ms"])[:places] + list(best_in_flight(rows).values()))
        chosen[name] = list(dict.fromkeys(setting_of(r).key() for r in top))
    return chosen


def sweep(model_dir: Path, seconds: float, rounds: int, workloads: list[str], turn: int = 0,
          only: dict[str, list[str]] | None = None, batches: Sequence[int] = BATCHES) -> dict[str, Any]:
    """Measure the settings on every workload in alternating windows; return rows and limits.

    `only` restricts a workload's sweep rows to the given keys; the service's rows always run.
    """
    model_dir = Path(model_dir).resolve()
    settings = service_settings(model_dir)
    # the service's classifier: its session is the "service" rows, its tokenizer pool serves every row
    classifier = Classifier(model_dir, intra_op_threads=settings.ort_threads, spinning=settings.ort_spinning,
                            sessions=settings.batch_workers, cache_dir=settings.cache_dir)
    grid = settings_grid(usable_cores(), settings, batches)
    for name, keys in (only or {}).items():
        known = {s.key(): s for s in grid if s.session == "bench"}
        if unknown := sorted(set(keys) - set(known)):
            raise ValueError(f"unknown in-process setting {unknown[0]!r} (e.g. {next(iter(known))})")
        if not any(known[k].threads == 1 and known[k].batch == 1 for k in keys):
            raise ValueError(f"the settings of {name} need one with 1 thread and batch 1 (the latency limit)")
    chosen = {name: [s for s in grid if s.session == "service" or only is None or name not in only
                     or s.key() in only[name]] for name in workloads}
    # runners[intra_op, spinning]: one per calling thread of the settings that need them
    runners: dict[tuple[int, bool], list[Callable[[dict[str, Any]], Any]]] = {}
    for setting in (s for rows in chosen.values() for s in rows):
        if setting.session == "bench":
            have = runners.setdefault((setting.intra_op, setting.spinning), [])
            have += [runner(bench_session(classifier.model_path, setting.intra_op, setting.spinning))
                     for _ in range(setting.threads - len(have))]

    def infers_of(setting: Setting) -> Sequence[Callable[[dict[str, Any]], Any]]:
        # the service's rows go through Classifier.run, so they follow whatever the service does there
        if setting.session == "service":
            return [classifier.run] * setting.threads
        return runners[setting.intra_op, setting.spinning]

    for infer in [classifier.run, *(r for group in runners.values() for r in group)]:  # ORT's one-off costs
        for batch in (["warm up"], [LONG] * max(batches)):
            infer(classifier.tokenize(batch))
    results: dict[str, Any] = {}
    for name in workloads:
        texts = WORKLOADS[name].texts
        rates: dict[Setting, list[float]] = {s: [] for s in chosen[name]}
        calls: dict[Setting, list[float]] = {s: [] for s in chosen[name]}
        for index in range(rounds):
            # every other round backwards, so no setting always runs early or after the same one
            for setting in chosen[name] if (turn + index) % 2 == 0 else chosen[name][::-1]:
                rate, latencies = window(infers_of(setting), classifier, texts, setting.threads,
                                         setting.batch, seconds)
                rates[setting].append(rate)
                calls[setting] += latencies
                time.sleep(GAP)
        rows = [summarise(s, rates[s], calls[s]) for s in chosen[name]]
        results[name] = {"settings": rows, **best(rows)}
    return {"cores": usable_cores(), "service_setting": {"ort_threads": settings.ort_threads,
                                                         "ort_spinning": settings.ort_spinning,
                                                         "batch_workers": settings.batch_workers},
            "workloads": results}


def runner(session: ort.InferenceSession) -> Callable[[dict[str, Any]], Any]:
    """Return a function running the session on model inputs, returning its logits."""
    return lambda feeds: session.run(["logits"], feeds)


def main(argv: list[str] | None = None) -> int:
    """Print the sweep of one model as JSON."""
    parser = argparse.ArgumentParser(prog="python -m bench.inprocess", description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--seconds", type=float, default=0.2, help="per window (default 0.2)")
    parser.add_argument("--rounds", type=int, default=1, help="windows per setting and workload (default 1)")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--turn", type=int, default=0, help="odd: start with the grid backwards (the repetition)")
    parser.add_argument("--only", nargs="*", default=[], metavar="WORKLOAD=KEY",
                        help="measure only these sweep settings of a workload, e.g. short=bench/intra1/spin0/thr2/b8")
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES), metavar="N",
                        help=f"texts per call of the sweep (default {' '.join(map(str, BATCHES))})")
    args = parser.parse_args(argv)
    only: dict[str, list[str]] = {}
    for item in args.only:
        workload, _, key = item.partition("=")
        if workload not in WORKLOADS or not key:
            parser.error(f"--only takes WORKLOAD=KEY, got {item!r}")
        only.setdefault(workload, []).append(key)
    if args.seconds <= 0 or args.rounds < 1 or min(args.batches) < 1:
        parser.error("--seconds must be > 0, --rounds and every --batches at least 1")
    try:
        result = sweep(args.model_dir, args.seconds, args.rounds, args.workloads, args.turn, only or None,
                       sorted(set(args.batches)))
    except ValueError as exc:
        parser.error(str(exc))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
