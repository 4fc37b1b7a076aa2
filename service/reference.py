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

import numpy as np

from service import runtime
from service.classifier import (
    Direction,
    InferenceError,
    Input,
    InputTooLong,
    ModelLoadError,
    Prediction,
    apply_function,
    default_function,
    labels_from_config,
    rank,
    read_json,
)
from service.tasks import TOKEN_CLASSIFICATION, TextClassification, detect


class _PipelineClassifier:
    """Classify texts with a transformers text-classification pipeline that a subclass builds."""

    backend = ""
    encodes = False  # the pipeline tokenizes inside its run (see service.classifier.Classifier)
    model_path = None  # no ONNX file of ours: PyTorch, or Optimum's own export
    task = TextClassification()  # the text-classification pipeline only

    def __init__(self, model_dir: Path, intra_op_threads: int = 1) -> None:
        """Read the labels of a model folder, then build the pipeline."""
        self.model_dir = Path(model_dir)
        self.config = read_json(self.model_dir / "config.json")
        if detect(self.config) == TOKEN_CLASSIFICATION:
            raise ModelLoadError(f"SERVICE_BACKEND={self.backend} serves text classifiers; {self.model_dir} holds a "
                                 "token classifier, which the onnx backend serves")
        self.labels = labels_from_config(self.config, self.model_dir / "config.json")
        self.function = default_function(self.config, len(self.labels))
        self.name = self.model_dir.name
        self.intra_op_threads = intra_op_threads
        self._pipeline = self._build_pipeline()
        self.max_length = int(self._pipeline.tokenizer.model_max_length)
        self._truncation_side = self._pipeline.tokenizer.truncation_side
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

    def logits(self, inputs: Sequence[Input], *, truncate: bool = True,
               direction: Direction | None = None) -> np.ndarray:
        """Return the logits [inputs, labels] the pipeline computes for texts or (text, text_pair) pairs."""
        items = [{"text": item[0], "text_pair": item[1]} if isinstance(item, tuple) else item for item in inputs]
        try:
            with self._lock:
                tokenizer = self._pipeline.tokenizer
                tokenizer.truncation_side = direction or self._truncation_side
                if not truncate:
                    self._check_lengths(inputs)
                # function_to_apply="none": the raw logits, every label, sorted by score
                outputs = self._pipeline(items, top_k=None, function_to_apply="none")
        except InputTooLong:
            raise
        except Exception as exc:  # torch, transformers and onnxruntime raise many unrelated types
            raise InferenceError(f"the {self.backend} pipeline failed") from exc
        self.ready = True
        position = {label: i for i, label in enumerate(self.labels)}
        logits = np.zeros((len(items), len(self.labels)), dtype=np.float32)
        for row, output in enumerate(outputs):
            for prediction in output:
                logits[row, position[prediction["label"]]] = prediction["score"]
        return logits

    def _check_lengths(self, inputs: Sequence[Input]) -> None:
        """Raise InputTooLong for the first input over max_length tokens (called with the lock held)."""
        tokenizer = self._pipeline.tokenizer
        for index, item in enumerate(inputs):
            pair = item if isinstance(item, tuple) else (item, None)
            if len(tokenizer(*pair, truncation=False)["input_ids"]) > self.max_length:
                raise InputTooLong(index, self.max_length)

    def postprocess(self, logits: np.ndarray, top_k: int | None,
                    function_to_apply: str | None = None) -> list[list[Prediction]]:
        """Return ranked predictions per input, as the pipeline would."""
        return rank(apply_function(logits, function_to_apply or self.function), self.labels, top_k)

    def classify(self, inputs: Sequence[Input], top_k: int | None = None,
                 function_to_apply: str | None = None) -> list[list[Prediction]]:
        """Return, per input, labels sorted by score (top_k of them, None: all)."""
        return self.postprocess(self.logits(inputs), top_k, function_to_apply)

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
        ort = runtime.onnxruntime()  # before optimum imports it, so with its telemetry off
        try:
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
