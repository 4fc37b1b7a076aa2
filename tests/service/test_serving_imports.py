"""The serving process never imports torch, transformers or optimum."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
