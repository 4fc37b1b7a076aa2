"""Choose the int8 model: try the recipes, keep the fastest that meets the gate, confirm it on the test split.

The gate compares each candidate with the fp32 ONNX model on the selection split: label agreement at
least `min_agreement` and accuracy at most `max_accuracy_drop` below fp32's. Calibration (static ranges,
the sensitivity pass) uses its own split; the chosen model is then confirmed on the test split, which
took no part in making or choosing it.

The activations' one scale per tensor is what costs dynamic int8 its agreement; one scale per token
(export/pertoken.py), with SmoothQuant's outlier smoothing, agrees far better at the same speed. When
that still misses the gate, the ladder: its most sensitive MatMuls (a per-MatMul pass on the calibration
split) made two-pass, step by step, and only if all of them two-pass misses, kept in fp32.

The search does no work that cannot change its decision (see Search). The steps that build, time and
score a candidate are passed in (Steps), so the decisions are tested without building models.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from export.gate import Gate, upper_bound
from export.progress import Progress, heartbeat
from export.quantize import QuantizationSettings, Recipe, build, fused_graph, resolve_target, weight_matmuls
from export.resolve import ExportError
from export.validate import Pool, ort_runner, ort_session, predicted, true_labels, typical, usable_cores

logger = logging.getLogger(__name__)

LATENCY_ROUNDS = 15  # at most; fewer for a large model, so that a window takes about WINDOW_SECONDS
WINDOW_SECONDS = 3.0
QUICK_ROUNDS = 3  # the first timing of every candidate; the precise one only for those that can still win
CLEARLY_SLOWER = 0.85  # a quick batch-8 speed-up below this share of a passing candidate's cannot beat it
CANARY_WINDOWS = 5
PER_TOKEN = "dynamic int8, one activation scale per token"
# Fractions of the weight MatMuls made two-pass, then (if even all of them two-pass misses the gate) kept
# in fp32, most sensitive first; the ladder stops at the first step that passes, since each costs speed.
TWO_PASS_LADDER = (1 / 12, 1 / 6, 1 / 3, 1 / 2, 2 / 3, 1)
EXCLUSION_LADDER = (1 / 12, 1 / 6, 1 / 4, 1 / 3, 5 / 12, 1 / 2)
# Scoring in random chunks lets it stop early: a chunk-aligned prefix is a uniform sample of the split.
CHUNK = 256
PASS_RISK = 0.01  # most probability that a candidate stopped early as passing would miss on the whole split
LOOKS = (0.5, 0.75)  # shares of the selection split after which an early pass is considered


class Scorer:
    """Score candidates against the fp32 model on the pool's calibration, selection and test inputs."""

    def __init__(self, pool: Pool, fp32_model: Path) -> None:
        self.pool = pool
        self.fp32_model = fp32_model
        rng = np.random.default_rng(0)
        # a fixed random order, so that a chunk-aligned prefix is a uniform sample (early stopping)
        self.selection = rng.permutation(pool.indices("validation", "selection_extra"))
        self.test = pool.indices(*(name for name in pool.parts if name.startswith("test")))
        self.calibration = pool.indices("calibration")
        everything = np.concatenate([self.calibration, self.selection, self.test])
        pool.score("onnx_fp32", pool.classifier.run, everything, what="scoring with fp32")
        text = typical(pool, self.selection)
        self.latency_inputs = {size: pool.encode([text] * size) for size in (1, 8)}
        self.fp32_timing: dict[int, object] = {}  # sessions by thread count
        self.fp32_fastest: dict[int, float] = {}  # batch size: fastest fp32 run on one thread, ms
        self.fp32_batch8_ms = math.inf  # fastest fp32 batch of 8 on one thread seen so far

    def calibration_batches(self) -> list[dict[str, np.ndarray]]:
        return [batch for _, batch in self.pool.encoded.batches(self.calibration)]

    def select(self, key: str, run: Callable[[dict], np.ndarray], gate: Gate, label: str) -> dict:
        """Score a candidate (run: a batch -> logits) on the selection split; return its figures against fp32.

        Scoring stops as soon as the decision is known. Exactly: once more labels differ than the gate
        allows on the whole split (a miss), or once even the unscored inputs could not make it miss (a
        pass). Statistically, at the LOOKS: a pass when the upper confidence bounds of the disagreement
        rate and of the rate of labels int8 gets wrong where fp32 was right both fit the gate; the
        chance that such a candidate misses on the whole split is at most PASS_RISK (a union bound
        over the looks and both rates).
        """
        pool, order = self.pool, self.selection
        allowed = gate.allowed_disagreements(len(order))
        labels = true_labels([pool.examples[i] for i in order], pool.label2id)
        labelled_total = int((labels >= 0).sum())
        allowed_drop = int(np.floor(gate.max_accuracy_drop * labelled_total + 1e-9))
        looks = [math.ceil(share * len(order)) for share in LOOKS]
        risk = PASS_RISK / (2 * len(LOOKS))
        state: dict = {}

        def decided(at_chunk_end: bool) -> bool:
            scored = pool.done(key, order)
            done = order[scored]
            ours, theirs = predicted(pool.scores(key, done)), predicted(pool.scores("onnx_fp32", done))
            flips = int((ours != theirs).sum())
            known = labels[scored]
            harmed = int(((theirs == known) & (ours != known) & (known >= 0)).sum())
            helped = int(((ours == known) & (theirs != known) & (known >= 0)).sum())
            if flips > allowed:
                state["stopped"] = "sure to miss: more labels differ than the gate allows on the whole split"
                return True
            left, labelled_left = len(order) - len(done), labelled_total - int((known >= 0).sum())
            if left and flips + left <= allowed and harmed - helped + labelled_left <= allowed_drop:
                state["stopped"] = "sure to pass: the inputs left could not make it miss"
                return True
            # a look needs a uniform sample: whole chunks of the random order, not part of a length-sorted one
            if not at_chunk_end or not left or not looks or len(done) < looks[0]:
                return False
            while looks and len(done) >= looks[0]:
                looks.pop(0)
            ok = upper_bound(flips, len(done), risk) * len(order) <= allowed
            if ok and labelled_total:
                ok = upper_bound(harmed, int((known >= 0).sum()), risk) <= gate.max_accuracy_drop
            if ok:
                state["stopped"] = (f"passes with probability >= {1 - PASS_RISK:.0%}: the upper bounds of its "
                                    f"disagreement and accuracy-loss rates fit the gate")
            return ok

        pool.score(key, run, order, what=f"scoring {label}", chunk=CHUNK, until=decided)
        done = order[pool.done(key, order)]
        figures = {**pool.figures(key, "onnx_fp32", done), "inputs": len(done), "of": len(order)}
        if "stopped" in state and len(done) < len(order):
            figures["stopped"] = state["stopped"]
        return figures

    def confirm(self, key: str, model: Path) -> dict:
        """Score the chosen candidate on the whole test split; return its figures against fp32."""
        self.pool.score(key, ort_runner(ort_session(model)), self.test, what="confirming on the test split")
        return {**self.pool.figures(key, "onnx_fp32", self.test), "inputs": len(self.test), "of": len(self.test)}

    def mean_diff(self, model: Path) -> float:
        """Return the mean absolute score difference of a model against fp32 on the calibration split."""
        key, inputs = "sensitivity", self.calibration
        self.pool.forget(key)
        self.pool.score(key, ort_runner(ort_session(model)), inputs)
        return float(np.abs(self.pool.scores(key, inputs) - self.pool.scores("onnx_fp32", inputs)).mean())

    def quick_speedup(self, model: Path) -> float:
        """Return fp32's batch-8 time over the model's, fastest of QUICK_ROUNDS runs each, on one thread."""
        runs = (ort_session(model, 1, spinning=False), self._fp32(1))
        best, best_fp32 = _alternate(runs, self.latency_inputs[8], QUICK_ROUNDS)
        self.fp32_batch8_ms = min(self.fp32_batch8_ms, best_fp32)
        return round(best_fp32 / best, 3)

    def rounds(self) -> int:
        """Return the runs per timing window: LATENCY_ROUNDS, fewer where one fp32 batch of 8 takes long.

        A long run's minimum is steady over fewer runs, as other work disturbs a smaller share of it.
        """
        if not math.isfinite(self.fp32_batch8_ms):
            return LATENCY_ROUNDS
        return max(5, min(LATENCY_ROUNDS, int(WINDOW_SECONDS * 1000 / (2 * self.fp32_batch8_ms))))

    def latency(self, model: Path) -> dict:
        """Return batch-1 and batch-8 latency of a model and of fp32, measured in alternation.

        The ranking figures run on one thread: the work a batch costs. On a shared machine that holds
        still, while on two threads two recipes doing the same work once measured 1.9x and 2.8x fp32 in
        one search. Batch 8 is also measured on every usable core with idle threads not spinning, as
        the service runs it ("as_served").
        """
        figures: dict = {}
        for threads in sorted({1, usable_cores()}):
            runs = (ort_session(model, threads, spinning=False), self._fp32(threads))
            for size in (1, 8) if threads == 1 else (8,):
                if threads == 1:
                    best, best_fp32 = self._undisturbed(runs, size)
                else:  # "as_served": one window
                    best, best_fp32 = _alternate(runs, self.latency_inputs[size], self.rounds())
                entry = figures if threads == 1 else figures.setdefault("as_served", {"threads": threads})
                entry.update({f"batch{size}_ms": round(best, 3), f"batch{size}_fp32_ms": round(best_fp32, 3),
                              f"batch{size}_speedup": round(best_fp32 / best, 3)})
        return figures

    def _fp32(self, threads: int):
        if threads not in self.fp32_timing:
            self.fp32_timing[threads] = ort_session(self.fp32_model, threads, spinning=False)
        return self.fp32_timing[threads]

    def _undisturbed(self, runs: Sequence, size: int) -> tuple[float, float]:
        """Return the fastest candidate and fp32 runs (in ms) of a window that fp32 vouches for.

        fp32's fastest run so far is the canary: a window where it ran >10% slower than that was disturbed
        (other work on the machine, or seconds after the process churned through memory, as the
        sensitivity pass does) and is measured again, up to CANARY_WINDOWS times.
        """
        batch = self.latency_inputs[size]
        if size not in self.fp32_fastest:
            self.fp32_fastest[size] = _alternate(runs[1:], batch, 2 * self.rounds())[0]
        for _ in range(CANARY_WINDOWS):
            best, best_fp32 = _alternate(runs, batch, self.rounds())
            quiet, self.fp32_fastest[size] = self.fp32_fastest[size], min(self.fp32_fastest[size], best_fp32)
            if best_fp32 <= 1.1 * quiet:
                break
        return best, best_fp32


