"""The one way routes reach the model: validated inputs in, logits out, batched when batching is on."""

from __future__ import annotations

import time

import numpy as np
from flask import current_app
from tokenizers import Encoding

from service.batching import Scheduler
from service.classifier import Direction, Input
from service.metrics import Metrics


def infer(inputs: list[Input], truncate: bool = True, direction: Direction | None = None) -> np.ndarray:
    """Return the logits [inputs, labels] of texts or (text, text_pair) pairs.

    With batching, inputs are tokenized in the calling request thread and run in a batch shared with
    concurrent requests; raises InputTooLong (truncate=False), Unavailable or InferenceError.
    """
    classifier = current_app.extensions["service.classifier"]
    scheduler: Scheduler | None = current_app.extensions["service.scheduler"]
    started = time.perf_counter()
    if scheduler is None:
        logits = classifier.logits(inputs, truncate=truncate, direction=direction)
    else:
        logits = scheduler.logits(classifier.encode(inputs, truncate=truncate, direction=direction))
    metrics: Metrics = current_app.extensions["service.metrics"]
    metrics.observe_inference(len(inputs), time.perf_counter() - started)
    return logits


def infer_encoded(encodings: list[Encoding]) -> np.ndarray | list[np.ndarray]:
    """Return the logits of inputs the model's task encoded itself (token windows, zero-shot pairs).

    Each encoding counts as one text against the queue; a per-token task gets each one's
    [tokens, labels]. The onnx backend only: the reference backends do not encode.
    """
    classifier = current_app.extensions["service.classifier"]
    scheduler: Scheduler | None = current_app.extensions["service.scheduler"]
    started = time.perf_counter()
    if scheduler is None:
        logits = classifier.split(classifier.run(classifier.collate(encodings)), encodings)
        classifier.ready = True
    else:
        logits = scheduler.logits(encodings)
    metrics: Metrics = current_app.extensions["service.metrics"]
    metrics.observe_inference(len(encodings), time.perf_counter() - started)
    return logits
