"""Hand-rated sentence snippets (Hutto & Gilbert, ICWSM 2014) and their fixed splits.

Each snippet carries the mean of about 20 human ratings on -4..+4. A snippet rated at least +1 is
POSITIVE, at most -1 NEGATIVE; the ones in between are kept unlabelled: they still count when the
int8 model is compared with the original (real traffic has neutral text too) but not for accuracy.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from export.sources import snippets_dir

LABEL_THRESHOLD = 1.0
SEED = 20141  # fixed: changing it changes every split and so the default model
DOMAINS = {
    "movie": "movieReviewSnippets_GroundTruth.txt",
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
    "nyt": "nytEditorialSnippets_GroundTruth.txt",
    "tweets": "tweets_GroundTruth.txt",
}
OOD_VALIDATION_SIZE = 500  # per out-of-domain corpus; the rest of it is test data


@dataclass(frozen=True)
class Example:
    """One input: its text (and second text, for a pair model) and its label name, None if unlabelled."""

    text: str
    label: str | None
    domain: str
    text_pair: str | None = None

    @property
    def input(self) -> str | tuple[str, str]:
        """Return what the model reads: the text, or (text, text_pair)."""
        return self.text if self.text_pair is None else (self.text, self.text_pair)


@dataclass(frozen=True)
class Splits:
    """Fixed splits: movie snippets train the model, every domain gives validation and test data."""

    train: list[Example]
    validation: list[Example]
    test: dict[str, list[Example]]


def parse_ground_truth(path: Path, domain: str) -> list[Example]:
    """Parse one tab-separated *_GroundTruth.txt file (id, mean rating, text)."""
    examples = []
    for line in path.read_text(encoding="utf-8").splitlines():
        fields = line.split("\t")
        if len(fields) != 3 or not fields[2].strip():
            continue
        score = float(fields[1])
        label = "POSITIVE" if score >= LABEL_THRESHOLD else "NEGATIVE" if score <= -LABEL_THRESHOLD else None
        examples.append(Example(text=fields[2].strip(), label=label, domain=domain))
    return examples


def load_splits(root: Path | None = None) -> Splits:
    """Return the fixed splits: movie 80/10/10, other corpora 500 validation and the rest test."""
    root = root or snippets_dir()
    train: list[Example] = []
    validation: list[Example] = []
    test: dict[str, list[Example]] = {}
    for domain, filename in DOMAINS.items():
        examples = parse_ground_truth(root / filename, domain)
        random.Random(f"{SEED}-{domain}").shuffle(examples)
        if domain == "movie":
            n_train, n_val = int(0.8 * len(examples)), int(0.1 * len(examples))
            train = [e for e in examples[:n_train] if e.label is not None]
            validation += examples[n_train:n_train + n_val]
            test[domain] = examples[n_train + n_val:]
        else:
            validation += examples[:OOD_VALIDATION_SIZE]
            test[domain] = examples[OOD_VALIDATION_SIZE:]
    return Splits(train=train, validation=validation, test=test)


def labelled(examples: Iterable[Example]) -> list[Example]:
    """Keep the examples that carry a label."""
    return [e for e in examples if e.label is not None]


def read_text_file(path: Path, pairs: bool = False) -> list[Example]:
    """Read user-supplied validation inputs, one per line (LABEL as in id2label).

    Single texts: 'text' or 'LABEL<TAB>text'. Pairs: 'text<TAB>text_pair' or 'LABEL<TAB>text<TAB>text_pair';
    a pair line with one field, or more than three, raises ValueError naming the line.
    """
    examples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if pairs:
            fields = line.split("\t")
            if len(fields) not in (2, 3) or not all(field.strip() for field in fields):
                raise ValueError(f"{path}:{number}: a pair line is 'text<TAB>text_pair' or "
                                 f"'LABEL<TAB>text<TAB>text_pair', got {len(fields)} tab-separated field(s)")
            label = fields[0].strip() if len(fields) == 3 else None
            examples.append(Example(text=fields[-2], label=label, domain=path.stem, text_pair=fields[-1]))
            continue
        head, sep, tail = line.partition("\t")
        if sep and tail.strip():
            examples.append(Example(text=tail, label=head.strip(), domain=path.stem))
        else:
            examples.append(Example(text=line, label=None, domain=path.stem))
    return examples


def inputs(examples: Sequence[Example]) -> list[str | tuple[str, str]]:
    """Return what the model reads of each example, in order: texts, or (text, text_pair) pairs."""
    return [e.input for e in examples]
