"""The request bodies of the benchmark: a short, a long and a mixed-length workload."""

from __future__ import annotations

from dataclasses import dataclass

# ~20 tokens: one review sentence, the typical request of the original service.
SHORT = "An absolutely wonderful film: moving, funny and beautifully acted. I loved every minute of it."

# 256 tokens with [CLS] and [SEP]: the model's limit, so no backend truncates and all run the same length.
LONG = (
    "I went into this film expecting very little, having been disappointed by the director's last two "
    "efforts, and I came out of it genuinely moved. The first half hour is slow, and a few of the early "
    "scenes in the family kitchen drag on longer than they need to, but the patience pays off. The lead "
    "performance is quiet and precise: she never tells us what she feels, yet every glance lands. The "
    "supporting cast is almost as good, especially the brother, whose jokes hide a grief the script "
    "reveals only near the end. The photography is beautiful without ever showing off, the score is "
    "sparse, and the editing in the hospital sequence is the best I have seen this year. There are flaws. "
    "The subplot about the neighbour's business goes nowhere, the final reconciliation is a little too "
    "neat, and one long speech in the third act explains what the images had already made clear. Still, "
    "these are small complaints about a film that treats its characters with respect and its audience "
    "with intelligence. I laughed, I cried twice, and I have not stopped thinking about the last shot. "
    "Highly recommended, and worth seeing on the biggest screen you can find, with people you love. "
    "Bring tissues, and do stay for the lovely song over the closing credits."
)

# Mixed lengths, as real traffic has them: from a few words to the 256-token limit.
MIXED = [
    "Loved it.",
    "Terrible. I hated it.",
    SHORT,
    "Dull, predictable and far too long; the jokes fall flat and I was bored within twenty minutes.",
    " ".join(LONG.split()[:40]),
    " ".join(LONG.split()[:80]),
    " ".join(LONG.split()[:120]),
    LONG,
]


@dataclass(frozen=True)
class Workload:
    """A named list of texts; the load generator sends them in turn, one per request."""

    name: str
    texts: tuple[str, ...]


WORKLOADS = {
    "short": Workload("short", (SHORT,)),
    "long": Workload("long", (LONG,)),
    "mixed": Workload("mixed", tuple(MIXED)),
}
