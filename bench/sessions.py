"""Two calling threads on one shared session against one session each, in alternating rounds.

    python -m bench.sessions                       # short and long texts, batch 1, 4 rounds of 8 s
    python -m bench.sessions --seconds 4 --rounds 6 --batch 4

The evidence for a session per model slot (service/classifier.py): the in-process sweep's windows
(a fraction of a second) are too short to show it, since two threads on one session often start
at full speed and fall behind only after a few seconds. Each round runs both layouts for the same
time, in turn, every other round in the other order. Prints one line per round and the median
ratio per workload.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from bench.inprocess import DEFAULT_MODEL, bench_session, runner, window
from bench.workloads import WORKLOADS
from service.classifier import Classifier, ModelLoadError

THREADS = 2


def main(argv: list[str] | None = None) -> int:
    """Measure both layouts round after round; print texts/s and the ratios."""
    parser = argparse.ArgumentParser(prog="python -m bench.sessions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS), default=["short", "long"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds of each layout per round")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.rounds < 1 or args.batch < 1:
        parser.error("--seconds must be > 0, --rounds and --batch at least 1")
    try:
        classifier = Classifier(args.model_dir.resolve())  # its tokenizer; the sessions are built here
    except ModelLoadError as exc:
        parser.error(str(exc))
    own = [runner(bench_session(classifier.model_path, 1, False)) for _ in range(THREADS)]
    layouts = {"one shared session": [own[0]] * THREADS, "one session each": own}
    for run in own:
        run(classifier.tokenize(["warm up"]))
    for name in args.workloads:
        texts = WORKLOADS[name].texts
        rates: dict[str, list[float]] = {layout: [] for layout in layouts}
        for index in range(args.rounds):
            order = list(layouts) if index % 2 == 0 else list(layouts)[::-1]
            for layout in order:
                rate, _ = window(layouts[layout], classifier, texts, THREADS, args.batch, args.seconds)
                rates[layout].append(rate)
            print(f"{name} round {index + 1}: " + ", ".join(f"{layout} {rates[layout][-1]:.1f} texts/s"
                                                          for layout in layouts), flush=True)
        ratios = [each / shared for shared, each in zip(rates["one shared session"], rates["one session each"],
                                                         strict=True)]
        print(f"{name}: one session each ÷ one shared, median {statistics.median(ratios):.2f} "
              f"(rounds {min(ratios):.2f}-{max(ratios):.2f}); {THREADS} threads, batch {args.batch}, "
              f"1 intra-op thread, spinning off", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
