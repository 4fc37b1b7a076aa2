"""The export, stage by stage: source -> ONNX fp32 -> int8 -> validation -> model folder."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from export import manifest, progress
from export.budget import Plan, plan
from export.convert import export_fp32, opset_of, write_served
from export.dataset import Example, load_splits, read_text_file
from export.gate import Gate
from export.quantize import CALIBRATION_SIZE, QuantizationSettings, resolve_target, sample
from export.resolve import ExportError, Source, check_classifier, resolve
from service import tasks
from service.config import usable_cores

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "merges.txt", "vocab.json", "sentencepiece.bpe.model", "spiece.model", "added_tokens.json")
TEST_SET_CAP = 1000  # per out-of-domain test set: bounds validation time, still +-1.5 pt at 95%


@dataclass
class ExportOptions:
    """What the user asked for (see `python -m export --help`)."""

    model: str | None  # hub id or local folder; None: the default sentiment recipe
    name: str | None = None
    output_dir: Path = Path("onnx_models")
    revision: str | None = None
    force: bool = False
    quantization: QuantizationSettings = field(default_factory=QuantizationSettings)
    min_agreement: float = Gate.min_agreement  # label agreement with the fp32 model on the selection split
    max_accuracy_drop: float = Gate.max_accuracy_drop  # accuracy below fp32's on the selection split
    on_miss: str = "best"  # auto, when no candidate meets the gate: "best" int8, or "fp32"
    enforce_gate: bool = True
    validation_file: Path | None = None
    pairs: bool = False  # a pair model: validation_file holds text pairs
    task: str | None = None  # None: detected from the checkpoint (service.tasks.detect)
    # zero-shot: the labels and template its int8 gate ranks (the user's own; None: PROBE_LABELS, the default)
    candidate_labels: tuple[str, ...] | None = None
    hypothesis_template: str | None = None
    opset: int | None = None
    retrain: bool = False
    budget_minutes: float | None = None  # --budget; None: planned for budget.DEFAULT_MINUTES, search not cut
    quiet: bool = False  # the command line's --quiet: warnings and errors only


# Set by the command line's SIGINT/SIGTERM handler. Library code can swallow a KeyboardInterrupt (a
# bare `except:` around an import, for one), so each stage boundary and the final rename check this too.
STOP = threading.Event()


class Interrupted(KeyboardInterrupt):
    """The export was asked to stop."""


def _check_stop() -> None:
    if STOP.is_set():
        raise Interrupted


class Stages:
    """Announce each stage with its number and elapsed time, so a long export is never silent."""

    def __init__(self, total: int) -> None:
        self.total, self.count, self.started = total, 0, time.monotonic()
        self.timings: dict[str, float] = {}
        self._current: tuple[str, float] | None = None

    def next(self, title: str) -> None:
        _check_stop()
        self._close()
        self.count += 1
        logger.info("[%d/%d] %s", self.count, self.total, title)
        # a stage's own quiet stretches (imports, loading a model) get status lines too
        self._current = (title, time.monotonic(), progress.begin(f"[{self.count}/{self.total}] {title}"))

    def _close(self) -> None:
        if self._current:
            title, started, activity = self._current
            progress.end(activity)
            self.timings[title] = round(time.monotonic() - started, 1)
            self._current = None

    def finish(self) -> float:
        self._close()
        return round(time.monotonic() - self.started, 1)


NAME_BYTES = 200  # a folder name, with room for the .tmp- prefixes beside it within the file system's 255


def default_name(model: str | None) -> str:
    """Return the folder name for a model: the recipe's name, a hub id's name, or a folder's name."""
    from export.recipe import DEFAULT_NAME

    if model is None:
        return DEFAULT_NAME
    return Path(model.rstrip("/")).name or "model"


def _examples(options: ExportOptions) -> list[Example]:
    """Return the inputs of --validation-file, or raise ExportError saying why they cannot be read."""
    path = options.validation_file
    assert path is not None
    if not path.exists():
        raise ExportError(f"--validation-file {path} does not exist.")
    if not path.is_file():
        raise ExportError(f"--validation-file {path} is not a file.")
    try:
        return read_text_file(path, pairs=options.pairs)
    except UnicodeDecodeError as exc:
        raise ExportError(f"--validation-file {path} is not UTF-8 text (byte {exc.start}: {exc.reason}).") from None
    except OSError as exc:
        raise ExportError(f"--validation-file {path} cannot be read: {exc.strerror or exc}.") from None
    except ValueError as exc:
        raise ExportError(str(exc)) from None


