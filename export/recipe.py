"""The default model's recipe: fine-tune all-MiniLM-L6-v2 for POSITIVE/NEGATIVE on movie snippets.

Reproducible: pinned sources (export.sources), fixed splits (export.dataset), fixed seeds and
hyper-parameters. The checkpoint is cached under a key made of all of these, so `make export`
trains only when the recipe changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from export.dataset import Splits, load_splits
from export.sources import ENCODER, SNIPPETS, cache_dir, encoder_dir

logger = logging.getLogger(__name__)

DEFAULT_NAME = "minilm-l6-sentiment"
ID2LABEL = {0: "NEGATIVE", 1: "POSITIVE"}


@dataclass(frozen=True)
class Hyperparameters:
    """Everything that decides the weights, apart from the sources and splits."""

    epochs: int = 3
    batch_size: int = 32
    learning_rate: float = 5e-5
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    train_max_length: int = 64  # snippets are short: 99% fit; serving truncates at model_max_length
    model_max_length: int = 256  # all-MiniLM-L6-v2 was trained on at most 256 word pieces
    seed: int = 42


def recipe_key(params: Hyperparameters) -> str:
    """Return a short hash of everything that decides the checkpoint."""
    blob = json.dumps({"params": asdict(params), "encoder": ENCODER.sha256, "data": SNIPPETS.sha256,
                       "version": 1}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def checkpoint_dir(params: Hyperparameters | None = None) -> Path:
    """Return where the checkpoint of this recipe is (or will be) cached."""
    params = params or Hyperparameters()
    return cache_dir() / "checkpoints" / f"{DEFAULT_NAME}-{recipe_key(params)}"


def ensure_checkpoint(params: Hyperparameters | None = None, retrain: bool = False) -> Path:
    """Return the fine-tuned checkpoint folder, training it first if it is not cached."""
    params = params or Hyperparameters()
    target = checkpoint_dir(params)
    if (target / "recipe.json").is_file() and not retrain:
        logger.info("reusing the cached default checkpoint %s", target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=".train-"))
    try:
        train(params, scratch, load_splits())
        if target.exists():
            shutil.rmtree(target)
        os.replace(scratch, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def train(params: Hyperparameters, output: Path, splits: Splits) -> None:
    """Fine-tune the encoder with a classification head and save a transformers checkpoint."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    random.seed(params.seed)
    torch.manual_seed(params.seed)
    source = encoder_dir()
    tokenizer = AutoTokenizer.from_pretrained(source, model_max_length=params.model_max_length)
    hf_logging.set_verbosity_error()  # the new classifier head is expected, not news
    model = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=2, id2label=ID2LABEL, label2id={v: k for k, v in ID2LABEL.items()})
    hf_logging.set_verbosity_warning()

    examples = list(splits.train)
    steps_per_epoch = math.ceil(len(examples) / params.batch_size)
    total_steps = steps_per_epoch * params.epochs
    no_decay = ("bias", "LayerNorm.weight")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)],
         "weight_decay": params.weight_decay},
        {"params": [p for n, p in model.named_parameters() if n.endswith(no_decay)],
         "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=params.learning_rate)
    warmup = int(params.warmup_ratio * total_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / max(warmup, 1),
                                    max(0.0, (total_steps - step) / max(total_steps - warmup, 1))))
    held_out = [e for e in splits.validation if e.domain == "movie" and e.label is not None]
    history = []
    order = random.Random(params.seed)
    started = time.monotonic()
    model.train()
    step = 0
    for epoch in range(params.epochs):
        order.shuffle(examples)
        running, seen = 0.0, 0
        for start in range(0, len(examples), params.batch_size):
            batch = examples[start:start + params.batch_size]
            inputs = tokenizer([e.text for e in batch], padding=True, truncation=True,
                               max_length=params.train_max_length, return_tensors="pt")
            labels = torch.tensor([model.config.label2id[e.label] for e in batch])
            loss = model(**inputs, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            running, seen, step = running + loss.item(), seen + 1, step + 1
            if step % 50 == 0 or step == total_steps:
                logger.info("train epoch %d/%d step %d/%d loss %.4f (%.0f s)", epoch + 1,
                            params.epochs, step, total_steps, running / seen,
                            time.monotonic() - started)
                running, seen = 0.0, 0
        history.append({"epoch": epoch + 1, "movie_validation_accuracy": _accuracy(model, tokenizer, held_out)})
        logger.info("train epoch %d: movie validation accuracy %.4f", epoch + 1,
                    history[-1]["movie_validation_accuracy"])
    model.eval()
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    report = {
        "base_model": "sentence-transformers/all-MiniLM-L6-v2",
        "sources": {a.requirement: {"file": a.filename, "sha256": a.sha256} for a in (ENCODER, SNIPPETS)},
        "hyperparameters": asdict(params),
        "train_examples": len(examples),
        "train_seconds": round(time.monotonic() - started, 1),
        "history": history,
        "torch_threads": torch.get_num_threads(),
        "recipe_key": recipe_key(params),
    }
    (output / "recipe.json").write_text(json.dumps(report, indent=2) + "\n")


def _accuracy(model, tokenizer, examples: list) -> float:
    """Return the model's accuracy on labelled examples (left in train mode afterwards)."""
    import torch

    model.eval()
    hits = 0
    with torch.inference_mode():
        for start in range(0, len(examples), 128):
            batch = examples[start:start + 128]
            inputs = tokenizer([e.text for e in batch], padding=True, truncation=True, return_tensors="pt")
            predicted = model(**inputs).logits.argmax(dim=-1).tolist()
            hits += sum(model.config.id2label[p] == e.label for p, e in zip(predicted, batch, strict=True))
    model.train()
    return round(hits / max(len(examples), 1), 5)
