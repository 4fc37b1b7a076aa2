"""Score the export's inputs with every model once, and compare the ONNX models with the original PyTorch one.

Every model sees the same token ids, encoded by the service's own Classifier for the exported folder,
so the figures measure the models, not tokenizers, and what is validated is what is served. Scores
are post-processed as the service and transformers' text-classification pipeline do: softmax over
more than one label, sigmoid for one label or multi-label problems.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from export.dataset import Example
from service import runtime
from service.classifier import Input, apply_function
from service.config import usable_cores  # the service's rule: affinity, capped by the cgroup's quota

logger = logging.getLogger(__name__)

# Texts are scored in batches of similar length. On the default model's selection snippets, batches of 16
# scored faster than batches of 64 with fp32 and with per-token int8: less padding, and activations that
# stay in cache.
BATCH_SIZE = 16
# Under a budget, PyTorch still scores at least this many inputs of each set.
PYTORCH_FLOOR = 200


def predicted(scores: np.ndarray) -> np.ndarray:
    """Return the predicted class index per row (for one sigmoid label: 1 if score > 0.5)."""
    if scores.shape[1] == 1:
        return (scores[:, 0] > 0.5).astype(np.int64)
    return scores.argmax(axis=1)


def input_length(item: Input) -> int:
    """Return an input's length in characters (a pair's: both texts)."""
    return len(item) if isinstance(item, str) else len(item[0]) + len(item[1])


class Encoded:
    """Inputs encoded once by the service's own Classifier, unpadded; any subset is collated on demand.

    What the export scores is what the service feeds its model: the same tokenizer.json, truncation
    (pairs longest first) and padding (service.classifier.Classifier.encode and collate).
    """

    def __init__(self, classifier, inputs: Sequence[Input], progress: str | None = None) -> None:
        from export.progress import Progress

        self.classifier = classifier
        self.encodings: list = []
        step = 1024
        with Progress(progress, len(inputs)) if progress else nullcontext() as counter:
            for start in range(0, len(inputs), step):
                chunk = list(inputs[start:start + step])
                self.encodings.extend(classifier.encode(chunk))
                if counter is not None:
                    counter.update(len(chunk))
        self.lengths = np.array([len(encoding) for encoding in self.encodings], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.encodings)

    def batch(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """Return the inputs at indices padded to the longest of them, as the service collates a batch."""
        return self.classifier.collate([self.encodings[i] for i in indices])

    def batches(self, indices: Sequence[int], size: int = BATCH_SIZE):
        """Yield (indices, batch) over indices, grouping inputs of similar token length to limit padding."""
        indices = np.asarray(indices, dtype=np.int64)
        ordered = indices[np.argsort(self.lengths[indices], kind="stable")]
        for start in range(0, len(ordered), size):
            chunk = ordered[start:start + size]
            yield chunk, self.batch(chunk)


def ort_session(model: Path, threads: int | None = None, spinning: bool = True):
    """Open an onnxruntime CPU session on `threads` intra-op threads (default: the usable cores).

    spinning=False stops idle pool threads from busy-waiting, as the service runs them.
    """
    ort = runtime.onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or usable_cores()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


def ort_runner(session) -> Callable[[dict], np.ndarray]:
    """Return a function that runs a tokenized batch through an onnxruntime session."""
    names = [i.name for i in session.get_inputs()]
    return lambda batch: session.run(["logits"], {n: batch[n] for n in names})[0]


def torch_runner(checkpoint: Path) -> Callable[[dict], np.ndarray]:
    """Return a function that runs a tokenized batch through the original PyTorch model."""
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.set_num_threads(usable_cores())
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    # Only what forward() takes, as the pipeline does: a BERT tokenizer's token_type_ids do not reach a
    # DistilBERT model.
    accepted = set(inspect.signature(model.forward).parameters)

    def run(batch: dict) -> np.ndarray:
        with torch.inference_mode():
            feeds = {k: torch.from_numpy(v) for k, v in batch.items() if k in accepted}
            return model(**feeds).logits.float().numpy()

    return run


def compare(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Return label agreement and score differences of candidate against reference scores."""
    diff = np.abs(reference - candidate)
    return {
        "label_agreement": round(float((predicted(reference) == predicted(candidate)).mean()), 5),
        "max_abs_score_diff": round(float(diff.max()), 6),
        "mean_abs_score_diff": round(float(diff.mean()), 6),
    }


def true_labels(examples: Sequence[Example], label2id: dict[str, int]) -> np.ndarray:
    """Return each example's label as a class index (matched by name, any case), -1 where the model has none."""
    lowered = {k.lower(): v for k, v in label2id.items()}
    return np.array([lowered.get(e.label.lower(), -1) if e.label else -1 for e in examples], dtype=np.int64)


