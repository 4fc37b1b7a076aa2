"""The Kubernetes and KServe manifests: valid offline against real schemas, and true to the service."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from service import create_app
from service.config import DEFAULTS, SETTINGS, Settings
from service.models import check_layout
from service.tracing import EXIT_FLUSH_SECONDS
from tests.deploy.manifests import (
    DEPLOY,
    KUBERNETES_VERSIONS,
    REPO,
    ManifestError,
    load,
    manifests,
    render,
    validate_core,
    validate_kserve,
)

KUBERNETES = manifests("kubernetes/base")
KSERVE = manifests("kserve")
KSERVE_MULTI = manifests("kserve/multi-model")
MULTI_FILES = manifests("kubernetes/multi-model")  # the overlay's own files, its Deployment a patch
CORE_KINDS = ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget")
MULTI_KINDS = (*CORE_KINDS, "PersistentVolumeClaim", "Pod")  # the overlay rendered, and its loader pod
APPLIED_ALONE = ("model-loader.yaml",)  # in deploy/kubernetes/multi-model, left out of its kustomization
KSERVE_MODEL_PATH = "/mnt/models"  # where KServe puts the folder that a storageUri names
DOCS = (REPO / "docs" / "deployment.md").read_text()
# the user the image runs as (Dockerfile USER uid:gid)
IMAGE_USER = [int(part) for part in re.search(r"^USER (\d+):(\d+)$", (REPO / "Dockerfile").read_text(),
                                               re.MULTILINE).groups()]


def container(pod_spec: dict[str, Any]) -> dict[str, Any]:
    """Return the only container of a pod spec."""
    assert len(pod_spec["containers"]) == 1
    return pod_spec["containers"][0]


def env(spec: dict[str, Any]) -> dict[str, str]:
    """Return a container's environment as a mapping."""
    return {item["name"]: item["value"] for item in spec.get("env", [])}


@cache
def multi_model() -> dict[str, dict[str, Any]]:
    """Return the multi-model overlay as kustomize renders it, with the loader pod applied beside it."""
    return {**render("kubernetes/multi-model"), "Pod": MULTI_FILES["Pod"]}


def core(folder: str) -> dict[str, dict[str, Any]]:
    """Return the core documents of a deployment: "base" (single model) or "multi-model" (rendered)."""
    return KUBERNETES if folder == "base" else multi_model()


def test_the_folders_hold_the_kinds_this_page_checks() -> None:
    assert sorted(KUBERNETES) == sorted((*CORE_KINDS, "Kustomization"))
    assert sorted(MULTI_FILES) == ["Deployment", "Kustomization", "PersistentVolumeClaim", "Pod"]
    assert sorted(manifests("kubernetes")) == ["Kustomization"]
    assert sorted(KSERVE) == ["InferenceService", "ServingRuntime"]
    assert sorted(KSERVE_MULTI) == ["InferenceService"]


CORE_DOCUMENTS = [("base", kind) for kind in CORE_KINDS] + [("multi-model", kind) for kind in MULTI_KINDS]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(("folder", "kind"), CORE_DOCUMENTS, ids=[f"{f}-{k}" for f, k in CORE_DOCUMENTS])
def test_core_manifest_is_valid_strictly(folder: str, kind: str, version: str) -> None:
    validate_core(core(folder)[kind], version)


KSERVE_FOLDERS = {"kserve": KSERVE, "kserve/multi-model": KSERVE_MULTI}


@pytest.mark.parametrize(("folder", "kind"), [("kserve", "InferenceService"), ("kserve", "ServingRuntime"),
                                              ("kserve/multi-model", "InferenceService")])
def test_kserve_manifest_is_valid_against_the_sdk_models(folder: str, kind: str) -> None:
    validate_kserve(KSERVE_FOLDERS[folder][kind])


def _rename(document: dict[str, Any], path: list[Any], new_key: str) -> None:
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    parent[new_key] = parent.pop(path[-1])


def _set(document: dict[str, Any], path: list[Any], value: Any) -> None:
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    if value is _DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value


