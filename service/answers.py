"""The Inference API's answers for token classification and zero-shot: validated request in, JSON-ready answer out.

Both go the one way to the model (service.inference): the task encodes (a text's windows, or each
(text, hypothesis) pair), the scheduler batches every encoding of the request with other requests'
under the same limits, and the task post-processes.
"""

from __future__ import annotations

from typing import Any

from service import state
from service.errors import ApiError
from service.inference import infer_encoded
from service.schemas import TagRequest, ZeroShotRequest
from service.tasks import TaskError, public


def tag(request: TagRequest) -> list[Any]:
    """Return each text's entities, its windows' logits merged as TokenClassificationPipeline merges them."""
    classifier = state.classifier()
    limit = state.settings().max_batch
    task = classifier.task
    for text in request.texts:  # a text that alone is far over the limit is refused before it is tokenized whole
        if (least := task.windows_over(text, request.stride or 0, limit)) is not None:
            raise ApiError(413, f"texts too long: they make at least {least} windows of {classifier.max_length} "
                                f"tokens, the limit is {limit} per request")
    windows = [task.windows(text, request.stride or 0) for text in request.texts]
    count = sum(len(own) for own in windows)
    if count > limit:  # each window is one text against the request and queue limits
        raise ApiError(413, f"texts too long: they make {count} windows of {classifier.max_length} tokens, the limit "
                            f"is {limit} per request")
    rows = infer_encoded([window for own in windows for window in own], _characters(request.texts))
    answers, position = [], 0
    for text, own in zip(request.texts, windows, strict=True):
        entities = task.entities(text, own, rows[position:position + len(own)], request.strategy,
                                 request.ignore_labels)
        position += len(own)
        answers.append([public(entity) for entity in entities])
    return answers if request.batch else answers[0]


def zero_shot(request: ZeroShotRequest) -> Any:
    """Return each text's candidate labels ranked by entailment, as a list best first or the pipeline's dict."""
    classifier = state.classifier()
    task = classifier.task
    try:
        encodings = classifier.encode(task.pairs(request.texts, request.candidates), only_first=True)
    except TaskError as exc:
        raise ApiError(400, str(exc)) from None
    ranked = task.rank(infer_encoded(encodings, _characters(request.texts)), request.candidates)
    if request.pipeline_shape:
        answers: list[Any] = [{"sequence": text, "labels": labels, "scores": scores}
                              for text, (labels, scores) in zip(request.texts, ranked, strict=True)]
    else:
        answers = [[{"label": label, "score": score} for label, score in zip(labels, scores, strict=True)]
                   for labels, scores in ranked]
    return answers if request.batch else answers[0]


def _characters(texts: list[str]) -> int:
    """Return the characters of the texts a client sent (not the hypotheses made of them), as TEI counts them."""
    return sum(len(text) for text in texts)
