"""Choose the int8 model: try the recipes, keep the fastest that meets the gate, confirm it on the test split.

The gate compares each candidate with the fp32 ONNX model on the selection split: label agreement at
least `min_agreement` and accuracy at most `max_accuracy_drop` below fp32's. Calibration (static ranges,
the sensitivity pass) uses its own split; the chosen model is then confirmed on the test split, which
took no part in making or choosing it.

Measured on the default model (agreement with fp32; the selection split is 2,560 snippets plus the
8,598 out-of-domain snippets past the test cap): dynamic int8 per-channel 97.7% on the 2,560, static QDQ
with MinMax ranges 94.4%, 8-bit weights alone 99.6%. The activations' one scale per tensor is what costs
agreement; one scale per token (export/pertoken.py) brings int8 to 99.35-99.57% depending on the set, at
the same speed. Hence, when that misses the gate, the candidates that also keep the most sensitive
MatMuls in fp32, found by a per-MatMul pass on the calibration split.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from export.dataset import Example
from export.quantize import QuantizationSettings, Recipe, build, fused_graph, resolve_target, weight_matmuls
from export.resolve import ExportError

logger = logging.getLogger(__name__)

LATENCY_ROUNDS = 10
PER_TOKEN = "dynamic int8, one activation scale per token"
# Fractions of the weight MatMuls kept in fp32, most sensitive first; the ladder stops at the first that
# passes, since each step only costs speed.
EXCLUSION_LADDER = (1 / 12, 1 / 6, 1 / 4, 1 / 3, 5 / 12, 1 / 2)


@dataclass(frozen=True)
class Gate:
    """What a candidate must meet on the selection split, against the fp32 model."""

    min_agreement: float = 0.995
    max_accuracy_drop: float = 0.003  # 0.3 points

    def allowed_disagreements(self, inputs: int) -> int:
        """Return how many labels may differ from fp32's on a set of this size within the gate."""
        return int(np.floor((1.0 - self.min_agreement) * inputs + 1e-9))

    def check(self, figures: dict) -> bool:
        """Return whether figures (agreement, accuracy_drop) meet the gate."""
        drop = figures.get("accuracy_drop")
        return figures["agreement"] >= self.min_agreement and (drop is None or drop <= self.max_accuracy_drop)


