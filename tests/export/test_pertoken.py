"""Per-token int8 (export/pertoken.py) on tiny real models, run by onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from export.convert import detect_target, export_fp32
from export.pertoken import activation_ranges, rewrite
from export.quantize import Recipe, build

# The precision claims below hold where onnxruntime's uint8 x int8 GEMM is exact. Without VNNI (AVX2,
# AVX-512 without VNNI) it sums pairs of products in saturating int16 (VPMADDUBSW), which then swamps the
# small errors these tests compare.
exact_int8_gemm = pytest.mark.skipif(
    detect_target() not in ("avx512_vnni", "arm64"),
    reason=f"this CPU ({detect_target()}) has no VNNI: its int8 GEMM saturates pairs of products")

TEXTS = ["good", "a great film and a superb actor , i love this movie , it is very fun and not dull at all",
         "the plot was bad", "awful"]


@pytest.fixture(scope="module", params=["bert", "distilbert"])
def fp32(request, checkpoints, tmp_path_factory) -> Path:
    return export_fp32(checkpoints(request.param), tmp_path_factory.mktemp(f"fp32-{request.param}"))


def _batch(texts: list[str], tokenizer_dir: Path) -> dict[str, np.ndarray]:
    from transformers import AutoTokenizer

    batch = AutoTokenizer.from_pretrained(tokenizer_dir)(texts, padding=True, return_tensors="np")
    return {k: v.astype(np.int64) for k, v in batch.items()}


def _run(model: Path, texts: list[str], tokenizer_dir: Path, output: str = "logits") -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run([output], {k: v for k, v in _batch(texts, tokenizer_dir).items() if k in names})[0]


def _ops(model: Path) -> list[str]:
    import onnx

    return [node.op_type for node in onnx.load(str(model)).graph.node]


def test_every_weight_matmul_becomes_int8_and_gelu_inputs_are_shifted(fp32, tmp_path):
    from export.quantize import weight_matmuls

    out = tmp_path / "model.onnx"
    changed = rewrite(fp32, out)
    # 2 layers x (query, key, value, attention output, FFN in, FFN out); query, key and value share one
    # quantized input, so 4 activations per layer, of which the FFN output's (after GELU) is shifted
    assert changed == {"matmuls": 12, "activations": 8, "shifted_activations": 2, "smoothed_activations": 0,
                       "two_pass_matmuls": 0}
    assert len(weight_matmuls(fp32)) == 12 and weight_matmuls(out) == []
    assert _ops(out).count("MatMulInteger") == 12 and _ops(out).count("QuantizeLinear") == 8
    assert out.stat().st_size < fp32.stat().st_size


def test_scores_stay_close_to_fp32(fp32, tmp_path):
    out = tmp_path / "model.onnx"
    rewrite(fp32, out)
    reference, quantized = _run(fp32, TEXTS, fp32.parent), _run(out, TEXTS, fp32.parent)
    assert np.abs(quantized - reference).max() < 0.05 * np.abs(reference).max(), (reference, quantized)


def test_a_text_scores_the_same_alone_and_in_a_padded_batch(fp32, tmp_path):
    """One scale per token: a long companion (and its padding) cannot move a short text's result."""
    per_token = tmp_path / "model.onnx"
    rewrite(fp32, per_token)
    alone = np.concatenate([_run(per_token, [t], fp32.parent) for t in TEXTS])
    scale = np.abs(alone).max()  # the tiny random models' logits are small
    assert np.abs(alone - _run(per_token, TEXTS, fp32.parent)).max() < 1e-4 * scale

    # the same check on onnxruntime's dynamic int8 (one scale per tensor) does see the companions
    dynamic = build(Recipe("dynamic", "dynamic"), fp32, tmp_path / "dynamic")
    alone = np.concatenate([_run(dynamic, [t], fp32.parent) for t in TEXTS])
    assert np.abs(alone - _run(dynamic, TEXTS, fp32.parent)).max() > 1e-3 * scale


def test_excluded_matmuls_stay_fp32(fp32, tmp_path):
    from export.quantize import weight_matmuls

    keep = weight_matmuls(fp32)[:3]
    out = tmp_path / "model.onnx"
    assert rewrite(fp32, out, exclude=keep)["matmuls"] == 9
    assert weight_matmuls(out) == keep


def test_an_old_opset_is_refused(fp32, tmp_path):
    import onnx

    proto = onnx.load(str(fp32))
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = 12
    old = tmp_path / "old.onnx"
    onnx.save(proto, str(old))
    with pytest.raises(ValueError, match="opset >= 13"):
        rewrite(old, tmp_path / "model.onnx")


