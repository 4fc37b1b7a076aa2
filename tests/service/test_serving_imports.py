"""The serving process never imports torch, transformers or optimum."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.testkit import REPO, service_env

# Runs in a fresh interpreter: build the app the way `python -m service` does, serve every route
# once, and report any heavy module that was imported or even attempted.
PROBE = r"""
import json, sys
HEAVY = ("torch", "transformers", "optimum")
attempted = []

class Recorder:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            attempted.append(name)
        return None  # let the normal finders decide

sys.meta_path.insert(0, Recorder())
import service.__main__
from service.app import create_app
client = create_app().test_client()
statuses = [client.post("/sentiment", json={"text": "a fine film"}).status_code,
            client.post("/", json={"inputs": ["good", "bad"]}).status_code,
            client.post("/sentiment", data=b"{bad").status_code]
statuses += [client.get(path).status_code for path in ("/health", "/ready", "/info", "/metrics", "/openapi.json")]
loaded = sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)
print(json.dumps({"statuses": statuses, "attempted": attempted, "loaded": loaded}))
"""


def test_serving_never_imports_torch_or_transformers(model_dir: Path) -> None:
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True,
                            timeout=120, env=service_env(SERVICE_MODEL_DIR=str(model_dir)))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["statuses"] == [200, 200, 400, 200, 200, 200, 200, 200]
    assert report["attempted"] == []
    assert report["loaded"] == []


# Imports every module of the service and the export, checks that none imported onnxruntime or changed the
# environment, then loads the model: onnxruntime's telemetry must be off by then (or as the user set it).
TELEMETRY_PROBE = r"""
import json, os, sys
before = dict(os.environ)
import service.__main__, service.app, service.classifier, service.weights, service.reference, export.cli
imported = {"onnxruntime": "onnxruntime" in sys.modules, "environment changed": dict(os.environ) != before}
from service.classifier import Classifier
Classifier(os.environ["SERVICE_MODEL_DIR"]).classify(["a fine film"])
print(json.dumps({**imported, "telemetry": os.environ.get("ORT_DISABLE_TELEMETRY")}))
"""


# onnxruntime keeps its telemetry off by itself when one of these says it runs under CI (the names are in
# libonnxruntime's strings), which would leave the user's "0" below nothing to show
CI_MARKERS = ("CI", "TF_BUILD", "GITHUB_ACTIONS", "GITLAB_CI", "CIRCLECI", "TRAVIS", "JENKINS_URL",
              "CODEBUILD_BUILD_ID", "BUILDKITE", "TEAMCITY_VERSION", "APPVEYOR", "BITBUCKET_BUILD_NUMBER")


@pytest.mark.parametrize("setting", [None, "0"], ids=["unset", "user-set-0"])
def test_importing_does_nothing_and_onnxruntime_starts_with_its_telemetry_off(model_dir: Path, tmp_path: Path,
                                                                               setting: str | None) -> None:
    env = service_env(SERVICE_MODEL_DIR=str(model_dir), HOME=str(tmp_path), XDG_CACHE_HOME=str(tmp_path / "xdg"))
    for name in ("ORT_DISABLE_TELEMETRY", *CI_MARKERS):
        env.pop(name, None)
    if setting is not None:
        env["ORT_DISABLE_TELEMETRY"] = setting
    result = subprocess.run([sys.executable, "-c", TELEMETRY_PROBE], cwd=REPO, capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"onnxruntime": False, "environment changed": False, "telemetry": setting or "1"}
    # onnxruntime's Linux telemetry writes its device id under ~/.cache/Microsoft when it is on: the user's
    # own "0" shows that this test can see those files
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert bool(written) == (setting == "0"), written