_DELETE = object()
_POD = ["spec", "template", "spec"]
_KSERVE_CONTAINER = ["spec", "containers", 0]
_KSERVE_MODEL = ["spec", "predictor", "model"]


@pytest.mark.parametrize(("kind", "mutate", "message"), [
    ("Deployment", lambda d: _rename(d, [*_POD, "containers", 0, "readinessProbe"], "readinessProbes"),
     "readinessProbes"),
    ("Deployment", lambda d: _set(d, [*_POD, "terminationGracePeriodSeconds"], "20"), "'20' is not of type"),
    ("Deployment", lambda d: _set(d, [*_POD, "containers", 0, "name"], _DELETE), "'name' is a required property"),
    ("HorizontalPodAutoscaler",
     lambda d: _set(d, ["spec", "metrics", 0, "resource", "target", "averageUtilization"], "70%"), "'70%'"),
    ("PodDisruptionBudget", lambda d: _set(d, ["spec", "selector"], "app"), "'app' is not of type"),
    ("PersistentVolumeClaim", lambda d: _set(d, ["spec", "accessModes"], "ReadWriteMany"),
     "'ReadWriteMany' is not of type 'array'"),
    ("Pod", lambda d: _rename(d, ["spec", "volumes", 0, "persistentVolumeClaim"], "persistentVolumeClaims"),
     "persistentVolumeClaims"),
])
def test_core_validation_fails_on_a_broken_manifest(kind: str, mutate: Any, message: str) -> None:
    broken = copy.deepcopy(KUBERNETES.get(kind) or multi_model()[kind])
    mutate(broken)
    with pytest.raises(ManifestError, match=re.escape(message)):
        validate_core(broken, KUBERNETES_VERSIONS[-1])


@pytest.mark.parametrize(("kind", "mutate", "message"), [
    # a misspelt KServe field, at two depths
    ("InferenceService", lambda d: _rename(d, ["spec", "predictor", "model", "protocolVersion"], "protocolVerison"),
     "protocolVerison: not a field of V1beta1ModelSpec"),
    ("InferenceService", lambda d: _rename(d, ["spec", "predictor"], "predicter"), "predicter"),
    # a required field missing (the SDK model rejects it)
    ("InferenceService", lambda d: _set(d, ["spec", "predictor"], _DELETE), "`predictor`, must not be `None`"),
    ("ServingRuntime", lambda d: _set(d, ["spec", "containers"], _DELETE), "`containers`, must not be `None`"),
    # wrong types: a KServe field and a Kubernetes field inside a runtime container
    ("InferenceService", lambda d: _set(d, ["spec", "predictor", "minReplicas"], "2"), "expected int"),
    ("ServingRuntime", lambda d: _set(d, [*_KSERVE_CONTAINER, "ports", 0, "containerPort"], "8080"),
     "containers[0].ports[0].containerPort: '8080' is not of type"),
    # a misspelt Kubernetes field inside a KServe document
    ("ServingRuntime", lambda d: _rename(d, [*_KSERVE_CONTAINER, "readinessProbe"], "readynessProbe"),
     "readynessProbe"),
    # the multi-model InferenceService: a misspelt field and a Kubernetes type inside its model spec
    ("multi-model/InferenceService", lambda d: _rename(d, [*_KSERVE_MODEL, "storageUri"], "storageURI"),
     "storageURI: not a field of V1beta1ModelSpec"),
    ("multi-model/InferenceService", lambda d: _set(d, [*_KSERVE_MODEL, "env", 0, "value"], 1),
     "env[0].value: 1 is not of type 'string'"),
])
def test_kserve_validation_fails_on_a_broken_manifest(kind: str, mutate: Any, message: str) -> None:
    broken = copy.deepcopy(KSERVE_MULTI["InferenceService"] if kind.startswith("multi-model/") else KSERVE[kind])
    mutate(broken)
    with pytest.raises(ManifestError, match=re.escape(message)):
        validate_kserve(broken)


