"""Token classification and zero-shot end to end: tiny checkpoints exported by the export's code path, then
served, answer as transformers' pipelines do on the original PyTorch checkpoints."""

from __future__ import annotations

import json
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flask.testing import FlaskClient

from export.pipeline import ExportOptions, run
from export.quantize import QuantizationSettings
from export.resolve import ExportError
from service.app import create_app
from tests.export.tiny import NER_LABELS, NLI_LABELS, SENTENCES, build_checkpoint, build_token_checkpoint

FAMILIES = ("bert", "roberta", "xlm-roberta")  # WordPiece, byte-level BPE, unigram
STRATEGIES = ("none", "simple", "first", "average", "max")
# Short texts fit one window of the tiny models' 24 tokens: accents, emoji, CJK, leading and inner spaces.
SHORT = ["Zoë in Köln", "  the actor 😀 a film", "東京 と 大阪", "not very good, is it"]
LONG = " ".join(SENTENCES[:5]) + " Zoë and John Smith 😀 went to Köln."
TOLERANCE = 1e-4  # fp32 ONNX against PyTorch: float rounding


def _texts_file(folder: Path) -> Path:
    path = folder / "texts.txt"
    path.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    return path


def _export(checkpoint: Path, out: Path, mode: str = "none", **options: Any) -> Path:
    """Export with the export's own code path (what make export runs) from a file of unlabelled texts."""
    return run(ExportOptions(model=str(checkpoint), name=checkpoint.name, output_dir=out,
                             validation_file=_texts_file(out.parent), quantization=QuantizationSettings(mode=mode),
                             **options))


def _pipeline(task: str, checkpoint: Path):
    from transformers import pipeline

    return pipeline(task, model=str(checkpoint), device="cpu")


