"""What a model does: its task, the capabilities the routes ask for, and each task's encoding and answers.

A model folder's manifest names its task; the export detects it from the checkpoint (`detect`).
Routes never compare task names: they ask the model's task whether it can classify texts, tag
tokens or rank candidate labels. Token classification and zero-shot follow transformers' pipelines
(`token_classification.py`, `zero_shot_classification.py`), written here without transformers.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from tokenizers import Encoding, Tokenizer

TEXT_CLASSIFICATION = "text-classification"
TOKEN_CLASSIFICATION = "token-classification"
ZERO_SHOT_CLASSIFICATION = "zero-shot-classification"
TASKS = (TEXT_CLASSIFICATION, TOKEN_CLASSIFICATION, ZERO_SHOT_CLASSIFICATION)

# What a route may ask of a model's task.
CLASSIFY = "classify"  # labels per text or pair, from id2label
TAG = "tag"  # a label per token, grouped into entities
ZERO_SHOT = "zero-shot"  # rank labels the request names, through an NLI head's entailment logit

STRATEGIES = ("none", "simple", "first", "average", "max")
Strategy = Literal["none", "simple", "first", "average", "max"]
DEFAULT_TEMPLATE = "This example is {}."


class TaskError(ValueError):
    """A request the model's task cannot answer as asked; the message is safe to show."""


def entailment_id(labels: Sequence[str]) -> int:
    """Return the index of the first label whose name starts with "entail" (any case), or -1."""
    return next((i for i, label in enumerate(labels) if str(label).lower().startswith("entail")), -1)


def detect(config: dict[str, Any]) -> str:
    """Return a checkpoint config's task: token classification, zero-shot (an NLI head) or text classification."""
    architectures = config.get("architectures") or []
    if any(str(name).endswith("ForTokenClassification") for name in architectures):
        return TOKEN_CLASSIFICATION
    id2label = config.get("id2label") or {}
    labels = [id2label[key] for key in sorted(id2label, key=lambda k: int(k))] if isinstance(id2label, dict) else []
    if any(str(name).endswith("ForSequenceClassification") for name in architectures) and entailment_id(labels) >= 0:
        return ZERO_SHOT_CLASSIFICATION
    return TEXT_CLASSIFICATION


class Task:
    """A model's task: its name, what it can answer, and whether its logits come per token."""

    name = TEXT_CLASSIFICATION
    capabilities: frozenset[str] = frozenset({CLASSIFY})
    per_token = False  # logits [batch, tokens, labels] rather than [batch, labels]

    def can(self, capability: str) -> bool:
        """Return whether this task answers requests of that capability."""
        return capability in self.capabilities

    def describe(self) -> str:
        """Return what the model does, for error messages."""
        return {TEXT_CLASSIFICATION: "classifies texts", TOKEN_CLASSIFICATION: "tags tokens (token classification)",
                ZERO_SHOT_CLASSIFICATION: "classifies text pairs (NLI) and ranks candidate labels"}[self.name]


class TextClassification(Task):
    """A label per text or pair, from the model's id2label."""


@dataclass(frozen=True)
class Candidates:
    """The zero-shot parameters of a request: the labels to rank, the hypothesis and single or multi-label."""

    labels: list[str]
    template: str = DEFAULT_TEMPLATE
    multi_label: bool = False