def _alternate(sessions: Sequence, batch: dict[str, np.ndarray], rounds: int) -> list[float]:
    """Return the fastest run of each session over `rounds` runs taken in turn, in ms.

    The minimum is the run least disturbed by other work on a shared machine; taken in alternation the
    ratio of two minima is not biased by load drift.
    """
    runs = [_runner(session, batch) for session in sessions]
    for run in runs:
        run()
    best = [float("inf")] * len(runs)
    for _ in range(rounds):
        for i, run in enumerate(runs):
            started = time.perf_counter()
            run()
            best[i] = min(best[i], (time.perf_counter() - started) * 1000)
    return best


def _runner(session, batch: dict[str, np.ndarray]) -> Callable[[], object]:
    feeds = {i.name: batch[i.name] for i in session.get_inputs()}
    return lambda: session.run(["logits"], feeds)


def _counts(fractions: Sequence[float], total: int) -> list[int]:
    """Return the distinct MatMul counts the fractions of total come to (at least one each)."""
    return sorted({max(1, round(f * total)) for f in fractions})


def recipes(settings: QuantizationSettings, reduce_range: bool) -> list[Recipe]:
    """Return the fixed candidates of a mode (auto adds sensitivity-based ones as it goes)."""
    dynamic = Recipe("dynamic int8", "dynamic", per_channel=settings.per_channel, reduce_range=reduce_range,
                     exclude=tuple(settings.nodes_to_exclude))
    static = Recipe("static int8 (QDQ, MinMax calibration)", "static", per_channel=settings.per_channel,
                    reduce_range=reduce_range, exclude=tuple(settings.nodes_to_exclude))
    per_token = Recipe(PER_TOKEN + (", outlier channels smoothed" if settings.smoothing else ""), "per-token",
                       exclude=tuple(settings.nodes_to_exclude), smoothing=settings.smoothing)
    if settings.mode == "dynamic":
        return [dynamic]
    if settings.mode == "static":
        return [static]
    if settings.mode == "per-token":
        return [per_token]
    return [
        dynamic,
        per_token,
        replace(dynamic, name="dynamic int8, weights per tensor", per_channel=False),
        replace(dynamic, name="dynamic int8, 7-bit weights (reduce_range)", reduce_range=True),
        replace(dynamic, name="dynamic int8 of the O2-fused graph (QAttention)", fused=True),
        static,
        Recipe("8-bit block weights, int8 compute (MatMulNBits)", "weight-only"),
    ]