@pytest.fixture(scope="module")
def taggers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Return per tokenizer family (checkpoint, exported fp32 folder) of a tiny token classifier."""
    built = {}
    for family in FAMILIES:
        root = tmp_path_factory.mktemp(f"tagger-{family}")
        checkpoint = build_token_checkpoint(root / f"ner-{family}", family)
        built[family] = (checkpoint, _export(checkpoint, root / "out"))
    return built


@pytest.fixture(scope="module")
def tag_clients(taggers: dict[str, tuple[Path, Path]]) -> dict[str, FlaskClient]:
    return {family: create_app({"MODEL_DIR": str(folder), "ORT_THREADS": 1}).test_client()
            for family, (_, folder) in taggers.items()}


@pytest.fixture(scope="module")
def tag_pipelines(taggers: dict[str, tuple[Path, Path]]):
    return {family: _pipeline("token-classification", checkpoint) for family, (checkpoint, _) in taggers.items()}


def _same(answer: list[dict[str, Any]], expected: list[dict[str, Any]], text: str) -> None:
    """Assert the service's entities equal the pipeline's: keys, labels, words, offsets and order; scores close."""
    assert [sorted(entity) for entity in answer] == [sorted(entity) for entity in expected]
    strip = [{k: v for k, v in entity.items() if k != "score"} for entity in answer]
    assert strip == [{k: (int(v) if k in ("start", "end", "index") else v) for k, v in entity.items() if k != "score"}
                     for entity in expected]
    assert all(abs(a["score"] - float(e["score"])) < TOLERANCE for a, e in zip(answer, expected, strict=True))
    assert all(0 <= e["start"] <= e["end"] <= len(text) for e in answer)


def test_a_token_classifier_is_detected_and_its_task_recorded(taggers, tag_clients) -> None:
    _, folder = taggers["bert"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["task"] == "token-classification"
    assert manifest["validation"]["sets"]["validation"]["onnx_fp32_vs_pytorch"]["max_abs_logit_diff"] < TOLERANCE
    info = tag_clients["bert"].get("/info").get_json()
    assert info["model"]["task"] == "token-classification" and info["model"]["labels"] == list(NER_LABELS.values())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_entities_equal_the_pipelines_for_every_strategy(family, strategy, tag_clients, tag_pipelines) -> None:
    tokenizer = tag_pipelines[family].tokenizer
    for text in SHORT:
        assert len(tokenizer(text)["input_ids"]) <= tokenizer.model_max_length  # one window: no truncation
        response = tag_clients[family].post("/", json={"inputs": text,
                                                       "parameters": {"aggregation_strategy": strategy}})
        assert response.status_code == 200, response.get_json()
        expected = tag_pipelines[family](text, aggregation_strategy=strategy)
        assert expected, "a random model tags something in every text"
        _same(response.get_json(), expected, text)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("strategy", STRATEGIES[1:])
def test_a_long_text_is_windowed_and_merged_as_the_pipeline_does(family, strategy, tag_clients,
                                                                  tag_pipelines) -> None:
    client, pipe = tag_clients[family], tag_pipelines[family]
    for stride in (0, 5):
        answer = client.post("/", json={"inputs": LONG, "parameters": {"aggregation_strategy": strategy,
                                                                       "stride": stride}}).get_json()
        _same(answer, pipe(LONG, aggregation_strategy=strategy, stride=stride), LONG)
    # without stride the text is still read whole, in windows that do not overlap
    whole = client.post("/", json={"inputs": LONG, "parameters": {"aggregation_strategy": strategy}}).get_json()
    _same(whole, pipe(LONG, aggregation_strategy=strategy, stride=0), LONG)
    first_window = max(end for _, end in pipe.tokenizer(LONG, truncation=True, return_offsets_mapping=True)[
        "offset_mapping"])
    assert max(entity["end"] for entity in whole) > first_window


@pytest.mark.parametrize("family", FAMILIES)
def test_every_token_of_a_long_text_is_tagged_without_aggregation(family, tag_clients, tag_pipelines) -> None:
    tokenizer = tag_pipelines[family].tokenizer
    answer = tag_clients[family].post("/", json={"inputs": LONG, "parameters": {"ignore_labels": []}}).get_json()
    tokens = tokenizer(LONG, add_special_tokens=False, return_offsets_mapping=True)
    assert len(tokenizer(LONG)["input_ids"]) > 2 * tokenizer.model_max_length  # three windows at least
    assert [(e["start"], e["end"]) for e in answer] == [tuple(o) for o in tokens["offset_mapping"]]


@pytest.mark.parametrize("ignore", [[], ["O", "MISC"], ["B-PER", "I-PER"]])
def test_ignore_labels_as_the_pipeline(ignore, tag_clients, tag_pipelines) -> None:
    text = SHORT[0]
    for strategy in ("none", "simple"):
        answer = tag_clients["roberta"].post("/", json={"inputs": text, "parameters": {
            "aggregation_strategy": strategy, "ignore_labels": ignore}}).get_json()
        expected = tag_pipelines["roberta"](text, aggregation_strategy=strategy, ignore_labels=ignore)
        _same(answer, expected, text)
        assert not {e.get("entity", e.get("entity_group")) for e in answer} & set(ignore)


def test_a_list_of_texts_gets_a_list_of_entity_lists(tag_clients) -> None:
    client = tag_clients["bert"]
    parameters = {"aggregation_strategy": "simple"}
    alone = [client.post("/", json={"inputs": text, "parameters": parameters}).get_json() for text in SHORT]
    together = client.post("/", json={"inputs": SHORT, "parameters": parameters}).get_json()
    assert together == alone


def test_concurrent_requests_share_runs_and_keep_their_answers(tag_clients) -> None:
    client = tag_clients["xlm-roberta"]
    texts = [LONG, *SHORT] * 2
    body = {"parameters": {"aggregation_strategy": "first", "stride": 3}}
    alone = [client.post("/", json={"inputs": text, **body}).get_json() for text in texts]
    answers: dict[int, Any] = {}

    def post(index: int) -> None:
        answers[index] = client.post("/", json={"inputs": texts[index], **body}).get_json()

    threads = [threading.Thread(target=post, args=(index,)) for index in range(len(texts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [answers[i] for i in range(len(texts))] == alone


@pytest.mark.parametrize(("parameters", "status", "message"), [
    ({"aggregation_strategy": "loud"}, 400, "must be one of none, simple, first, average, max"),
    ({"aggregation_strategy": "none", "stride": 2}, 400, "needs an aggregation_strategy other than none"),
    ({"aggregation_strategy": "simple", "stride": 22}, 400, "'stride' must be an integer from 0 to 21"),
    ({"aggregation_strategy": "simple", "stride": -1}, 400, "'stride' must be an integer"),
    ({"ignore_labels": "O"}, 400, "'ignore_labels' must be a list of strings"),
    ({"aggregation_strategy": "simple", "stride": 2.5}, 400, "'stride' must be an integer"),
    ({"aggregation_strategy": "simple", "stride": True}, 400, "'stride' must be an integer"),
])
def test_bad_tagging_parameters_are_refused(parameters, status, message, tag_clients) -> None:
    response = tag_clients["bert"].post("/", json={"inputs": SHORT[0], "parameters": parameters})
    assert response.status_code == status and message in response.get_json()["error"]


def test_routes_of_other_tasks_say_what_the_model_does(tag_clients) -> None:
    client = tag_clients["bert"]
    response = client.post("/sentiment", json={"text": SHORT[0]})
    assert response.status_code == 400 and "tags tokens" in response.get_json()["error"]
    too_long = client.post("/", json={"inputs": LONG * 20, "parameters": {"aggregation_strategy": "simple"}})
    assert too_long.status_code == 413 and "windows" in too_long.get_json()["error"]
    assert client.post("/", json={"inputs": ""}).get_json() == {"error": "text cannot be empty"}


@pytest.mark.parametrize("family", FAMILIES)
def test_texts_over_the_window_limit_are_refused_and_a_huge_one_from_its_start(family, tag_clients,
                                                                            tag_pipelines) -> None:
    client, tokenizer = tag_clients[family], tag_pipelines[family].tokenizer
    limit = client.get("/info").get_json()["limits"]["max_batch"]  # a window counts as a text

    def windows(text: str) -> int:  # transformers' own cut, as the pipeline makes it
        return len(tokenizer(text, truncation=True, return_overflowing_tokens=True)["input_ids"])

    def refused(text: str) -> str:
        response = client.post("/", json={"inputs": text, "parameters": {"aggregation_strategy": "simple"}})
        assert response.status_code == 413, response.get_json()
        return response.get_json()["error"]

    words = 1
    while windows("alpha beta " * words) <= limit:
        words *= 2
    just_over = "alpha beta " * words  # fewer characters than the start the service reads first: counted whole
    assert refused(just_over) == (f"texts too long: they make {windows(just_over)} windows of "
                                  f"{tokenizer.model_max_length} tokens, the limit is {limit} per request")
    assert client.post("/", json={"inputs": "alpha beta " * (words // 4)}).status_code == 200
    # about 2 MB: refused from its start, whose windows are a lower bound of the text's
    huge = "alpha beta " * 180_000
    message = refused(huge)
    least = int(message.split("at least ")[1].split()[0])
    assert limit < least <= windows(huge[:len(huge) // 100]) < windows(huge[:len(huge) // 50])
    # No whitespace: the start is cut where the pre-tokenizer splits words, each CJK character for WordPiece
    # and each run of letters or of punctuation for byte-level BPE. Unigram's pre-tokenizer splits at spaces
    # only, so there the start is one word, no bound, and the text is counted whole.
    spaceless = "東京は日本の首都です。" * 20_000
    message = refused(spaceless)
    if family == "xlm-roberta":
        assert message == (f"texts too long: they make {windows(spaceless)} windows of "
                           f"{tokenizer.model_max_length} tokens, the limit is {limit} per request")
    else:
        least = int(message.split("at least ")[1].split()[0])
        assert limit < least <= windows(spaceless[:len(spaceless) // 10]) < windows(spaceless[:len(spaceless) // 5])


def test_an_int8_token_classifier_is_gated_on_tokens_and_entities(tmp_path: Path) -> None:
    checkpoint = build_token_checkpoint(tmp_path / "ner", "bert", seed=1)
    # A random tiny model's labels are close calls that int8 flips more often than a trained model's:
    # the gate is relaxed here to what such a model reaches, then tightened past it.
    folder = _export(checkpoint, tmp_path / "out", mode="auto", min_agreement=0.7)
    manifest = json.loads((folder / "manifest.json").read_text())
    gate = manifest["validation"]["gate"]
    assert manifest["validation"]["served_model"] == "onnx_int8" and gate["passed"]
    assert manifest["quantization"]["chosen"] and min(gate["token_agreement"], gate["entity_agreement"]) >= 0.7
    assert manifest["quantization"]["served"] == "int8" and "meets the gate" in manifest["quantization"]["why"]
    client = create_app({"MODEL_DIR": str(folder), "ORT_THREADS": 1}).test_client()
    assert client.post("/", json={"inputs": SHORT[0]}).status_code == 200
    reached = max(min(c["selection"]["token_agreement"], c["selection"]["entity_agreement"])
                  for c in manifest["quantization"]["candidates"])
    if reached < 1.0:
        with pytest.raises(ExportError, match="No int8 candidate met the gate"):
            _export(checkpoint, tmp_path / "strict", mode="auto", min_agreement=reached + 1e-6)


def test_the_task_can_be_forced_and_a_wrong_one_is_refused(tmp_path: Path) -> None:
    checkpoint = build_checkpoint(tmp_path / "nli", "bert", NLI_LABELS)
    folder = _export(checkpoint, tmp_path / "out", task="text-classification")
    assert json.loads((folder / "manifest.json").read_text())["task"] == "text-classification"
    client = create_app({"MODEL_DIR": str(folder), "ORT_THREADS": 1}).test_client()
    refused = client.post("/", json={"inputs": "a dog", "parameters": {"candidate_labels": ["animals"]}})
    assert refused.status_code == 400 and "needs an NLI model" in refused.get_json()["error"]
    with pytest.raises(ExportError, match="cannot do token-classification"):
        _export(checkpoint, tmp_path / "wrong", task="token-classification")
    sentiment = build_checkpoint(tmp_path / "sentiment", "bert")
    with pytest.raises(ExportError, match="none of its labels"):
        _export(sentiment, tmp_path / "nope", task="zero-shot-classification")
    # the zero-shot gate's labels are for zero-shot models only
    with pytest.raises(ExportError, match="apply to a zero-shot model.*this export is text-classification"):
        _export(sentiment, tmp_path / "labels", candidate_labels=("a", "b"))


# zero-shot

NLI_FAMILIES = ("bert", "roberta")
ZS_TEXTS = ["the movie was great fun", "an awful , boring plot", "i love this actor"]
ZS_LABELS = ["good", "bad", "film", "actor"]


@pytest.fixture(scope="module")
def nli(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Return per family (checkpoint, exported fp32 folder) of a tiny NLI model, exported from single texts."""
    built = {}
    for family in NLI_FAMILIES:
        root = tmp_path_factory.mktemp(f"nli-{family}")
        checkpoint = build_checkpoint(root / f"nli-{family}", family, NLI_LABELS)
        built[family] = (checkpoint, _export(checkpoint, root / "out"))
    return built