def validation_sets(options: ExportOptions) -> dict[str, list[Example]]:
    """Return the calibration split, the selection split ("validation", the gate) and the test sets."""
    if options.validation_file is not None:
        examples = _examples(options)
        if len(examples) < 4:
            raise ExportError(f"--validation-file {options.validation_file} needs at least 4 inputs "
                              f"(calibration, selection and test splits are drawn from it); it has {len(examples)}.")
        # a quarter (at most CALIBRATION_SIZE) calibrates; the rest is halved into selection and test
        shuffled = sample(examples, size=len(examples))
        cut = min(CALIBRATION_SIZE, len(examples) // 4)
        rest = shuffled[cut:]
        return {"calibration": shuffled[:cut], "validation": rest[:len(rest) // 2],
                "test_file": rest[len(rest) // 2:]}
    splits = load_splits()
    # Calibration comes from the training split: the selection and test splits stay unseen by the quantizer.
    sets = {"calibration": sample(splits.train), "validation": splits.validation}
    for domain, examples in splits.test.items():
        sets[f"test_{domain}"] = examples if domain == "movie" else examples[:TEST_SET_CAP]
    # The out-of-domain snippets past the test cap join the selection split: at 2,560 inputs one flip is
    # 0.04 pt and the gate's 0.5 pt budget is within noise (a candidate that agreed on 99.57% of them agreed
    # on 99.35% of these 8,598); a larger selection split keeps a lucky candidate from being chosen.
    sets["selection_extra"] = [e for domain, examples in splits.test.items() if domain != "movie"
                               for e in examples[TEST_SET_CAP:]]
    return sets


# Labels a zero-shot model is asked about when the validation inputs are single texts and the user named
# none (--candidate-labels): what it reads in service is (text, hypothesis) pairs, and these cover topics
# and sentiment.
PROBE_LABELS = ("positive", "negative", "sports", "politics", "technology")


def probe(options: ExportOptions) -> tuple[list[str], str]:
    """Return the candidate labels and the hypothesis template a zero-shot model's gate ranks."""
    return (list(options.candidate_labels or PROBE_LABELS), options.hypothesis_template or tasks.DEFAULT_TEMPLATE)


def hypotheses(examples: list[Example], labels: Sequence[str], template: str) -> list[Example]:
    """Return each single text paired with the hypothesis of every label, as zero-shot reads it."""
    return [Example(text=e.text, label=None, domain=e.domain, text_pair=template.format(label))
            for e in examples for label in labels]


def _pool(fp32: Path, sets: dict[str, list[Example]]):
    """Encode every input of the export once, with the service's own code for the exported folder."""
    from export.validate import Pool
    from service.classifier import Classifier, ModelLoadError

    try:
        classifier = Classifier(fp32.parent, intra_op_threads=usable_cores(), verify=False)
    except ModelLoadError as exc:  # what the service could not serve is not worth quantizing
        raise ExportError(f"the service cannot load the exported model: {exc}") from None
    return Pool(classifier, sets)


def _plan(options: ExportOptions, pool, fp32: Path, started: float) -> Plan:
    """Time fp32 on a sample, plan the scoring to fit the budget, and cut the splits to the plan."""
    from export.quantize import sample
    from export.validate import BATCH_SIZE

    selection = pool.indices("validation", "selection_extra")
    tests = [name for name in pool.parts if name.startswith("test")]
    run = pool.classifier.run  # fp32 as the service runs it
    probe = sample(selection.tolist(), size=3 * BATCH_SIZE)
    pool.score("onnx_fp32", run, probe[:BATCH_SIZE])  # the first runs allocate: not timed
    began = time.perf_counter()
    pool.score("onnx_fp32", run, probe[BATCH_SIZE:])
    per_input = (time.perf_counter() - began) / max(1, len(probe) - BATCH_SIZE)
    budget = plan(options.budget_minutes, started, per_input, len(selection), len(pool.indices(*tests)),
                  len(pool.indices("calibration")))
    if budget.fraction < 1.0:
        for name in ("validation", "selection_extra", *tests):
            if name in pool.parts:
                kept = max(1, round(budget.fraction * len(pool.parts[name])))
                pool.parts[name] = np.sort(np.array(sample(pool.parts[name].tolist(), size=kept), dtype=np.int64))
        budget.selection = len(pool.indices("validation", "selection_extra"))
        budget.test = len(pool.indices(*tests))
    budget.say()
    return budget


def _check_task_options(config: dict, task: str, path: Path, options: ExportOptions) -> None:
    """Raise ExportError if the checkpoint cannot do the task, or an option does not apply to it."""
    check_task(config, task, path)
    if task == tasks.TOKEN_CLASSIFICATION and options.pairs:
        raise ExportError("--pairs does not apply to token classification: it tags the tokens of single texts.")
    if (options.candidate_labels or options.hypothesis_template) and (
            task != tasks.ZERO_SHOT_CLASSIFICATION or options.pairs):
        raise ExportError("--candidate-labels and --hypothesis-template apply to a zero-shot model exported from "
                          f"single texts: this export is {task}{' from text pairs' if options.pairs else ''}.")


def _preflight(options: ExportOptions) -> tuple[str, Path, list[Example] | None]:
    """Return the folder's name and path and the --validation-file's inputs (None without one), or raise
    ExportError for what the options alone show to be wrong."""
    name = options.name if options.name is not None else default_name(options.model)
    if options.model is not None and options.retrain:
        raise ExportError("--retrain applies to the default model (no --model): it retrains its recipe.")
    if options.revision is not None and (options.model is None or Path(options.model).exists()):
        raise ExportError("--revision applies to a Hugging Face Hub id, not the default model or a local folder.")
    if not name or name.startswith(".") or "/" in name or "\\" in name or len(name.encode()) > NAME_BYTES:
        raise ExportError(f"--name {name[:80]!r} must be a plain folder name of at most {NAME_BYTES} bytes, not "
                          "starting with a dot.")
    if options.quantization.mode != "none":
        resolve_target(options.quantization)  # --reduce-range for a target without it fails now, not after minutes
    if options.pairs and options.validation_file is None:
        raise ExportError("--pairs needs --validation-file with text pairs ('text<TAB>text_pair' or "
                          "'LABEL<TAB>text<TAB>text_pair' per line): the default snippets are single texts.")
    # read now: a missing or unreadable file fails before minutes of work
    examples = _examples(options) if options.validation_file is not None else None
    target = (options.output_dir / name).resolve()
    if target.exists() and not options.force:
        raise ExportError(f"{target} already exists; pass --force (make export ... EXPORT_ARGS=--force) "
                          f"to replace it, or choose another --name.")
    existing = options.output_dir.absolute()
    while not existing.exists():  # made only once the model is known: a failed export leaves no folder
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ExportError(f"--output-dir {options.output_dir} cannot hold the model folder: {existing} is "
                          f"{'not a folder' if not existing.is_dir() else 'not writable'}.")
    return name, target, examples


def _work_folder(options: ExportOptions, name: str) -> Path:
    """Make the output folder and, inside it, the export's temporary folder; return the latter."""
    try:
        options.output_dir.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=options.output_dir, prefix=f".tmp-{name}-"))
    except OSError as exc:
        raise ExportError(f"--output-dir {options.output_dir} cannot hold the model folder: "
                          f"{exc.strerror or exc}.") from None


def _check_source(options: ExportOptions, source: Source, config: dict, task: str, target: Path,
                  examples: list[Example] | None) -> None:
    """Raise ExportError if writing target would delete the checkpoint; warn when the validation file's labels
    (examples: its inputs) are not the model's."""
    checkpoint = source.path.resolve()
    if checkpoint == target or target in checkpoint.parents:
        raise ExportError(f"{target} holds the checkpoint being exported ({checkpoint}); replacing it would delete "
                          "the checkpoint. Choose another --output-dir or --name.")
    if examples is None or task == tasks.TOKEN_CLASSIFICATION:
        return
    labels = [str(label) for label in (config.get("id2label") or {}).values()]
    known = {label.lower() for label in labels}  # as validate.true_labels matches them
    labelled = [e.label for e in examples if e.label is not None]
    unknown = sorted({label for label in labelled if label.lower() not in known})
    if unknown:  # such inputs count as unlabelled (a file may serve several models): say so, once
        left = sum(label.lower() in known for label in labelled)
        logger.warning("--validation-file %s labels inputs %s%s, which are not the model's labels (%s): those "
                       "inputs count as unlabelled; %s", options.validation_file, ", ".join(unknown[:5]),
                       " ..." if len(unknown) > 5 else "", ", ".join(labels),
                       f"accuracy is measured on the {left} labelled with them" if left else
                       "no input has a label of the model's, so the gate checks agreement only, not accuracy")


def run(options: ExportOptions) -> Path:
    """Export, validate and write onnx_models/<name>/; return the folder. Raise ExportError on failure."""
    name, target, examples = _preflight(options)
    stages = Stages(total=5)
    stages.next("locating the model")
    source = _locate(options)
    config = check_classifier(source.path)
    task = options.task or tasks.detect(config)
    _check_task_options(config, task, source.path, options)
    _check_source(options, source, config, task, target, examples)
    logger.info("      %s (%s, %s, labels %s)", source.path, config.get("model_type"), task,
                ", ".join(str(v) for v in (config.get("id2label") or {}).values()))

    budget_started = time.monotonic()  # the budget covers the export proper, not obtaining the model
    work = _work_folder(options, name)
    try:
        stages.next("exporting to ONNX (fp32) with Optimum")
        fp32 = export_fp32(source.path, work / "fp32", opset=options.opset,
                           task="token-classification" if task == tasks.TOKEN_CLASSIFICATION else "text-classification")
        exported_config = json.loads((fp32.parent / "config.json").read_text(encoding="utf-8"))

        if task == tasks.TOKEN_CLASSIFICATION:
            models, quant_record, report, max_length = _tag_stages(options, stages, source, fp32, work)
            budget_record = None
        else:
            models, quant_record, report, max_length, budget_record = _classify_stages(
                options, stages, source, fp32, work, budget_started, zero_shot=task == tasks.ZERO_SHOT_CLASSIFICATION)
        served = report["served_model"]

        stages.next("writing the model folder")
        folder = work / "final"
        folder.mkdir()
        written = write_served(models[served], folder / "model.onnx")
        for file in ("config.json", *TOKENIZER_FILES):
            if (fp32.parent / file).is_file():
                shutil.copy2(fp32.parent / file, folder / file)
        body = {
            "name": name,
            "task": task,
            "source": source.provenance,
            "model": {"file": "model.onnx", "files": [path.name for path in written],
                      "model_type": exported_config.get("model_type"),
                      "architectures": exported_config.get("architectures"),
                      "id2label": exported_config.get("id2label"), "max_length": max_length,
                      "inputs": "text pairs" if options.pairs else "texts",
                      "opset": opset_of(folder / "model.onnx"),
                      "size_bytes": sum(path.stat().st_size for path in written),
                      "fp32_size_bytes": fp32.stat().st_size},
            **({"budget": budget_record} if budget_record is not None else {}),
            "quantization": quant_record,
            "validation": report,
            "versions": manifest.package_versions(),
        }
        if task != tasks.TOKEN_CLASSIFICATION:
            _log_summary(report, served)
        if not report["gate"]["passed"] and options.enforce_gate:
            raise ExportError(_gate_missed(options, report, quant_record))
        body["timings_s"] = {**stages.timings}
        body["timings_s"]["total"] = stages.finish()
        manifest.write(folder, body)
        _check_stop()
        _replace(folder, target)
        logger.info("wrote %s in %.0f s", target, body["timings_s"]["total"])
        return target
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _locate(options: ExportOptions) -> Source:
    """Return the checkpoint to export: the hub id or folder asked for, else the default model's recipe."""
    if options.model is not None:
        return resolve(options.model, options.revision)
    from export.recipe import ensure_checkpoint

    checkpoint = ensure_checkpoint(retrain=options.retrain)
    recipe = json.loads((checkpoint / "recipe.json").read_text())
    return Source(path=checkpoint, provenance={"kind": "recipe", "path": str(checkpoint), "recipe": recipe})


def _gate_missed(options: ExportOptions, report: dict[str, Any], quant_record: dict[str, Any]) -> str:
    """Return why no int8 candidate met the gate, and what to do about it."""
    gate = report["gate"]
    left_out = quant_record.get("not_done_for_the_budget")
    measured = (f"agreement with fp32 >= {options.min_agreement:.2%} and accuracy drop <= "
                f"{options.max_accuracy_drop * 100:.2f} pt on the selection split; the best agreed on "
                f"{gate['agreement']:.2%}" if "agreement" in gate else
                f"{gate['metric']} with fp32 >= {options.min_agreement:.2%}; the best agreed on "
                f"{gate['token_agreement']:.2%} of tokens, {gate['entity_agreement']:.2%} of entities")
    ranking = gate.get("ranking")
    if ranking is not None and not ranking["passed"]:
        measured += (f"; zero-shot: the int8 model put fp32's top candidate label first for "
                     f"{ranking['top_agreement']:.2%} of texts")
    return (f"No int8 candidate met the gate ({measured}); nothing was written. "
            + (f"--budget {options.budget_minutes:g} left out {'; '.join(left_out)}: a larger --budget, or "
               f"none, tries them. " if left_out else "")
            + "Serve fp32 with --on-miss fp32 or --quantize none, relax --min-agreement / --max-accuracy-drop, "
              "or accept it with --no-gate.")


def check_task(config: dict, task: str, path: Path) -> None:
    """Refuse a task the checkpoint's head cannot do, naming what it is."""
    architectures = config.get("architectures") or []
    if task not in tasks.TASKS:
        raise ExportError(f"--task must be one of {', '.join(tasks.TASKS)}; got {task!r}.")
    wanted = "ForTokenClassification" if task == tasks.TOKEN_CLASSIFICATION else "ForSequenceClassification"
    if not any(str(a).endswith(wanted) for a in architectures):
        raise ExportError(f"{path} cannot do {task}: config.json names {', '.join(architectures) or 'no architecture'}"
                          f", expected *{wanted}.")
    labels = [str(v) for v in (config.get("id2label") or {}).values()]
    if task == tasks.ZERO_SHOT_CLASSIFICATION and tasks.entailment_id(labels) < 0:
        raise ExportError(f"{path} cannot do zero-shot classification: none of its labels ({', '.join(labels)}) "
                          "starts with 'entail', so no logit says that a hypothesis follows from the text.")


def _tag_why(record: dict[str, Any]) -> str:
    """Say why a token classifier's export serves what it serves (the manifest's quantization.why)."""
    if record["mode"] == "none":
        return "--quantize none serves fp32"
    if record["passed"]:
        return f"{record['chosen']} is the first candidate that meets the gate on tokens and entities"
    if record["chosen"] is None:
        return "no candidate met the gate; --on-miss fp32 serves fp32"
    return "no candidate met the gate; the one with the best token agreement is kept (--on-miss best)"


def _tag_stages(options: ExportOptions, stages: Stages, source: Source, fp32: Path, work: Path):
    """Quantize and validate a token classifier: the gate on tokens and entity spans, then PyTorch's logits."""
    from export.tagging import Windows, figures, search, texts_of, torch_runner
    from service.classifier import Classifier, ModelLoadError

    quantize = options.quantization.mode != "none"
    stages.next(f"quantizing to int8 ({options.quantization.mode})" if quantize else "skipping quantization")
    sets = validation_sets(options)
    texts = texts_of([e for name, examples in sets.items() if name != "calibration" for e in examples])
    try:
        classifier = Classifier(fp32.parent, intra_op_threads=usable_cores(), verify=False)
    except ModelLoadError as exc:
        raise ExportError(f"the service cannot load the exported model: {exc}") from None
    windows = Windows(classifier, texts)
    reference = windows.logits(classifier.run)
    models = {"onnx_fp32": fp32}
    gate = Gate(options.min_agreement, options.max_accuracy_drop)
    if quantize:
        try:
            chosen, record = search(fp32, work / "int8", options.quantization, windows, reference, gate,
                                    options.on_miss)
        except ValueError as exc:
            raise ExportError(str(exc)) from None
        if chosen is not None:
            models["onnx_int8"] = chosen
    else:
        record = {"mode": "none"}
    served = "onnx_int8" if "onnx_int8" in models else "onnx_fp32"
    record["served"] = "int8" if served == "onnx_int8" else "fp32"
    record["why"] = _tag_why(record)

    stages.next("validating against the PyTorch model")
    pytorch = windows.logits(torch_runner(source.path))
    outputs = {"onnx_fp32": reference}
    if served == "onnx_int8":
        from export.validate import ort_runner, ort_session

        outputs["onnx_int8"] = windows.logits(ort_runner(ort_session(models["onnx_int8"])))
    entry = {"inputs": len(texts), "windows": len(windows.flat),
             **{f"{name}_vs_pytorch": figures(windows, pytorch, rows) for name, rows in outputs.items()}}
    against = figures(windows, reference, outputs[served])
    passed = bool(record.get("passed", True)) if served == "onnx_int8" else True
    report = {"sets": {"validation": entry}, "served_model": served,
              "gate": {"metric": "per-token label agreement and entity-span agreement (aggregation simple)",
                       "min_agreement": options.min_agreement, "token_agreement": against["token_agreement"],
                       "entity_agreement": against["entity_agreement"], "passed": passed,
                       "enforced": options.enforce_gate}}
    logger.info("      %d texts, %d windows: %s against PyTorch max|d logit| %.2g, token agreement %.4f", len(texts),
                len(windows.flat), served, entry[f"{served}_vs_pytorch"]["max_abs_logit_diff"],
                entry[f"{served}_vs_pytorch"]["token_agreement"])
    return models, record, report, classifier.max_length


def _classify_stages(options: ExportOptions, stages: Stages, source: Source, fp32: Path, work: Path,
                     budget_started: float, zero_shot: bool = False):
    """Quantize and validate a sequence classifier: the int8 search and its gate, then PyTorch's scores."""
    quantize = options.quantization.mode != "none"
    stages.next(f"quantizing to int8 ({options.quantization.mode})" if quantize else "skipping quantization")
    sets = validation_sets(options)
    if zero_shot and not options.pairs:
        sets = {name: hypotheses(examples, *probe(options)) for name, examples in sets.items()}
    if not quantize:  # only the gate and the quantizer read these
        sets.pop("calibration")
        sets.pop("selection_extra", None)
    pool = _pool(fp32, sets)
    budget = _plan(options, pool, fp32, budget_started)
    models = {"onnx_fp32": fp32}
    if quantize:
        from export.search import Scorer, search

        scorer = Scorer(pool, fp32)
        gate = Gate(options.min_agreement, options.max_accuracy_drop)
        chosen, quant_record = search(fp32, work / "int8", options.quantization, scorer, gate,
                                      options.on_miss, stop=_check_stop, deadline=budget.search_deadline)
        if chosen is not None:
            models["onnx_int8"] = chosen
    else:
        quant_record = {"mode": "none"}
    ranking = None
    if zero_shot and not options.pairs and "onnx_int8" in models:
        ranking = ranking_figures(pool, models["onnx_int8"], *probe(options))
        logger.info("      zero-shot ranking of %d texts' %d candidate labels: top label agreement %.4f, order %.4f",
                    ranking["texts"], len(ranking["labels"]), ranking["top_agreement"], ranking["order_agreement"])
        if ranking["top_agreement"] < options.min_agreement and options.on_miss == "fp32":
            del models["onnx_int8"]
            quant_record["served"] = "fp32"
            quant_record["why"] = "the int8 model ranks candidate labels below the gate; --on-miss fp32 serves fp32"
    served = "onnx_int8" if "onnx_int8" in models else "onnx_fp32"

    stages.next("validating against the PyTorch model")
    from export.validate import evaluate

    checked = [name for name in sets if name not in ("calibration", "selection_extra")]
    report = evaluate(source.path, pool, models, checked, pytorch_seconds=budget.pytorch_seconds())
    if served == "onnx_int8":
        # the search's own figures: against fp32, on the selection split and confirmed on the test split
        selection = quant_record["candidates"][[c["name"] for c in quant_record["candidates"]].index(
            quant_record["chosen"])]["selection"]
        figures = {"agreement": selection["agreement"], "accuracy_drop": selection["accuracy_drop"]}
        passed, confirmed = bool(quant_record["passed"]), bool(quant_record["test"]["passed"])
    else:  # the fp32 model is the reference the gate measures against
        figures, passed, confirmed = {"agreement": 1.0, "accuracy_drop": 0.0}, True, True
    split = ("the selection half of --validation-file" if options.validation_file is not None else
             "the selection split (validation, plus the out-of-domain snippets past the test cap)")
    measured = (f"onnx_int8 against onnx_fp32 on {split}" if served == "onnx_int8" else
                f"none: onnx_fp32, the gate's reference, is served ({split} scored)")
    report["gate"] = {"metric": f"{measured}: label agreement and accuracy drop",
                      "min_agreement": options.min_agreement, "max_accuracy_drop": options.max_accuracy_drop,
                      **figures, "passed": passed, "confirmed_on_test": confirmed, "enforced": options.enforce_gate}
    if ranking is not None and served == "onnx_int8":
        # zero-shot answers rank labels by their entailment logits: the served model must rank as fp32 does
        ranking["passed"] = ranking["top_agreement"] >= options.min_agreement
        report["gate"]["ranking"] = ranking
        report["gate"]["passed"] = report["gate"]["passed"] and ranking["passed"]
        report["gate"]["metric"] += "; zero-shot: the top candidate label of each text against fp32's"
    report["served_model"] = served
    return models, quant_record, report, pool.max_length, budget.describe()


RANKING_TEXTS = 500  # texts whose candidate labels are ranked by both models (a pair per label)


def ranking_figures(pool, int8: Path, labels: Sequence[str], template: str) -> dict:
    """Return how often int8 ranks a text's candidate labels as fp32 does: the same top label, the same order.

    Single-label zero-shot ranks candidates by their entailment logit, so both models' entailment
    logits of each text's (text, hypothesis) pairs are compared, on the selection split.
    """
    from export.validate import ort_runner, ort_session

    # hypotheses() wrote each text's pairs one after the other, in the labels' order
    wanted = [template.format(label) for label in labels]
    kept = set(pool.indices("validation", "selection_extra").tolist())
    complete = []
    for start in sorted(kept):
        group = list(range(start, start + len(wanted)))
        examples = [pool.examples[i] for i in group if i in kept]
        if len(examples) == len(wanted) and [e.text_pair for e in examples] == wanted \
                and len({e.text for e in examples}) == 1:
            complete.append(group)
    complete = complete[:RANKING_TEXTS]
    flat = [index for group in complete for index in group]
    entail = tasks.entailment_id(pool.classifier.labels)
    logits = {}
    for name, run in (("fp32", pool.classifier.run), ("int8", ort_runner(ort_session(int8)))):
        found: dict[int, float] = {}
        for chunk, batch in pool.encoded.batches(flat):
            found.update(zip(chunk.tolist(), run(batch)[:, entail].tolist(), strict=True))
        logits[name] = np.array([[found[i] for i in group] for group in complete])
    if not complete:
        return {"texts": 0, "labels": list(labels), "template": template, "top_agreement": 1.0,
                "order_agreement": 1.0}
    orders = {name: np.argsort(-values, axis=1, kind="stable") for name, values in logits.items()}
    return {"texts": len(complete), "labels": list(labels), "template": template,
            "top_agreement": round(float((orders["fp32"][:, 0] == orders["int8"][:, 0]).mean()), 5),
            "order_agreement": round(float((orders["fp32"] == orders["int8"]).all(axis=1).mean()), 5)}


def _log_summary(report: dict, served: str) -> None:
    for set_name, entry in report["sets"].items():
        figures = entry.get(f"{served}_vs_pytorch", {})
        acc = entry["accuracy"]
        sampled = f" (PyTorch: {entry['pytorch_inputs']})" if "pytorch_inputs" in entry else ""
        accuracy = (f"accuracy pytorch {acc.get('pytorch')} {served} {acc.get(served)}"
                    if acc.get("pytorch") is not None else "accuracy: no input has one of the model's labels")
        logger.info("      %-12s n=%-5d%s agreement %.4f max|d| %.4f %s", set_name, entry["inputs"], sampled,
                    figures.get("label_agreement", 1.0), figures.get("max_abs_score_diff", 0.0), accuracy)
    lat = report["latency"]
    logger.info("      latency batch 1 / 8 (ms): %s", ", ".join(
        f"{k} {v['batch1_p50_ms']}/{v['batch8_p50_ms']}" for k, v in lat.items() if isinstance(v, dict)))


def _replace(folder: Path, target: Path) -> None:
    """Move the finished folder into place; an old one is moved aside first and removed after."""
    old = None
    if target.exists():
        old = target.with_name(f".tmp-old-{target.name}-{os.getpid()}")
        os.replace(target, old)
    os.replace(folder, target)
    if old is not None and old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    elif old is not None:  # --force over a file or a link of that name
        old.unlink(missing_ok=True)