@pytest.mark.parametrize("folder", ["kubernetes/base", "kubernetes/multi-model"])
def test_kustomization_lists_every_manifest_of_its_folder(folder: str) -> None:
    kustomization = manifests(folder)["Kustomization"]
    listed = [r for r in kustomization["resources"] if r.endswith(".yaml")]  # not the base: a folder
    listed += [patch["path"] for patch in kustomization.get("patches", [])]
    present = sorted(p.name for p in (DEPLOY / folder).glob("*.yaml")
                     if p.name not in ("kustomization.yaml", *APPLIED_ALONE))
    assert sorted(listed) == present


def test_the_top_kustomization_is_the_base_and_the_overlay_builds_on_it() -> None:
    base = {kind: document for kind, document in KUBERNETES.items() if kind != "Kustomization"}
    assert render("kubernetes") == render("kubernetes/base") == base
    assert "../base" in MULTI_FILES["Kustomization"]["resources"]
    # the overlay changes the Deployment alone and adds the claim: Service, autoscaler and budget as in base
    for kind in ("Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"):
        assert multi_model()[kind] == KUBERNETES[kind]


def test_every_manifest_file_parses_to_documents_with_a_kind() -> None:
    for path in sorted(DEPLOY.rglob("*.yaml")):
        documents = load(path)
        assert documents and all("kind" in d and "apiVersion" in d for d in documents), path


# --- the manifests agree with the service and the image ---

POD = KUBERNETES["Deployment"]["spec"]["template"]["spec"]
CLASSIFIER = container(POD)
RUNTIME = container(KSERVE["ServingRuntime"]["spec"])


def pod(folder: str) -> dict[str, Any]:
    """Return the pod spec of the Deployment of "base" or "multi-model"."""
    return core(folder)["Deployment"]["spec"]["template"]["spec"]


def kserve_container(isvc: dict[str, Any]) -> dict[str, Any]:
    """Return the runtime's container as KServe runs it for an InferenceService: the model spec's container
    fields merged into it (env by name, the model's winning; resources by key)."""
    model = isvc["spec"]["predictor"]["model"]
    merged = copy.deepcopy(RUNTIME)
    merged["env"] = list({item["name"]: item for item in [*RUNTIME.get("env", []), *model.get("env", [])]}.values())
    for key, values in model.get("resources", {}).items():
        merged["resources"][key] = {**merged["resources"].get(key, {}), **values}
    return merged


# each container the manifests run the image in
CONTAINERS: dict[str, Callable[[], dict[str, Any]]] = {
    "deployment": lambda: CLASSIFIER,
    "servingruntime": lambda: RUNTIME,
    "deployment-multi-model": lambda: container(pod("multi-model")),
    "inferenceservice-multi-model": lambda: kserve_container(KSERVE_MULTI["InferenceService"]),
}


def _prestop_seconds(spec: dict[str, Any]) -> float:
    command = spec.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    return float(command[1]) if command[:1] == ["sleep"] else 0.0


def _shutdown_timeout(spec: dict[str, Any]) -> float:
    return float(env(spec).get("SERVICE_SHUTDOWN_TIMEOUT", DEFAULTS["SHUTDOWN_TIMEOUT"]))


@pytest.mark.parametrize("folder", ["base", "multi-model"])
def test_deployment_probes_the_service_health_routes_on_its_port(folder: str) -> None:
    classifier = container(pod(folder))
    port = int(env(classifier)["SERVICE_PORT"])
    ports = {p["name"]: p["containerPort"] for p in classifier["ports"]}
    assert classifier["readinessProbe"]["httpGet"]["path"] == "/ready"  # 503 from SIGTERM on
    assert classifier["livenessProbe"]["httpGet"]["path"] == "/health"
    assert classifier["startupProbe"]["httpGet"]["path"] == "/health"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert ports[classifier[probe]["httpGet"]["port"]] == port