@pytest.fixture(scope="module")
def zs_clients(nli) -> dict[str, FlaskClient]:
    return {family: create_app({"MODEL_DIR": str(folder), "ORT_THREADS": 1}).test_client()
            for family, (_, folder) in nli.items()}


@pytest.fixture(scope="module")
def zs_pipelines(nli):
    return {family: _pipeline("zero-shot-classification", checkpoint) for family, (checkpoint, _) in nli.items()}


def test_an_nli_model_is_detected_as_zero_shot(nli) -> None:
    manifest = json.loads((nli["bert"][1] / "manifest.json").read_text())
    assert manifest["task"] == "zero-shot-classification"
    validation = manifest["validation"]["sets"]["validation"]
    assert validation["onnx_fp32_vs_pytorch"]["max_abs_score_diff"] < TOLERANCE


def test_an_int8_zero_shot_model_is_gated_on_its_ranking_of_labels(tmp_path: Path) -> None:
    # Wide weights: entailment logits differ from hypothesis to hypothesis, and int8 keeps their order.
    decisive = build_checkpoint(tmp_path / "decisive", "roberta", NLI_LABELS, seed=2, initializer_range=0.5)
    folder = _export(decisive, tmp_path / "out", mode="dynamic", min_agreement=0.9, max_accuracy_drop=1.0)
    gate = json.loads((folder / "manifest.json").read_text())["validation"]["gate"]
    ranking = gate["ranking"]
    assert gate["passed"] and ranking["passed"] and ranking["texts"] > 0
    assert ranking["top_agreement"] >= 0.9 and ranking["order_agreement"] <= ranking["top_agreement"]
    # Default weights: near-tied entailment logits, whose order int8 rounding may flip though every pair keeps
    # its NLI label; the gate follows the ranking either way.
    tied = build_checkpoint(tmp_path / "tied", "roberta", NLI_LABELS, seed=2)
    loose = _export(tied, tmp_path / "loose", mode="dynamic", min_agreement=0.99, max_accuracy_drop=1.0,
                    enforce_gate=False)
    gate = json.loads((loose / "manifest.json").read_text())["validation"]["gate"]
    assert gate["ranking"]["passed"] == (gate["ranking"]["top_agreement"] >= 0.99)
    assert gate["passed"] == (gate["ranking"]["passed"] and gate["agreement"] >= 0.99)
    if not gate["ranking"]["passed"]:
        with pytest.raises(ExportError, match="top candidate label first for"):
            _export(tied, tmp_path / "strict", mode="dynamic", min_agreement=0.99, max_accuracy_drop=1.0)


