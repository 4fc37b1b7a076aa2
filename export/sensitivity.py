"""Keep the MatMuls that int8 hurts most in fp32, until the int8 model meets the agreement gate.

Dynamic int8 quantizes each activation per tensor, so error builds up layer after layer; no single
layer explains the flips (measured on the default model: excluding any one layer gained <= 0.6 pt).
The MatMuls are grouped by role (the node name with the layer number wildcarded: all FFN outputs,
all query projections, ...); each group is tried alone, and groups are then excluded greedily in
order of measured gain until the gate is met. Every trial is recorded for the manifest.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from export.convert import QuantizationSettings, quantize_dynamic

logger = logging.getLogger(__name__)

LAYER_INDEX = re.compile(r"(layers?[._/])\d+")


def matmul_groups(fp32_model: Path) -> dict[str, list[str]]:
    """Return MatMul node names grouped by role across layers (layer number replaced by '*')."""
    import onnx

    groups: dict[str, list[str]] = {}
    for node in onnx.load(str(fp32_model), load_external_data=False).graph.node:
        if node.op_type == "MatMul" and node.name:
            groups.setdefault(LAYER_INDEX.sub(r"\1*", node.name), []).append(node.name)
    return groups


def search(fp32_model: Path, work: Path, settings: QuantizationSettings, agreement_of: Callable[[Path], float],
           min_agreement: float) -> tuple[Path, dict, dict]:
    """Quantize, and while the gate is missed exclude the most sensitive groups; return model, record, log."""
    started = time.monotonic()
    trials: list[dict] = []

    def trial(label: str, excluded: list[str]) -> tuple[Path, dict, float]:
        out = work / f"trial-{len(trials)}"
        model, record = quantize_dynamic(fp32_model, out, replace(settings, nodes_to_exclude=excluded))
        agreement = agreement_of(model)
        trials.append({"excluded_groups": label, "excluded_nodes": len(excluded), "agreement": agreement})
        logger.info("      int8 with %-40s fp32 nodes %3d: agreement %.4f", label or "nothing", len(excluded),
                    agreement)
        return model, record, agreement

    model, record, agreement = trial("", list(settings.nodes_to_exclude))
    chosen: list[str] = []
    if agreement < min_agreement and settings.search:
        groups = matmul_groups(fp32_model)
        single = {role: trial(role, [*settings.nodes_to_exclude, *nodes]) for role, nodes in groups.items()}
        ranked = [r for r in sorted(single, key=lambda r: -single[r][2]) if single[r][2] > agreement]
        for role in ranked:
            chosen.append(role)
            if len(chosen) == 1:
                model, record, agreement = single[role]
            else:
                nodes = [n for r in chosen for n in groups[r]]
                model, record, agreement = trial(" + ".join(chosen), [*settings.nodes_to_exclude, *nodes])
            if agreement >= min_agreement:
                break
    final = work / "chosen"
    shutil.copytree(model.parent, final)
    log = {"gate": min_agreement, "trials": trials, "excluded_groups": chosen, "final_agreement": agreement,
           "seconds": round(time.monotonic() - started, 1)}
    return final / model.name, record, log