class ZeroShotClassification(TextClassification):
    """An NLI classifier: its own labels for pairs, and candidate labels ranked by entailment."""

    name = ZERO_SHOT_CLASSIFICATION
    capabilities = frozenset({CLASSIFY, ZERO_SHOT})

    def __init__(self, labels: Sequence[str]) -> None:
        """Find the entailment and contradiction logits as the pipeline does."""
        self.entailment = entailment_id(labels)
        if self.entailment < 0:
            raise ValueError("a zero-shot model needs a label whose name starts with 'entail'")
        self.contradiction = -1 if self.entailment == 0 else 0

    @staticmethod
    def pairs(texts: Sequence[str], candidates: Candidates) -> list[tuple[str, str]]:
        """Return each (text, hypothesis) pair, text by text, label by label."""
        hypotheses = [candidates.template.format(label) for label in candidates.labels]
        return [(text, hypothesis) for text in texts for hypothesis in hypotheses]

    def rank(self, logits: np.ndarray, candidates: Candidates) -> list[tuple[list[str], list[float]]]:
        """Return per text its candidate labels best first and their scores, from the pairs' logits."""
        values = np.asarray(logits, dtype=np.float32).reshape(-1, len(candidates.labels), logits.shape[-1])
        if candidates.multi_label or len(candidates.labels) == 1:
            # each label on its own: softmax over [contradiction, entailment]
            pair = values[..., [self.contradiction, self.entailment]]
            scores = (np.exp(pair) / np.exp(pair).sum(-1, keepdims=True))[..., 1]
        else:  # the labels compete: softmax over their entailment logits
            entail = values[..., self.entailment]
            scores = np.exp(entail) / np.exp(entail).sum(-1, keepdims=True)
        results = []
        for row in scores:
            order = list(reversed(row.argsort()))  # the pipeline's order, ties included
            results.append(([candidates.labels[i] for i in order], [float(row[i]) for i in order]))
        return results


def parse_template(value: Any) -> str:
    """Return a hypothesis template that holds the label's place as {} (or {0}), or raise TaskError."""
    if not isinstance(value, str):
        raise TaskError("parameter 'hypothesis_template' must be a string")
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(value)
                  if name is not None]
    except ValueError:
        fields = [("?", "", None)]
    # str.format would also reach attributes and items ({0.x}, {0[1]}): only the label itself is allowed
    only_label = all(name in ("", "0") and not spec and not conversion for name, spec, conversion in fields)
    try:
        usable = bool(fields) and only_label and value.format("label") != value
    except (IndexError, ValueError):  # "{}{}" wants a second label; "{}{0}" mixes numbering
        usable = False
    if not usable:
        raise TaskError(f"parameter 'hypothesis_template' {value!r} must hold the label's place as {{}}, "
                        f"for example {DEFAULT_TEMPLATE!r}")
    return value


def parse_labels(value: Any) -> list[str]:
    """Return candidate labels from a list of strings or a comma-separated string, or raise TaskError."""
    if isinstance(value, str):
        labels = [label.strip() for label in value.split(",") if label.strip()]
    elif isinstance(value, list) and all(isinstance(label, str) for label in value):
        labels = list(value)
    else:
        raise TaskError("parameter 'candidate_labels' must be a list of strings or a comma-separated string")
    if not labels:
        raise TaskError("parameter 'candidate_labels' must name at least one label")
    return labels


# windows_over reads at most this many characters a token (English averages 4-5) before it counts windows
HEAD_CHARS_PER_TOKEN = 8