def test_the_zero_shot_gate_ranks_the_users_own_labels_and_template(tmp_path: Path) -> None:
    decisive = build_checkpoint(tmp_path / "decisive", "roberta", NLI_LABELS, seed=2, initializer_range=0.5)
    labels, template = ("billing", "refund", "delivery", "login"), "The customer writes about {}."
    # a random tiny model ranks some label sets as int8 does and not others: the gate judges the ones given
    folder = _export(decisive, tmp_path / "out", mode="dynamic", min_agreement=0.9, max_accuracy_drop=1.0,
                     candidate_labels=labels, hypothesis_template=template, enforce_gate=False)
    gate = json.loads((folder / "manifest.json").read_text())["validation"]["gate"]
    ranking = gate["ranking"]
    # every text's pairs were found and ranked: none is left out for not matching the hypotheses written
    assert ranking["labels"] == list(labels) and ranking["template"] == template and ranking["texts"] > 0
    assert ranking["passed"] == (ranking["top_agreement"] >= 0.9)
    assert gate["passed"] == (ranking["passed"] and gate["agreement"] >= 0.9)


@pytest.mark.parametrize("family", NLI_FAMILIES)
@pytest.mark.parametrize("multi_label", [False, True])
@pytest.mark.parametrize("template", [None, "The text is about {}."])
def test_candidate_labels_are_ranked_as_the_pipeline_ranks_them(family, multi_label, template, zs_clients,
                                                                zs_pipelines) -> None:
    parameters = {"candidate_labels": ZS_LABELS, "multi_label": multi_label,
                  **({"hypothesis_template": template} if template else {})}
    for text in ZS_TEXTS:
        answer = zs_clients[family].post("/", json={"inputs": text, "parameters": parameters}).get_json()
        expected = zs_pipelines[family](text, ZS_LABELS, multi_label=multi_label,
                                        **({"hypothesis_template": template} if template else {}))
        assert [entry["label"] for entry in answer] == expected["labels"]
        assert np.allclose([entry["score"] for entry in answer], expected["scores"], atol=TOLERANCE)
        if not multi_label:
            assert abs(sum(entry["score"] for entry in answer) - 1.0) < 1e-5


