"""The Kubernetes and KServe manifests: valid offline against real schemas, and true to the service."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import pytest

from service.config import DEFAULTS, Settings
from service.tracing import EXIT_FLUSH_SECONDS
from tests.deploy.manifests import (
    DEPLOY,
    KUBERNETES_VERSIONS,
    REPO,
    ManifestError,
    load,
    manifests,
    validate_core,
    validate_kserve,
)

KUBERNETES = manifests("kubernetes")
KSERVE = manifests("kserve")
CORE_KINDS = ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget")
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


def test_the_folders_hold_the_kinds_this_page_checks() -> None:
    assert sorted(KUBERNETES) == sorted((*CORE_KINDS, "Kustomization"))
    assert sorted(KSERVE) == ["InferenceService", "ServingRuntime"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("kind", CORE_KINDS)
def test_core_manifest_is_valid_strictly(kind: str, version: str) -> None:
    validate_core(KUBERNETES[kind], version)


@pytest.mark.parametrize("kind", ["InferenceService", "ServingRuntime"])
def test_kserve_manifest_is_valid_against_the_sdk_models(kind: str) -> None:
    validate_kserve(KSERVE[kind])


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


@pytest.mark.parametrize(("kind", "mutate", "message"), [
    ("Deployment", lambda d: _rename(d, [*_POD, "containers", 0, "readinessProbe"], "readinessProbes"),
     "readinessProbes"),
    ("Deployment", lambda d: _set(d, [*_POD, "terminationGracePeriodSeconds"], "20"), "'20' is not of type"),
    ("Deployment", lambda d: _set(d, [*_POD, "containers", 0, "name"], _DELETE), "'name' is a required property"),
    ("HorizontalPodAutoscaler",
     lambda d: _set(d, ["spec", "metrics", 0, "resource", "target", "averageUtilization"], "70%"), "'70%'"),
    ("PodDisruptionBudget", lambda d: _set(d, ["spec", "selector"], "app"), "'app' is not of type"),
])
def test_core_validation_fails_on_a_broken_manifest(kind: str, mutate: Any, message: str) -> None:
    broken = copy.deepcopy(KUBERNETES[kind])
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
])
def test_kserve_validation_fails_on_a_broken_manifest(kind: str, mutate: Any, message: str) -> None:
    broken = copy.deepcopy(KSERVE[kind])
    mutate(broken)
    with pytest.raises(ManifestError, match=re.escape(message)):
        validate_kserve(broken)


def test_kustomization_lists_every_manifest_of_its_folder() -> None:
    listed = KUBERNETES["Kustomization"]["resources"]
    present = sorted(p.name for p in (DEPLOY / "kubernetes").glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == present


def test_every_manifest_file_parses_to_documents_with_a_kind() -> None:
    for path in sorted(DEPLOY.glob("*/*.yaml")):
        documents = load(path)
        assert documents and all("kind" in d and "apiVersion" in d for d in documents), path


# --- the manifests agree with the service and the image ---

POD = KUBERNETES["Deployment"]["spec"]["template"]["spec"]
CLASSIFIER = container(POD)
RUNTIME = container(KSERVE["ServingRuntime"]["spec"])


def _prestop_seconds(spec: dict[str, Any]) -> float:
    command = spec.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    return float(command[1]) if command[:1] == ["sleep"] else 0.0


def _shutdown_timeout(spec: dict[str, Any]) -> float:
    return float(env(spec).get("SERVICE_SHUTDOWN_TIMEOUT", DEFAULTS["SHUTDOWN_TIMEOUT"]))


def test_deployment_probes_the_service_health_routes_on_its_port() -> None:
    port = int(env(CLASSIFIER)["SERVICE_PORT"])
    ports = {p["name"]: p["containerPort"] for p in CLASSIFIER["ports"]}
    assert CLASSIFIER["readinessProbe"]["httpGet"]["path"] == "/ready"  # 503 from SIGTERM on
    assert CLASSIFIER["livenessProbe"]["httpGet"]["path"] == "/health"
    assert CLASSIFIER["startupProbe"]["httpGet"]["path"] == "/health"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert ports[CLASSIFIER[probe]["httpGet"]["port"]] == port


def test_deployment_grace_period_covers_the_prestop_sleep_and_the_drain() -> None:
    prestop, drain = _prestop_seconds(CLASSIFIER), _shutdown_timeout(CLASSIFIER)
    assert prestop >= 3, "endpoints and proxies need a few seconds to drop a terminating pod"
    # with tracing on, the spans still queued get a bounded time at exit, after the drain
    assert POD["terminationGracePeriodSeconds"] > prestop + drain + EXIT_FLUSH_SECONDS


def test_kserve_grace_period_covers_the_drain() -> None:
    predictor = KSERVE["InferenceService"]["spec"]["predictor"]
    assert predictor["terminationGracePeriodSeconds"] > _shutdown_timeout(RUNTIME) + EXIT_FLUSH_SECONDS + 5


@pytest.mark.parametrize("spec", [CLASSIFIER, RUNTIME], ids=["deployment", "servingruntime"])
def test_the_settings_are_valid_and_the_logs_json(spec: dict[str, Any]) -> None:
    settings = {name.removeprefix("SERVICE_"): value for name, value in env(spec).items()
                if name.startswith("SERVICE_")}
    parsed = Settings.from_mapping({**settings, "MODEL_DIR": str(REPO / DEFAULTS["MODEL_DIR"])})
    assert parsed.log_format == "json" and parsed.access_log is True  # what a log collector parses


@pytest.mark.parametrize("spec", [CLASSIFIER, RUNTIME], ids=["deployment", "servingruntime"])
def test_cpu_is_whole_cores_with_requests_equal_to_limits(spec: dict[str, Any]) -> None:
    # the service takes ceil(cpu.max quota) onnxruntime threads: a fractional limit would run more
    # threads than the quota allows (throttling), a request below the limit would not guarantee them
    resources = spec["resources"]
    assert resources["requests"] == resources["limits"]
    assert re.fullmatch(r"[1-9][0-9]*", str(resources["limits"]["cpu"])), resources["limits"]["cpu"]
    assert "SERVICE_ORT_THREADS" not in env(spec), "a fixed thread count would not follow the CPU limit"


@pytest.mark.parametrize("kind", ["deployment", "servingruntime"])
def test_runs_as_the_image_user_with_a_read_only_root_and_a_tmp_volume(kind: str) -> None:
    if kind == "deployment":
        spec, pod = CLASSIFIER, POD
        security = {**pod["securityContext"], **spec["securityContext"]}
        volumes = pod["volumes"]
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


def test_service_selects_the_pods_and_targets_the_http_port() -> None:
    service = KUBERNETES["Service"]["spec"]
    labels = KUBERNETES["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= labels.items()
    assert KUBERNETES["Deployment"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert [p["targetPort"] for p in service["ports"]] == [p["name"] for p in CLASSIFIER["ports"]]


def test_autoscaler_and_disruption_budget_fit_the_deployment() -> None:
    deployment = KUBERNETES["Deployment"]
    hpa, pdb = KUBERNETES["HorizontalPodAutoscaler"]["spec"], KUBERNETES["PodDisruptionBudget"]["spec"]
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
    assert CLASSIFIER["image"] == RUNTIME["image"] == default


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
