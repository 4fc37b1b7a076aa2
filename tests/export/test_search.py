"""The int8 search's decisions, with the build, timing and scoring steps injected (no models built),
and its scoring and budget pieces on real inputs."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest

from export.budget import MIN_SELECTION, plan
from export.dataset import Example
from export.gate import Gate, upper_bound
from export.quantize import QuantizationSettings
from export.resolve import ExportError
from export.search import PASS_RISK, Scorer, Search, recipes
from export.validate import Encoded, Pool, ort_runner, ort_session
from service.classifier import Classifier
from tests.export.tiny import WORDS, build_checkpoint

SELECTION = 2000
ALL = [r.name for r in recipes(QuantizationSettings(), reduce_range=False)]
DYNAMIC, PER_TOKEN, PER_TENSOR, REDUCED, FUSED, STATIC, WEIGHT_ONLY = ALL


class FakeSteps:
    """Candidates with set speeds and disagreements; records what the search asked for."""

    selection_size, test_size = SELECTION, 500

    def __init__(self, tmp: Path, speed: dict[str, float], flips: dict[str, int], broken: tuple[str, ...] = (),
                 ladder_flips: dict[int, int] | None = None, slow_build: float = 0.0) -> None:
        self.tmp, self.speed, self.flips, self.broken = tmp, speed, flips, broken
        self.ladder_flips = ladder_flips or {}  # two-pass MatMul count: flips
        self.slow_build = slow_build
        self.built: list[str] = []
        self.timed: list[str] = []
        self.scored: list[str] = []
        self.names: dict[Path, str] = {}

    def build(self, recipe, output: Path) -> Path:
        if recipe.name in self.broken:
            raise RuntimeError("the quantizer cannot handle this graph")
        time.sleep(self.slow_build)
        output.mkdir(parents=True, exist_ok=True)
        (output / "model.onnx").write_bytes(b"x" * (100 + len(self.built)))
        self.built.append(recipe.name)
        self.names[output / "model.onnx"] = recipe.name
        self.recipe = {**getattr(self, "recipe", {}), recipe.name: recipe}
        return output / "model.onnx"

    def _speed(self, name: str) -> float:
        if name in self.speed:
            return self.speed[name]
        return 1.5 - 0.05 * len(self.recipe[name].two_pass) - 0.1 * len(self.recipe[name].exclude)

    def quick_speedup(self, model: Path) -> float:
        return self._speed(self.names[model])

    def latency(self, model: Path) -> dict:
        name = self.names[model]
        self.timed.append(name)
        return {"batch1_ms": 1.0, "batch8_ms": 8.0 / self._speed(name), "batch8_speedup": self._speed(name)}

    def select(self, key: str, model: Path, label: str) -> dict:
        name = self.names[model]
        self.scored.append(name)
        flips = self.flips.get(name)
        if flips is None:
            flips = self.ladder_flips.get(len(self.recipe[name].two_pass), 50)
        return {"agreement": 1 - flips / SELECTION, "accuracy_drop": 0.0, "inputs": SELECTION, "of": SELECTION}

    def confirm(self, key: str, model: Path) -> dict:
        return {"agreement": 0.999, "accuracy_drop": 0.0, "inputs": 500, "of": 500}

    def weight_matmuls(self) -> list[str]:
        return [f"MatMul_{i}" for i in range(12)]

    def sensitivity_of(self, base, nodes, node: str) -> float:
        return int(node.split("_")[1]) / 100  # MatMul_11 is the most sensitive


def _search(tmp_path: Path, steps: FakeSteps, mode: str = "auto", **kw) -> tuple[Path | None, dict, Search]:
    searched = Search(QuantizationSettings(mode=mode, target="avx2"), steps, Gate(), tmp_path, **kw)
    chosen, record = searched.run()
    return chosen, record, searched


def _by_name(record: dict) -> dict[str, dict]:
    return {c["name"]: c for c in record["candidates"]}


def test_the_fastest_passing_candidate_wins_and_slower_ones_are_not_scored(tmp_path):
    speed = {DYNAMIC: 2.0, PER_TOKEN: 1.9, PER_TENSOR: 1.6, REDUCED: 2.1, FUSED: 1.2, STATIC: 1.3, WEIGHT_ONLY: 0.6}
    flips = dict.fromkeys(ALL, 2) | {REDUCED: 40}  # the fastest misses (more than 10 of 2,000 differ)
    steps = FakeSteps(tmp_path, speed, flips)
    chosen, record, _ = _search(tmp_path, steps)
    assert record["chosen"] == DYNAMIC and record["served"] == "int8" and chosen is not None
    assert steps.scored == [REDUCED, DYNAMIC]  # fastest first
    candidates = _by_name(record)
    # per-token is not clearly slower: timed precisely, then not scored as it is not faster
    assert PER_TOKEN in steps.timed and candidates[PER_TOKEN]["skipped"].startswith("not faster")
    # below 0.85 x 2.0: not even timed precisely
    for name in (PER_TENSOR, FUSED, STATIC):
        assert candidates[name]["skipped"].startswith("clearly slower") and name not in steps.timed
    assert "selection" not in candidates[WEIGHT_ONLY] and "slower than fp32" in candidates[WEIGHT_ONLY]["skipped"]
    assert record["sensitivity"] == [] and record["test"]["passed"]


def test_a_missing_per_token_recipe_starts_the_ladder_which_stops_at_the_first_step_that_passes(tmp_path):
    speed = {DYNAMIC: 2.0, PER_TOKEN: 1.9, PER_TENSOR: 1.8, REDUCED: 1.8, FUSED: 1.2, STATIC: 1.3, WEIGHT_ONLY: 0.6}
    steps = FakeSteps(tmp_path, speed, dict.fromkeys(ALL, 30), ladder_flips={1: 30, 2: 20, 4: 5, 6: 1})
    chosen, record, _ = _search(tmp_path, steps)
    ranking = [r["node"] for r in record["sensitivity"]]
    assert ranking == [f"MatMul_{i}" for i in range(11, -1, -1)]  # worst first
    ladder = record["candidates"][7:]
    assert [len(c["two_pass_nodes"]) for c in ladder] == [1, 2, 4]  # 1/12, 1/6, 1/3 of 12; 4 passes
    assert ladder[-1]["two_pass_nodes"] == ranking[:4] and ladder[-1]["passed"]
    assert record["chosen"] == ladder[-1]["name"] and record["passed"]


def test_nothing_passing_keeps_the_best_or_serves_fp32_when_asked(tmp_path):
    speed = dict.fromkeys(ALL, 2.0)
    flips = {name: 30 + i for i, name in enumerate(ALL)}
    chosen, record, _ = _search(tmp_path / "best", FakeSteps(tmp_path, speed, flips), mode="dynamic")
    assert not record["passed"] and record["chosen"] == DYNAMIC and record["why"].startswith("no candidate")
    chosen, record, _ = _search(tmp_path / "fp32", FakeSteps(tmp_path, speed, flips), mode="dynamic", on_miss="fp32")
    assert chosen is None and record["served"] == "fp32" and "--on-miss fp32" in record["why"]


def test_int8_slower_than_fp32_is_not_served_in_auto(tmp_path):
    steps = FakeSteps(tmp_path, dict.fromkeys(ALL, 0.8), dict.fromkeys(ALL, 0))
    chosen, record, _ = _search(tmp_path, steps)
    assert chosen is None and record["served"] == "fp32" and "slower than fp32" in record["why"]


def test_a_recipe_that_cannot_be_built_is_recorded_and_none_at_all_is_an_error(tmp_path):
    steps = FakeSteps(tmp_path, dict.fromkeys(ALL, 2.0), dict.fromkeys(ALL, 0), broken=(DYNAMIC,))
    _, record, _ = _search(tmp_path / "one", steps)
    assert "RuntimeError" in _by_name(record)[DYNAMIC]["error"] and record["chosen"] != DYNAMIC
    with pytest.raises(ExportError, match="no quantization candidate could be built"):
        _search(tmp_path / "none", FakeSteps(tmp_path, {}, {}, broken=tuple(ALL)))


def test_past_the_deadline_optional_work_is_left_out_and_said(tmp_path):
    steps = FakeSteps(tmp_path, dict.fromkeys(ALL, 2.0), dict.fromkeys(ALL, 30), slow_build=0.05)
    _, record, _ = _search(tmp_path, steps, deadline=time.monotonic() + 0.01)
    assert steps.built == [DYNAMIC]  # the first candidate is always built; the rest waited on the deadline
    left_out = record["not_done_for_the_budget"]
    assert any(PER_TOKEN in item for item in left_out) and record["sensitivity"] == []
    # nothing passed: with --on-miss fp32 the reason says what the budget left out
    steps = FakeSteps(tmp_path, dict.fromkeys(ALL, 2.0), dict.fromkeys(ALL, 30), slow_build=0.05)
    _, record, _ = _search(tmp_path / "fp32", steps, on_miss="fp32", deadline=time.monotonic() + 0.01)
    assert record["served"] == "fp32" and "the budget left out building" in record["why"]


def test_a_sensitivity_pass_that_cannot_fit_the_deadline_gives_up_early(tmp_path):
    steps = FakeSteps(tmp_path, dict.fromkeys(ALL, 2.0), dict.fromkeys(ALL, 30))
    slow = steps.sensitivity_of
    calls = []

    def sensitivity_of(base, nodes, node):
        calls.append(node)
        time.sleep(0.2)
        return slow(base, nodes, node)

    steps.sensitivity_of = sensitivity_of
    _, record, _ = _search(tmp_path, steps, deadline=time.monotonic() + 1.0)  # 12 MatMuls x 0.2 s do not fit
    assert len(calls) < 12 and record["sensitivity"] == []
    assert any("the pass needs about" in item for item in record["not_done_for_the_budget"])
    assert all(not c["two_pass_nodes"] for c in record["candidates"] if "two_pass_nodes" in c)


def test_upper_bound_is_clopper_pearsons():
    # no events in n trials: the bound solves (1 - p)^n = risk
    assert upper_bound(0, 100, 0.05) == pytest.approx(1 - 0.05 ** (1 / 100), rel=1e-6)
    # at the bound, seeing this few events or fewer has probability `risk` (the exact binomial sum)
    for events, trials, risk in ((3, 1000, 0.05), (12, 4000, 1e-4), (0, 2048, 3e-4)):
        p = upper_bound(events, trials, risk)
        tail = sum(math.comb(trials, k) * p ** k * (1 - p) ** (trials - k) for k in range(events + 1))
        assert tail == pytest.approx(risk, rel=1e-4)
    assert upper_bound(5, 5, 0.05) == 1.0 and upper_bound(1, 100, 0.001) > upper_bound(1, 100, 0.05)


def test_the_plan_keeps_everything_when_it_fits_and_cuts_every_split_alike_when_not():
    now = time.monotonic()
    roomy = plan(10, now, 0.001, selection=11000, test=4000, calibration=128)
    assert roomy.fraction == 1.0 and (roomy.selection, roomy.test) == (11000, 4000)
    tight = plan(10, now, 0.040, selection=11000, test=4000, calibration=128)
    assert MIN_SELECTION <= tight.selection < 11000 and tight.test == math.ceil(tight.fraction * 4000)
    assert tight.search_deadline < tight.end == pytest.approx(now + 600, abs=1)
    assert plan(10, now, 10.0, selection=11000, test=4000, calibration=128).selection == MIN_SELECTION
    # without --budget: planned for the default minutes, and the search is not cut short
    default = plan(None, now, 0.040, selection=11000, test=4000, calibration=128)
    assert default.search_deadline is None and default.selection == tight.selection and not default.explicit


# -- scoring on real inputs ---------------------------------------------------------------------------

def _example(text: str) -> Example:
    return Example(text=text, label=None, domain="file")


def _texts(count: int, seed: int = 3) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 30)))) for _ in range(count)]


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_the_service_encodes_as_the_tokenizer_pads(tmp_path, family):
    """The pool's batches (the service's encode and collate) equal transformers' tokenizer(padding=True)."""
    from transformers import AutoTokenizer

    from export.convert import export_fp32

    checkpoint = build_checkpoint(tmp_path / family, family)
    classifier = Classifier(export_fp32(checkpoint, tmp_path / "onnx").parent, verify=False)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    texts = _texts(40) + [" ".join(WORDS) * 20]  # one past max_length: truncated
    for inputs in (texts, list(zip(texts, reversed(texts), strict=True))):
        encoded = Encoded(classifier, inputs)
        picked = [5, 0, 17, 33, 40]
        firsts = [inputs[i] if isinstance(inputs[i], str) else inputs[i][0] for i in picked]
        seconds = None if isinstance(inputs[0], str) else [inputs[i][1] for i in picked]
        expected = tokenizer(firsts, seconds, padding=True, truncation=True, max_length=classifier.max_length,
                             return_tensors="np")
        batch = encoded.batch(picked)
        assert set(batch) <= set(expected) and "input_ids" in batch
        for name in batch:
            np.testing.assert_array_equal(batch[name], expected[name])


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A tiny model's pool of 4,000 selection inputs, scored with fp32."""
    from export.convert import export_fp32

    root = tmp_path_factory.mktemp("scorer")
    checkpoint = build_checkpoint(root / "checkpoint")
    models = {0: export_fp32(checkpoint, root / "onnx")}
    texts = _texts(4136, seed=5)
    parts = {"calibration": [_example(t) for t in texts[:128]],
             "validation": [_example(t) for t in texts[128:4128]], "test_file": [_example(t) for t in texts[4128:]]}
    pool = Pool(Classifier(models[0].parent, verify=False), parts)
    return Scorer(pool, models[0]), models