class Steps:
    """How the search builds, times and scores a candidate: onnxruntime's quantizers and the Scorer."""

    def __init__(self, fp32_model: Path, work: Path, scorer: Scorer, gate: Gate) -> None:
        self.fp32_model, self.work, self.scorer, self.gate = fp32_model, work, scorer, gate
        self._ranges: dict[str, np.ndarray] = {}  # per-token smoothing's, measured once on calibration
        self._fused: Path | None = None
        self.selection_size, self.test_size = len(scorer.selection), len(scorer.test)

    def ranges_for(self, recipe: Recipe) -> dict[str, np.ndarray] | None:
        from export.pertoken import activation_ranges

        if recipe.kind != "per-token" or not recipe.smoothing:
            return None
        if not self._ranges:
            self._ranges.update(activation_ranges(self.fp32_model, self.scorer.calibration_batches()))
        return self._ranges

    def build(self, recipe: Recipe, output: Path) -> Path:
        source = self.fp32_model
        if recipe.fused:
            self._fused = self._fused or fused_graph(self.fp32_model, self.work / "fused")
            source = self._fused
        calibration = self.scorer.calibration_batches() if recipe.kind == "static" else ()
        return build(recipe, source, output, calibration, ranges=self.ranges_for(recipe))

    def quick_speedup(self, model: Path) -> float:
        return self.scorer.quick_speedup(model)

    def latency(self, model: Path) -> dict:
        return self.scorer.latency(model)

    def select(self, key: str, model: Path, label: str) -> dict:
        return self.scorer.select(key, ort_runner(ort_session(model)), self.gate, label)

    def confirm(self, key: str, model: Path) -> dict:
        return self.scorer.confirm(key, model)

    def weight_matmuls(self) -> list[str]:
        return weight_matmuls(self.fp32_model)

    def sensitivity_of(self, base: Recipe, nodes: Sequence[str], node: str) -> float:
        """Return how far quantizing only `node` (with base's recipe) moves scores from fp32's."""
        model = build(replace(base, exclude=tuple(n for n in nodes if n != node)), self.fp32_model,
                      self.work / "one", ranges=self.ranges_for(base))
        return self.scorer.mean_diff(model)


