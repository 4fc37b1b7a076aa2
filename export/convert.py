"""Optimum's own path from a PyTorch checkpoint to fp32 ONNX, and the CPU the int8 model is made for."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

from export.resolve import ExportError, first_line
from service.weights import DATA_FILE

logger = logging.getLogger(__name__)

TARGETS = ("avx512_vnni", "avx512", "avx2", "arm64")


def detect_target(cpuinfo: str | None = None, machine: str | None = None) -> str:
    """Return the quantization target that fits this CPU: avx512_vnni, avx512, avx2 or arm64."""
    machine = (machine or platform.machine()).lower()
    if machine in ("aarch64", "arm64"):
        return "arm64"
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
            break
    if {"avx512_vnni", "avx512vnni", "avx_vnni"} & flags and "avx512f" in flags:
        return "avx512_vnni"
    if "avx512f" in flags and "avx512bw" in flags:
        return "avx512"
    return "avx2"


def export_fp32(checkpoint: Path, output: Path, opset: int | None = None, task: str = "text-classification") -> Path:
    """Export a checkpoint to output/model.onnx with Optimum, for its task (text- or token-classification)."""
    from optimum.exporters.onnx import main_export

    from export.progress import heartbeat

    try:
        # torch's tracer warns about constants it records (the attention mask's); they are expected here
        with heartbeat("exporting"), warnings.catch_warnings(), _stdout_to_stderr():
            warnings.simplefilter("ignore")
            main_export(str(checkpoint), output=output, task=task, opset=opset,
                        library_name="transformers", local_files_only=True, do_validation=True)
    except ValueError as exc:
        # Optimum raises ValueError for unsupported architectures and for failed output validation.
        raise ExportError(f"Optimum could not export {checkpoint}: {first_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - loading and tracing the user's checkpoint, and the opset asked for
        raise ExportError(f"Optimum could not export {checkpoint}{f' at --opset {opset}' if opset else ''}: "
                          f"{_cause(exc)}") from None
    model = output / "model.onnx"
    if not model.is_file():
        raise ExportError(f"Optimum wrote no model.onnx into {output}.")
    return model




def _cause(exc: Exception) -> str:
    """Say why loading or tracing a checkpoint failed, in one line: what is wrong with its files, where known."""
    if isinstance(exc, ModuleNotFoundError) and exc.name in ("tensorflow", "flax", "jax"):
        # transformers falls back to other frameworks' loaders when the weights are not PyTorch's
        return "its weights file cannot be read as PyTorch weights (is it complete?)"
    if type(exc).__name__ == "SafetensorError":
        return f"its safetensors weights cannot be read (is the file complete?): {first_line(exc)}"
    if isinstance(exc, RuntimeError) and "size mismatch" in str(exc):
        mismatch = str(exc)[str(exc).index("size mismatch"):]
        return f"its weights do not match its config.json: {first_line(mismatch)}"
    return f"{type(exc).__name__}: {first_line(exc)}"


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send what the libraries print to stdout (torch prints a graph when tracing fails) to stderr, at the
    descriptor: the export's stdout carries only the model folder."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def write_served(model: Path, target: Path) -> list[Path]:
    """Write an ONNX model to target with its weights in DATA_FILE beside it; return both files.

    onnxruntime memory-maps an external data file and uses the weights where they lie, where it
    copies an inline model's weights into the heap. Only the pages that runs touch become resident
    (of a BERT embedding table, the rows of the tokens that occur), and they are file pages that
    processes on one machine share and the kernel can drop. Tensors under 1 KiB stay inline.
    """
    import onnx

    proto = onnx.load(str(model))  # with any external data of its own (a model over 2 GB has some)
    onnx.save_model(proto, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)
    written = [path for path in (target, target.parent / DATA_FILE) if path.is_file()]
    for path in written[1:]:  # onnx writes the data file owner-only: readable as the graph is, for the service
        path.chmod(target.stat().st_mode & 0o777)
    return written


def opset_of(model: Path) -> int:
    """Return the default-domain opset of an ONNX file."""
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), -1)