def accuracy(scores: np.ndarray, examples: Sequence[Example], label2id: dict[str, int]) -> float | None:
    """Return accuracy on the labelled examples whose label the model knows, or None if there are none."""
    labels = true_labels(examples, label2id)
    known = labels >= 0
    if not known.any():
        return None
    return round(float((predicted(scores[known]) == labels[known]).mean()), 5)


class Pool:
    """Every input an export scores, tokenized once, with each model's scores kept as they are computed.

    parts name the sets the inputs come from (calibration, validation, test_movie, ...). The int8 search
    and the validation against PyTorch read and fill the same scores, so no model scores an input twice.
    """

    def __init__(self, classifier, parts: dict[str, Sequence[Example]]) -> None:
        """classifier: the service's Classifier of the fp32 model folder (it encodes, and runs fp32)."""
        self.classifier, self.config, self.max_length = classifier, classifier.config, classifier.max_length
        self.label2id = {str(k): int(v) for k, v in self.config["label2id"].items()}
        self.num_labels = len(classifier.labels)
        self.examples = [e for examples in parts.values() for e in examples]
        self.parts: dict[str, np.ndarray] = {}
        offset = 0
        for name, examples in parts.items():
            self.parts[name] = np.arange(offset, offset + len(examples))
            offset += len(examples)
        self.encoded = Encoded(classifier, [e.input for e in self.examples], progress="tokenizing")
        self._scores: dict[str, np.ndarray] = {}
        self._done: dict[str, np.ndarray] = {}

    def indices(self, *names: str) -> np.ndarray:
        """Return the positions of the named parts' inputs (parts that are absent count as empty)."""
        found = [self.parts[name] for name in names if name in self.parts]
        return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)

    def encode(self, inputs: Sequence[Input]) -> dict[str, np.ndarray]:
        """Return one padded batch of inputs outside the pool (latency probes)."""
        return Encoded(self.classifier, inputs).batch(range(len(inputs)))

    def done(self, key: str, indices: Sequence[int]) -> np.ndarray:
        """Return which of indices have scores from model key."""
        return self._done[key][indices] if key in self._done else np.zeros(len(indices), dtype=bool)

    def scores(self, key: str, indices: Sequence[int]) -> np.ndarray:
        """Return model key's scores of indices (NaN where it has not scored them)."""
        return self._scores[key][indices]

    def alias(self, key: str, existing: str) -> None:
        """Let key name the scores of model existing (the chosen candidate becomes "onnx_int8")."""
        self._scores[key], self._done[key] = self._scores[existing], self._done[existing]

    def forget(self, key: str) -> None:
        """Drop model key's scores (the sensitivity pass scores a new model per MatMul under one key)."""
        self._scores.pop(key, None)
        self._done.pop(key, None)

    def score(self, key: str, run: Callable[[dict], np.ndarray], indices: Sequence[int], what: str | None = None,
              chunk: int | None = None, until: Callable[[bool], bool] | None = None) -> None:
        """Score the inputs at indices that model key has not scored yet, with run (a batch -> logits).

        With chunk, inputs are scored chunk by chunk in the order given, each chunk's batches grouping
        inputs of similar length; until(at_chunk_end) is asked after every batch whether to stop.
        """
        from export.progress import Progress

        if key not in self._scores:
            self._scores[key] = np.full((len(self.examples), self.num_labels), np.nan)
            self._done[key] = np.zeros(len(self.examples), dtype=bool)
        indices = np.asarray(indices, dtype=np.int64)
        todo = indices[~self._done[key][indices]]
        step = chunk or max(1, len(todo))
        # the time left is estimated from tokens: inputs are scored shortest first within each chunk
        work = float(self.encoded.lengths[todo].sum())
        with Progress(what, len(todo), work=work) if what and len(todo) else nullcontext() as counter:
            for start in range(0, len(todo), step):
                part = todo[start:start + step]
                last = math.ceil(len(part) / BATCH_SIZE)
                for number, (idx, batch) in enumerate(self.encoded.batches(part), start=1):
                    self._scores[key][idx] = apply_function(run(batch), self.classifier.function)
                    self._done[key][idx] = True
                    if counter is not None:
                        counter.update(len(idx), float(self.encoded.lengths[idx].sum()))
                    if until is not None and until(number == last):
                        return

    def figures(self, key: str, reference: str, indices: Sequence[int]) -> dict:
        """Return agreement, score differences and accuracy of model key against reference on indices."""
        indices = np.asarray(indices, dtype=np.int64)
        scores, base = self.scores(key, indices), self.scores(reference, indices)
        examples = [self.examples[i] for i in indices]
        found = compare(base, scores)
        acc, acc_ref = accuracy(scores, examples, self.label2id), accuracy(base, examples, self.label2id)
        return {"agreement": found["label_agreement"], "max_abs_score_diff": found["max_abs_score_diff"],
                "mean_abs_score_diff": found["mean_abs_score_diff"], "accuracy": acc, "accuracy_fp32": acc_ref,
                "accuracy_drop": None if acc is None else round(acc_ref - acc, 5)}