def test_the_pipelines_shape_for_old_clients_and_on_request(zs_clients, zs_pipelines) -> None:
    client, text = zs_clients["bert"], ZS_TEXTS[0]
    expected = zs_pipelines["bert"](text, ZS_LABELS)
    for headers, extra in (({"User-Agent": "unknown/None; hf_hub/0.36.2; python/3.12"}, {}),
                           ({}, {"response_format": "pipeline"})):
        answer = client.post("/", json={"inputs": text, "parameters": {"candidate_labels": ZS_LABELS, **extra}},
                             headers=headers).get_json()
        assert answer["sequence"] == text and answer["labels"] == expected["labels"]
        assert np.allclose(answer["scores"], expected["scores"], atol=TOLERANCE)
    listed = client.post("/", json={"inputs": text, "parameters": {"candidate_labels": ZS_LABELS}},
                         headers={"User-Agent": "unknown/None; hf_hub/1.2.0; python/3.12"}).get_json()
    assert [entry["label"] for entry in listed] == expected["labels"]


def test_labels_as_a_comma_separated_string_and_a_list_of_texts(zs_clients) -> None:
    client = zs_clients["roberta"]
    one = [client.post("/", json={"inputs": text, "parameters": {"candidate_labels": ZS_LABELS}}).get_json()
           for text in ZS_TEXTS]
    many = client.post("/", json={"inputs": ZS_TEXTS, "parameters": {"candidate_labels": " good, bad ,film,actor,"}})
    assert many.get_json() == one


def test_without_candidate_labels_an_nli_model_classifies(zs_clients) -> None:
    answer = zs_clients["bert"].post("/", json={"inputs": {"text": "a dog runs", "text_pair": "an animal moves"}})
    assert sorted(entry["label"] for entry in answer.get_json()[0]) == sorted(NLI_LABELS.values())


@pytest.mark.parametrize(("parameters", "status", "message"), [
    ({"candidate_labels": ["a"], "hypothesis_template": "no place"}, 400, "must hold the label's place as {}"),
    ({"candidate_labels": ["a"], "hypothesis_template": "{0.__class__}"}, 400, "must hold the label's place"),
    ({"candidate_labels": ["a"], "hypothesis_template": "{"}, 400, "must hold the label's place"),
    ({"candidate_labels": " , "}, 400, "must name at least one label"),
    ({"candidate_labels": [1, 2]}, 400, "must be a non-empty list of strings or a comma-separated string"),
    ({"candidate_labels": []}, 400, "must be a non-empty list of strings or a comma-separated string"),
    ({"candidate_labels": ["a"], "hypothesis_template": 3}, 400, "'hypothesis_template' must be a string"),
    ({"candidate_labels": ["a"], "multi_label": "yes"}, 400, "'multi_label' must be true or false"),
    ({"candidate_labels": ["a"], "response_format": "xml"}, 400, "'response_format' must be one of"),
    ({"candidate_labels": [str(i) for i in range(33)]}, 413, "33 text pairs, the limit is 32"),
    ({"candidate_labels": ["a"], "hypothesis_template": "{}{}"}, 400, "must hold the label's place"),
    ({"candidate_labels": ["a"], "hypothesis_template": "{0} " * 200}, 400, "leaves no room for the text"),
    ({"candidate_labels": ["ok", "x\ud800"]}, 400,
     "candidate_labels[1] is not valid Unicode: lone surrogate at character 1"),
    ({"candidate_labels": "ok,\udfff"}, 400, "candidate_labels is not valid Unicode: lone surrogate at character 3"),
    ({"candidate_labels": ["a"], "hypothesis_template": "{} \ud800"}, 400,
     "hypothesis_template is not valid Unicode: lone surrogate at character 3"),
])
def test_bad_zero_shot_parameters_are_refused(parameters, status, message, zs_clients) -> None:
    response = zs_clients["bert"].post("/", json={"inputs": ZS_TEXTS[0], "parameters": parameters})
    assert response.status_code == status and message in response.get_json()["error"], response.get_json()


def test_every_pair_counts_against_the_request_limit(nli) -> None:
    client = create_app({"MODEL_DIR": str(nli["bert"][1]), "ORT_THREADS": 1, "MAX_BATCH": 4,
                         "MAX_QUEUE": 4}).test_client()
    fits = client.post("/", json={"inputs": ZS_TEXTS[0], "parameters": {"candidate_labels": ZS_LABELS}})
    assert fits.status_code == 200
    over = client.post("/", json={"inputs": ZS_TEXTS[:2], "parameters": {"candidate_labels": ZS_LABELS[:3]}})
    assert over.status_code == 413 and "6 text pairs" in over.get_json()["error"]


@pytest.fixture(autouse=True)
def _quiet_pipelines():
    """transformers warns that the fallback word heuristic is used for BPE and unigram tokenizers; expected."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


# the real huggingface_hub clients against a real server

@pytest.fixture
def offline_hub_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the client post to a local base_url whatever HF_HUB_OFFLINE says, without a token."""
    from huggingface_hub import constants
    from huggingface_hub.utils import reset_sessions

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    reset_sessions()


def _entities(items: list[Any]) -> list[tuple]:
    """Return entities (dicts or the client's dataclasses) as comparable tuples, scores rounded."""
    def field(item: Any, name: str) -> Any:
        return item.get(name) if isinstance(item, dict) else getattr(item, name)

    return [(field(e, "entity_group") or field(e, "entity"), field(e, "word"), int(field(e, "start")),
             int(field(e, "end")), round(float(field(e, "score")), 3)) for e in items]