@exact_int8_gemm
def test_two_pass_matmuls_multiply_the_remainder_too_and_come_closer_to_fp32(fp32, tmp_path):
    from export.quantize import weight_matmuls

    nodes = weight_matmuls(fp32)
    single, double = tmp_path / "single.onnx", tmp_path / "double.onnx"
    rewrite(fp32, single)
    # an excluded MatMul stays fp32 even when also named two-pass
    changed = rewrite(fp32, double, exclude=nodes[:1], two_pass=nodes[:4])
    assert changed["matmuls"] == 11 and changed["two_pass_matmuls"] == 3
    # nodes[1:4] are layer 0's key, value (one shared input, so one remainder) and attention output
    assert _ops(double).count("MatMulInteger") == 11 + 3 and _ops(double).count("QuantizeLinear") == 8 + 2
    assert weight_matmuls(double) == nodes[:1]

    # against fp32 with the same int8 weights, the activations' rounding is all that is left: the second
    # pass shrinks it ~254-fold (what remains is float rounding)
    everything = tmp_path / "everything.onnx"
    assert rewrite(fp32, everything, two_pass=nodes)["two_pass_matmuls"] == 12
    reference = _run(_with_int8_weights(fp32, tmp_path / "int8-weights.onnx"), TEXTS, fp32.parent)
    error_single = np.abs(_run(single, TEXTS, fp32.parent) - reference).max()
    error_double = np.abs(_run(everything, TEXTS, fp32.parent) - reference).max()
    assert error_double < 0.1 * error_single, (error_single, error_double)


def test_activation_ranges_leave_padding_out(fp32):
    together = activation_ranges(fp32, [_batch(TEXTS, fp32.parent)])  # short texts padded to the long one
    alone = [activation_ranges(fp32, [_batch([text], fp32.parent)]) for text in TEXTS]
    assert len(together) == 8  # the inputs of the 12 weight MatMuls (query, key and value share one)
    for name, peaks in together.items():
        expected = np.max([ranges[name] for ranges in alone], axis=0)
        np.testing.assert_allclose(peaks, expected, rtol=1e-4, atol=1e-6)


@exact_int8_gemm
def test_smoothing_moves_an_outlier_channel_into_the_weights(fp32, tmp_path):
    """One channel 40x the others sets every token's scale; divided out, the rest keep their steps."""
    import onnx
    from onnx import numpy_helper

    # an fp32 model whose first LayerNorm output (the embeddings', read by layer 0's query, key and value
    # and by the residual) has one channel 40x larger: a real model's outlier channel
    proto = onnx.load(str(fp32))
    norm = next(node for node in proto.graph.node if node.op_type == "LayerNormalization")
    for tensor in proto.graph.initializer:
        if tensor.name in norm.input[1:]:
            values = numpy_helper.to_array(tensor).copy()
            values[0] *= 40.0
            tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    # compared where the outlier acts: the output of a MatMul that reads it (the logits of a tiny random
    # model barely move)
    weights = {tensor.name for tensor in proto.graph.initializer}
    product = next(node.output[0] for node in proto.graph.node
                   if node.op_type == "MatMul" and node.input[0] == norm.output[0] and node.input[1] in weights)
    proto.graph.output.append(onnx.helper.make_tensor_value_info(product, onnx.TensorProto.FLOAT, None))
    outlier = tmp_path / "outlier.onnx"
    onnx.save(proto, str(outlier))
    ranges = activation_ranges(outlier, [_batch(TEXTS, fp32.parent)])
    peaks = ranges[norm.output[0]]
    assert peaks[0] > 10 * np.median(peaks)

    plain, smoothed = tmp_path / "plain.onnx", tmp_path / "smoothed.onnx"
    rewrite(outlier, plain)
    changed = rewrite(outlier, smoothed, ranges=ranges, alpha=0.5)
    # every input quantized symmetrically (query/key/value's, the attention output's, the FFN's first
    # MatMul's), not the GELU outputs: one Mul each
    assert changed["smoothed_activations"] == 6 and changed["shifted_activations"] == 2
    assert _ops(smoothed).count("Mul") == _ops(plain).count("Mul") + 6
    reference = _run(outlier, TEXTS, fp32.parent, product)
    error_plain = np.abs(_run(plain, TEXTS, fp32.parent, product) - reference).mean()
    error_smoothed = np.abs(_run(smoothed, TEXTS, fp32.parent, product) - reference).mean()
    assert error_smoothed < 0.5 * error_plain, (error_plain, error_smoothed)


def test_a_smoothed_recipe_needs_calibration(fp32, tmp_path):
    with pytest.raises(ValueError, match="calibration"):
        build(Recipe("smoothed", "per-token", smoothing=0.5), fp32, tmp_path / "smoothed")
    model = build(Recipe("smoothed", "per-token", smoothing=0.5), fp32, tmp_path / "calibrated",
                  [_batch(TEXTS, fp32.parent)])
    assert _ops(model).count("MatMulInteger") == 12


def _with_int8_weights(fp32: Path, out: Path) -> Path:
    """Write fp32 with every weight MatMul's weight rounded as the rewrite rounds it (per column, int8)."""
    import onnx
    from onnx import numpy_helper

    from export.quantize import weight_matmuls

    proto = onnx.load(str(fp32))
    names = set(weight_matmuls(fp32))
    weights = {node.input[1] for node in proto.graph.node if node.name in names}
    for tensor in proto.graph.initializer:
        if tensor.name in weights:
            weight = numpy_helper.to_array(tensor)
            scale = np.abs(weight).max(axis=0) / 127.0
            scale[scale == 0] = 1.0
            tensor.CopyFrom(numpy_helper.from_array((np.round(weight / scale) * scale).astype(np.float32),
                                                    tensor.name))
    onnx.save(proto, str(out))
    return out
