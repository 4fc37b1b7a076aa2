"""Several models in one process: a repository of model folders, each served under its name on every contract,
exactly as when served alone; the default model on the unprefixed routes; unknown and broken models."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from service.app import create_app
from service.config import ConfigError
from service.logs import ACCESS
from tests.export.tiny import SENTENCES
from tests.service.conftest import NER, SENTIMENT, TINY, link_copy
from tests.testkit import NEGATIVE, POSITIVE, REPO, schema_errors, service_env

TEXTS = [POSITIVE, NEGATIVE, "an average movie with some good moments"]


@pytest.fixture(scope="session")
def alone(repository: Path) -> dict[str, FlaskClient]:
    """Return a client of each model served alone from its own folder."""
    return {name: create_app({"MODEL_DIR": str(repository / name), "TESTING": True}).test_client()
            for name in (SENTIMENT, TINY, NER)}


def repository_app(folder: Path, **config: Any) -> Flask:
    """Return an app serving a repository."""
    return create_app({"MODEL_DIR": str(folder), "TESTING": True, **config})


@pytest.fixture(scope="session")
def together(repository: Path) -> FlaskClient:
    """Return a client of the three models served together, the default model on the unprefixed routes."""
    return repository_app(repository, DEFAULT_MODEL=SENTIMENT).test_client()


def v2_body(texts: list[str]) -> dict[str, Any]:
    """Return a JSON v2 inference request for texts."""
    return {"inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}]}


# (model, path under the model's prefix, body) for every contract the model's task answers
CALLS = [
    (SENTIMENT, "", {"inputs": TEXTS, "parameters": {"top_k": 2}}),
    (SENTIMENT, "/sentiment", {"texts": TEXTS, "top_k": None}),
    (SENTIMENT, "/predict", {"inputs": [[text] for text in TEXTS]}),
    (SENTIMENT, "/tokenize", {"inputs": TEXTS}),
    (TINY, "", {"inputs": TEXTS}),
    (TINY, "/sentiment", {"text": TEXTS[0]}),
    (TINY, "/predict", {"inputs": [TEXTS[0], TEXTS[1]], "raw_scores": True}),
    (NER, "", {"inputs": SENTENCES[:3], "parameters": {"aggregation_strategy": "simple"}}),
    (NER, "", {"inputs": SENTENCES[3]}),
    (NER, "/predict", {"inputs": "a text"}),  # 424: not a classifier, as alone
]


@pytest.mark.parametrize(("name", "path", "body"), CALLS)
def test_each_model_answers_under_its_name_exactly_as_when_served_alone(
        name: str, path: str, body: dict[str, Any], together: FlaskClient, alone: dict[str, FlaskClient]) -> None:
    expected = alone[name].post(path or "/", json=body)
    answer = together.post(f"/models/{name}{path}", json=body)
    assert (answer.status_code, answer.get_json()) == (expected.status_code, expected.get_json())
    if name == SENTIMENT:  # the default model: the unprefixed routes too
        unprefixed = together.post(path or "/", json=body)
        assert (unprefixed.status_code, unprefixed.get_json()) == (expected.status_code, expected.get_json())


def test_a_model_of_another_task_says_where_its_requests_go(together: FlaskClient) -> None:
    answer = together.post(f"/models/{NER}/sentiment", json={"text": "a"})
    assert answer.status_code == 400 and answer.get_json()["error"].endswith(f"send its requests to POST /models/{NER}")


def test_a_models_url_with_a_trailing_slash_is_the_same_url(together: FlaskClient) -> None:
    # InferenceClient(base_url=".../models/x/") posts to the base_url as written
    slash, plain = (together.post(f"/models/{TINY}{end}", json={"inputs": TEXTS}) for end in ("/", ""))
    assert (slash.status_code, slash.get_json()) == (plain.status_code, plain.get_json()) and plain.status_code == 200
    assert together.get(f"/models/{TINY}/").get_json() == together.get(f"/models/{TINY}").get_json()


@pytest.mark.parametrize("name", [SENTIMENT, TINY, NER])
def test_each_model_answers_v2_under_its_folder_name_as_when_served_alone(
        name: str, together: FlaskClient, alone: dict[str, FlaskClient]) -> None:
    served_alone = alone[name].get("/info").get_json()["model"]["name"]  # its manifest's name when alone
    expected = alone[name].post(f"/v2/models/{served_alone}/infer", json=v2_body(TEXTS[:2])).get_json()
    answer = together.post(f"/v2/models/{name}/infer", json=v2_body(TEXTS[:2]))
    assert answer.status_code == 200
    assert answer.get_json() == {**expected, "model_name": name}
    metadata = together.get(f"/v2/models/{name}").get_json()
    assert {**metadata, "name": served_alone} == alone[name].get(f"/v2/models/{served_alone}").get_json()
    assert together.get(f"/v2/models/{name}/ready").get_json() == {"name": name, "ready": True}


def test_the_document_describes_every_models_requests_and_answers(together: FlaskClient) -> None:
    document = together.get("/openapi.json").get_json()
    inference = document["paths"]["/models/{served_model}"]["post"]
    infer = document["paths"]["/v2/models/{model_name}/infer"]["post"]
    calls = [(f"/models/{name}", body, inference) for name, path, body in CALLS if path == ""]
    calls += [(f"/models/{NER}", {"inputs": SENTENCES[:2], "parameters": {"aggregation_strategy": "none"}}, inference)]
    calls += [(f"/v2/models/{name}/infer", v2_body(TEXTS[:2]), infer) for name in (SENTIMENT, TINY, NER)]
    calls += [(f"/v2/models/{NER}/infer", {**v2_body(TEXTS[:1]), "parameters": {"aggregation_strategy": "first"}},
               infer)]
    for path, body, operation in calls:
        assert schema_errors(body, operation["requestBody"]["content"]["application/json"]["schema"], document) == []
        answer = together.post(path, json=body)
        assert answer.status_code == 200, (path, answer.get_json())
        schema = operation["responses"]["200"]["content"]["application/json"]["schema"]
        assert schema_errors(answer.get_json(), schema, document) == [], path


UNKNOWN = [
    ("POST", "/models/nope", {"inputs": "a"}),
    ("POST", "/models/nope/sentiment", {"text": "a"}),
    ("POST", "/models/nope/predict", {"inputs": "a"}),
    ("POST", "/models/nope/rerank", {"query": "a", "texts": ["b"]}),
    ("POST", "/models/nope/tokenize", {"inputs": "a"}),
    ("GET", "/models/nope/info", None),
    ("GET", "/models/nope", None),
    ("GET", "/models/[nope'", None),  # what a client sends of a name with '#' or '?' in it
    ("GET", "/v2/models/nope", None),
    ("GET", "/v2/models/nope/ready", None),
    ("POST", "/v2/models/nope/infer", v2_body(["a"])),
    ("POST", "/v2/repository/models/nope/load", {}),
    ("POST", "/v2/repository/models/nope/unload", {}),
]


@pytest.mark.parametrize(("method", "path", "body"), UNKNOWN)
def test_an_unknown_model_is_404_json_on_every_contract(method: str, path: str, body: Any, together: FlaskClient,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=ACCESS):
        answer = together.open(path, method=method, json=body)
    assert answer.status_code == 404
    assert "nope" in answer.get_json()["error"]
    # the record names the model asked for; a name no model has never becomes a metric's label
    assert "nope" in next(record.fields["model"] for record in caplog.records if record.name == ACCESS)
    assert "nope" not in together.get("/metrics").get_data(as_text=True)


def test_info_lists_every_model_with_task_labels_state_and_memory(together: FlaskClient) -> None:
    info = together.get("/info").get_json()
    assert info["default_model"] == SENTIMENT and info["model"]["name"] == SENTIMENT
    models = {model["name"]: model for model in info["models"]}
    assert sorted(models) == [NER, SENTIMENT, TINY]
    assert (models[SENTIMENT]["task"], models[SENTIMENT]["labels"]) == ("text-classification", ["NEGATIVE", "POSITIVE"])
    assert models[TINY]["labels"] == ["negative", "neutral", "positive"]
    assert models[NER]["task"] == "token-classification"
    assert all(model["state"] == "READY" and model["ready"] for model in models.values())
    assert [model["default"] for model in models.values()].count(True) == 1
    # the weights: the default model's ~57 MiB int8 graph and data, far more than a tiny model's
    assert models[SENTIMENT]["memory"]["weights_bytes"] > 100 * models[TINY]["memory"]["weights_bytes"] > 0
    assert info["run_budget"] >= 1
    assert together.get(f"/models/{TINY}/info").get_json()["model"]["labels"] == ["negative", "neutral", "positive"]
    # a model's URL answers GET with its /info, as Triton's model URL answers with its metadata
    assert together.get(f"/models/{TINY}").get_json() == together.get(f"/models/{TINY}/info").get_json()


def test_metrics_count_requests_per_model(together: FlaskClient) -> None:
    together.post(f"/models/{TINY}/sentiment", json={"text": "a"})
    together.post("/sentiment", json={"text": "a"})
    text = together.get("/metrics").get_data(as_text=True)
    counts = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line.startswith("service_model_requests_total{")}
    assert counts[f'service_model_requests_total{{model="{TINY}",status="200"}}'] >= 1
    assert counts[f'service_model_requests_total{{model="{SENTIMENT}",status="200"}}'] >= 1
    assert 'route="/models/<served_model>/sentiment"' in text  # the route template, never the raw path


def test_a_repository_of_one_model_serves_it_by_default(tmp_path: Path, tiny_models: dict[int, Path]) -> None:
    link_copy(tiny_models[2], tmp_path / "only")
    client = repository_app(tmp_path).test_client()
    assert client.post("/sentiment", json={"text": "a"}).status_code == 200
    assert client.get("/info").get_json()["default_model"] == "only"
    assert client.post("/v2/models/only/infer", json=v2_body(["a"])).status_code == 200


def test_several_models_need_a_default_model(repository: Path) -> None:
    with pytest.raises(ConfigError, match="set SERVICE_DEFAULT_MODEL") as caught:
        repository_app(repository)
    assert all(name in str(caught.value) for name in (SENTIMENT, TINY, NER))
    with pytest.raises(ConfigError, match="'other' is not a model of"):
        repository_app(repository, DEFAULT_MODEL="other")


def test_start_up_says_what_to_set_in_one_line(repository: Path) -> None:
    """`python -m service` on a repository of several models and no default: one line, exit 2, no traceback."""
    done = subprocess.run([sys.executable, "-m", "service"], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env=service_env(SERVICE_MODEL_DIR=str(repository)))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert "set SERVICE_DEFAULT_MODEL" in done.stderr and "Traceback" not in done.stderr


def test_a_single_model_folder_refuses_a_default_model_it_is_not(model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="unset it"):
        create_app({"MODEL_DIR": str(model_dir), "DEFAULT_MODEL": "x"})


def test_a_broken_folder_is_named_and_the_others_are_served(tmp_path: Path, tiny_models: dict[int, Path],
                                                           caplog: pytest.LogCaptureFixture) -> None:
    link_copy(tiny_models[2], tmp_path / "good")
    broken = link_copy(tiny_models[3], tmp_path / "broken")
    (broken / "config.json").unlink()  # listed in its manifest, now missing
    (tmp_path / "empty").mkdir()
    client = repository_app(tmp_path, DEFAULT_MODEL="good").test_client()
    failed = [record.getMessage() for record in caplog.records if "is not served" in record.getMessage()]
    assert any(str(broken) in line and "config.json" in line for line in failed)
    assert any(str(tmp_path / "empty") in line for line in failed)
    models = {model["name"]: model for model in client.get("/info").get_json()["models"]}
    assert (models["broken"]["state"], models["empty"]["state"], models["good"]["state"]) == \
        ("UNAVAILABLE", "UNAVAILABLE", "READY")
    assert "config.json" in models["broken"]["reason"]
    answer = client.post("/models/broken/sentiment", json={"text": "a"})
    assert answer.status_code == 503 and "config.json" in answer.get_json()["error"]
    assert client.post("/models/good/sentiment", json={"text": "a"}).status_code == 200
    assert client.get("/ready").status_code == 200  # the models it serves are ready
    with pytest.raises(ConfigError, match="the default model 'broken'"):
        repository_app(tmp_path, DEFAULT_MODEL="broken")


def test_metadata_lists_the_repository_extension(together: FlaskClient) -> None:
    assert "model_repository" in together.get("/v2").get_json()["extensions"]
    index = together.post("/v2/repository/index").get_json()
    assert index == [{"name": name, "version": "1", "state": "READY"} for name in (NER, SENTIMENT, TINY)]


def test_json_body_of_an_index_request_is_read(together: FlaskClient) -> None:
    assert together.post("/v2/repository/index", data=json.dumps({"ready": True})).status_code == 200
    answer = together.post("/v2/repository/index", data="[1]")
    assert answer.status_code == 400 and answer.get_json() == {"error": "the request must be a JSON object"}


@pytest.fixture
def changing(repository: Path, tmp_path: Path) -> FlaskClient:
    """Return a client of a repository of its own (loads and unloads change it): the default model and tiny."""
    folder = tmp_path / "repository"
    folder.mkdir()
    link_copy(repository / SENTIMENT, folder / SENTIMENT)
    link_copy(repository / TINY, folder / TINY)
    return repository_app(folder, DEFAULT_MODEL=SENTIMENT, API_KEY="k3y").test_client()


KEY = {"Authorization": "Bearer k3y"}


def test_unload_refuses_the_models_requests_and_load_brings_it_back(changing: FlaskClient,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    before = changing.post(f"/models/{TINY}/sentiment", json={"texts": TEXTS}, headers=KEY).get_json()
    assert changing.post(f"/v2/repository/models/{TINY}/unload", headers=KEY).status_code == 200
    calls = ((f"/models/{TINY}/sentiment", {"text": "a"}), (f"/models/{TINY}", {"inputs": "a"}),
             (f"/models/{TINY}/predict", {"inputs": "a"}), (f"/v2/models/{TINY}/infer", v2_body(["a"])))
    with caplog.at_level(logging.INFO, logger=ACCESS):
        for path, body in calls:
            answer = changing.post(path, json=body, headers=KEY)
            assert answer.status_code == 503, path
            assert answer.get_json()["error"].startswith(f"model '{TINY}' is not available (UNAVAILABLE: unloaded)")
    # each refusal is the unloaded model's: in its access record and its own count
    assert [record.fields["model"] for record in caplog.records if record.name == ACCESS] == [TINY] * len(calls)
    metrics = changing.get("/metrics", headers=KEY).get_data(as_text=True)
    assert f'service_model_requests_total{{model="{TINY}",status="503"}} {len(calls)}.0' in metrics
    ready = changing.get(f"/v2/models/{TINY}/ready", headers=KEY)
    assert ready.status_code == 503 and ready.get_json()["name"] == TINY and ready.get_json()["ready"] is False
    index = changing.post("/v2/repository/index", headers=KEY).get_json()
    assert {"name": TINY, "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"} in index
    # the other models never notice
    assert changing.post("/sentiment", json={"text": "a"}, headers=KEY).status_code == 200
    assert changing.get("/ready").status_code == 200
    assert changing.post(f"/v2/repository/models/{TINY}/load", headers=KEY).status_code == 200
    assert changing.post(f"/models/{TINY}/sentiment", json={"texts": TEXTS}, headers=KEY).get_json() == before


def test_unloading_the_default_model_refuses_the_unprefixed_routes(changing: FlaskClient) -> None:
    assert changing.post(f"/v2/repository/models/{SENTIMENT}/unload", headers=KEY).status_code == 200
    answer = changing.post("/sentiment", json={"text": "a"}, headers=KEY)
    assert answer.status_code == 503 and f"model '{SENTIMENT}' is not available" in answer.get_json()["error"]
    assert changing.post(f"/models/{TINY}/sentiment", json={"text": "a"}, headers=KEY).status_code == 200
    # /info says so, in its documented shape, and the settings the model gets back when loaded
    before = changing.get("/info", headers=KEY)
    document = changing.get("/openapi.json").get_json()
    assert before.get_json()["model"] is None
    assert schema_errors(before.get_json(), {"$ref": "#/components/schemas/Info"}, document) == []
    assert before.get_json()["batching"]["enabled"] is True
    assert changing.post(f"/v2/repository/models/{SENTIMENT}/load", headers=KEY).status_code == 200
    assert changing.get("/info", headers=KEY).get_json()["batching"] == before.get_json()["batching"]
    assert changing.post("/sentiment", json={"text": POSITIVE}, headers=KEY).get_json()["label"] == "POSITIVE"


def test_the_repository_routes_need_the_api_key(changing: FlaskClient) -> None:
    for path in ("/v2/repository/index", f"/v2/repository/models/{TINY}/load", f"/v2/repository/models/{TINY}/unload"):
        assert changing.post(path).status_code == 401
    assert changing.post(f"/models/{TINY}/sentiment", json={"text": "a"}, headers=KEY).status_code == 200


def test_load_takes_only_folders_inside_the_repository(changing: FlaskClient, tmp_path: Path,
                                                       tiny_models: dict[int, Path]) -> None:
    folder = Path(changing.application.config["MODEL_DIR"])
    outside = link_copy(tiny_models[2], tmp_path / "outside")
    (folder / "escape").symlink_to(outside)  # a link out of the repository
    (folder / "deeper").mkdir()
    link_copy(tiny_models[2], folder / "deeper" / "model")
    (folder / "broken").mkdir()
    (folder / "broken" / "manifest.json").write_text("{}")
    cases = {
        "escape": (400, "not inside the repository"),
        "..": (400, "invalid model name"),
        ".hidden": (400, "invalid model name"),
        "deeper%2Fmodel": (404, None),  # a slash is no part of a name: no such route
        "%2Fetc": (308, None),  # Werkzeug merges the double slash: a redirect to .../models/etc/load, a 404
        "..%2F..%2Fetc": (404, None),
        "deeper": (400, "failed to load 'deeper'"),  # a folder of folders, not a model
        "broken": (400, "failed to load 'broken': broken/manifest.json lacks"),  # named as in the repository
        "missing": (404, "'missing' is not in the repository"),
    }
    for name, (status, message) in cases.items():
        answer = changing.post(f"/v2/repository/models/{name}/load", headers=KEY)
        assert answer.status_code == status, name
        assert status == 308 or "error" in answer.get_json()
        if message:
            assert message in answer.get_json()["error"], name
            assert str(tmp_path) not in answer.get_json()["error"]  # no path of the machine's
    assert changing.post("/models/escape/sentiment", json={"text": "a"}, headers=KEY).status_code in (404, 503)
    served = {row["name"]: row["state"] for row in changing.post("/v2/repository/index", headers=KEY).get_json()}
    assert served[SENTIMENT] == served[TINY] == "READY" and served.get("escape") != "READY"
    answer = changing.post(f"/v2/repository/models/{TINY}/load", headers=KEY, json={"parameters": {"config": "{}"}})
    assert answer.status_code == 400 and "not supported" in answer.get_json()["error"]


def test_a_single_model_folder_has_no_repository_routes(client: FlaskClient) -> None:
    answer = client.post("/v2/repository/models/minilm-l6-sentiment/unload")
    assert answer.status_code == 404 and answer.get_json() == {"error": "not found"}
    assert "model_repository" not in client.get("/v2").get_json()["extensions"]
    assert client.post("/sentiment", json={"text": "a"}).status_code == 200
