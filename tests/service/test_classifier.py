"""The ONNX Classifier: the real default model, its tokenizer, post-processing and load-time checks."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

from service.classifier import (
    WIDE_CLIP_CHARS_PER_TOKEN,
    Classifier,
    InferenceError,
    InputTooLong,
    ModelLoadError,
    apply_function,
)
from tests.testkit import NEGATIVE, POSITIVE, write_manifest

# Mixed cases for the tokenizer: accents, CJK, emoji, control characters, long and short texts.
TOKENIZER_TEXTS = [
    POSITIVE,
    NEGATIVE,
    "Ça n'était pas terrible… mais l'actrice est géniale! 映画は最高でした 🎬🍿",
    "  leading and trailing spaces  \t\n",
    "ok",
    "word " * 600,  # far beyond 256 tokens: truncated
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
]


def test_labels_and_limits_of_the_default_model(classifier: Classifier) -> None:
    assert classifier.labels == ["NEGATIVE", "POSITIVE"]
    assert classifier.max_length == 256
    assert classifier.function == "softmax"
    assert classifier.ready


@pytest.mark.parametrize(("text", "label"), [(POSITIVE, "POSITIVE"), (NEGATIVE, "NEGATIVE"),
                                             ("What a great, delightful movie.", "POSITIVE"),
                                             ("Terrible. I hated it.", "NEGATIVE")])
def test_clear_texts_are_classified_right(classifier: Classifier, text: str, label: str) -> None:
    (ranked,) = classifier.classify([text], top_k=None)
    assert ranked[0]["label"] == label
    assert ranked[0]["score"] > 0.8
    assert all(0.0 <= p["score"] <= 1.0 and type(p["score"]) is float for p in ranked)
    assert sum(p["score"] for p in ranked) == pytest.approx(1.0, abs=1e-9)
    assert ranked[0]["score"] >= ranked[1]["score"]


def test_batch_keeps_input_order(classifier: Classifier) -> None:
    texts = [POSITIVE, NEGATIVE, "Terrible. I hated it.", "What a great, delightful movie."]
    batch = classifier.classify(texts, top_k=None)
    singles = [classifier.classify([text], top_k=None)[0] for text in texts]
    assert [r[0]["label"] for r in batch] == ["POSITIVE", "NEGATIVE", "NEGATIVE", "POSITIVE"]
    assert [r[0]["label"] for r in batch] == [r[0]["label"] for r in singles]
    for in_batch, alone in zip(batch, singles, strict=True):
        # the default model quantizes activations with one scale per token: companions do not move scores
        assert in_batch[0]["score"] == pytest.approx(alone[0]["score"], abs=1e-6)


def test_long_text_is_truncated_not_rejected(classifier: Classifier) -> None:
    long_text = NEGATIVE + " and so on" * 20_000
    feeds = classifier.tokenize([long_text, "short"])
    assert feeds["input_ids"].shape == (2, 256)
    assert feeds["attention_mask"][1].sum() < 10  # the short text is padded, not stretched
    (ranked,) = classifier.classify([long_text])
    assert ranked[0]["label"] == "NEGATIVE"


def test_token_ids_equal_transformers_autotokenizer(model_dir: Path, classifier: Classifier) -> None:
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(model_dir)(TOKENIZER_TEXTS, padding=True, truncation=True,
                                                          return_tensors="np")
    ours = classifier.tokenize(TOKENIZER_TEXTS)
    assert ours["input_ids"].shape[1] == 256
    for name in ours:
        np.testing.assert_array_equal(ours[name], reference[name].astype(np.int64), err_msg=name)
    single = classifier.tokenize(["ok"])
    np.testing.assert_array_equal(single["input_ids"],
                                  AutoTokenizer.from_pretrained(model_dir)(["ok"], return_tensors="np")["input_ids"])


def _at_once(work: Any, threads: int) -> None:
    """Run work in that many threads started together; fail with the first exception any raised."""
    failures: list[BaseException] = []
    start = threading.Barrier(threads)

    def guarded() -> None:
        try:
            start.wait(timeout=30)
            work()
        except BaseException as exc:  # collected and re-raised in the main thread
            failures.append(exc)

    running = [threading.Thread(target=guarded) for _ in range(threads)]
    for thread in running:
        thread.start()
    for thread in running:
        thread.join(timeout=120)
    assert not failures, failures[0]


def test_tokenizer_is_safe_across_threads(classifier: Classifier) -> None:
    expected = classifier.tokenize(TOKENIZER_TEXTS)["input_ids"]

    def work() -> None:
        for _ in range(20):
            np.testing.assert_array_equal(classifier.tokenize(TOKENIZER_TEXTS)["input_ids"], expected)

    _at_once(work, 8)


def test_runs_at_once_use_sessions_of_their_own_and_score_alike(model_dir: Path) -> None:
    """Each model slot has its own session; more callers than sessions share one; scores never change."""
    reference = Classifier(model_dir, intra_op_threads=1)
    two = Classifier(model_dir, intra_op_threads=1, sessions=2)
    assert (reference.sessions, two.sessions) == (1, 2)
    feeds = two.tokenize(TOKENIZER_TEXTS)
    expected = reference.run(feeds)
    used: dict[int, int] = {}
    for session in two._sessions:  # count the calls of each real session
        def counted(*args: Any, _run: Any = session.run, _key: int = id(session), **kwargs: Any) -> Any:
            used[_key] = used.get(_key, 0) + 1
            return _run(*args, **kwargs)
        session.run = counted

    def work() -> None:
        for _ in range(10):
            np.testing.assert_array_equal(two.run(feeds), expected)

    _at_once(work, 4)
    assert sum(used.values()) == 40
    assert len(used) == 2 and min(used.values()) >= 5, used  # both sessions ran, not only the first


def test_a_run_alone_takes_the_lone_session_and_runs_beside_it_the_others(model_dir: Path) -> None:
    """The lone session (every core) runs only when no other run is in progress; scores never change."""
    reference = Classifier(model_dir, intra_op_threads=1)
    classifier = Classifier(model_dir, intra_op_threads=1, sessions=2, lone_threads=2)
    lone = classifier._lone
    assert classifier.sessions == 3 and lone is not None
    assert lone.get_session_options().intra_op_num_threads == 2
    feeds = classifier.tokenize(TOKENIZER_TEXTS)
    expected = reference.run(feeds)
    lock = threading.Lock()
    calls = {"lone": 0, "beside": 0}
    active = {"lone": 0, "most_lone": 0}
    beside_started = threading.Event()
    lone_run, beside_runs = lone.run, {id(s): s.run for s in classifier._sessions}

    def on_lone(*args: Any, **kwargs: Any) -> Any:
        with lock:
            calls["lone"] += 1
            active["lone"] += 1
            active["most_lone"] = max(active["most_lone"], active["lone"])
        beside_started.wait(10)  # hold it until a run has started beside it
        try:
            return lone_run(*args, **kwargs)
        finally:
            with lock:
                active["lone"] -= 1

    def beside(session_id: int) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            with lock:
                calls["beside"] += 1
            beside_started.set()
            return beside_runs[session_id](*args, **kwargs)
        return run

    lone.run = on_lone
    for session in classifier._sessions:
        session.run = beside(id(session))
    beside_started.set()  # one caller at a time: every run is alone and takes the lone session
    for _ in range(3):
        np.testing.assert_array_equal(classifier.run(feeds), expected)
    assert calls == {"lone": 3, "beside": 0}
    beside_started.clear()

    def work() -> None:
        for _ in range(10):
            np.testing.assert_array_equal(classifier.run(feeds), expected)

    _at_once(work, 4)
    assert calls["lone"] + calls["beside"] == 43
    assert calls["lone"] >= 4 and calls["beside"] >= 1, calls  # the first run held it: the others went beside
    assert active["most_lone"] == 1  # never two runs at once on the lone session
    np.testing.assert_array_equal(classifier.run(feeds), expected)  # alone again: the lone session
    assert calls["lone"] >= 5


def test_three_labels_top_k_and_functions(tiny_models: dict[int, Path]) -> None:
    tiny = Classifier(tiny_models[3])
    texts = ["a wonderful film", "dull and terrible"]
    logits = tiny.run(tiny.tokenize(texts)).astype(np.float64)
    ranked = tiny.classify(texts, top_k=None)
    assert [len(r) for r in ranked] == [3, 3]
    for row, result in zip(logits, ranked, strict=True):
        expected = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
        by_label = {p["label"]: p["score"] for p in result}
        labels = ["negative", "neutral", "positive"]
        assert by_label == pytest.approx(dict(zip(labels, expected, strict=True)), abs=1e-12)
        assert [p["score"] for p in result] == sorted(by_label.values(), reverse=True)
    assert [len(r) for r in tiny.classify(texts, top_k=2)] == [2, 2]
    assert tiny.classify(texts, top_k=2)[0] == ranked[0][:2]
    assert len(tiny.classify(texts, top_k=10)[0]) == 3  # like transformers: top_k beyond the labels is all
    raw = tiny.classify(texts, top_k=None, function_to_apply="none")[0]
    assert sorted(p["score"] for p in raw) == pytest.approx(sorted(logits[0]), abs=1e-6)
    sigmoid = tiny.classify(texts, top_k=None, function_to_apply="sigmoid")[0]
    assert sorted(p["score"] for p in sigmoid) == pytest.approx(sorted(1 / (1 + np.exp(-logits[0]))), abs=1e-12)


def test_multi_label_models_default_to_sigmoid(tiny_models: dict[int, Path], tmp_path: Path) -> None:
    folder = shutil.copytree(tiny_models[3], tmp_path / "multi")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "problem_type": "multi_label_classification"}))
    write_manifest(folder, "multi")
    tiny = Classifier(folder)
    assert tiny.function == "sigmoid"
    scores = [p["score"] for p in tiny.classify(["a wonderful film"])[0]]
    assert sum(scores) != pytest.approx(1.0, abs=1e-3)  # independent probabilities, not a softmax


def test_weights_in_an_external_data_file_score_as_inline_ones(tiny_models: dict[int, Path], tmp_path: Path) -> None:
    from export.convert import DATA_FILE, write_served  # the export's layout

    folder = shutil.copytree(tiny_models[3], tmp_path / "external")
    written = write_served(tiny_models[3] / "model.onnx", folder / "model.onnx")
    assert [path.name for path in written] == ["model.onnx", DATA_FILE]
    assert (folder / "model.onnx").stat().st_size < (folder / DATA_FILE).stat().st_size
    write_manifest(folder, "external")
    texts = ["a wonderful film", "a dull , boring plot " * 5, "fun"]
    inline = Classifier(tiny_models[3]).classify(texts, top_k=None)
    assert Classifier(folder).classify(texts, top_k=None) == inline
    # the data file belongs to the model: without it, start-up stops with one line
    (folder / DATA_FILE).unlink()
    with pytest.raises(ModelLoadError, match=f"{DATA_FILE} is listed in manifest.json but missing"):
        Classifier(folder)
    write_manifest(folder, "external")  # signed without it: onnxruntime finds no weights
    with pytest.raises(ModelLoadError, match="cannot be loaded by onnxruntime") as caught:
        Classifier(folder)
    assert "\n" not in str(caught.value)


def test_score_functions_are_numerically_stable() -> None:
    logits = np.array([[1000.0, -1000.0], [-800.0, -800.0]], dtype=np.float32)
    assert apply_function(logits, "softmax").tolist() == [[1.0, 0.0], [0.5, 0.5]]
    assert apply_function(logits, "sigmoid").tolist() == [[1.0, 0.0], [0.0, 0.0]]
    with pytest.raises(ValueError, match="unknown function_to_apply"):
        apply_function(logits, "relu")


def test_onnxruntime_failure_becomes_inference_error(tiny_models: dict[int, Path]) -> None:
    tiny = Classifier(tiny_models[2])
    feeds = tiny.tokenize(["a film"])
    feeds["input_ids"] = feeds["input_ids"].astype(np.float32)  # a real ORT type error
    with pytest.raises(InferenceError, match="onnxruntime failed"):
        tiny.run(feeds)


def _broken_copy(source: Path, target: Path, edit_config: dict | None = None, drop: tuple[str, ...] = (),
                 big_tokenizer: bool = False, onnx_bytes: bytes | None = None,
                 manifest: bool = True) -> Path:
    """Copy a model folder, apply one fault, and (by default) re-sign it so only the fault remains."""
    folder = shutil.copytree(source, target)
    if edit_config is not None:
        config = json.loads((folder / "config.json").read_text())
        for key, value in edit_config.items():
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value
        (folder / "config.json").write_text(json.dumps(config))
    for name in drop:
        (folder / name).unlink()
    if big_tokenizer:
        # 500 word-level tokens for a 120-row embedding table
        tokenizer = Tokenizer(WordLevel({f"w{i}": i for i in range(500)}, unk_token="w0"))
        tokenizer.pre_tokenizer = Whitespace()
        tokenizer.save(str(folder / "tokenizer.json"))
    if onnx_bytes is not None:
        (folder / "model.onnx").write_bytes(onnx_bytes)
    if manifest:
        write_manifest(folder, folder.name)
    return folder


@pytest.mark.parametrize(("fault", "message"), [
    ({"edit_config": {"id2label": None, "label2id": None}}, "has no id2label"),
    ({"edit_config": {"id2label": {"0": "A", "1": "B", "2": "C"}}}, "id2label has 3 labels"),
    ({"drop": ("tokenizer.json",)}, "tokenizer.json is missing"),
    ({"drop": ("config.json",)}, "config.json is missing"),
    ({"drop": ("manifest.json",), "manifest": False}, "manifest.json is missing"),
    ({"onnx_bytes": b"not an onnx graph"}, "cannot be loaded by onnxruntime"),
    ({"onnx_bytes": b"tampered", "manifest": False}, "does not match its sha256"),
    ({"big_tokenizer": True}, "tokenizer.json has 500 tokens but the model's vocab_size is"),
    ({"big_tokenizer": True, "edit_config": {"vocab_size": None}}, "model.onnx rejects token id 499"),
])
def test_unusable_model_folders_fail_with_one_clear_line(tiny_models: dict[int, Path], tmp_path: Path,
                                                          fault: dict, message: str) -> None:
    folder = _broken_copy(tiny_models[2], tmp_path / "broken", **fault)
    with pytest.raises(ModelLoadError, match=message) as caught:
        Classifier(folder)
    assert "\n" not in str(caught.value)
    assert caught.value.__cause__ is None  # one line for the operator, not a chained traceback


def _ids(classifier: Classifier, inputs: list, **options: Any) -> list[list[int]]:
    return [encoding.ids for encoding in classifier.encode(inputs, **options)]


@pytest.mark.parametrize("direction", ["right", "left"])
def test_huge_texts_are_cut_before_tokenizing_with_the_same_tokens(classifier: Classifier, direction: str) -> None:
    whole = Tokenizer.from_file(str(classifier.model_dir / "tokenizer.json"))
    whole.enable_truncation(max_length=classifier.max_length, direction=direction)
    texts = [
        (POSITIVE + " ") * 20_000,  # ~2 MiB of ordinary words
        "好" * 300_000,  # no whitespace at all: one token per character
        "word " * 40 + " " * 10_000 + "awful " * 40,  # a whitespace run longer than the first cut
        "x" * 5_000 + " " + NEGATIVE * 50,  # one very long word first
    ]
    for text in texts:
        assert _ids(classifier, [text], direction=direction) == [whole.encode(text).ids], text[:40]
    # tokenizers computes a truncated pair's overflow as every combination of both texts' parts, so
    # the whole pair stays small here (~4,000 tokens a text), though well past the cut
    pair = ((NEGATIVE + " ") * 200, (POSITIVE + " ") * 200)
    assert _ids(classifier, [pair], direction=direction) == [whole.encode(*pair).ids]


def test_characters_past_the_wide_cut_are_never_read(classifier: Classifier) -> None:
    # a text with fewer than max_length tokens in its first max_length x 100 characters: the rest is ignored
    gap = classifier.max_length * WIDE_CLIP_CHARS_PER_TOKEN
    assert _ids(classifier, ["good " + " " * gap + "awful"]) == _ids(classifier, ["good"])


def test_a_huge_text_costs_about_what_a_max_length_text_costs(classifier: Classifier) -> None:
    huge = (NEGATIVE + " ") * 20_000  # ~2 MiB: tokenized whole it takes seconds here
    started = time.perf_counter()
    classifier.encode([huge])
    cut = time.perf_counter() - started
    started = time.perf_counter()
    whole = Tokenizer.from_file(str(classifier.model_dir / "tokenizer.json"))
    whole.encode(huge)
    assert cut < (time.perf_counter() - started) / 20


def test_pairs_are_truncated_longest_first_and_typed(classifier: Classifier) -> None:
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(classifier.model_dir)
    pairs = [("a short query", NEGATIVE * 30), (POSITIVE * 30, NEGATIVE * 30), ("query", "answer")]
    for pair in pairs:
        expected = reference(*pair, truncation=True)
        (encoding,) = classifier.encode([pair])
        assert encoding.ids == expected["input_ids"] and encoding.type_ids == expected["token_type_ids"]
    left = AutoTokenizer.from_pretrained(classifier.model_dir, truncation_side="left")
    assert _ids(classifier, [pairs[1]], direction="left") == [left(*pairs[1], truncation=True)["input_ids"]]


def test_without_truncation_a_long_input_is_refused(classifier: Classifier) -> None:
    assert len(classifier.encode(["fine"], truncate=False)) == 1
    with pytest.raises(InputTooLong) as refused:
        classifier.encode(["fine", "word " * 300], truncate=False)
    assert (refused.value.index, refused.value.max_length) == (1, 256)
    with pytest.raises(InputTooLong):
        classifier.encode([("q", "word " * 300)], truncate=False)


def test_tokens_carry_texts_and_utf8_byte_offsets(classifier: Classifier) -> None:
    (tokens,) = classifier.tokens(["Ça va? 映画"])
    assert [t["text"] for t in tokens] == ["[CLS]", "ça" if tokens[1]["text"] == "ça" else "Ça", "va", "?", "映",
                                           "画", "[SEP]"]
    assert tokens[0] == {"id": 101, "text": "[CLS]", "special": True, "start": None, "stop": None}
    raw = "Ça va? 映画".encode()
    for token in tokens[1:-1]:
        assert raw[token["start"]:token["stop"]].decode() == token["text"]
    (plain,) = classifier.tokens(["word " * 300], add_special_tokens=False)
    assert len(plain) == 300 and not any(t["special"] for t in plain)  # not truncated


def test_the_truncation_length_follows_the_tokenizer_capped_by_the_positions(tmp_path):
    from service.classifier import model_max_length

    roberta = {"max_position_embeddings": 514, "model_type": "roberta"}  # two positions before the first
    assert model_max_length({}, roberta) == 512
    assert model_max_length({"model_max_length": 128}, roberta) == 128
    assert model_max_length({"model_max_length": 1000000000000000019884624838656},
                            {"max_position_embeddings": 512, "model_type": "bert"}) == 512