class TokenClassification(Task):
    """A label per token, grouped into entities with character offsets into the text sent."""

    name = TOKEN_CLASSIFICATION
    capabilities = frozenset({TAG})
    per_token = True

    def __init__(self, tokenizer: Tokenizer, labels: Sequence[str], max_length: int, unk_id: int | None) -> None:
        """tokenizer: one that neither truncates nor pads (windows are cut here)."""
        self.tokenizer, self.labels, self.max_length, self.unk_id = tokenizer, list(labels), max_length, unk_id
        # Windows are cut between tokenizing and post-processing, so the text is tokenized by a copy
        # without the post-processor: post-processing twice would trim byte-level offsets twice.
        self.raw = Tokenizer.from_str(tokenizer.to_str())
        self.raw.post_processor = None
        self.specials = tokenizer.num_special_tokens_to_add(False)
        # WordPiece knows its subwords by a prefix ("##"); other tokenizers by a heuristic on spaces
        self.word_aware = bool(getattr(tokenizer.model, "continuing_subword_prefix", None))
        self.decoder = tokenizer.decoder

    @property
    def max_stride(self) -> int:
        """Return the largest stride a window allows: its tokens less one."""
        return max(0, self.max_length - self.specials - 1)

    def windows(self, text: str, stride: int) -> list[Encoding]:
        """Return the text's windows of max_length tokens (special tokens included), overlapping by stride tokens.

        A text that fits is one window. The cut is the one transformers' fast tokenizer makes with
        return_overflowing_tokens and stride: the tokens without special tokens, cut in windows of
        max_length less the special tokens, each window then given its special tokens.
        """
        encoding = self.raw.encode(text, add_special_tokens=False)
        encoding.truncate(self.max_length - self.specials, stride=stride, direction="right")
        final = self.tokenizer.post_process(encoding, None, add_special_tokens=True)
        return [final, *final.overflowing]

    def windows_over(self, text: str, stride: int, limit: int) -> int | None:
        """Return how many windows the start of a long text already makes, if more than limit; else None.

        A request's windows count against its limit of texts, and tokenizing a text of megabytes takes
        seconds: this tokenizes only as many characters as limit + 1 windows could take, less the last word
        among them, which the cut may have split. The words before it are the whole text's first words (the
        pre-tokenizer splits at whitespace, and at punctuation or each CJK character where the tokenizer
        does), so their tokens are the whole text's first tokens, and their windows a lower bound of the
        text's. A start that is one word (no boundary to cut at) gives no bound: the text is counted whole.
        """
        width = self.max_length - self.specials
        step = max(1, width - stride)
        tokens = width + limit * step  # more than this make more than limit windows
        head = text[:tokens * HEAD_CHARS_PER_TOKEN]
        if len(head) == len(text):
            return None
        words = self.raw.encode(head, add_special_tokens=False).word_ids
        kept = words.index(words[-1]) if words else 0  # the tokens before the last word's first
        count = 1 + -(-max(0, kept - width) // step)  # the windows Encoding.truncate cuts kept tokens into
        return count if count > limit else None

    def entities(self, text: str, windows: Sequence[Encoding], rows: Sequence[np.ndarray], strategy: Strategy,
                 ignore_labels: Sequence[str]) -> list[dict[str, Any]]:
        """Return a text's entities from its windows' logits, as TokenClassificationPipeline.postprocess does."""
        found: list[dict[str, Any]] = []
        for window, logits in zip(windows, rows, strict=True):
            values = np.asarray(logits, dtype=np.float32)
            exp = np.exp(values - values.max(axis=-1, keepdims=True))
            scores = exp / exp.sum(axis=-1, keepdims=True)
            grouped = self._aggregate(self._tokens(text, window, scores), strategy)
            found += [entity for entity in grouped
                      if entity.get("entity") not in ignore_labels and entity.get("entity_group") not in ignore_labels]
        # Windows without aggregation never overlap (stride needs one): each token is kept once, in order,
        # even where byte-level pieces of one character share offsets.
        return _merge_overlapping(found) if len(windows) > 1 and strategy != "none" else found

    def _tokens(self, text: str, window: Encoding, scores: np.ndarray) -> list[dict[str, Any]]:
        """Return the window's non-special tokens with their scores, offsets and whether each continues a word."""
        tokens = []
        for index, (token_id, token, (start, end), special) in enumerate(zip(
                window.ids, window.tokens, window.offsets, window.special_tokens_mask, strict=True)):
            if special:
                continue
            piece = text[start:end]
            if self.word_aware:
                subword = len(token) != len(piece)
            else:  # the pipeline's fallback: glued to the character before it
                subword = start > 0 and " " not in text[start - 1:start + 1]
            if token_id == self.unk_id:
                token, subword = piece, False
            tokens.append({"word": token, "scores": scores[index], "start": start, "end": end, "index": index,
                           "is_subword": subword})
        return tokens

    def _aggregate(self, tokens: list[dict[str, Any]], strategy: Strategy) -> list[dict[str, Any]]:
        """Return per-token entities (none), or entities grouped after per-word voting (first, average, max)."""
        if strategy in ("none", "simple"):
            entities = []
            for token in tokens:
                best = int(token["scores"].argmax())
                entities.append({"entity": self.labels[best], "score": token["scores"][best], "index": token["index"],
                                 "word": token["word"], "start": token["start"], "end": token["end"]})
        else:
            entities = [self._word(group, strategy) for group in _words(tokens)]
        return entities if strategy == "none" else self._group(entities)

    def _word(self, tokens: list[dict[str, Any]], strategy: Strategy) -> dict[str, Any]:
        """Return one word's entity from its tokens: the first token's label, the best token's, or the average's."""
        if strategy == "first":
            scores = tokens[0]["scores"]
        elif strategy == "max":
            scores = max(tokens, key=lambda token: token["scores"].max())["scores"]
        else:
            scores = np.nanmean(np.stack([token["scores"] for token in tokens]), axis=0)
        best = int(scores.argmax())
        return {"entity": self.labels[best], "score": scores[best], "word": self._text([t["word"] for t in tokens]),
                "start": tokens[0]["start"], "end": tokens[-1]["end"]}

    def _group(self, entities: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Return adjacent entities of one tag joined into groups; a B- tag starts a new group."""
        groups: list[dict[str, Any]] = []
        current: list[dict[str, Any]] = []
        for entity in entities:
            if current:
                bi, tag = _tag(entity["entity"])
                if tag != _tag(current[-1]["entity"])[1] or bi == "B":
                    groups.append(self._joined(current))
                    current = []
            current.append(entity)
        if current:
            groups.append(self._joined(current))
        return groups

    def _joined(self, entities: list[dict[str, Any]]) -> dict[str, Any]:
        """Return one entity group: the first tag without its B-/I- prefix, the mean score, the decoded words."""
        return {"entity_group": entities[0]["entity"].split("-", 1)[-1],
                "score": np.nanmean([entity["score"] for entity in entities]),
                "word": self._text([entity["word"] for entity in entities]),
                "start": entities[0]["start"], "end": entities[-1]["end"]}

    def _text(self, tokens: list[str]) -> str:
        """Return tokens joined as the tokenizer's decoder joins them."""
        return self.decoder.decode(tokens) if self.decoder is not None else " ".join(tokens)


def _words(tokens: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Return tokens grouped into words: a token that continues a word joins the one before it."""
    words: list[list[dict[str, Any]]] = []
    for token in tokens:
        if words and token["is_subword"]:
            words[-1].append(token)
        else:
            words.append([token])
    return words


def _tag(label: str) -> tuple[str, str]:
    """Return (B or I, tag) of a label; a label without a B-/I- prefix continues (I)."""
    if label.startswith(("B-", "I-")):
        return label[0], label[2:]
    return "I", label


def _merge_overlapping(entities: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return the entities of overlapping windows with overlaps resolved: the longer span, then the higher score."""
    if not entities:
        return entities
    ordered = sorted(entities, key=lambda entity: entity["start"])
    merged = []
    previous = ordered[0]
    for entity in ordered:
        if previous["start"] <= entity["start"] < previous["end"]:
            length, previous_length = entity["end"] - entity["start"], previous["end"] - previous["start"]
            if length > previous_length or (length == previous_length and entity["score"] > previous["score"]):
                previous = entity
        else:
            merged.append(previous)
            previous = entity
    merged.append(previous)
    return merged


def public(entity: dict[str, Any]) -> dict[str, Any]:
    """Return an entity with JSON types: the score a float, offsets integers."""
    return {**entity, "score": float(entity["score"]), "start": int(entity["start"]), "end": int(entity["end"]),
            **({"index": int(entity["index"])} if "index" in entity else {})}