class Search:
    """The int8 search's decisions, step by step.

    1. Build every recipe and time it quickly (batch 8, one thread, beside fp32).
    2. Score them fastest first. A candidate is timed precisely only while it can still beat the fastest
       one that passed, and scored only if it is faster than that one; scoring stops once the outcome
       is known (Scorer.select).
    3. If the per-token recipe misses and nothing faster passed, the ladder (sensitivity pass, then
       more exact MatMuls step by step).
    4. Choose the fastest passing candidate (fp32 when it is slower than fp32) and confirm it on the
       test split.
    A deadline (from --budget) stops optional work: candidates not yet built, and ladder steps.
    """

    def __init__(self, settings: QuantizationSettings, steps: Steps, gate: Gate, work: Path, on_miss: str = "best",
                 stop: Callable[[], None] = lambda: None, deadline: float | None = None) -> None:
        self.settings, self.steps, self.gate, self.work = settings, steps, gate, work
        self.on_miss, self.stop, self.deadline = on_miss, stop, deadline
        self.trials: list[dict] = []
        self.models: dict[int, Path] = {}
        self.ranking: list[dict] = []
        self.out_of_time: list[str] = []
        self.chosen_key: str | None = None  # the pool's key for the chosen candidate's scores

    # -- steps ----------------------------------------------------------------------------------------

    def late(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def attempt(self, recipe: Recipe) -> int | None:
        """Build a candidate and time it quickly; return its index, or None if it could not be built."""
        self.stop()
        trial = recipe.describe()
        try:
            # the time left, as the candidates built so far took (the first one has no estimate)
            earlier = [t["build_seconds"] for t in self.trials if "build_seconds" in t]
            with heartbeat(f"building {recipe.name}", expected=float(np.median(earlier)) if earlier else None):
                began = time.monotonic()
                model = self.steps.build(recipe, self.work / f"candidate-{len(self.trials)}")
                trial["build_seconds"] = round(time.monotonic() - began, 1)
                trial["quick_batch8_speedup"] = self.steps.quick_speedup(model)
        except ExportError:
            raise
        except Exception as exc:  # a recipe the quantizer or runtime cannot handle is recorded, not fatal
            trial["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            logger.info("      %-52s failed: %s", recipe.name, trial["error"])
            self.trials.append(trial)
            return None
        trial["size_bytes"] = model.stat().st_size
        trial["passed"] = False
        logger.info("      %-52s built in %.0f s, b8 about x%.2f fp32", recipe.name, trial["build_seconds"],
                    trial["quick_batch8_speedup"])
        self.models[len(self.trials)] = model
        self.trials.append(trial)
        return len(self.trials) - 1

    def fastest_passing(self) -> int | None:
        passing = [i for i, t in enumerate(self.trials) if t.get("passed")]
        return max(passing, key=lambda i: self.trials[i]["batch8_speedup"]) if passing else None

    def evaluate(self, index: int) -> bool:
        """Time a candidate precisely and score it, unless a faster one already met the gate."""
        self.stop()
        trial, best = self.trials[index], self.fastest_passing()
        if best is not None:
            leader = self.trials[best]
            if trial["quick_batch8_speedup"] < CLEARLY_SLOWER * leader["batch8_speedup"]:
                trial["skipped"] = f"clearly slower at batch 8 than {leader['name']!r}, which meets the gate"
                logger.info("      %-52s not scored: %s", trial["name"], trial["skipped"])
                return False
        if "batch8_speedup" not in trial:
            with heartbeat(f"timing {trial['name']}"):
                trial.update(self.steps.latency(self.models[index]))
        if best is not None and self.trials[best]["batch8_speedup"] >= trial["batch8_speedup"]:
            trial["skipped"] = f"not faster at batch 8 than {self.trials[best]['name']!r}, which meets the gate"
            logger.info("      %-52s b8 x%.2f fp32: not scored (%s)", trial["name"], trial["batch8_speedup"],
                        trial["skipped"])
            return False
        selection = self.steps.select(f"candidate-{index}", self.models[index], trial["name"])
        trial["selection"], trial["passed"] = selection, self.gate.check(selection)
        logger.info("      %-52s agreement %.4f acc drop %+.4f  b8 %.1f ms (x%.2f fp32)  %s", trial["name"],
                    selection["agreement"], selection["accuracy_drop"] or 0.0, trial["batch8_ms"],
                    trial["batch8_speedup"], ("passes" if trial["passed"] else "misses the gate") + (
                        f" ({selection['inputs']} of {selection['of']} inputs: {selection['stopped']})"
                        if "stopped" in selection else ""))
        return trial["passed"]

    def rank_matmuls(self, base: Recipe) -> list[dict]:
        """Quantize one weight MatMul at a time; return them by how far that alone moves scores, worst first.

        Under a deadline the pass gives up (returns []) as soon as its first MatMuls show that the rest
        would not fit.
        """
        nodes = self.steps.weight_matmuls()
        found = []
        began = time.monotonic()
        with Progress("sensitivity pass", len(nodes), unit="MatMuls") as progress:
            for done, node in enumerate(nodes, start=1):
                self.stop()
                found.append({"node": node, "mean_abs_score_diff": round(
                    self.steps.sensitivity_of(base, nodes, node), 6)})
                progress.update()
                projected = began + (time.monotonic() - began) / done * len(nodes)
                if self.deadline is not None and done < len(nodes) and projected > self.deadline:
                    self.out_of_time.append(
                        f"the sensitivity pass and the ladder: the pass needs about {projected - began:.0f} s, "
                        f"the budget left {self.deadline - began:.0f} s")
                    logger.info("      %s", self.out_of_time[-1])
                    return []
        return sorted(found, key=lambda f: -f["mean_abs_score_diff"])

    def ladder(self, base: Recipe) -> None:
        """Per-token int8 with its most sensitive MatMuls made more exact, step by step, until one passes.

        First two-pass (the rounding remainder multiplied too: twice the int8 work), then, if even every
        MatMul two-pass misses, fp32 for the most sensitive (several times the int8 work).
        """
        if self.late():
            self.out_of_time.append("the sensitivity pass and the ladder")
            return
        began = time.monotonic()
        self.ranking[:] = self.rank_matmuls(base)
        if not self.ranking:
            return
        logger.info("      sensitivity pass over %d MatMuls in %.0f s; most sensitive: %s", len(self.ranking),
                    time.monotonic() - began, ", ".join(r["node"] for r in self.ranking[:3]))
        order = tuple(r["node"] for r in self.ranking)
        label = {"per-token": "smoothed per-token int8" if base.smoothing else "per-token int8"}.get(
            base.kind, "dynamic int8")
        steps = [("two-pass", count) for count in _counts(TWO_PASS_LADDER, len(order)) if base.kind == "per-token"]
        steps += [("fp32", count) for count in _counts(EXCLUSION_LADDER, len(order))]
        for number, (how, count) in enumerate(steps):
            if self.late():
                self.out_of_time.append(f"{len(steps) - number} of the ladder's {len(steps)} steps")
                break
            recipe = replace(base, name=f"{label}, {count} most sensitive MatMuls {how}",
                             **({"two_pass": order[:count]} if how == "two-pass"
                                else {"exclude": (*base.exclude, *order[:count])}))
            index = self.attempt(recipe)
            if index is None:
                continue
            if self.evaluate(index) or "skipped" in self.trials[index]:
                break  # each further step is slower still

    # -- the whole search -----------------------------------------------------------------------------

    def run(self) -> tuple[Path | None, dict]:
        """Search; return the chosen int8 model (None: serve fp32) and the record for the manifest."""
        started = time.monotonic()
        target, reduce_range = resolve_target(self.settings)
        pool = recipes(self.settings, reduce_range)
        indices: dict[str, int | None] = {}
        for recipe in pool:
            if indices and any(i is not None for i in indices.values()) and self.late():
                self.out_of_time.append(f"building {recipe.name!r}")
                continue
            indices[recipe.name] = self.attempt(recipe)
        trials = self.trials
        # The ladder starts from the per-token recipe, the one that agrees best of those much faster than
        # fp32 (plain dynamic int8 where the per-token rewrite could not be built).
        base = next((r for r in pool if r.kind == "per-token" and indices.get(r.name) is not None), pool[0])
        built = sorted((i for i in indices.values() if i is not None), key=lambda i: -trials[i]["quick_batch8_speedup"])
        # In auto, a candidate slower than fp32 is scored only if none faster meets the gate: fp32 would be
        # served over it.
        slow = [i for i in built if self.settings.mode == "auto" and trials[i]["quick_batch8_speedup"] < 1.0]
        for group in ([i for i in built if i not in slow], slow):
            if group is slow and self.fastest_passing() is not None:
                for i in slow:
                    trials[i]["skipped"] = "slower than fp32 at batch 8, and a faster candidate meets the gate"
                break
            for i in group:
                self.evaluate(i)
            base_index, best = indices.get(base.name), self.fastest_passing()
            # every step of the ladder is slower than its base: none can beat a candidate that passed faster
            if (self.settings.mode == "auto" and base_index in group and "selection" in trials[base_index]
                    and not trials[base_index]["passed"]
                    and (best is None or trials[best]["batch8_speedup"] < trials[base_index]["batch8_speedup"])):
                self.ladder(base)
        record = self.record(target, started)
        return self.choose(record)

    def record(self, target: str, started: float) -> dict:
        return {
            "mode": self.settings.mode, "target": target, "target_detected": self.settings.target == "auto",
            "tool": "onnxruntime.quantization",
            "gate": {"split": "selection", "min_agreement": self.gate.min_agreement,
                     "max_accuracy_drop": self.gate.max_accuracy_drop, "against": "onnx_fp32",
                     "selection_inputs": self.steps.selection_size, "test_inputs": self.steps.test_size,
                     "pass_risk": PASS_RISK},
            "candidates": self.trials, "sensitivity": self.ranking,
            "search_seconds": round(time.monotonic() - started, 1),
            **({"not_done_for_the_budget": self.out_of_time} if self.out_of_time else {}),
        }

    def _left_out(self) -> str:
        """Return what the deadline left out, as the end of a reason ("" if nothing)."""
        return f" (the budget left out {'; '.join(self.out_of_time)})" if self.out_of_time else ""

    def choose(self, record: dict) -> tuple[Path | None, dict]:
        trials = self.trials
        measured = [i for i, t in enumerate(trials) if "selection" in t]
        if not measured:
            raise ExportError("no quantization candidate could be built: " + "; ".join(
                f"{t['name']}: {t.get('error')}" for t in trials))
        passing = [i for i in measured if trials[i]["passed"]]
        if passing:
            # fastest at batch 8 (the ratio to fp32 measured beside it), then the smallest file
            chosen = max(passing, key=lambda i: (trials[i]["batch8_speedup"], -trials[i]["size_bytes"]))
            why = "the fastest at batch 8 of the candidates that meet the gate"
            if self.settings.mode == "auto" and trials[chosen]["batch8_speedup"] < 1.0:
                # an int8 model slower than fp32 is no gain (tiny models: the quantize ops outweigh the
                # MatMuls); `--quantize dynamic|static` asked for int8 explicitly and gets it
                record.update(chosen=None, served="fp32", passed=True, why="every int8 candidate that meets the "
                              "gate is slower than fp32 at batch 8; fp32 is served" + self._left_out())
                logger.info("      %s", record["why"])
                return None, record
        else:
            # fully scored candidates first: an early-stopped one's figures cover only the inputs it reached
            chosen = max(measured, key=lambda i: (trials[i]["selection"]["inputs"] == trials[i]["selection"]["of"],
                                                  trials[i]["selection"]["agreement"],
                                                  -(trials[i]["selection"]["accuracy_drop"] or 0.0)))
            why = "no candidate met the gate; this one agreed best"
            logger.warning("      no candidate met the gate (agreement >= %.2f%%, accuracy drop <= %.2f pt)",
                           self.gate.min_agreement * 100, self.gate.max_accuracy_drop * 100)
            if self.on_miss == "fp32":
                record.update(chosen=None, served="fp32", passed=True,
                              why="no candidate met the gate; --on-miss fp32 serves the fp32 model" + self._left_out())
                logger.info("      %s", record["why"])
                return None, record
        self.chosen_key = f"candidate-{chosen}"
        record.update(chosen=trials[chosen]["name"], why=why, served="int8", passed=bool(passing),
                      **{key: trials[chosen][key] for key in ("kind", "per_channel", "reduce_range", "fused_graph",
                                                              "fp32_nodes", "two_pass_nodes") if key in trials[chosen]})
        confirm = self.steps.confirm(f"candidate-{chosen}", self.models[chosen])
        record["test"] = {**confirm, "passed": self.gate.check(confirm)}
        logger.info("      chose %s (%s); test split: agreement %.4f, accuracy drop %+.4f, %s", trials[chosen]["name"],
                    why, confirm["agreement"], confirm["accuracy_drop"] or 0.0,
                    "confirmed" if record["test"]["passed"] else "NOT confirmed")
        final = self.work / "chosen"
        shutil.copytree(self.models[chosen].parent, final)
        return final / "model.onnx", record


def search(fp32_model: Path, work: Path, settings: QuantizationSettings, scorer: Scorer, gate: Gate,
           on_miss: str = "best", stop: Callable[[], None] = lambda: None,
           deadline: float | None = None) -> tuple[Path | None, dict]:
    """Build and measure the candidates; return the chosen int8 model (None: serve fp32) and the record.

    The chosen candidate's scores are in the scorer's pool as "onnx_int8".
    """
    steps = Steps(fp32_model, work, scorer, gate)
    searched = Search(settings, steps, gate, work, on_miss, stop, deadline)
    chosen, record = searched.run()
    if chosen is not None:
        scorer.pool.alias("onnx_int8", searched.chosen_key)
    return chosen, record