@pytest.mark.parametrize("folder", ["base", "multi-model"])
def test_deployment_grace_period_covers_the_prestop_sleep_and_the_drain(folder: str) -> None:
    classifier = container(pod(folder))
    prestop, drain = _prestop_seconds(classifier), _shutdown_timeout(classifier)
    assert prestop >= 3, "endpoints and proxies need a few seconds to drop a terminating pod"
    # with tracing on, the spans still queued get a bounded time at exit, after the drain
    assert pod(folder)["terminationGracePeriodSeconds"] > prestop + drain + EXIT_FLUSH_SECONDS


@pytest.mark.parametrize("folder", ["kserve", "kserve/multi-model"])
def test_kserve_grace_period_covers_the_drain(folder: str) -> None:
    isvc = KSERVE_FOLDERS[folder]["InferenceService"]
    predictor = isvc["spec"]["predictor"]
    assert predictor["terminationGracePeriodSeconds"] > _shutdown_timeout(kserve_container(isvc)) \
        + EXIT_FLUSH_SECONDS + 5


def _service_settings(spec: dict[str, Any]) -> dict[str, str]:
    return {name.removeprefix("SERVICE_"): value for name, value in env(spec).items() if name.startswith("SERVICE_")}


@pytest.mark.parametrize("name", CONTAINERS)
def test_the_settings_are_valid_and_the_logs_json(name: str) -> None:
    settings = _service_settings(CONTAINERS[name]())
    parsed = Settings.from_mapping({**settings, "MODEL_DIR": str(REPO / DEFAULTS["MODEL_DIR"])})
    assert parsed.log_format == "json" and parsed.access_log is True  # what a log collector parses


@pytest.mark.parametrize("name", CONTAINERS)
def test_every_service_variable_is_a_setting_of_the_service(name: str) -> None:
    # Settings.from_mapping ignores a name it does not know: a misspelt variable would be silently unset
    known = {setting.variable for setting in SETTINGS}
    assert [v for v in env(CONTAINERS[name]()) if v.startswith("SERVICE_") and v not in known] == []


@pytest.mark.parametrize("name", CONTAINERS)
def test_cpu_is_whole_cores_with_requests_equal_to_limits(name: str) -> None:
    # the service takes ceil(cpu.max quota) onnxruntime threads: a fractional limit would run more
    # threads than the quota allows (throttling), a request below the limit would not guarantee them
    spec = CONTAINERS[name]()
    resources = spec["resources"]
    assert resources["requests"] == resources["limits"]
    assert re.fullmatch(r"[1-9][0-9]*", str(resources["limits"]["cpu"])), resources["limits"]["cpu"]
    assert "SERVICE_ORT_THREADS" not in env(spec), "a fixed thread count would not follow the CPU limit"


