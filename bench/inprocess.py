"""The in-process limit: tokenize + session.run with no HTTP, at its best thread and batch setting.

Run in its own process (`python -m bench.inprocess`), so it shares nothing with the driver or a
server; it prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from itertools import product
from pathlib import Path
from typing import Any

from bench.workloads import WORKLOADS
from service.classifier import Classifier

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "onnx_models" / "minilm-l6-sentiment"
INTRA_OP = (1, 2)
PYTHON_THREADS = (1, 2)
BATCHES = (1, 8)
MAX_CALLS = 100_000  # per thread and setting: a bound besides the time limit


def measure(classifier: Classifier, texts: tuple[str, ...], threads: int, batch: int,
            seconds: float) -> dict[str, Any]:
    """Return texts per second and per-call latency of `threads` loops of tokenize + run."""
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
            classifier.run(classifier.tokenize(chunk))
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
    return {"threads": threads, "batch": batch, "calls": len(calls),
            "texts_per_s": len(calls) * batch / elapsed,
            "p50_ms": statistics.median(calls) * 1e3,
            "p99_ms": sorted(calls)[int(0.99 * (len(calls) - 1))] * 1e3}


def sweep(model_dir: Path, seconds: float, workloads: list[str]) -> dict[str, Any]:
    """Measure every intra-op x Python thread x batch setting per workload; pick the best of each."""
    classifiers = {}
    for intra in INTRA_OP:
        # spinning off, as the service runs it: spinning threads steal the cores other runs need
        classifiers[intra] = Classifier(model_dir, intra_op_threads=intra, spinning=False)
        classifiers[intra].warmup()
    results: dict[str, Any] = {}
    for name in workloads:
        texts = WORKLOADS[name].texts
        rows = []
        for intra, threads, batch in product(INTRA_OP, PYTHON_THREADS, BATCHES):
            rows.append({"intra_op": intra, **measure(classifiers[intra], texts, threads, batch, seconds)})
        single = [row for row in rows if row["threads"] == 1 and row["batch"] == 1]
        results[name] = {
            "settings": rows,
            # throughput limit: the best setting; latency limit: one request alone, best intra-op
            "best_throughput": max(rows, key=lambda row: row["texts_per_s"]),
            "best_latency": min(single, key=lambda row: row["p50_ms"]),
        }
    return results


def main(argv: list[str] | None = None) -> int:
    """Print the sweep of one model as JSON."""
    parser = argparse.ArgumentParser(prog="python -m bench.inprocess", description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--seconds", type=float, default=0.75, help="per setting (default 0.75)")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    args = parser.parse_args(argv)
    print(json.dumps(sweep(args.model_dir, args.seconds, args.workloads)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
