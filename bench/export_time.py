"""Time `python -m export` on classifiers of the sizes users bring, and how long each phase stayed silent.

    python -m bench.export_time --size base [--size minilm ...] [--name NAME] [-- EXPORT_ARGS...]

The Hub is out of reach here, so each model is a randomly initialised BERT classifier of that shape
(seeded, with the default model's WordPiece tokenizer), exported on the default validation snippets.
Random weights make a model whose labels hinge on small score margins: it measures the export's cost,
not a fine-tune's quantization error. Results go to bench/results/export-NAME.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOKENIZER = REPO / "onnx_models" / "minilm-l6-sentiment"
RESULTS = REPO / "bench" / "results"
# layers, hidden width, heads, feed-forward width: MiniLM-L6 (the default), BERT-base, BERT-large
SIZES = {"minilm": (6, 384, 12, 1536), "base": (12, 768, 12, 3072), "large": (24, 1024, 16, 4096)}


def build_checkpoint(folder: Path, size: str, seed: int = 0, tie: bool = False) -> Path:
    """Save a random BERT classifier of `size` with the default model's tokenizer into folder.

    tie: shift the classifier's bias so that the two logits tie at the median input of the validation
    snippets. Half the inputs then go each way, many by small margins, so int8 flips labels and the
    search needs its sensitivity pass and ladder, as a hard-to-quantize fine-tune would.
    """
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    layers, hidden, heads, ffn = SIZES[size]
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=ffn, max_position_embeddings=512, id2label={0: "NEGATIVE", 1: "POSITIVE"},
                        label2id={"NEGATIVE": 0, "POSITIVE": 1})
    model = BertForSequenceClassification(config).eval()
    if tie:
        from export.dataset import load_splits

        texts = [e.text for e in load_splits().validation[:256]]
        tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
        with torch.inference_mode():
            logits = model(**tokenizer(texts, padding=True, truncation=True, max_length=128,
                                       return_tensors="pt")).logits
            model.classifier.bias[1] -= float((logits[:, 1] - logits[:, 0]).median())
    model.save_pretrained(folder)
    for file in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(TOKENIZER / file, folder / file)
    return folder


def timed_export(checkpoint: Path, output: Path, extra: list[str]) -> dict:
    """Run the export CLI, timestamping each line it writes; return its timings and its longest silence."""
    command = [sys.executable, "-m", "export", "--model", str(checkpoint), "--name", "model",
               "--output-dir", str(output), *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = last = time.monotonic()
    longest, after = 0.0, ""
    lines = []
    with subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
                          cwd=REPO) as process:
        for line in process.stderr:
            now = time.monotonic()
            if now - last > longest:
                longest, after = now - last, lines[-1] if lines else "(start)"
            last = now
            lines.append(line.rstrip())
            print(line, end="", file=sys.stderr)
    total = time.monotonic() - started
    if process.returncode != 0:
        failure = next((line for line in reversed(lines) if "export failed" in line), lines[-1] if lines else "")
        raise SystemExit(f"export failed with exit code {process.returncode} after {total:.0f} s: {failure}")
    body = json.loads((output / "model" / "manifest.json").read_text())
    return {"seconds": round(total, 1), "longest_silence_s": round(longest, 1), "silent_after": after,
            "timings_s": body["timings_s"], "quantization": {k: body["quantization"].get(k) for k in (
                "chosen", "served", "passed", "search_seconds", "not_done_for_the_budget")},
            "candidates": [{k: c.get(k) for k in ("name", "build_seconds", "batch8_speedup", "skipped", "passed")}
                           for c in body["quantization"].get("candidates", [])],
            "plan": body["budget"], "fp32_size_bytes": body["model"]["fp32_size_bytes"],
            "command": " ".join(command[1:])}


def report(runs: dict[str, dict]) -> str:
    """Return the Markdown table of a set of runs; stage 3 is split into its phases."""
    lines = ["| model (layers, width) | fp32 MB | total s | longest silence s | [2] ONNX export s | [3] int8 search s "
             "| of which fp32 reference s | builds s | timing and scoring s | [4] validation s | selection inputs "
             "| candidates built | chosen |", "|" + "---|" * 13]
    for size, run in runs.items():
        stages = [s for title, s in run["timings_s"].items() if title != "total"][1:4]
        plan, quant = run["plan"], run["quantization"]
        builds = sum(c.get("build_seconds") or 0 for c in run["candidates"])
        search = quant.get("search_seconds") or 0
        phases = [stages[1] - search, builds, search - builds]
        lines.append(f"| {size} {SIZES[size][:2]} | {run['fp32_size_bytes'] / 1e6:.0f} | {run['seconds']:.0f} | "
                     f"{run['longest_silence_s']:.1f} | {stages[0]:.0f} | {stages[1]:.0f} | "
                     + " | ".join(f"{p:.0f}" for p in phases) + f" | {stages[2]:.0f} | "
                     f"{plan['selection_inputs']:,} of {plan['selection_available']:,} | {len(run['candidates'])} | "
                     f"{quant['chosen'] or quant['served']} |")
    return "\n".join(lines)


def write_results(name: str, runs: dict[str, dict], command: str) -> str:
    """Write bench/results/export-NAME.{json,md}; return the table."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"export-{name}.json").write_text(json.dumps(runs, indent=2) + "\n")
    table = report(runs)
    (RESULTS / f"export-{name}.md").write_text(
        f"# Export time by model size ({name})\n\n`{command}`\n\n{table}\n\nStage [1] (locating the model) "
        "and [5] (writing the folder) take under a second or two; the total includes starting Python. Stage 3's "
        "fp32 reference covers encoding the inputs, the budget's probe and fp32's scores; builds are the "
        "candidates' (and the sensitivity pass's are in timing and scoring). Longest silence: the longest gap "
        "between two lines the export wrote.\n")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.export_time", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", action="append", choices=SIZES, help="model size, repeatable (default: base)")
    parser.add_argument("--name", default=date.today().isoformat(), help="results name (default: today)")
    parser.add_argument("--tie", action="store_true",
                        help="labels decided by small margins, so that int8 needs the ladder (see build_checkpoint)")
    parser.add_argument("export_args", nargs="*", help="passed to python -m export (after --)")
    args = parser.parse_args(argv)
    runs = {}
    for size in args.size or ["base"]:
        with tempfile.TemporaryDirectory(prefix=f"export-time-{size}-") as scratch:
            checkpoint = build_checkpoint(Path(scratch) / "checkpoint", size, tie=args.tie)
            runs[size] = timed_export(checkpoint, Path(scratch) / "out", args.export_args)
    command = " ".join(["python -m bench.export_time", *(f"--size {size}" for size in runs),
                        *(["--tie"] if args.tie else []), *(["--", *args.export_args] if args.export_args else [])])
    table = write_results(args.name, runs, command)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