def test_the_inference_client_tags_tokens_and_ranks_labels_on_a_real_server(
        taggers, tag_pipelines, nli, zs_pipelines, offline_hub_allowed) -> None:
    from huggingface_hub import InferenceClient

    from tests.testkit import running_server

    text = SHORT[0]
    with running_server(SERVICE_MODEL_DIR=str(taggers["roberta"][1])) as server:
        client = InferenceClient(base_url=server.url, timeout=30)
        for strategy in STRATEGIES:
            assert _entities(client.token_classification(text, aggregation_strategy=strategy)) == \
                _entities(tag_pipelines["roberta"](text, aggregation_strategy=strategy))
        long = client.token_classification(LONG, aggregation_strategy="max", stride=4)
        assert _entities(long) == _entities(tag_pipelines["roberta"](LONG, aggregation_strategy="max", stride=4))
    with running_server(SERVICE_MODEL_DIR=str(nli["bert"][1])) as server:
        client = InferenceClient(base_url=server.url, timeout=30)
        for multi_label in (False, True):
            ranked = client.zero_shot_classification(ZS_TEXTS[1], ZS_LABELS, multi_label=multi_label,
                                                      hypothesis_template="It is {}.")
            expected = zs_pipelines["bert"](ZS_TEXTS[1], ZS_LABELS, multi_label=multi_label,
                                            hypothesis_template="It is {}.")
            assert [item.label for item in ranked] == expected["labels"]
            assert np.allclose([item.score for item in ranked], expected["scores"], atol=TOLERANCE)


NEW_CLIENT = "huggingface_hub==1.33.0"  # a client of the generation that reads zero-shot as a list
NEW_CLIENT_PROBE = r"""
import json, sys
from huggingface_hub import InferenceClient
client = InferenceClient(base_url=sys.argv[1], timeout=30)
if sys.argv[2] == "tag":
    found = client.token_classification(sys.argv[3], aggregation_strategy="simple")
    print(json.dumps([{"entity_group": e.entity_group, "word": e.word, "start": e.start, "end": e.end,
                       "score": e.score} for e in found]))
else:
    found = client.zero_shot_classification(sys.argv[3], json.loads(sys.argv[4]))
    print(json.dumps([{"label": e.label, "score": e.score} for e in found]))
"""


@pytest.fixture(scope="session")
def new_client_python() -> Path:
    """Return the python of a virtualenv holding the newer huggingface_hub (made once under .cache/)."""
    import subprocess
    import sys

    from tests.testkit import REPO

    venv = REPO / ".cache" / f"hub-client-{NEW_CLIENT.split('==')[1]}"
    python = venv / "bin" / "python"
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", NEW_CLIENT], check=True, timeout=600)
    return python


@pytest.mark.slow
def test_the_newer_inference_client_reads_both_tasks(taggers, tag_pipelines, nli, zs_pipelines,
                                                     new_client_python) -> None:
    import subprocess

    from tests.testkit import running_server

    def probe(url: str, *args: str) -> Any:
        env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}
        done = subprocess.run([str(new_client_python), "-c", NEW_CLIENT_PROBE, url, *args], capture_output=True,
                              text=True, timeout=120, env=env)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    text = SHORT[0]
    with running_server(SERVICE_MODEL_DIR=str(taggers["bert"][1])) as server:
        assert _entities(probe(server.url, "tag", text)) == \
            _entities(tag_pipelines["bert"](text, aggregation_strategy="simple"))
    with running_server(SERVICE_MODEL_DIR=str(nli["roberta"][1])) as server:
        ranked = probe(server.url, "zero-shot", ZS_TEXTS[0], json.dumps(ZS_LABELS))
        expected = zs_pipelines["roberta"](ZS_TEXTS[0], ZS_LABELS)
        assert [item["label"] for item in ranked] == expected["labels"]
        assert np.allclose([item["score"] for item in ranked], expected["scores"], atol=TOLERANCE)


def _v2(client: FlaskClient, name: str, inputs: list[dict[str, Any]], parameters: dict[str, Any] | None = None):
    body = {"inputs": inputs, **({"parameters": parameters} if parameters else {})}
    return client.post(f"/v2/models/{name}/infer", json=body)


def _bytes(name: str, data: list[str]) -> dict[str, Any]:
    return {"name": name, "datatype": "BYTES", "shape": [len(data)], "data": data}


