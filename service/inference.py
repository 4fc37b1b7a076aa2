"""The one way routes reach the model: validated inputs in, logits out, batched when batching is on."""

from __future__ import annotations

import time

import numpy as np
from flask import current_app

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
