"""The one way routes reach the model: validated inputs in, logits out, batched when batching is on."""

from __future__ import annotations

import time

import numpy as np
from flask import g
from tokenizers import Encoding

from service import state
from service.classifier import Direction, Input
from service.timing import Timing


def infer(inputs: list[Input], truncate: bool = True, direction: Direction | None = None) -> np.ndarray:
    """Return the logits [inputs, labels] of texts or (text, text_pair) pairs.

    With batching, inputs are tokenized in the calling request thread and run in a batch shared with
    concurrent requests; raises InputTooLong (truncate=False), Unavailable or InferenceError. The
    request's Timing (service.observe) gets each stage.
    """
    classifier = state.classifier()
    scheduler = state.scheduler()
    timing: Timing = g.timing
    timing.texts = len(inputs)
    timing.characters = sum(len(item) if isinstance(item, str) else len(item[0]) + len(item[1]) for item in inputs)
    started = timing.tokenizing = time.perf_counter()
    if not classifier.encodes:  # the reference pipelines tokenize inside their run
        logits = classifier.logits(inputs, truncate=truncate, direction=direction)
        timing.add_run(started, time.perf_counter(), len(inputs), None)
    else:
        encodings = classifier.encode(inputs, truncate=truncate, direction=direction)
        timing.tokenized = time.perf_counter()
        timing.tokens = sum(len(encoding) for encoding in encodings)
        if scheduler is not None:
            logits = scheduler.logits(encodings, timing)
        else:
            logits = classifier.run(classifier.collate(encodings))
            timing.add_run(timing.tokenized, time.perf_counter(), len(encodings),
                           len(encodings) * max(len(encoding) for encoding in encodings))
            classifier.ready = True
    timing.inferred = time.perf_counter()
    metrics = state.metrics()
    metrics.observe_inference(len(inputs), timing.inferred - started)
    return logits


def infer_encoded(encodings: list[Encoding], characters: int) -> np.ndarray | list[np.ndarray]:
    """Return the logits of inputs the model's task encoded itself (token windows, zero-shot pairs).

    Each encoding counts as one text against the queue; a per-token task gets each one's
    [tokens, labels]. characters: those of the texts the client sent. The onnx backend only: the
    reference backends do not encode.
    """
    classifier = state.classifier()
    scheduler = state.scheduler()
    timing: Timing = g.timing  # the task encoded already: its time counts as the request's parsing
    timing.texts, timing.characters = len(encodings), characters
    timing.tokens = sum(len(encoding) for encoding in encodings)
    started = time.perf_counter()
    if scheduler is None:
        logits = classifier.split(classifier.run(classifier.collate(encodings)), encodings)
        timing.add_run(started, time.perf_counter(), len(encodings),
                       len(encodings) * max(len(encoding) for encoding in encodings))
        classifier.ready = True
    else:
        logits = scheduler.logits(encodings, timing)
    timing.inferred = time.perf_counter()
    metrics = state.metrics()
    metrics.observe_inference(len(encodings), timing.inferred - started)
    return logits