def test_v2_tags_tokens_with_the_inference_apis_options(tag_clients) -> None:
    client = tag_clients["bert"]
    metadata = client.get("/v2/models/ner-bert").get_json()
    assert [t["name"] for t in metadata["inputs"]] == ["text"] and [t["name"] for t in metadata["outputs"]] == \
        ["entities"]
    parameters = {"aggregation_strategy": "first", "stride": 3, "ignore_labels": "O,MISC"}
    response = _v2(client, "ner-bert", [_bytes("text", [LONG, SHORT[0]])], parameters)
    assert response.status_code == 200, response.get_json()
    (output,) = response.get_json()["outputs"]
    assert output["name"] == "entities" and output["datatype"] == "BYTES" and output["shape"] == [2]
    expected = client.post("/", json={"inputs": [LONG, SHORT[0]], "parameters": {
        **parameters, "ignore_labels": ["O", "MISC"]}}).get_json()
    assert [json.loads(item) for item in output["data"]] == expected
    refused = _v2(client, "ner-bert", [_bytes("text", ["a"]), _bytes("text_pair", ["b"])])
    assert refused.status_code == 400 and "its inputs are 'text'" in refused.get_json()["error"]
    bad = _v2(client, "ner-bert", [_bytes("text", ["a"])], {"aggregation_strategy": "none", "stride": 2})
    assert bad.status_code == 400 and "needs an aggregation_strategy" in bad.get_json()["error"]


def test_v2_ranks_candidate_labels_and_classifies_without_them(zs_clients) -> None:
    client = zs_clients["roberta"]
    metadata = client.get("/v2/models/nli-roberta").get_json()
    assert "candidate_labels" in [t["name"] for t in metadata["inputs"]]
    response = _v2(client, "nli-roberta", [_bytes("text", ZS_TEXTS[:2]), _bytes("candidate_labels", ZS_LABELS)],
                   {"multi_label": True, "hypothesis_template": "It is {}."})
    assert response.status_code == 200, response.get_json()
    outputs = {output["name"]: output for output in response.get_json()["outputs"]}
    assert outputs["labels"]["shape"] == outputs["scores"]["shape"] == [2, len(ZS_LABELS)]
    expected = client.post("/", json={"inputs": ZS_TEXTS[:2], "parameters": {
        "candidate_labels": ZS_LABELS, "multi_label": True, "hypothesis_template": "It is {}."}}).get_json()
    assert outputs["labels"]["data"] == [entry["label"] for row in expected for entry in row]
    assert np.allclose(outputs["scores"]["data"], [entry["score"] for row in expected for entry in row], atol=1e-6)
    plain = _v2(client, "nli-roberta", [_bytes("text", ["a dog"]), _bytes("text_pair", ["an animal"])])
    assert [o["name"] for o in plain.get_json()["outputs"]] == ["label", "score", "probabilities", "logits"]


def test_both_tasks_answers_carry_teis_timing_headers_with_the_texts_counts(tag_clients, zs_clients) -> None:
    texts = [LONG, SHORT[2]]  # the long one makes several windows; the hypotheses are not the client's characters
    tag, zero_shot = tag_clients["bert"], zs_clients["bert"]
    answers = [
        tag.post("/", json={"inputs": texts, "parameters": {"aggregation_strategy": "simple"}}),
        _v2(tag, "ner-bert", [_bytes("text", texts)]),
        zero_shot.post("/", json={"inputs": texts, "parameters": {"candidate_labels": ZS_LABELS}}),
        _v2(zero_shot, "nli-bert", [_bytes("text", texts), _bytes("candidate_labels", ZS_LABELS)])]
    for response in answers:
        assert response.status_code == 200, response.get_json()
        assert int(response.headers["x-compute-characters"]) == sum(len(text) for text in texts)
        assert int(response.headers["x-compute-tokens"]) > 0
        assert int(response.headers["x-inference-time"]) <= int(response.headers["x-total-time"])


def test_tei_routes_refuse_a_token_classifier_as_tei_does(tag_clients) -> None:
    client = tag_clients["bert"]
    for path, body in (("/predict", {"inputs": "a"}), ("/rerank", {"query": "a", "texts": ["b"]})):
        response = client.post(path, json=body)
        assert response.status_code == 424 and response.get_json()["error_type"] == "Backend"
        assert "model is not a classifier model" in response.get_json()["error"]
    assert client.post("/tokenize", json={"inputs": SHORT[0]}).status_code == 200


def test_each_tasks_requests_and_answers_match_its_api_document(tag_clients, zs_clients) -> None:
    from tests.testkit import schema_errors

    cases = [(tag_clients["xlm-roberta"], {"inputs": SHORT, "parameters": {"aggregation_strategy": strategy}})
             for strategy in STRATEGIES]
    cases += [(zs_clients["bert"], {"inputs": text, "parameters": {"candidate_labels": ZS_LABELS, **extra}})
              for text in (ZS_TEXTS[0], ZS_TEXTS) for extra in ({}, {"response_format": "pipeline"})]
    cases.append((zs_clients["bert"], {"inputs": "a dog"}))
    for client, body in cases:
        document = client.get("/openapi.json").get_json()
        operation = document["paths"]["/"]["post"]
        assert schema_errors(body, operation["requestBody"]["content"]["application/json"]["schema"], document) == []
        answer = client.post("/", json=body)
        assert answer.status_code == 200
        schema = operation["responses"]["200"]["content"]["application/json"]["schema"]
        assert schema_errors(answer.get_json(), schema, document) == []


