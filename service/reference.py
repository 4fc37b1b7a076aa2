"""Reference backends: transformers pipelines behind the same interface as the ONNX classifier.

`pytorch` is the original service (a transformers pipeline on a PyTorch checkpoint); `optimum` is
Optimum's ORTModelForSequenceClassification in the same pipeline, on an exported ONNX folder. The
benchmark and the contract test compare this service with them. Both need the dev dependencies
(torch, transformers, optimum), imported here only, when the backend is built.
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


class _PipelineClassifier:
    """Classify texts with a transformers text-classification pipeline that a subclass builds."""

    backend = ""

    def __init__(self, model_dir: Path, intra_op_threads: int = 1) -> None:
        """Read the labels of a model folder, then build the pipeline."""
        self.model_dir = Path(model_dir)
        self.config = read_json(self.model_dir / "config.json")
        self.labels = labels_from_config(self.config, self.model_dir / "config.json")
        self.function = default_function(self.config, len(self.labels))
        self.name = self.model_dir.name
        self.intra_op_threads = intra_op_threads
        self._pipeline = self._build_pipeline()
        self.max_length = int(self._pipeline.tokenizer.model_max_length)
        # The pipeline's tokenizer is not safe to share across threads (tokenizers #537).
        self._lock = threading.Lock()
        self.ready = False

    def _build_pipeline(self) -> Any:
        """Return the transformers pipeline of this backend."""
        raise NotImplementedError

    def _missing(self, exc: ImportError) -> ModelLoadError:
        """Return the error for a missing dev dependency."""
        return ModelLoadError(f"SERVICE_BACKEND={self.backend} needs the dev dependencies ({exc.name} is "
                              "not installed): pip install -r requirements-dev.txt")

    def classify(self, texts: Sequence[str], top_k: int | None = None,
                 function_to_apply: str | None = None) -> list[list[Prediction]]:
        """Return, per text, labels sorted by score (top_k of them, None: all)."""
        if function_to_apply is not None and function_to_apply not in FUNCTIONS:
            raise ValueError(f"unknown function_to_apply {function_to_apply!r}")
        try:
            with self._lock:
                # top_k=None returns every label sorted by score; slicing keeps the pipeline's order
                outputs = self._pipeline(list(texts), top_k=None, function_to_apply=function_to_apply)
        except Exception as exc:  # torch, transformers and onnxruntime raise many unrelated types
            raise InferenceError(f"the {self.backend} pipeline failed") from exc
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


class ReferenceClassifier(_PipelineClassifier):
    """Classify texts with transformers' pipeline("text-classification") on a PyTorch checkpoint."""

    backend = "pytorch"

    def _build_pipeline(self) -> Any:
        """Load a transformers checkpoint folder (config.json, weights, tokenizer) into a pipeline."""
        try:
            import torch
            from transformers import pipeline
        except ImportError as exc:
            raise self._missing(exc) from None
        torch.set_num_threads(self.intra_op_threads)
        try:
            return pipeline("text-classification", model=str(self.model_dir), truncation=True, device="cpu")
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{self.model_dir} is not a transformers checkpoint "
                                 f"({type(exc).__name__})") from None


class OptimumClassifier(_PipelineClassifier):
    """Classify texts with Optimum's ORTModelForSequenceClassification in a transformers pipeline."""

    backend = "optimum"

    def _build_pipeline(self) -> Any:
        """Load an exported ONNX folder (model.onnx, config.json, tokenizer) into a pipeline."""
        try:
            import onnxruntime as ort
            import torch
            from optimum.onnxruntime import ORTModelForSequenceClassification
            from transformers import AutoTokenizer, pipeline
        except ImportError as exc:
            raise self._missing(exc) from None
        # the same thread budget as the onnx backend, so the two differ only in the code around ORT
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = 1
        torch.set_num_threads(self.intra_op_threads)  # the pipeline's tensors are torch tensors
        try:
            model = ORTModelForSequenceClassification.from_pretrained(
                self.model_dir, file_name="model.onnx", session_options=options,
                provider="CPUExecutionProvider")
            tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{self.model_dir} is not an exported ONNX model folder "
                                 f"({type(exc).__name__})") from None
        return pipeline("text-classification", model=model, tokenizer=tokenizer, truncation=True, device="cpu")
