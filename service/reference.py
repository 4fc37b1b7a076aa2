"""The PyTorch reference backend: the original transformers pipeline behind the same interface.

Used to check the ONNX service against the service it replaces (SERVICE_BACKEND=pytorch). It needs
the dev dependencies (torch, transformers), imported here only, when the backend is built.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from service.classifier import (
    FUNCTIONS,
    InferenceError,
    ModelLoadError,
    Prediction,
    default_function,
    labels_from_config,
    read_json,
)


class ReferenceClassifier:
    """Classify texts with transformers' pipeline("text-classification") on a PyTorch checkpoint."""

    backend = "pytorch"

    def __init__(self, model_dir: Path, intra_op_threads: int = 1) -> None:
        """Load a transformers checkpoint folder (config.json, weights, tokenizer)."""
        self.model_dir = Path(model_dir)
        self.config = read_json(self.model_dir / "config.json")
        self.labels = labels_from_config(self.config, self.model_dir / "config.json")
        self.function = default_function(self.config, len(self.labels))
        self.name = self.model_dir.name
        self.intra_op_threads = intra_op_threads
        try:
            import torch
            from transformers import pipeline
        except ImportError as exc:
            raise ModelLoadError(f"SERVICE_BACKEND=pytorch needs the dev dependencies ({exc.name} is "
                                 "not installed): pip install -r requirements-dev.txt") from None
        torch.set_num_threads(intra_op_threads)
        try:
            self._pipeline = pipeline("text-classification", model=str(self.model_dir),
                                      truncation=True, device="cpu")
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{self.model_dir} is not a transformers checkpoint "
                                 f"({type(exc).__name__})") from None
        self.max_length = int(self._pipeline.tokenizer.model_max_length)
        # The pipeline's tokenizer is not safe to share across threads (tokenizers #537).
        self._lock = threading.Lock()
        self.ready = False

    def classify(self, texts: Sequence[str], top_k: int | None = None,
                 function_to_apply: str | None = None) -> list[list[Prediction]]:
        """Return, per text, labels sorted by score (top_k of them, None: all)."""
        if function_to_apply is not None and function_to_apply not in FUNCTIONS:
            raise ValueError(f"unknown function_to_apply {function_to_apply!r}")
        try:
            with self._lock:
                # top_k=None returns every label sorted by score; slicing keeps the pipeline's order
                outputs = self._pipeline(list(texts), top_k=None, function_to_apply=function_to_apply)
        except Exception as exc:  # torch and transformers raise many unrelated types
            raise InferenceError("the transformers pipeline failed") from exc
        self.ready = True
        return [[Prediction(label=o["label"], score=float(o["score"])) for o in output[:top_k]]
                for output in outputs]

    def warmup(self) -> None:
        """Run one short batch so the first request does not pay the first-run costs."""
        self.classify(["warm up"])

    def info(self) -> dict[str, Any]:
        """Return what /info says about the model."""
        return {"name": self.name, "labels": list(self.labels), "function_to_apply": self.function,
                "max_length": self.max_length, "inputs": None, "source": None,
                "quantization": None, "validation": None, "created_at": None}
