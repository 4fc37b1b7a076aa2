"""Compare the ONNX models with the original PyTorch model on labelled and unlabelled inputs.

All three models see the same token ids (the exported tokenizer), so the figures measure the models,
not tokenizers. Scores are post-processed as transformers' text-classification pipeline does:
softmax over more than one label, sigmoid for one label or multi-label problems.
"""

from __future__ import annotations

import inspect
import logging
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from export.dataset import Example
from service.classifier import Input, apply_function, default_function
from service.config import usable_cores  # the service's rule: affinity, capped by the cgroup's quota

logger = logging.getLogger(__name__)

# Texts are scored in batches of similar length. On the default model's selection snippets, batches of 16
# scored faster than batches of 64 with fp32 and with per-token int8: less padding, and activations that
# stay in cache.
BATCH_SIZE = 16


def probabilities(logits: np.ndarray, config: dict) -> np.ndarray:
    """Turn logits into scores as the service does by default (transformers' pipeline's function)."""
    return apply_function(logits, default_function(config, logits.shape[1]))


def predicted(scores: np.ndarray) -> np.ndarray:
    """Return the predicted class index per row (for one sigmoid label: 1 if score > 0.5)."""
    if scores.shape[1] == 1:
        return (scores[:, 0] > 0.5).astype(np.int64)
    return scores.argmax(axis=1)


def input_length(item: Input) -> int:
    """Return an input's length in characters (a pair's: both texts)."""
    return len(item) if isinstance(item, str) else len(item[0]) + len(item[1])


def _batches(texts: Sequence[Input], tokenizer, max_length: int):
    """Yield (indices, encoded numpy batch), grouping inputs of similar length to limit padding.

    Pairs are encoded as the text-classification pipeline does: tokenizer(texts, text_pairs), truncated
    longest first.
    """
    order = sorted(range(len(texts)), key=lambda i: input_length(texts[i]))
    for start in range(0, len(order), BATCH_SIZE):
        idx = order[start:start + BATCH_SIZE]
        chunk = [texts[i] for i in idx]
        firsts = [item if isinstance(item, str) else item[0] for item in chunk]
        seconds = None if isinstance(chunk[0], str) else [item[1] for item in chunk]
        enc = tokenizer(firsts, seconds, padding=True, truncation=True, max_length=max_length, return_tensors="np")
        yield idx, {k: v.astype(np.int64) for k, v in enc.items()}


def _run_all(texts: Sequence[Input], tokenizer, max_length: int, run: Callable[[dict], np.ndarray],
             num_labels: int) -> np.ndarray:
    logits = np.zeros((len(texts), num_labels), dtype=np.float32)
    for idx, batch in _batches(texts, tokenizer, max_length):
        logits[idx] = run(batch)
    return logits


def ort_session(model: Path, threads: int | None = None, spinning: bool = True):
    """Open an onnxruntime CPU session on `threads` intra-op threads (default: the usable cores).

    spinning=False stops idle pool threads from busy-waiting, as the service runs them.
    """
    import onnxruntime as ort

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


def accuracy(scores: np.ndarray, examples: Sequence[Example], label2id: dict[str, int]) -> float | None:
    """Return accuracy on the labelled examples whose label the model knows, or None if there are none."""
    lowered = {k.lower(): v for k, v in label2id.items()}
    pairs = [(i, lowered[e.label.lower()]) for i, e in enumerate(examples)
             if e.label is not None and e.label.lower() in lowered]
    if not pairs:
        return None
    hits = predicted(scores[[i for i, _ in pairs]]) == np.array([t for _, t in pairs])
    return round(float(hits.mean()), 5)


def latency_ms(run: Callable[[dict], np.ndarray], tokenizer, text: Input, max_length: int) -> dict:
    """Return median in-process latency (model run only) at batch 1 and batch 8."""
    figures = {}
    for batch_size, repeats in ((1, 40), (8, 15)):
        batch = next(_batches([text] * batch_size, tokenizer, max_length))[1]
        for _ in range(3):
            run(batch)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            run(batch)
            times.append((time.perf_counter() - started) * 1000)
        figures[f"batch{batch_size}_p50_ms"] = round(statistics.median(times), 3)
    return figures


def evaluate(checkpoint: Path, tokenizer_dir: Path, models: dict[str, Path], sets: dict[str, list[Example]],
             config: dict, max_length: int) -> dict:
    """Score every set with PyTorch and each ONNX model; return agreement, differences, accuracy, latency."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    label2id = {str(k): int(v) for k, v in config["label2id"].items()}
    num_labels = len(config["id2label"])
    runners = {"pytorch": torch_runner(checkpoint)}
    runners.update({name: ort_runner(ort_session(path)) for name, path in models.items()})
    report: dict = {"sets": {}, "latency": {}}
    for set_name, examples in sets.items():
        texts = [e.input for e in examples]
        scores = {}
        for name, run in runners.items():
            started = time.monotonic()
            scores[name] = probabilities(_run_all(texts, tokenizer, max_length, run, num_labels), config)
            logger.info("  scored %-10s %5d inputs with %-9s in %.1f s", set_name, len(texts), name,
                        time.monotonic() - started)
        entry = {"inputs": len(texts), "labelled": sum(e.label is not None for e in examples),
                 "accuracy": {name: accuracy(s, examples, label2id) for name, s in scores.items()}}
        for name in models:
            entry[f"{name}_vs_pytorch"] = compare(scores["pytorch"], scores[name])
        report["sets"][set_name] = entry
    sample = sorted((e.input for e in next(iter(sets.values()))), key=input_length)
    typical = sample[len(sample) // 2] if sample else "a typical sentence"
    for name, run in runners.items():
        report["latency"][name] = latency_ms(run, tokenizer, typical, max_length)
    report["latency"]["threads"] = usable_cores()
    # Latency on a shared machine means little without the load it was measured under.
    report["latency"]["load_average_1min"] = round(os.getloadavg()[0], 2)
    report["latency"]["note"] = "median of model runs on pre-tokenized input of a median-length sentence"
    return report