class Scorer:
    """Score fixed, pre-tokenized sets with ONNX models; the fp32 scores are the reference."""

    def __init__(self, tokenizer, max_length: int, config: dict, sets: dict[str, Sequence[Example]],
                 fp32_model: Path) -> None:
        from export.validate import _batches

        self.config = config
        self.label2id = {str(k): int(v) for k, v in config["label2id"].items()}
        self.num_labels = len(config["id2label"])
        self.sets = {name: list(examples) for name, examples in sets.items()}
        self.batches = {name: list(_batches([e.text for e in examples], tokenizer, max_length))
                        for name, examples in self.sets.items()}
        typical = sorted((e.text for e in self.sets["selection"]), key=len)
        text = typical[len(typical) // 2]
        self.latency_inputs = {size: next(_batches([text] * size, tokenizer, max_length))[1] for size in (1, 8)}
        self.fp32_model = fp32_model
        self.fp32_session = _session(fp32_model)
        self.reference = {name: self.scores(self.fp32_session, name)[0] for name in self.sets}

    def scores(self, session, set_name: str, max_disagreements: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Return the probabilities a session gives a set's examples, and which examples were scored.

        With max_disagreements, scoring stops as soon as more labels than that differ from fp32's: the
        candidate already misses the gate on the whole set.
        """
        from export.validate import predicted, probabilities

        names = [i.name for i in session.get_inputs()]
        scores = np.zeros((len(self.sets[set_name]), self.num_labels))
        scored = np.zeros(len(self.sets[set_name]), dtype=bool)
        flips = 0
        for idx, batch in self.batches[set_name]:
            scores[idx] = probabilities(session.run(["logits"], {n: batch[n] for n in names})[0], self.config)
            scored[idx] = True
            if max_disagreements is not None:
                flips += int((predicted(scores[idx]) != predicted(self.reference[set_name][idx])).sum())
                if flips > max_disagreements:
                    break
        return scores, scored

    def compare(self, session, set_name: str, max_disagreements: int | None = None) -> dict:
        """Return agreement, score differences and the accuracy drop of a session against fp32.

        With max_disagreements (see scores), the figures cover the inputs scored before it stopped.
        """
        from export.validate import accuracy, compare

        scores, scored = self.scores(session, set_name, max_disagreements)
        scores, reference = scores[scored], self.reference[set_name][scored]
        figures = compare(reference, scores)
        examples = [e for e, kept in zip(self.sets[set_name], scored) if kept]
        acc, acc_fp32 = accuracy(scores, examples, self.label2id), accuracy(reference, examples, self.label2id)
        return {"agreement": figures["label_agreement"], "max_abs_score_diff": figures["max_abs_score_diff"],
                "mean_abs_score_diff": figures["mean_abs_score_diff"], "accuracy": acc, "accuracy_fp32": acc_fp32,
                "accuracy_drop": None if acc is None else round(acc_fp32 - acc, 5), "inputs": int(scored.sum()),
                "of": len(scored)}

    def mean_diff(self, session, set_name: str) -> float:
        """Return the mean absolute score difference of a session against fp32 on a set."""
        return float(np.abs(self.scores(session, set_name)[0] - self.reference[set_name]).mean())

    def latency(self, session) -> dict:
        """Return batch-1 and batch-8 latency of a session and of fp32, measured in alternation."""
        figures = {}
        for size, batch in self.latency_inputs.items():
            times: dict[str, list[float]] = {"candidate": [], "fp32": []}
            runs = {"candidate": _runner(session, batch), "fp32": _runner(self.fp32_session, batch)}
            for run in runs.values():
                run()
            for _ in range(LATENCY_ROUNDS):
                for name, run in runs.items():
                    started = time.perf_counter()
                    run()
                    times[name].append((time.perf_counter() - started) * 1000)
            # The minimum is the run least disturbed by other work on a shared machine; taken in alternation
            # with fp32 it gives a ratio that load drift does not bias.
            best, best_fp32 = min(times["candidate"]), min(times["fp32"])
            figures[f"batch{size}_ms"] = round(best, 3)
            figures[f"batch{size}_fp32_ms"] = round(best_fp32, 3)
            figures[f"batch{size}_speedup"] = round(best_fp32 / best, 3)
        return figures


def _session(model: Path):
    from export.validate import ort_session

    return ort_session(model)


def _runner(session, batch: dict[str, np.ndarray]) -> Callable[[], object]:
    feeds = {i.name: batch[i.name] for i in session.get_inputs()}
    return lambda: session.run(["logits"], feeds)


def recipes(settings: QuantizationSettings, reduce_range: bool) -> list[Recipe]:
    """Return the fixed candidates of a mode (auto adds sensitivity-based ones as it goes)."""
    dynamic = Recipe("dynamic int8", "dynamic", per_channel=settings.per_channel, reduce_range=reduce_range,
                     exclude=tuple(settings.nodes_to_exclude))
    static = Recipe("static int8 (QDQ, MinMax calibration)", "static", per_channel=settings.per_channel,
                    reduce_range=reduce_range, exclude=tuple(settings.nodes_to_exclude))
    per_token = Recipe(PER_TOKEN, "per-token", exclude=tuple(settings.nodes_to_exclude))
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


def sensitivity(fp32_model: Path, scorer: Scorer, work: Path, base: Recipe) -> list[dict]:
    """Quantize one weight MatMul at a time; return them by how far that alone moves scores, worst first."""
    nodes = weight_matmuls(fp32_model)
    found = []
    for node in nodes:
        model = build(replace(base, exclude=tuple(n for n in nodes if n != node)), fp32_model, work / "one")
        found.append({"node": node, "mean_abs_score_diff": round(scorer.mean_diff(_session(model), "calibration"), 6)})
    return sorted(found, key=lambda f: -f["mean_abs_score_diff"])


def search(fp32_model: Path, work: Path, settings: QuantizationSettings, scorer: Scorer, gate: Gate,
           on_miss: str = "best", stop: Callable[[], None] = lambda: None) -> tuple[Path, dict]:
    """Build and measure the candidates; return the chosen model (fp32 if asked on a miss) and the record."""
    started = time.monotonic()
    target, reduce_range = resolve_target(settings)
    calibration = [batch for _, batch in scorer.batches["calibration"]]
    fused_source: Path | None = None
    trials: list[dict] = []
    models: dict[int, Path] = {}

    def attempt(recipe: Recipe) -> dict:
        nonlocal fused_source
        stop()
        trial = recipe.describe()
        out = work / f"candidate-{len(trials)}"
        try:
            source = fp32_model
            if recipe.fused:
                fused_source = fused_source or fused_graph(fp32_model, work / "fused")
                source = fused_source
            began = time.monotonic()
            model = build(recipe, source, out, calibration)
            trial["build_seconds"] = round(time.monotonic() - began, 1)
            session = _session(model)
        except ExportError:
            raise
        except Exception as exc:  # a recipe the quantizer or runtime cannot handle is recorded, not fatal
            trial["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            logger.info("      %-52s failed: %s", recipe.name, trial["error"])
            trials.append(trial)
            return trial
        # scoring stops once the candidate is sure to miss the gate: most do within the first quarter
        trial["selection"] = scorer.compare(session, "selection", gate.allowed_disagreements(
            len(scorer.sets["selection"])))
        trial.update(scorer.latency(session))
        trial["size_bytes"] = model.stat().st_size
        trial["passed"] = gate.check(trial["selection"])
        models[len(trials)] = model
        trials.append(trial)
        sel = trial["selection"]
        logger.info("      %-52s agreement %.4f acc drop %+.4f  b8 %.1f ms (x%.2f fp32)  %s", recipe.name,
                    sel["agreement"], sel["accuracy_drop"] or 0.0, trial["batch8_ms"], trial["batch8_speedup"],
                    "passes" if trial["passed"] else "misses the gate" + (
                        f" (stopped after {sel['inputs']} of {sel['of']} inputs)" if sel["inputs"] < sel["of"]
                        else ""))
        return trial

    pool = recipes(settings, reduce_range)
    outcomes = {recipe.name: attempt(recipe) for recipe in pool}
    ranking: list[dict] = []
    # The ladder starts from the per-token recipe, the one that agrees best of those much faster than fp32
    # (plain dynamic int8 where the per-token rewrite could not be built).
    base = next((r for r in pool if r.kind == "per-token" and "selection" in outcomes[r.name]), pool[0])
    if settings.mode == "auto" and not outcomes[base.name].get("passed"):
        stop()
        began = time.monotonic()
        ranking = sensitivity(fp32_model, scorer, work, base)
        logger.info("      sensitivity pass over %d MatMuls in %.0f s; most sensitive: %s", len(ranking),
                    time.monotonic() - began, ", ".join(r["node"] for r in ranking[:3]))
        ladder = sorted({max(1, round(f * len(ranking))) for f in EXCLUSION_LADDER})
        for count in ladder:
            kept = tuple(r["node"] for r in ranking[:count])
            label = "per-token int8" if base.kind == "per-token" else "dynamic int8"
            trial = attempt(replace(base, name=f"{label}, {count} most sensitive MatMuls fp32",
                                    exclude=(*base.exclude, *kept)))
            if trial.get("passed"):
                break

    measured = [i for i, t in enumerate(trials) if "selection" in t]
    if not measured:
        raise ExportError("no quantization candidate could be built: " + "; ".join(
            f"{t['name']}: {t.get('error')}" for t in trials))
    passing = [i for i in measured if trials[i]["passed"]]
    record = {
        "mode": settings.mode, "target": target, "target_detected": settings.target == "auto",
        "tool": "onnxruntime.quantization", "gate": {"split": "selection", "min_agreement": gate.min_agreement,
                                                     "max_accuracy_drop": gate.max_accuracy_drop,
                                                     "against": "onnx_fp32",
                                                     "selection_inputs": len(scorer.sets["selection"]),
                                                     "test_inputs": len(scorer.sets["test"])},
        "candidates": trials, "sensitivity": ranking, "search_seconds": round(time.monotonic() - started, 1),
    }
    if passing:
        # fastest at batch 8 (the ratio to fp32 measured beside it), then the smallest file
        chosen = max(passing, key=lambda i: (trials[i]["batch8_speedup"], -trials[i]["size_bytes"]))
        why = "the fastest at batch 8 of the candidates that meet the gate"
        if settings.mode == "auto" and trials[chosen]["batch8_speedup"] < 1.0:
            # an int8 model slower than fp32 is no gain (tiny models: the quantize ops outweigh the MatMuls);
            # `--quantize dynamic|static` asked for int8 explicitly and gets it
            record.update(chosen=None, served="fp32", passed=True, why="every int8 candidate that meets the gate "
                          "is slower than fp32 at batch 8; fp32 is served")
            logger.info("      %s", record["why"])
            return fp32_model, record
    else:
        # fully scored candidates first: an early-stopped one's figures cover only the inputs it reached
        chosen = max(measured, key=lambda i: (trials[i]["selection"]["inputs"] == trials[i]["selection"]["of"],
                                              trials[i]["selection"]["agreement"],
                                              -(trials[i]["selection"]["accuracy_drop"] or 0.0)))
        why = "no candidate met the gate; this one agreed best"
        logger.warning("      no candidate met the gate (agreement >= %.2f%%, accuracy drop <= %.2f pt)",
                       gate.min_agreement * 100, gate.max_accuracy_drop * 100)
        if on_miss == "fp32":
            record.update(chosen=None, served="fp32", passed=True,
                          why="no candidate met the gate; --on-miss fp32 serves the fp32 model")
            return fp32_model, record
    record.update(chosen=trials[chosen]["name"], why=why, served="int8", passed=bool(passing),
                  **{key: trials[chosen][key] for key in ("kind", "per_channel", "reduce_range", "fused_graph",
                                                            "fp32_nodes")})
    confirm = scorer.compare(_session(models[chosen]), "test")
    record["test"] = {**confirm, "passed": gate.check(confirm)}
    logger.info("      chose %s (%s); test split: agreement %.4f, accuracy drop %+.4f, %s", trials[chosen]["name"],
                why, confirm["agreement"], confirm["accuracy_drop"] or 0.0,
                "confirmed" if record["test"]["passed"] else "NOT confirmed")
    final = work / "chosen"
    shutil.copytree(models[chosen].parent, final)
    return final / "model.onnx", record