LATENCY_SECONDS = 3.0  # at most per model and batch size, beyond the fewest runs below


def latency_ms(run: Callable[[dict], np.ndarray], batches: dict[int, dict[str, np.ndarray]]) -> dict:
    """Return median in-process latency (model run only) of each batch size's batch.

    40 runs at batch 1 and 15 at batch 8, fewer (at least 5) where they would take over LATENCY_SECONDS.
    """
    figures = {}
    for batch_size, most in ((1, 40), (8, 15)):
        batch = batches[batch_size]
        for _ in range(2):
            run(batch)
        started = time.perf_counter()
        run(batch)
        repeats = max(5, min(most, int(LATENCY_SECONDS / max(time.perf_counter() - started, 1e-6))))
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            run(batch)
            times.append((time.perf_counter() - started) * 1000)
        figures[f"batch{batch_size}_p50_ms"] = round(statistics.median(times), 3)
    return figures


def typical(pool: Pool, indices: Sequence[int]) -> Input:
    """Return the input of median length among indices (the latency probes' input)."""
    ordered = sorted((pool.examples[i].input for i in indices), key=input_length)
    return ordered[len(ordered) // 2] if ordered else "a typical sentence"


def evaluate(checkpoint: Path, pool: Pool, models: dict[str, Path], sets: Sequence[str],
             pytorch_seconds: float | None = None) -> dict:
    """Score the named sets with PyTorch and each ONNX model; return agreement, differences, accuracy, latency.

    Scores the search already computed are reused. pytorch_seconds bounds PyTorch's scoring: each set
    is then sampled (the same seeded way) to what fits, and the report says how many inputs it scored.
    """
    from export.progress import Progress
    from export.quantize import sample

    runners = {"pytorch": torch_runner(checkpoint)}
    # fp32 runs in the pool's own Classifier session; a second session of it would only cost memory
    runners.update({name: pool.classifier.run if name == "onnx_fp32" else ort_runner(ort_session(path))
                    for name, path in models.items()})
    needed = {name: pool.indices(name) for name in sets}
    limit = None
    if pytorch_seconds is not None:
        probe = sample(np.concatenate(list(needed.values())).tolist(), size=3 * BATCH_SIZE)
        pool.score("pytorch", runners["pytorch"], probe[:BATCH_SIZE])  # the first runs allocate: not timed
        started = time.perf_counter()
        pool.score("pytorch", runners["pytorch"], probe[BATCH_SIZE:])
        per_input = (time.perf_counter() - started) / max(1, len(probe) - BATCH_SIZE)
        affordable = int(pytorch_seconds / per_input)
        if affordable < sum(len(i) for i in needed.values()):
            limit = max(PYTORCH_FLOOR, affordable // max(1, len(needed)))
            logger.info("      PyTorch scores at most %d inputs per set (%.0f ms per input, %.0f s allowed)",
                        limit, per_input * 1000, pytorch_seconds)
    report: dict = {"sets": {}, "latency": {}}
    for set_name, indices in needed.items():
        chosen = indices if limit is None or len(indices) <= limit else np.sort(
            np.array(sample(indices.tolist(), size=limit), dtype=np.int64))
        for name, run in runners.items():
            pool.score(name, run, indices if name != "pytorch" else chosen, what=f"{name} on {set_name}")
        examples = [pool.examples[i] for i in indices]
        entry = {"inputs": len(indices), "labelled": sum(e.label is not None for e in examples),
                 "accuracy": {"pytorch": accuracy(pool.scores("pytorch", chosen),
                                                  [pool.examples[i] for i in chosen], pool.label2id)}}
        if len(chosen) < len(indices):
            entry["pytorch_inputs"] = len(chosen)
        entry["accuracy"].update({name: accuracy(pool.scores(name, indices), examples, pool.label2id)
                                  for name in models})
        for name in models:
            entry[f"{name}_vs_pytorch"] = compare(pool.scores("pytorch", chosen), pool.scores(name, chosen))
        report["sets"][set_name] = entry
    text = typical(pool, next(iter(needed.values())) if needed else [])
    batches = {size: pool.encode([text] * size) for size in (1, 8)}
    with Progress("timing the models", len(runners), unit="models") as progress:
        for name, run in runners.items():
            report["latency"][name] = latency_ms(run, batches)
            progress.update()
    report["latency"]["threads"] = usable_cores()
    # Latency on a shared machine means little without the load it was measured under.
    report["latency"]["load_average_1min"] = round(os.getloadavg()[0], 2)
    report["latency"]["note"] = ("median of model runs (40 at batch 1, 15 at batch 8, or as many as fit in "
                                 f"{LATENCY_SECONDS:g} s, at least 5) on pre-tokenized input of a median-length "
                                 "sentence")
    if limit is not None:
        report["pytorch_sampled"] = (f"PyTorch scored a seeded sample of at most {limit} inputs per set to fit the "
                                     f"budget; the *_vs_pytorch figures cover those, the ONNX accuracies every input")
    return report