TASK_PROBE = r"""
import json, sys
HEAVY = ("torch", "transformers", "optimum", "export")
attempted = []

class Recorder:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            attempted.append(name)
        return None

sys.meta_path.insert(0, Recorder())
from service.app import create_app
client = create_app().test_client()
statuses = [client.post("/", json=json.loads(sys.argv[1])).status_code]
print(json.dumps({"statuses": statuses, "attempted": attempted}))
"""


def test_serving_either_task_imports_no_torch_transformers_or_export(taggers, nli) -> None:
    import subprocess
    import sys

    from tests.testkit import REPO, service_env

    for folder, body in ((taggers["roberta"][1], {"inputs": LONG, "parameters": {"aggregation_strategy": "max"}}),
                         (nli["bert"][1], {"inputs": ZS_TEXTS[0], "parameters": {"candidate_labels": ZS_LABELS}})):
        done = subprocess.run([sys.executable, "-c", TASK_PROBE, json.dumps(body)], cwd=REPO, capture_output=True,
                              text=True, timeout=120, env=service_env(SERVICE_MODEL_DIR=str(folder)))
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout.strip().splitlines()[-1]) == {"statuses": [200], "attempted": []}


@pytest.mark.parametrize("backend", ["pytorch", "optimum"])
def test_the_reference_backends_refuse_a_token_classifier(taggers, backend: str) -> None:
    from service.classifier import ModelLoadError

    with pytest.raises(ModelLoadError, match=f"SERVICE_BACKEND={backend} serves text classifiers"):
        create_app({"MODEL_DIR": str(taggers["bert"][0]), "BACKEND": backend})


PROBES = [3, 2.0, 2.5, -1, True, "x", "SIMPLE", "none", "pipeline", [], ["a"], [1], {}]


def test_each_declared_parameter_is_validated_and_documented_from_its_declaration(tag_clients, zs_clients) -> None:
    from service.contract import conforms
    from service.schemas import ZERO_SHOT_PARAMETERS, tag_parameters

    for client, declared, base in ((tag_clients["bert"], tag_parameters(21), {"aggregation_strategy": "simple"}),
                                   (zs_clients["bert"], ZERO_SHOT_PARAMETERS, {"candidate_labels": ["a", "b"]})):
        document = client.get("/openapi.json").get_json()
        request = document["components"]["schemas"]["InferenceRequest" if client in tag_clients.values()
                                                     else "ZeroShotRequest"]
        properties = request["properties"]["parameters"]
        properties = next((option for option in properties.get("anyOf", [properties]) if option.get("properties")),
                          properties)["properties"]
        for param in declared:
            assert properties[param.name]["anyOf"][0] == param.schema
            for value in PROBES:
                folded = value.lower() if param.fold_case and isinstance(value, str) else value
                answer = client.post("/", json={"inputs": "a film", "parameters": {**base, param.name: value}})
                refused = answer.status_code == 400 and answer.get_json()["error"] == param.message
                assert refused == (not conforms(folded, param.schema)), (param.name, value, answer.get_json())


def test_each_tasks_v2_requests_and_answers_match_its_api_document(tag_clients, zs_clients) -> None:
    from tests.testkit import schema_errors

    cases = [(tag_clients["roberta"], "ner-roberta", [_bytes("text", [LONG])],
              {"aggregation_strategy": "average", "stride": 3, "ignore_labels": ["O"]}),
             (zs_clients["bert"], "nli-bert", [_bytes("text", ZS_TEXTS), _bytes("candidate_labels", ZS_LABELS[:2])],
              {"multi_label": True}),
             (zs_clients["bert"], "nli-bert", [_bytes("text", ["a dog"]), _bytes("text_pair", ["an animal"])], {})]
    for client, name, inputs, parameters in cases:
        document = client.get("/openapi.json").get_json()
        operation = document["paths"]["/v2/models/{model_name}/infer"]["post"]
        body = {"inputs": inputs, "parameters": parameters}
        assert schema_errors(body, operation["requestBody"]["content"]["application/json"]["schema"], document) == []
        answer = client.post(f"/v2/models/{name}/infer", json=body)
        assert answer.status_code == 200, answer.get_json()
        schema = operation["responses"]["200"]["content"]["application/json"]["schema"]
        assert schema_errors(answer.get_json(), schema, document) == []
    refused = {"inputs": [_bytes("text", ["a"]), _bytes("text_pair", ["b"])]}
    document = tag_clients["roberta"].get("/openapi.json").get_json()
    schema = document["paths"]["/v2/models/{model_name}/infer"]["post"]["requestBody"]["content"][
        "application/json"]["schema"]
    assert schema_errors(refused, schema, document) != []  # a token classifier takes no text_pair


def test_one_candidate_label_is_scored_on_its_own_as_the_pipeline_does(zs_clients, zs_pipelines) -> None:
    for family in NLI_FAMILIES:
        answer = zs_clients[family].post("/", json={"inputs": ZS_TEXTS[2], "parameters": {
            "candidate_labels": "actor"}}).get_json()
        expected = zs_pipelines[family](ZS_TEXTS[2], "actor")
        assert [entry["label"] for entry in answer] == expected["labels"] == ["actor"]
        assert abs(answer[0]["score"] - expected["scores"][0]) < TOLERANCE and answer[0]["score"] < 1.0
