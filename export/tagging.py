"""Token classification's int8 gate and validation: per-token labels and entity spans against fp32.

Every text is cut into the service's own windows (service.tasks.TokenClassification, no overlap) and
scored once per model. A candidate passes when its per-token labels agree with fp32's on at least
`min_agreement` of the tokens and its entity spans (aggregation "simple": tag, start, end) on at least
`min_agreement` of the spans either model finds. Unlabelled texts suffice: fp32 is the reference.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from export.gate import Gate
from export.quantize import QuantizationSettings, Recipe, build, resolve_target, sample
from export.search import PER_TOKEN
from export.validate import BATCH_SIZE, ort_runner, ort_session

logger = logging.getLogger(__name__)

Runner = Callable[[dict], np.ndarray]


class Windows:
    """The texts' windows, encoded once by the service's classifier for the exported folder."""

    def __init__(self, classifier, texts: Sequence[str]) -> None:
        self.classifier, self.texts = classifier, list(texts)
        self.task = classifier.task
        self.per_text = [self.task.windows(text, 0) for text in self.texts]
        self.flat = [window for windows in self.per_text for window in windows]

    def logits(self, run: Runner) -> list[np.ndarray]:
        """Return each window's logits [tokens, labels] from a runner, in batches."""
        rows: list[np.ndarray] = []
        for start in range(0, len(self.flat), BATCH_SIZE):
            chunk = self.flat[start:start + BATCH_SIZE]
            rows += list(self.classifier.split(run(self.classifier.collate(chunk)), chunk))
        return rows

    def labels(self, rows: Sequence[np.ndarray]) -> np.ndarray:
        """Return the argmax label of every non-special token of every window, concatenated."""
        kept = [row.argmax(axis=-1)[np.array(window.special_tokens_mask) == 0]
                for window, row in zip(self.flat, rows, strict=True)]
        return np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)

    def spans(self, rows: Sequence[np.ndarray]) -> set[tuple[int, str, int, int]]:
        """Return every text's entity spans with aggregation "simple": (text, tag, start, end)."""
        found = set()
        position = 0
        for number, (text, windows) in enumerate(zip(self.texts, self.per_text, strict=True)):
            own = rows[position:position + len(windows)]
            position += len(windows)
            for entity in self.task.entities(text, windows, own, "simple", ["O"]):
                found.add((number, entity["entity_group"], int(entity["start"]), int(entity["end"])))
        return found


def figures(windows: Windows, reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> dict:
    """Return per-token label agreement, entity-span agreement and score differences against the reference."""
    ref_labels, labels = windows.labels(reference), windows.labels(candidate)
    ref_spans, spans = windows.spans(reference), windows.spans(candidate)
    union = ref_spans | spans
    diff = np.concatenate([np.abs(a - b).ravel() for a, b in zip(reference, candidate, strict=True)])
    return {"tokens": int(len(labels)), "token_agreement": round(float((ref_labels == labels).mean()), 5),
            "entities": len(ref_spans), "entity_agreement": round(len(ref_spans & spans) / len(union), 5)
            if union else 1.0, "max_abs_logit_diff": round(float(diff.max()), 6),
            "mean_abs_logit_diff": round(float(diff.mean()), 6)}


def passes(found: dict, gate: Gate) -> bool:
    """Return whether figures meet the gate on tokens and on entity spans."""
    return found["token_agreement"] >= gate.min_agreement and found["entity_agreement"] >= gate.min_agreement


def recipes(settings: QuantizationSettings, reduce_range: bool) -> list[Recipe]:
    """Return the candidates of a mode, in the order tried: auto tries per-token int8, then dynamic."""
    dynamic = Recipe("dynamic int8", "dynamic", per_channel=settings.per_channel, reduce_range=reduce_range,
                     exclude=tuple(settings.nodes_to_exclude))
    per_token = Recipe(PER_TOKEN, "per-token", exclude=tuple(settings.nodes_to_exclude))
    return {"dynamic": [dynamic], "per-token": [per_token]}.get(settings.mode, [per_token, dynamic])


def search(fp32: Path, work: Path, settings: QuantizationSettings, windows: Windows, reference: list[np.ndarray],
           gate: Gate, on_miss: str) -> tuple[Path | None, dict]:
    """Build the candidates in turn and keep the first that meets the gate; return it (None: fp32) and the record."""
    if settings.mode == "static":
        raise ValueError("static int8 is not offered for token classification")
    target, reduce_range = resolve_target(settings)
    trials, chosen = [], None
    for number, recipe in enumerate(recipes(settings, reduce_range)):
        model = build(recipe, fp32, work / f"candidate-{number}")
        found = figures(windows, reference, windows.logits(ort_runner(ort_session(model))))
        trial = {**recipe.describe(), "selection": found, "passed": passes(found, gate)}
        trials.append((trial, model))
        logger.info("      %-30s token agreement %.4f entity agreement %.4f  %s", recipe.name,
                    found["token_agreement"], found["entity_agreement"],
                    "passes" if trial["passed"] else "misses the gate")
        if trial["passed"]:
            chosen = len(trials) - 1
            break
    record = {"mode": settings.mode, "target": target,
              "gate": {"split": "validation", "against": "onnx_fp32", "min_agreement": gate.min_agreement,
                       "metric": "per-token label agreement and entity-span agreement (aggregation simple)"},
              "candidates": [trial for trial, _ in trials]}
    if chosen is None and on_miss == "best":
        chosen = max(range(len(trials)), key=lambda i: trials[i][0]["selection"]["token_agreement"])
    record["chosen"] = trials[chosen][0]["name"] if chosen is not None else None
    record["passed"] = bool(chosen is not None and trials[chosen][0]["passed"])
    return (trials[chosen][1] if chosen is not None else None), record


def torch_runner(checkpoint: Path) -> Runner:
    """Return a function that runs a tokenized batch through the original PyTorch token classifier."""
    import inspect

    import torch
    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(checkpoint).eval()
    accepted = set(inspect.signature(model.forward).parameters)

    def run(batch: dict) -> np.ndarray:
        with torch.inference_mode():
            return model(**{k: torch.from_numpy(v) for k, v in batch.items() if k in accepted}).logits.float().numpy()

    return run


def texts_of(examples: Sequence, limit: int = 2000) -> list[str]:
    """Return the texts of examples (a seeded sample of at most limit)."""
    return [example.text for example in sample(examples, size=limit)]