@pytest.mark.parametrize("kind", ["deployment", "servingruntime", "deployment-multi-model"])
def test_runs_as_the_image_user_with_a_read_only_root_and_a_tmp_volume(kind: str) -> None:
    if kind.startswith("deployment"):
        pod_spec = pod("base" if kind == "deployment" else "multi-model")
        spec = container(pod_spec)
        security = {**pod_spec["securityContext"], **spec["securityContext"]}
        volumes = pod_spec["volumes"]
    else:
        spec = RUNTIME
        security = spec["securityContext"]
        volumes = KSERVE["ServingRuntime"]["spec"]["volumes"]
    assert security["runAsNonRoot"] is True
    assert [security["runAsUser"], security["runAsGroup"]] == IMAGE_USER
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    # Waitress spools large request bodies to the temporary directory
    tmp = [m["name"] for m in spec["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert tmp and any(v["name"] == tmp[0] and "emptyDir" in v for v in volumes)


@pytest.mark.parametrize("folder", ["base", "multi-model"])
def test_service_selects_the_pods_and_targets_the_http_port(folder: str) -> None:
    documents = core(folder)
    service = documents["Service"]["spec"]
    labels = documents["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= labels.items()
    assert documents["Deployment"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert [p["targetPort"] for p in service["ports"]] == [p["name"] for p in container(pod(folder))["ports"]]


@pytest.mark.parametrize("folder", ["base", "multi-model"])
def test_autoscaler_and_disruption_budget_fit_the_deployment(folder: str) -> None:
    documents = core(folder)
    deployment = documents["Deployment"]
    hpa, pdb = documents["HorizontalPodAutoscaler"]["spec"], documents["PodDisruptionBudget"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": deployment["metadata"]["name"]}
    assert [(m["type"], m["resource"]["name"], m["resource"]["target"]["type"]) for m in hpa["metrics"]] == [
        ("Resource", "cpu", "Utilization")]
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    # a drain may take maxUnavailable pods while at least one keeps serving
    assert hpa["minReplicas"] > pdb["maxUnavailable"] >= 1


def test_images_are_the_one_make_image_builds() -> None:
    makefile = (REPO / "Makefile").read_text()
    default = re.search(r"^IMAGE \?= (\S+)$", makefile, re.MULTILINE).group(1)
    loader = container(multi_model()["Pod"]["spec"])
    assert CLASSIFIER["image"] == RUNTIME["image"] == container(pod("multi-model"))["image"] == loader["image"] \
        == default


def test_inference_service_serves_the_default_model_over_v2_with_the_runtime() -> None:
    isvc, runtime = KSERVE["InferenceService"], KSERVE["ServingRuntime"]
    model = isvc["spec"]["predictor"]["model"]
    assert model["protocolVersion"] == "v2"
    assert "v2" in runtime["spec"]["protocolVersions"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in [f["name"] for f in runtime["spec"]["supportedModelFormats"]]
    # the v2 routes answer to the model folder's manifest name: /v2/models/<name>/infer
    manifest = json.loads((REPO / "onnx_models" / "minilm-l6-sentiment" / "manifest.json").read_text())
    assert isvc["metadata"]["name"] == manifest["name"] == "minilm-l6-sentiment"
    assert "storageUri" not in model, "the default model is the one baked into the image"


def test_serving_runtime_listens_and_is_probed_on_kserves_port() -> None:
    port = int(env(RUNTIME)["SERVICE_PORT"])
    assert port == 8080  # KServe's default container port
    assert [p["containerPort"] for p in RUNTIME["ports"]] == [port]
    assert RUNTIME["name"] == "kserve-container"
    for probe, path in (("readinessProbe", "/ready"), ("livenessProbe", "/health")):
        assert RUNTIME[probe]["httpGet"] == {"path": path, "port": port}


# --- the multi-model deployments: the repository volume, the default model, the probes ---


def _repository_mount() -> tuple[dict[str, Any], dict[str, Any]]:
    """Return the multi-model Deployment's mount of the repository (at SERVICE_MODEL_DIR) and its volume."""
    spec = container(pod("multi-model"))
    mounts = [m for m in spec["volumeMounts"] if m["mountPath"] == env(spec)["SERVICE_MODEL_DIR"]]
    assert len(mounts) == 1, "SERVICE_MODEL_DIR is no volume's mount path"
    volumes = {v["name"]: v for v in pod("multi-model")["volumes"]}
    return mounts[0], volumes[mounts[0]["name"]]


def _default_model() -> str:
    """Return the SERVICE_DEFAULT_MODEL that both multi-model deployments set (one and the same)."""
    names = {env(CONTAINERS[name]())["SERVICE_DEFAULT_MODEL"]
             for name in ("deployment-multi-model", "inferenceservice-multi-model")}
    assert len(names) == 1, f"the Kubernetes and KServe deployments name different default models: {names}"
    return names.pop()


def test_the_repository_claim_is_mounted_read_only_where_service_model_dir_points() -> None:
    mount, volume = _repository_mount()
    claim = multi_model()["PersistentVolumeClaim"]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert mount["readOnly"] is True and volume["persistentVolumeClaim"]["readOnly"] is True
    assert mount["subPath"], "the volume's root may hold lost+found, which is no model folder"
    # every replica mounts it, on whichever node the autoscaler puts it
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


def test_the_loader_pod_writes_where_the_pods_read_and_the_docs_copy_there() -> None:
    mount, volume = _repository_mount()
    loader = multi_model()["Pod"]["spec"]
    loading = container(loader)
    [loader_mount] = loading["volumeMounts"]
    loader_volume = {v["name"]: v for v in loader["volumes"]}[loader_mount["name"]]
    assert loader_volume["persistentVolumeClaim"]["claimName"] == volume["persistentVolumeClaim"]["claimName"]
    assert not loader_mount.get("readOnly") and not loader_volume["persistentVolumeClaim"].get("readOnly")
    folder = f"{loader_mount['mountPath']}/{mount['subPath']}"
    assert f"mkdir -p {folder} " in " ".join(loading["command"])
    assert [loader["securityContext"][key] for key in ("runAsUser", "runAsGroup")] == IMAGE_USER
    assert loader["securityContext"]["fsGroup"] == IMAGE_USER[1]  # the volume writable by the image's group
    # docs/deployment.md fills the volume through it with the default model and a second one
    name = multi_model()["Pod"]["metadata"]["name"]
    default = _default_model()
    assert f"kubectl cp onnx_models/{default} {name}:{folder}/{default}" in DOCS
    assert f"kubectl apply -f deploy/kubernetes/multi-model/{APPLIED_ALONE[0]}" in DOCS


def test_kserve_serves_the_same_claims_repository_at_its_model_path() -> None:
    isvc, runtime = KSERVE_MULTI["InferenceService"], KSERVE["ServingRuntime"]
    model = isvc["spec"]["predictor"]["model"]
    mount, volume = _repository_mount()
    assert model["storageUri"] == f"pvc://{volume['persistentVolumeClaim']['claimName']}/{mount['subPath']}"
    assert env(kserve_container(isvc))["SERVICE_MODEL_DIR"] == KSERVE_MODEL_PATH
    # the service's own runtime over v2; not a ModelMesh runtime (multiModel), whose protocol it does not speak
    assert model["runtime"] == runtime["metadata"]["name"] and model["protocolVersion"] == "v2"
    assert model["modelFormat"]["name"] in [f["name"] for f in runtime["spec"]["supportedModelFormats"]]
    assert not runtime["spec"].get("multiModel")


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system
        shutil.copy2(source, target)


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Return a repository as docs/deployment.md fills the volume: the default model and a second one."""
    folder = tmp_path_factory.mktemp("repository")
    for name in (_default_model(), "second-model"):
        shutil.copytree(REPO / "onnx_models" / "minilm-l6-sentiment", folder / name, copy_function=_link_or_copy)
    return folder


@pytest.mark.parametrize("name", ["deployment-multi-model", "inferenceservice-multi-model"])
def test_the_service_accepts_the_repository_with_the_manifests_settings(name: str, repository: Path) -> None:
    assert (REPO / "onnx_models" / _default_model() / "manifest.json").exists(), "the model the docs copy"
    settings = _service_settings(CONTAINERS[name]())
    assert settings["DEFAULT_MODEL"]  # a repository of several models needs it (else start-up stops)
    check_layout(Settings.from_mapping({**settings, "MODEL_DIR": str(repository)}))  # what start-up checks


def test_a_repository_answers_the_probes_of_both_multi_model_deployments(repository: Path) -> None:
    app = create_app({"MODEL_DIR": str(repository), "DEFAULT_MODEL": _default_model(), "TESTING": True})
    client = app.test_client()
    probes = [(name, probe) for name in ("deployment-multi-model", "inferenceservice-multi-model")
              for probe in ("startupProbe", "readinessProbe", "livenessProbe") if probe in CONTAINERS[name]()]
    assert len(probes) == 5  # KServe's runtime has no startup probe
    for name, probe in probes:
        path = CONTAINERS[name]()[probe]["httpGet"]["path"]
        answer = client.get(path)
        assert answer.status_code == 200, (name, probe, path, answer.get_data(as_text=True))
    # /ready covers every model: each answers on its own route too
    assert [client.get(f"/models/{m}/ready").status_code for m in (_default_model(), "second-model")] == [200, 200]
