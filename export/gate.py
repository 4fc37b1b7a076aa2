"""The gate a quantized model must meet against the fp32 model, and the bound its early pass relies on.

Kept apart from the search (export/search.py) so that the command line and the options share its
defaults without importing onnxruntime.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Gate:
    """What a candidate must meet on the selection split, against the fp32 model."""

    min_agreement: float = 0.995
    max_accuracy_drop: float = 0.003  # 0.3 points

    def allowed_disagreements(self, inputs: int) -> int:
        """Return how many labels may differ from fp32's on a set of this size within the gate."""
        return int(np.floor((1.0 - self.min_agreement) * inputs + 1e-9))

    def check(self, figures: dict) -> bool:
        """Return whether figures (agreement, accuracy_drop) meet the gate."""
        drop = figures.get("accuracy_drop")
        return figures["agreement"] >= self.min_agreement and (drop is None or drop <= self.max_accuracy_drop)


def upper_bound(events: int, trials: int, risk: float) -> float:
    """Return the Clopper-Pearson upper bound of a rate seen `events` times in `trials`, at confidence 1-risk.

    Valid for a uniform sample drawn without replacement from a finite set too: the hypergeometric tail
    is no heavier than the binomial one (Hoeffding, 1963).
    """
    if trials <= 0 or events >= trials:
        return 1.0

    def cdf(p: float) -> float:  # P(X <= events) for X ~ Binomial(trials, p)
        if p <= 0.0:
            return 1.0
        if p >= 1.0:
            return 0.0
        logs = [math.lgamma(trials + 1) - math.lgamma(k + 1) - math.lgamma(trials - k + 1)
                + k * math.log(p) + (trials - k) * math.log1p(-p) for k in range(events + 1)]
        top = max(logs)
        return math.exp(top) * sum(math.exp(v - top) for v in logs)

    low, high = events / trials, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if cdf(middle) > risk else (low, middle)
    return high
