"""Keep the MatMuls that int8 hurts most in fp32, as few as needed for the agreement gate.

Dynamic int8 quantizes each activation with one scale per tensor, so its error builds up layer after
layer. Measured on the default model (validation split, agreement with PyTorch): all int8 98.05%;
no single role group (all query projections, all FFN outputs, ...) reached 98.4%; the first two
layers in fp32 98.75%, the first three 99.38%; both FFN MatMuls of every layer 99.10%.

So the search tries candidate exclusion sets in order of how many weights they keep in fp32 (a
proxy for lost speed): nothing, each role group, the first k layers, all FFN MatMuls; it stops at the
first candidate that meets the gate. Every trial is recorded for the manifest.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from export.convert import QuantizationSettings, quantize_dynamic

logger = logging.getLogger(__name__)

LAYER_INDEX = re.compile(r"(layers?[._/])(\d+)")


@dataclass(frozen=True)
class Candidate:
    """A set of MatMul nodes to keep in fp32, and how many weights that keeps unquantized."""

    label: str
    nodes: tuple[str, ...]
    fp32_weights: int


def candidates(fp32_model: Path) -> list[Candidate]:
    """Return exclusion candidates, cheapest (fewest fp32 weights) first."""
    import onnx

    proto = onnx.load(str(fp32_model), load_external_data=False)
    dims = {t.name: [int(d) for d in t.dims] for t in proto.graph.initializer}
    sizes = {name: math.prod(shape) for name, shape in dims.items()}
    matmuls = [n for n in proto.graph.node if n.op_type == "MatMul" and n.name]
    weight = {n.name: sizes.get(n.input[1], 0) for n in matmuls}
    roles: dict[str, list[str]] = {}
    layers: dict[int, list[str]] = {}
    for node in matmuls:
        roles.setdefault(LAYER_INDEX.sub(r"\1*", node.name), []).append(node.name)
        match = LAYER_INDEX.search(node.name)
        if match:
            layers.setdefault(int(match.group(2)), []).append(node.name)

    def make(label: str, nodes: list[str]) -> Candidate:
        return Candidate(label, tuple(nodes), sum(weight[n] for n in nodes))

    found = [make("", [])]
    found += [make(role, nodes) for role, nodes in roles.items()]
    ordered = sorted(layers)
    found += [make(f"layers {ordered[0]}-{k}", [n for i in ordered if i <= k for n in layers[i]])
              for k in ordered[:-1]]
    # FFN MatMuls are the ones whose weight is not square (hidden -> intermediate -> hidden); the
    # classifier head is a Gemm in Optimum's export, so it is not among them.
    ffn = [n.name for n in matmuls if len(dims.get(n.input[1], [])) == 2 and len(set(dims[n.input[1]])) == 2]
    if ffn:
        found.append(make("all FFN MatMuls", ffn))
    unique = {c.nodes: c for c in found}
    return sorted(unique.values(), key=lambda c: (c.fp32_weights, len(c.nodes)))


def search(fp32_model: Path, work: Path, settings: QuantizationSettings, agreement_of: Callable[[Path], float],
           min_agreement: float) -> tuple[Path, dict, dict]:
    """Quantize; while the gate is missed, try the next-cheapest exclusion set; return model, record, log."""
    started = time.monotonic()
    trials: list[dict] = []
    best: tuple[float, Path, dict, Candidate] | None = None
    pool = candidates(fp32_model) if settings.search else [Candidate("", (), 0)]
    for candidate in pool:
        out = work / f"trial-{len(trials)}"
        excluded = [*settings.nodes_to_exclude, *candidate.nodes]
        model, record = quantize_dynamic(fp32_model, out, replace(settings, nodes_to_exclude=excluded))
        agreement = agreement_of(model)
        trials.append({"excluded": candidate.label, "excluded_nodes": len(candidate.nodes),
                       "fp32_weights": candidate.fp32_weights, "agreement": agreement})
        logger.info("      int8 keeping %-45s in fp32 (%3d nodes): agreement %.4f",
                    candidate.label or "nothing", len(candidate.nodes), agreement)
        if best is None or agreement > best[0] or agreement >= min_agreement:
            best = (agreement, model, record, candidate)
        if agreement >= min_agreement:
            break
    agreement, model, record, chosen = best
    final = work / "chosen"
    shutil.copytree(model.parent, final)
    log = {"gate": min_agreement, "trials": trials, "chosen": chosen.label, "excluded_nodes": list(chosen.nodes),
           "final_agreement": agreement, "seconds": round(time.monotonic() - started, 1),
           "order": "candidates by fp32 weights kept, stop at the first that meets the gate"}
    return final / model.name, record, log