def test_scoring_stops_early_once_a_pass_is_near_certain(scored):
    scorer, models = scored
    figures = scorer.select("same", ort_runner(ort_session(models[0])), Gate(), "the fp32 model itself")
    # identical model: the bound on its disagreement rate fits the gate at the first look, half-way
    assert figures["agreement"] == 1.0 and figures["of"] == 4000
    assert figures["inputs"] == 2048 and f"{1 - PASS_RISK:.0%}" in figures["stopped"]


def test_scoring_stops_at_once_when_a_miss_is_certain(scored):
    scorer, models = scored
    fp32 = ort_runner(ort_session(models[0]))
    figures = scorer.select("other", lambda batch: fp32(batch)[:, ::-1], Gate(), "every label swapped")
    # every label differs: more than the 20 allowed after the second batch of 16
    assert figures["agreement"] == 0.0 and figures["inputs"] == 32 and "sure to miss" in figures["stopped"]


def test_a_candidate_that_passes_narrowly_is_scored_in_full(scored):
    """15 of 4,000 labels differ (20 allowed): no bound is sure of the pass before the end."""
    scorer, models = scored
    ids = [encoding.ids for encoding in scorer.pool.encoded.encodings]
    long_ones = [i for i in scorer.selection.tolist() if len(ids[i]) > 25]  # long: no duplicates among them
    flipped = {tuple(ids[i]) for i in long_ones[::max(1, len(long_ones) // 15)][:15]}
    assert len(flipped) == 15
    fp32 = ort_runner(ort_session(models[0]))

    def candidate(batch: dict) -> np.ndarray:
        logits = fp32(batch)
        rows = [tuple(row[mask == 1]) for row, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)]
        return np.where(np.array([[row in flipped] for row in rows]), logits[:, ::-1], logits)

    figures = scorer.select("narrow", candidate, Gate(), "a narrow pass")
    assert figures["inputs"] == figures["of"] == 4000 and "stopped" not in figures
    assert figures["agreement"] == pytest.approx(1 - 15 / 4000) and Gate().check(figures)
