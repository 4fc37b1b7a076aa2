"""The export command's error paths: clear one-paragraph messages, non-zero exits, nothing half-written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from export.convert import detect_target
from export.validate import usable_cores
from tests.conftest import REPO_ROOT
from tests.export.tiny import build_checkpoint


def _assert_clean_failure(result, *fragments: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if "export failed:" in line]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_hub_id_with_the_hub_unreachable_fails_fast_and_suggests_a_local_folder(run_cli, tmp_path):
    result = run_cli("--model", "distilbert-base-uncased-finetuned-sst-2-english", "--output-dir", str(tmp_path))
    _assert_clean_failure(result, "Could not reach the Hugging Face Hub", "make export MODEL=DIR")
    assert result.seconds < 30
    assert list(tmp_path.iterdir()) == []


def test_hub_offline_mode_is_named(run_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run_cli("--model", "someone/some-classifier", "--output-dir", str(tmp_path))
    _assert_clean_failure(result, "someone/some-classifier")
    assert result.seconds < 30


@pytest.mark.parametrize(("model", "message"), [
    ("./no/such/folder", "neither an existing folder nor a Hugging Face Hub id"),
    ("a/b/c", "neither an existing folder nor a Hugging Face Hub id"),
    ("Makefile", "is a file"),
])
def test_bad_model_arguments(run_cli, tmp_path, model, message):
    _assert_clean_failure(run_cli("--model", model, "--output-dir", str(tmp_path)), message)


@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf"])
def test_a_budget_must_be_positive(run_cli, tmp_path, value):
    result = run_cli("--budget", value, "--output-dir", str(tmp_path))
    assert result.returncode == 2 and "--budget must be a positive number of minutes" in result.stderr


@pytest.mark.parametrize("value", ["-1", "0", "9", "99"])
def test_an_opset_torch_cannot_write_is_refused_first(run_cli, tmp_path, value):
    result = run_cli("--opset", value, "--output-dir", str(tmp_path))
    assert result.returncode == 2 and "--opset must lie between 11 and" in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []


def _bad_checkpoint(source: Path, folder: Path, change) -> Path:
    """Return a copy of a checkpoint with one thing broken by change(folder)."""
    import shutil

    shutil.copytree(source, folder)
    change(folder)
    return folder


def _config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


# (case, how the checkpoint is broken, what the one line says): found before any export work
BROKEN = [
    ("config-a-list", lambda f: (f / "config.json").write_text("[]"), "config.json is not a JSON object"),
    ("architectures-a-string", lambda f: _config(f, architectures="BertForSequenceClassification"),
     "'architectures' must be a list of class names"),
    ("tokenizer-json-garbage", lambda f: (f / "tokenizer.json").write_text("garbage{"),
     "tokenizer.json cannot be read as a tokenizer"),
]


@pytest.mark.parametrize(("change", "message"), [case[1:] for case in BROKEN], ids=[case[0] for case in BROKEN])
def test_a_broken_checkpoint_is_named_in_one_line(run_cli, checkpoints, tmp_path, change, message):
    broken = _bad_checkpoint(checkpoints("bert"), tmp_path / "broken", change)
    _assert_clean_failure(run_cli("--model", str(broken), "--output-dir", str(tmp_path / "out")), message)
    assert not (tmp_path / "out").exists()


# (case, how the checkpoint's weights are broken, what Optimum's failure is said to be): in-process, where torch
# is loaded already, as the export's own code path calls Optimum
WEIGHTS = [
    ("truncated-safetensors", lambda f: os.truncate(f / "model.safetensors", 5000),
     "its safetensors weights cannot be read"),
    ("labels-the-head-lacks", lambda f: _config(f, id2label={str(i): f"L{i}" for i in range(5)},
                                                label2id={f"L{i}": i for i in range(5)}),
     "its weights do not match its config.json: size mismatch"),
]


@pytest.mark.parametrize(("change", "message"), [case[1:] for case in WEIGHTS], ids=[case[0] for case in WEIGHTS])
def test_weights_optimum_cannot_load_are_an_export_error_that_says_why(checkpoints, tmp_path, change, message):
    from export.convert import export_fp32
    from export.resolve import ExportError

    broken = _bad_checkpoint(checkpoints("bert"), tmp_path / "broken", change)
    with pytest.raises(ExportError, match=message):
        export_fp32(broken, tmp_path / "out")


def test_an_opset_too_old_for_the_model_is_an_export_error_and_stdout_stays_clean(checkpoints, tmp_path, capfd):
    from export.convert import export_fp32
    from export.resolve import ExportError

    with pytest.raises(ExportError, match="at --opset 12: UnsupportedOperatorError"):
        export_fp32(checkpoints("bert"), tmp_path / "out", opset=12)
    captured = capfd.readouterr()
    assert captured.out == ""  # torch prints the graph it could not export: to stderr, not the folder's line
    assert "aten::" in captured.err


def test_output_and_validation_file_problems_fail_before_any_work(run_cli, checkpoints, tmp_path):
    model = ("--model", str(checkpoints("bert")))
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    _assert_clean_failure(run_cli(*model, "--output-dir", str(a_file)), "cannot hold the model folder")
    for name in ("n" * 201, "", ".hidden", "a\\b"):
        _assert_clean_failure(run_cli(*model, "--output-dir", str(tmp_path), "--name", name),
                              "must be a plain folder name of at most 200 bytes")
    _assert_clean_failure(run_cli(*model, "--retrain"), "--retrain applies to the default model")
    _assert_clean_failure(run_cli(*model, "--revision", "main"), "--revision applies to a Hugging Face Hub id")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xe8\x00\xff" * 10)
    labelled = tmp_path / "labelled.txt"
    labelled.write_text("POSITIVE\tgreat\nFOO\tbad\nBAR\tmeh\nfine\n")
    for path, fragment in ((tmp_path, "is not a file"), (binary, "is not UTF-8 text")):
        result = run_cli(*model, "--output-dir", str(tmp_path / "out"), "--validation-file", str(path))
        _assert_clean_failure(result, f"--validation-file {path}", fragment)
        assert not (tmp_path / "out").exists()
    # labels the model lacks: those inputs count as unlabelled, and the export says so before its work
    result = run_cli(*model, "--output-dir", str(tmp_path / "out"), "--validation-file", str(labelled),
                     "--quantize", "none")
    assert result.returncode == 0, result.stderr
    assert ("labels inputs BAR, FOO, which are not the model's labels (NEGATIVE, POSITIVE): those inputs count as "
            "unlabelled; accuracy is measured on the 1 labelled with them") in result.stderr


def test_force_never_replaces_the_checkpoint_it_exports(run_cli, checkpoints, tmp_path):
    checkpoint = _bad_checkpoint(checkpoints("bert"), tmp_path / "models" / "mine", lambda folder: None)
    before = sorted(path.name for path in checkpoint.iterdir())
    for output_dir, name in ((tmp_path / "models", "mine"), (tmp_path, "models")):
        result = run_cli("--model", str(checkpoint), "--output-dir", str(output_dir), "--name", name, "--force")
        _assert_clean_failure(result, "holds the checkpoint being exported")
    assert sorted(path.name for path in checkpoint.iterdir()) == before


def test_an_invalid_hub_id_is_not_blamed_on_the_network(run_cli, tmp_path):
    result = run_cli("--model", "org/na--me", "--output-dir", str(tmp_path))
    _assert_clean_failure(result, "'org/na--me' is neither an existing folder nor a valid Hugging Face Hub id")
    assert result.seconds < 30


def test_quiet_prints_only_the_folder_and_the_manifest_records_the_plan(run_cli, checkpoints, tmp_path,
                                                                       validation_file):
    common = ("--model", str(checkpoints("bert")), "--output-dir", str(tmp_path), "--validation-file",
              str(validation_file), "--quantize", "none")
    quiet = run_cli(*common, "--name", "quiet", "--quiet", "--budget", "3")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout.strip() == str(tmp_path / "quiet") and "[1/5]" not in quiet.stderr
    assert "Traceback" not in quiet.stderr and "budget" not in quiet.stderr
    plan = json.loads((tmp_path / "quiet" / "manifest.json").read_text())["budget"]
    # every file of the folder is as readable as the graph (onnx writes its data file owner-only)
    modes = {path.name: path.stat().st_mode & 0o777 for path in (tmp_path / "quiet").iterdir()}
    assert modes["model.onnx.data"] == modes["model.onnx"], modes
    # a tiny model fits a 3-minute budget with every input scored
    assert plan["budget_minutes"] == 3 and plan["selection_inputs"] == plan["selection_available"] > 0
    loud = run_cli(*common, "--name", "loud")
    assert loud.returncode == 0 and "[5/5]" in loud.stderr
    assert (f"budget 10 min (the default; the search is not cut short): the gate scores all "
            f"{plan['selection_available']} selection inputs") in loud.stderr, loud.stderr


@pytest.mark.parametrize(("option", "value"), [("--smoothing", "1.5"), ("--smoothing", "-0.1"),
                                               ("--min-agreement", "2"), ("--max-accuracy-drop", "-1")])
def test_out_of_range_settings_are_refused(run_cli, tmp_path, option, value):
    result = run_cli(option, value, "--output-dir", str(tmp_path))
    assert result.returncode == 2 and f"{option} must lie between 0 and 1" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("arguments", "message"), [
    (("--candidate-labels", "billing"), "--candidate-labels needs at least two different labels"),
    (("--candidate-labels", "a,a"), "--candidate-labels needs at least two different labels"),
    (("--candidate-labels", " , "), "--candidate-labels must name at least one label"),
    (("--hypothesis-template", "no place for the label"), "--hypothesis-template 'no place for the label' must hold"),
    (("--hypothesis-template", "{0.upper}"), "--hypothesis-template"),
])
def test_the_zero_shot_gates_labels_and_template_are_checked_first(run_cli, tmp_path, arguments, message):
    result = run_cli(*arguments, "--output-dir", str(tmp_path))
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_model_that_is_not_a_sequence_classifier_is_refused(run_cli, tmp_path):
    from transformers import BertConfig, BertModel

    encoder = tmp_path / "encoder"
    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=20)).save_pretrained(encoder)
    (encoder / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    _assert_clean_failure(run_cli("--model", str(encoder), "--output-dir", str(tmp_path / "out")),
                          "not a sequence classifier", "BertModel")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_a_task_the_head_cannot_do_is_refused_in_one_line(run_cli, checkpoints, tmp_path):
    result = run_cli("--model", str(checkpoints()), "--output-dir", str(tmp_path / "out"),
                     "--task", "token-classification")
    _assert_clean_failure(result, "cannot do token-classification", "expected *ForTokenClassification")
    assert run_cli("--task", "ner").returncode == 2  # argparse names the choices


def test_a_folder_without_config_is_refused(run_cli, tmp_path):
    (tmp_path / "empty").mkdir()
    _assert_clean_failure(run_cli("--model", str(tmp_path / "empty"), "--output-dir", str(tmp_path / "out")),
                          "has no config.json")


def test_an_existing_output_folder_is_refused_without_force(run_cli, checkpoints, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    result = run_cli("--model", str(checkpoints("bert")), "--name", "taken", "--output-dir", str(tmp_path))
    _assert_clean_failure(result, "already exists", "--force")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


@pytest.mark.slow  # a search over the int8 candidates: minutes
def test_the_gate_refuses_an_int8_model_that_disagrees(run_cli, tmp_path, validation_file):
    """A classifier whose two logits nearly tie on every input: int8 rounding flips many labels."""
    import random

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tests.export.tiny import WORDS

    # 400 more inputs (442 in all: 110 calibrate, 166 select, 166 test) so that per-token int8 flips some too
    rng = random.Random(7)
    extra = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20))) for _ in range(400)]
    inputs = tmp_path / "inputs.txt"
    inputs.write_text(validation_file.read_text(encoding="utf-8") + "\n".join(extra) + "\n", encoding="utf-8")
    validation_file = inputs
    checkpoint = build_checkpoint(tmp_path / "tie")
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    texts = [line.split("\t")[-1] for line in validation_file.read_text().splitlines()]
    with torch.inference_mode():
        logits = model(**AutoTokenizer.from_pretrained(checkpoint)(texts, padding=True, return_tensors="pt")).logits
        model.classifier.bias[1] -= float(np.median((logits[:, 1] - logits[:, 0]).numpy()))
    model.save_pretrained(checkpoint)

    out = tmp_path / "out"
    common = ("--model", str(checkpoint), "--output-dir", str(out), "--validation-file", str(validation_file))
    result = run_cli(*common, "--quantize", "dynamic")
    _assert_clean_failure(result, "No int8 candidate met the gate", "agreement with fp32 >= 99.50%",
                          "nothing was written")
    assert list(out.iterdir()) == []

    # a budget this small leaves every optional step out, and the refusal says so
    result = run_cli(*common, "--budget", "0.01")
    _assert_clean_failure(result, "No int8 candidate met the gate", "--budget 0.01 left out building",
                          "a larger --budget, or none, tries them")

    result = run_cli(*common, "--quantize", "dynamic", "--no-gate")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "tie" / "manifest.json").read_text())
    gate, quant = manifest["validation"]["gate"], manifest["quantization"]
    assert gate["passed"] is False and gate["enforced"] is False and gate["agreement"] < 0.995
    assert quant["passed"] is False and quant["served"] == "int8" and quant["fp32_nodes"] == []
    assert quant["why"].startswith("no candidate met the gate")

    # auto: every recipe, then the sensitivity pass and its exclusion ladder, each recorded with its figures
    result = run_cli(*common, "--name", "searched", "--on-miss", "fp32")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "searched" / "manifest.json").read_text())
    quant = manifest["quantization"]
    names = [c["name"] for c in quant["candidates"]]
    assert names[:7] == ["dynamic int8", "dynamic int8, one activation scale per token, outlier channels smoothed",
                         "dynamic int8, weights per tensor", "dynamic int8, 7-bit weights (reduce_range)",
                         "dynamic int8 of the O2-fused graph (QAttention)", "static int8 (QDQ, MinMax calibration)",
                         "8-bit block weights, int8 compute (MatMulNBits)"]
    # the ladder starts from the per-token recipe, which missed the gate on this model too
    assert len(names) > 7 and names[7].startswith("smoothed per-token int8, ") and "MatMuls two-pass" in names[7]
    for candidate in quant["candidates"]:
        assert "error" not in candidate, candidate
        assert candidate["quick_batch8_speedup"] > 0 and candidate["size_bytes"] > 0
        if "batch8_speedup" in candidate:  # timed precisely: it could still beat every passing candidate
            assert candidate["batch1_ms"] > 0 and candidate["batch8_ms"] > 0
            if usable_cores() > 1:  # batch 8 also timed on every core, as the service runs it
                assert candidate["as_served"]["batch8_ms"] > 0 and candidate["as_served"]["threads"] == usable_cores()
        if "skipped" in candidate:  # not scored: a faster candidate had met the gate
            assert "selection" not in candidate and not candidate["passed"]
            speed = candidate.get("batch8_speedup", candidate["quick_batch8_speedup"])
            assert any(c.get("passed") and c["batch8_speedup"] >= speed for c in quant["candidates"]), candidate
            continue
        assert "batch8_speedup" in candidate  # every scored candidate was timed precisely
        selection = candidate["selection"]
        assert {"agreement", "accuracy_drop", "max_abs_score_diff", "mean_abs_score_diff"} <= set(selection)
        assert candidate["passed"] == (selection["agreement"] >= 0.995 and (selection["accuracy_drop"] or 0) <= 0.003)
        # scoring stops early only once a candidate is sure to miss the gate on the whole selection split
        assert selection["inputs"] == selection["of"] == 166 or (
            selection["inputs"] < selection["of"] and not candidate["passed"])
    assert any(c["selection"]["inputs"] < c["selection"]["of"] for c in quant["candidates"] if "selection" in c)
    ranking = [r["node"] for r in quant["sensitivity"]]
    scores = [r["mean_abs_score_diff"] for r in quant["sensitivity"]]
    assert len(ranking) == 12 and scores == sorted(scores, reverse=True)  # 2 layers x 6 weight MatMuls
    # two-pass for more and more of the most sensitive MatMuls; fp32 for them only once all two-pass missed
    steps = quant["candidates"][7:]
    two_pass = [c for c in steps if c["two_pass_nodes"]]
    fp32 = [c for c in steps if c["fp32_nodes"]]
    assert steps == two_pass + fp32 and all(not c["fp32_nodes"] for c in two_pass)
    counts = [len(c["two_pass_nodes"]) for c in two_pass]
    assert counts == sorted(set(counts))
    assert all(c["two_pass_nodes"] == ranking[:n] for c, n in zip(two_pass, counts, strict=True))
    if fp32:
        assert counts[-1] == 12 and not two_pass[-1]["passed"]
        assert all(c["fp32_nodes"] == ranking[:len(c["fp32_nodes"])] for c in fp32)
    assert {c["activation_scales"] for c in steps} == {"per token"}
    assert {c["smoothing_alpha"] for c in [quant["candidates"][1], *steps]} == {0.5}
    # nothing met the gate, and --on-miss fp32 asked for the fp32 model rather than the best int8 one
    if not any(c["passed"] for c in quant["candidates"]):
        assert quant["served"] == "fp32" and manifest["validation"]["served_model"] == "onnx_fp32"
        assert "--on-miss fp32" in quant["why"]
    else:
        assert quant["chosen"] in [c["name"] for c in quant["candidates"] if c["passed"]] or quant["served"] == "fp32"
    assert manifest["validation"]["gate"]["passed"] is True


@pytest.mark.slow  # a search over the int8 candidates: minutes
def test_auto_picks_the_fastest_candidate_that_meets_the_gate(run_cli, checkpoints, tmp_path, validation_file):
    out = tmp_path / "out"
    result = run_cli("--model", str(checkpoints("bert")), "--output-dir", str(out), "--validation-file",
                     str(validation_file), "--name", "auto")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "auto" / "manifest.json").read_text())
    quant = manifest["quantization"]
    assert quant["mode"] == "auto" and len(quant["candidates"]) >= 6 and quant["search_seconds"] > 0
    passing = [c for c in quant["candidates"] if c.get("passed")]
    assert passing, quant["candidates"]  # a random tiny model's clear margins survive int8
    fastest = max(passing, key=lambda c: (c["batch8_speedup"], -c["size_bytes"]))
    if fastest["batch8_speedup"] >= 1.0:
        assert quant["chosen"] == fastest["name"] and quant["served"] == "int8"
        assert quant["test"]["agreement"] is not None and "passed" in quant["test"]
    else:  # on a model this small int8 can be slower than fp32; then fp32 is served, and said so
        assert quant["served"] == "fp32" and "slower than fp32" in quant["why"]


@pytest.mark.slow  # four exports stopped part-way: a minute or more each
@pytest.mark.parametrize("stage", ["[2/5]", "[4/5]"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_export_leaves_no_folder(checkpoints, tmp_path, validation_file, stage, signum):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "export", "--model", str(checkpoints("bert")), "--output-dir",
                             str(out), "--validation-file", str(validation_file)], cwd=REPO_ROOT,
                            stderr=subprocess.PIPE, text=True, env={**os.environ})
    deadline = time.monotonic() + 120
    seen = ""
    while stage not in seen and time.monotonic() < deadline:
        seen += proc.stderr.readline()
    assert stage in seen, seen
    proc.send_signal(signum)
    _, rest = proc.communicate(timeout=60)
    assert proc.returncode == 130, seen + rest
    assert "no model folder was written" in rest
    assert list(out.iterdir()) == [], list(out.iterdir())


@pytest.mark.parametrize(("flags", "machine", "expected"), [
    ("fpu avx2 avx512f avx512bw avx512_vnni", "x86_64", "avx512_vnni"),
    ("fpu avx2 avx512f avx512bw", "x86_64", "avx512"),
    ("fpu sse4_2 avx2 fma", "x86_64", "avx2"),
    ("fp asimd", "aarch64", "arm64"),
])
def test_detect_target(flags, machine, expected):
    assert detect_target(f"processor\t: 0\nflags\t\t: {flags}\n", machine) == expected


def test_help_lists_the_options(run_cli):
    result = run_cli("--help")
    assert result.returncode == 0
    for option in ("--model", "--name", "--force", "--quantize", "--target", "--min-agreement",
                   "--max-accuracy-drop", "--on-miss", "--no-gate", "--smoothing", "--budget", "--quiet", "--task",
                   "--candidate-labels", "--hypothesis-template"):
        assert option in result.stdout


def test_this_cpu_is_detected():
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file() and "avx512_vnni" in cpuinfo.read_text():
        assert detect_target() == "avx512_vnni"
    else:
        assert detect_target() in ("avx512", "avx2", "arm64")


def test_an_unexpected_failure_is_one_paragraph_and_the_trace_goes_to_a_file(monkeypatch, capfd, tmp_path):
    from export import cli

    def broken(options):  # injected fault: a bug deep in a stage
        raise RuntimeError("a library failed")

    monkeypatch.setattr(cli, "run", broken)
    monkeypatch.setattr(cli.logger, "handlers", [])  # a handler on this test's stderr
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert cli.main(["--output-dir", str(tmp_path / "out")]) == 2
    finally:  # main() installs its own
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "export failed unexpectedly: RuntimeError: a library failed" in err
    (log,) = tmp_path.glob("export-error-*.log")
    assert log.name in err and "RuntimeError: a library failed" in log.read_text()
    assert "Traceback" in log.read_text()
