"""The int8 recipes the export can apply to an fp32 ONNX model, each recorded as it was made.

onnxruntime's quantization API is called directly rather than through Optimum's ORTQuantizer, because
ORTQuantizer passes no extra options: it cannot keep activation-by-activation MatMuls in fp32
(`MatMulConstBOnly`) nor quantize a fused graph (`DefaultTensorType`, see fused_graph below).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from export.convert import TARGETS, detect_target
from export.pertoken import SMOOTHING_ALPHA
from export.resolve import ExportError

logger = logging.getLogger(__name__)

T = TypeVar("T")
MODES = ("auto", "dynamic", "per-token", "static", "none")
CALIBRATION_SIZE = 128  # sentences; static ranges barely move past ~100 on the default model


@dataclass
class QuantizationSettings:
    """What the user asked for; `auto` searches, `dynamic` and `static` build one candidate."""

    mode: str = "auto"
    target: str = "auto"
    per_channel: bool = True  # measured here: agrees with fp32 far more often, and is not slower
    reduce_range: bool | None = None  # None: on for AVX2 / AVX-512 without VNNI (VPMADDUBSW saturates)
    nodes_to_exclude: list[str] = field(default_factory=list)
    smoothing: float = SMOOTHING_ALPHA  # per-token: SmoothQuant's alpha; 0 turns smoothing off


@dataclass(frozen=True)
class Recipe:
    """One way to make an int8 model: the quantizer, its settings and the MatMuls kept in fp32."""

    name: str
    kind: str  # "dynamic", "per-token", "static" or "weight-only"
    per_channel: bool = True
    reduce_range: bool = False
    fused: bool = False  # quantize the O2-fused graph (Attention -> QAttention)
    exclude: tuple[str, ...] = ()
    two_pass: tuple[str, ...] = ()  # per-token MatMuls that also multiply their input's rounding remainder
    block_size: int = 32  # weight-only blocks
    smoothing: float = 0.0  # per-token: SmoothQuant's alpha, with ranges from the calibration split

    def describe(self) -> dict:
        """Return the settings as they go into the manifest."""
        record = {"name": self.name, "kind": self.kind, "per_channel": self.per_channel,
                  "reduce_range": self.reduce_range, "fused_graph": self.fused, "fp32_nodes": list(self.exclude)}
        if self.kind == "per-token":
            record["two_pass_nodes"] = list(self.two_pass)
            record["smoothing_alpha"] = self.smoothing
        if self.kind == "weight-only":
            record.update(bits=8, block_size=self.block_size, accuracy_level=4)
        record["activation_scales"] = {"dynamic": "per tensor", "per-token": "per token", "static": "calibrated",
                                       "weight-only": "per block"}[self.kind]
        return record


def resolve_target(settings: QuantizationSettings) -> tuple[str, bool]:
    """Return the CPU target and whether weights use 7 bits (reduce_range) on it."""
    target = detect_target() if settings.target == "auto" else settings.target
    if target not in TARGETS:
        raise ExportError(f"--target must be one of auto, {', '.join(TARGETS)}; got {settings.target!r}.")
    if settings.reduce_range and target not in ("avx2", "avx512"):
        raise ExportError(f"reduce_range applies to avx2 and avx512 targets, not {target}.")
    reduce_range = settings.reduce_range
    if reduce_range is None:
        reduce_range = target in ("avx2", "avx512")
    return target, reduce_range


def weight_matmuls(model: Path) -> list[str]:
    """Return the names of the MatMul nodes whose second input is a weight (an initializer)."""
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    weights = {t.name for t in proto.graph.initializer}
    return [n.name for n in proto.graph.node if n.op_type == "MatMul" and n.name and n.input[1] in weights]


def fused_graph(fp32_model: Path, output: Path) -> Path:
    """Return the model after Optimum's O2 fusions (attention, LayerNorm, GELU) for CPU."""
    from optimum.onnxruntime import ORTOptimizer
    from optimum.onnxruntime.configuration import OptimizationConfig

    optimizer = ORTOptimizer.from_pretrained(fp32_model.parent, file_names=[fp32_model.name])
    optimizer.optimize(OptimizationConfig(optimization_level=2, optimize_for_gpu=False), save_dir=output)
    fused = output / f"{fp32_model.stem}_optimized.onnx"
    if not fused.is_file():
        raise ExportError(f"Optimum's optimizer wrote no {fused.name}")
    return fused


def build(recipe: Recipe, source: Path, output: Path, calibration: Sequence[dict[str, np.ndarray]] = (),
          ranges: dict[str, np.ndarray] | None = None) -> Path:
    """Write recipe's int8 model of source (fp32, or O2-fused when recipe.fused) to output/model.onnx.

    A smoothed per-token recipe uses ranges (pertoken.activation_ranges of source), measured on the
    calibration batches when not given.
    """
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    output.mkdir(parents=True, exist_ok=True)
    target = output / "model.onnx"
    # Activation-by-activation MatMuls (attention scores) stay fp32: quantizing them made agreement no
    # better and, with one more DynamicQuantizeLinear each, the model no faster.
    extra = {"MatMulConstBOnly": True}
    exclude = list(recipe.exclude) or None
    if recipe.kind == "dynamic":
        ops = ["MatMul"]
        if recipe.fused:
            ops.append("Attention")
            # The fused graph carries contrib ops whose outputs ONNX shape inference cannot type; without a
            # default type the quantizer stops with "Unable to find data type for weight_name".
            extra["DefaultTensorType"] = onnx.TensorProto.FLOAT
        quantize_dynamic(source, target, op_types_to_quantize=ops, per_channel=recipe.per_channel,
                         reduce_range=recipe.reduce_range, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                         extra_options=extra)
    elif recipe.kind == "per-token":
        from export.pertoken import activation_ranges, rewrite

        if recipe.smoothing and ranges is None:
            if not calibration:
                raise ValueError("smoothing needs calibration batches")
            ranges = activation_ranges(source, calibration)
        changed = rewrite(source, target, exclude=recipe.exclude, two_pass=recipe.two_pass,
                          ranges=ranges if recipe.smoothing else None, alpha=recipe.smoothing)
        logger.debug("per-token int8: %s", changed)
    elif recipe.kind == "static":
        quantize_static(source, target, _Reader(calibration), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["MatMul"], per_channel=recipe.per_channel,
                        reduce_range=recipe.reduce_range, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, nodes_to_exclude=exclude, extra_options=extra)
    elif recipe.kind == "weight-only":
        from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

        # 8-bit weights in blocks; accuracy_level 4 computes in int8 with activations quantized per block,
        # a far finer grain than dynamic int8's one scale per tensor.
        config = DefaultWeightOnlyQuantConfig(block_size=recipe.block_size, is_symmetric=True, accuracy_level=4,
                                              bits=8)
        quantizer = MatMulNBitsQuantizer(onnx.load(str(source)), algo_config=config,
                                         nodes_to_exclude=list(recipe.exclude))
        quantizer.process()
        quantizer.model.save_model_to_file(str(target))
    else:
        raise ValueError(f"unknown recipe kind {recipe.kind!r}")
    return target


class _Reader:
    """Feed calibration batches to onnxruntime's calibrator (its CalibrationDataReader protocol)."""

    def __init__(self, batches: Sequence[dict[str, np.ndarray]]) -> None:
        self._batches = iter(list(batches))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def sample(items: Sequence[T], size: int = CALIBRATION_SIZE, seed: int = 0) -> list[T]:
    """Return a fixed random sample of items (all of them, shuffled, when size >= len(items))."""
    pool = list(items)
    random.Random(seed).shuffle(pool)
    return pool[:size]
