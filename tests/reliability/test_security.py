"""Security: loopback by default, hard limits, the model folder alone decides the model, nothing leaks, pinned deps."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from bench.sizes import closure, requirement_names
from tests.reliability.kit import (
    NEGATIVE,
    POSITIVE,
    REPO,
    Server,
    assert_no_leak,
    health_ok,
    send,
    service_env,
)

JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def default_host_server(default_model: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """Start `python -m service` with no SERVICE_HOST and no model setting; yield it and its logged URL."""
    env = service_env()
    del env["SERVICE_HOST"]  # the default is what is tested
    process = subprocess.Popen([sys.executable, "-m", "service"], cwd=REPO, env=env, text=True,
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    watchdog = threading.Timer(120, process.kill)  # a server that never logs its URL must not hang the run
    watchdog.start()
    try:
        for line in process.stderr:  # the start-up line comes after the model has loaded and warmed up
            found = re.search(r"serving model .* on (http://\S+)", line)
            if found:
                yield process, found.group(1)
                break
        else:
            pytest.fail(f"the server exited with {process.wait(timeout=10)} before serving", pytrace=False)
    finally:
        watchdog.cancel()
        process.terminate()
        process.wait(timeout=15)


def listening_addresses(pid: int) -> set[str]:
    """Return the ip:port of every TCP socket the process listens on (from /proc, IPv4 and IPv6)."""
    inodes = {link.readlink().name[len("socket:["):-1] for link in Path(f"/proc/{pid}/fd").iterdir()
              if link.readlink().name.startswith("socket:[")}
    found = set()
    for table in ("tcp", "tcp6"):
        for row in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                address, port = fields[1].split(":")
                octets = bytes.fromhex(address)[::-1] if len(address) == 8 else bytes.fromhex(address)
                ip = ".".join(map(str, octets)) if len(octets) == 4 else octets.hex()
                found.add(f"{ip}:{int(port, 16)}")
    return found


def test_binding_defaults_to_loopback_only(default_host_server: tuple[subprocess.Popen, str]) -> None:
    process, url = default_host_server
    port = int(url.rsplit(":", 1)[1])
    assert url == f"http://127.0.0.1:{port}"
    assert listening_addresses(process.pid) == {f"127.0.0.1:{port}"}
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    # Another loopback address reaches a socket bound to 0.0.0.0, but not one bound to 127.0.0.1.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.2", port), timeout=5).close()


def test_batch_and_size_limits_are_enforced_and_published(live: Server) -> None:
    limits = send(live, "GET", "/info").json()["limits"]
    assert (limits["max_batch"], limits["max_content_length"]) == (32, 2097152)
    assert send(live, "POST", "/sentiment", json.dumps({"texts": ["fine"] * 32}).encode(), JSON).status == 200
    for path, body in (("/sentiment", {"texts": ["fine"] * 33}), ("/", {"inputs": ["fine"] * 33})):
        reply = send(live, "POST", path, json.dumps(body).encode(), JSON)
        assert (reply.status, reply.json()) == (413, {"error": "batch too large: 33 texts, the limit is 32 per "
                                                               "request"})
    big = send(live, "POST", "/", json.dumps({"inputs": "a" * (2 * 1024 * 1024)}).encode(), JSON)
    assert big.status == 413


def test_no_request_can_choose_another_model(live: Server) -> None:
    info = send(live, "GET", "/info").json()["model"]
    plain = send(live, "POST", "/sentiment", json.dumps({"text": NEGATIVE}).encode(), JSON).json()
    attempts: list[tuple[str, dict[str, Any], dict[str, str]]] = [
        ("/sentiment", {"text": NEGATIVE, "model": "/etc/passwd", "model_dir": "/tmp"}, {}),
        ("/sentiment?model=/tmp/x&model_dir=../../etc", {"text": NEGATIVE}, {}),
        ("/sentiment", {"text": NEGATIVE}, {"X-Model": "/tmp/x", "X-Model-Dir": "/tmp/x"}),
        ("/", {"inputs": NEGATIVE, "model": "/tmp/x", "parameters": {"model": "/tmp/x", "revision": "main"}}, {}),
    ]
    for path, body, headers in attempts:
        reply = send(live, "POST", path, json.dumps(body).encode(), {**JSON, **headers})
        answer = reply.json() if path.startswith("/sentiment") else reply.json()[0][0]
        assert reply.status == 200 and answer["label"] == plain["label"], (path, body)
        assert answer["score"] == pytest.approx(plain["score"], abs=1e-6)  # the same model, same text alone
    for path in ("/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/onnx_models/minilm-l6-sentiment/model.onnx",
                 "/static/model.onnx", quote(str(REPO / "service" / "config.py"))):
        reply = send(live, "GET", path)
        assert (reply.status, reply.json()) == (404, {"error": "not found"}), path
    assert send(live, "GET", "/info").json()["model"] == info
    assert health_ok(live)


def test_no_answer_outside_info_carries_versions_paths_or_tracebacks(live: Server, versions: list[str]) -> None:
    document = send(live, "GET", "/openapi.json").json()
    gets = [path for path, item in document["paths"].items() if "get" in item and path != "/info"]
    posts = [("/sentiment", {"text": POSITIVE}), ("/sentiment", {"texts": [POSITIVE, NEGATIVE], "top_k": None}),
             ("/", {"inputs": POSITIVE}), ("/sentiment", {"text": ""}), ("/", {"inputs": 3})]
    replies = [send(live, "GET", path) for path in [*gets, "/nowhere", "/info/"]]
    replies += [send(live, "POST", path, json.dumps(body).encode(), JSON) for path, body in posts]
    assert len(replies) == len(gets) + 2 + len(posts) >= 11
    for reply in replies:
        assert_no_leak(reply, versions)
    metrics = send(live, "GET", "/metrics").body.decode()
    assert "python_info" not in metrics and "process_" not in metrics  # a registry of its own, no collectors


def test_info_carries_no_internal_path(live: Server) -> None:
    text = send(live, "GET", "/info").body.decode()
    assert not re.search(r'"/(work|root|home|tmp|usr)/', text), re.findall(r'"/(?:work|root|home|tmp)/[^"]*"', text)


# ---- dependencies -------------------------------------------------------------------------------------

def test_every_requirement_is_an_exact_pin_and_installed_as_pinned() -> None:
    for name in ("requirements.txt", "requirements-dev.txt"):
        for line in (REPO / name).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if not line or line == "-r requirements.txt":
                continue
            found = re.fullmatch(r"([A-Za-z0-9._-]+)(?:\[[A-Za-z0-9,._-]+\])?==([A-Za-z0-9.+]+)", line)  # name[extras]
            assert found, f"{name}: {line!r} is not an exact pin"
            installed = version(found.group(1))
            assert installed.split("+")[0] == found.group(2), f"{name}: {line} but {installed} is installed"


SERVING = closure(requirement_names(REPO / "requirements.txt"))
DEVELOPMENT = closure(requirement_names(REPO / "requirements.txt") + requirement_names(REPO / "requirements-dev.txt"))


@pytest.fixture(scope="module")
def audit(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run pip-audit once over every installed pin of both sets; skip, saying why, if no service answers."""
    pins = tmp_path_factory.mktemp("audit") / "pins.txt"
    pins.write_text("".join(f"{name}=={version(name).split('+')[0]}\n" for name in sorted(DEVELOPMENT)))
    failures = []
    for service in ("osv", "pypi"):  # OSV first: it also covers advisories PyPI does not mirror
        result = subprocess.run([sys.executable, "-m", "pip_audit", "-r", str(pins), "--no-deps", "--disable-pip",
                                 "-s", service, "-f", "json", "--progress-spinner", "off", "--timeout", "20"],
                                capture_output=True, text=True, timeout=600)
        try:
            report = json.loads(result.stdout)
        except json.JSONDecodeError:
            failures.append(f"{service}: exit {result.returncode}, {result.stderr.strip().splitlines()[-1:]}")
            continue
        audited = [d for d in report["dependencies"] if "skip_reason" not in d]
        if audited:
            return {"service": service, **report}
        # pip-audit exits 0 and says "No known vulnerabilities found" even when it audited nothing
        failures.append(f"{service}: audited 0 of {len(report['dependencies'])} "
                        f"({report['dependencies'][0].get('skip_reason') if report['dependencies'] else 'none'})")
    pytest.skip("pip-audit reached no vulnerability service from this machine: " + "; ".join(failures))


@pytest.mark.parametrize("name,members", [("serving", SERVING), ("development", DEVELOPMENT)],
                         ids=["requirements.txt", "requirements-dev.txt"])
def test_pip_audit_finds_no_known_vulnerability(audit: dict[str, Any], name: str, members: set[str]) -> None:
    dependencies = [d for d in audit["dependencies"] if d["name"] in members]
    skipped = [d["name"] for d in dependencies if "skip_reason" in d]
    findings = {f"{d['name']} {d['version']}: {v['id']} (fixed in {', '.join(v['fix_versions']) or 'no release'})"
                for d in dependencies for v in d.get("vulns", [])}
    print(f"\npip-audit ({audit['service']}), {name} set: {len(dependencies) - len(skipped)} of {len(members)} "
          f"audited, skipped {skipped}, findings {sorted(findings)}")
    assert len(dependencies) == len(members)
    assert findings == set()
