"""Fit an export into `--budget` minutes: how many inputs the gate and the checks score, said up front.

The budget covers the export proper (ONNX export, int8 search, validation, writing), not obtaining the
model (a download, or training the default recipe). Scoring inputs is what grows with a model's size,
so the plan measures what fp32 takes per input and keeps as much of the selection and test splits as
the budget affords, every split cut by the same fraction (a seeded sample), never below MIN_SELECTION
selection inputs. With --budget the search also gets a deadline for its optional work (candidates not
yet built, the sensitivity pass, ladder steps). Without it the splits are planned for DEFAULT_MINUTES
but the search is not cut short: a model that needs the ladder gets all of it, so the default can
cost time but never the choice. PyTorch's checks get what is left, sampled per set if need be.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

logger = logging.getLogger(__name__)

DEFAULT_MINUTES = 10.0
SCORING_SHARE = 0.45  # of the time left: fp32's reference scores and the candidates' scoring
PYTORCH_SHARE = 0.15  # of the time left: the validation against PyTorch
INT8_COST = 0.6  # an int8 candidate's scoring time per input, as a share of fp32's (it is 0.3-0.6 here)
EXPECTED_SCORINGS = 2  # candidates scored on the whole selection split, planned for
MIN_SELECTION = 2000  # below this one flip is more than 0.05 pt of agreement


@dataclass
class Plan:
    """What the export will score, and by when the search must stop optional work."""

    minutes: float
    fraction: float  # of the selection and test splits kept
    selection: int
    selection_available: int
    test: int
    test_available: int
    fp32_ms_per_input: float
    search_deadline: float | None  # time.monotonic(); None: the search is not cut short
    end: float  # time.monotonic() the whole export should be done by
    explicit: bool = True  # --budget was given

    def describe(self) -> dict:
        """Return the plan as it goes into the manifest, with what it costs in certainty."""
        return {"budget_minutes": self.minutes, "given": self.explicit,
                "search_cut_short": self.search_deadline is not None,
                "fp32_ms_per_input": round(self.fp32_ms_per_input, 2),
                "selection_inputs": self.selection, "selection_available": self.selection_available,
                "test_inputs": self.test, "test_available": self.test_available,
                "agreement_margin_95": round(self.margin(), 5)}

    def margin(self) -> float:
        """Return the 95% half-width of an agreement near the gate's measured on the selection inputs."""
        return 1.96 * math.sqrt(0.005 * 0.995 / max(1, self.selection))

    def say(self) -> None:
        """Log what the export will do within the budget."""
        kept = (f"all {self.selection:,}" if self.fraction >= 1.0
                else f"{self.selection:,} of the {self.selection_available:,}")
        logger.info("      budget %.0f min%s: the gate scores %s selection inputs (agreement known to +-%.2f pt "
                    "at 95%%), the test split %s of %s; fp32 takes %.1f ms per input", self.minutes,
                    "" if self.explicit else " (the default; the search is not cut short)", kept,
                    self.margin() * 100, f"{self.test:,}", f"{self.test_available:,}", self.fp32_ms_per_input)
        if self.fraction < 1.0:
            logger.info("      a larger --budget scores more of them: about %.0f min would score all",
                        self.minutes / self.fraction)

    def pytorch_seconds(self) -> float:
        """Return the seconds PyTorch's checks may take from now: most of what is left, at least its share.

        The floor keeps a PyTorch check of some thousands of inputs on a small model even when the
        search ran past the plan.
        """
        return max(0.8 * max(0.0, self.end - time.monotonic()), PYTORCH_SHARE * self.minutes * 60)


def plan(minutes: float | None, started: float, fp32_seconds_per_input: float, selection: int, test: int,
         calibration: int) -> Plan:
    """Return the plan for an export whose budgeted part began at `started` (time.monotonic()).

    minutes None: no --budget; plan for DEFAULT_MINUTES, without a deadline for the search.
    """
    explicit = minutes is not None
    minutes = minutes if explicit else DEFAULT_MINUTES
    now = time.monotonic()
    left = max(0.0, minutes * 60 - (now - started))
    per_input = max(fp32_seconds_per_input, 1e-6)
    affordable = SCORING_SHARE * left / per_input - calibration  # fp32-input equivalents
    need = (1 + INT8_COST * EXPECTED_SCORINGS) * selection + (1 + INT8_COST) * test
    fraction = 1.0 if need <= 0 else min(1.0, max(0.0, affordable) / need)
    kept_selection = selection if fraction >= 1.0 else min(selection, max(MIN_SELECTION, int(fraction * selection)))
    fraction = kept_selection / selection if selection else 1.0
    kept_test = test if fraction >= 1.0 else max(1, min(test, math.ceil(fraction * test)))
    end = started + minutes * 60
    return Plan(minutes=minutes, fraction=fraction, selection=kept_selection, selection_available=selection,
                test=kept_test, test_available=test, fp32_ms_per_input=per_input * 1000,
                search_deadline=end - PYTORCH_SHARE * left if explicit else None, end=end, explicit=explicit)
