"""SERVICE_PROCESSES=2 on a real port: both processes serve, /metrics counts both, stops and failures."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from prometheus_client.multiprocess import MultiProcessCollector

from tests.testkit import NEGATIVE, POSITIVE, REPO, post_in_flight, running_server, service_env

LONG = NEGATIVE + " It drags on and on." * 60  # 256 tokens: a batch of these takes a while


def children(pid: int) -> list[int]:
    """Return the child processes of pid."""
    found = []
    for listing in Path(f"/proc/{pid}/task").glob("*/children"):
        found += [int(child) for child in listing.read_text().split()]
    return sorted(found)


def sentiment_requests(metrics_dir: str, pid: int) -> float:
    """Return the /sentiment 200s that one process has counted in the shared metrics folder."""
    total = 0.0
    for metric in MultiProcessCollector.merge([str(Path(metrics_dir) / f"counter_{pid}.db")]):
        for sample in metric.samples:
            if sample.name == "service_requests_total" and sample.labels.get("route") == "/sentiment":
                total += sample.value
    return total


def wait_for(condition, timeout: float, what: str):  # noqa: ANN001, ANN201 - a test helper
    """Return condition()'s first true value within timeout, or fail naming what was awaited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"not within {timeout} s: {what}", pytrace=False)


def classify(url: str, text: str = POSITIVE) -> requests.Response:
    """POST one text on a connection of its own (so the kernel may give it to either process)."""
    return requests.post(f"{url}/sentiment", json={"text": text}, timeout=30,
                         headers={"Connection": "close"})


def test_two_processes_share_the_port_and_metrics_count_every_request(model_dir: Path) -> None:
    with running_server(SERVICE_MODEL_DIR=str(model_dir), SERVICE_PROCESSES="2") as server:
        pids = wait_for(lambda: len(found := children(server.process.pid)) == 2 and found, 30, "two children")
        info = requests.get(f"{server.url}/info", timeout=10).json()
        assert info["threads"]["processes"] == 2 and info["threads"]["batch_workers"] >= 1
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda _: classify(server.url), range(96)))
        assert {response.status_code for response in answers} == {200}
        bodies = {response.text for response in answers}
        assert len(bodies) == 1 and json.loads(bodies.pop())["label"] == "POSITIVE"  # the same model in both
        folder = Path(f"/proc/{pids[0]}/environ").read_bytes().split(b"\0")
        metrics_dir = next(v.split(b"=", 1)[1].decode() for v in folder if v.startswith(b"PROMETHEUS_MULTIPROC_DIR="))
        per_process = [sentiment_requests(metrics_dir, pid) for pid in pids]
        assert all(count > 0 for count in per_process) and sum(per_process) == 96, per_process
        scraped = requests.get(f"{server.url}/metrics", timeout=10).text  # answered by one of them: the sum
        assert 'service_requests_total{method="POST",route="/sentiment",status="200"} 96.0' in scraped
    assert not Path(metrics_dir).exists()  # the parent removes the folder when it stops


def test_sigterm_drains_every_process_and_exits_0(model_dir: Path) -> None:
    with running_server(SERVICE_MODEL_DIR=str(model_dir), SERVICE_PROCESSES="2") as server:
        pids = wait_for(lambda: len(found := children(server.process.pid)) == 2 and found, 30, "two children")
        port = urlsplit(server.url).port
        sent = threading.Barrier(9)
        answers: list = [None] * 8

        def in_flight(index: int) -> None:
            answers[index] = post_in_flight(port, LONG, sent)

        threads = [threading.Thread(target=in_flight, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        sent.wait()
        time.sleep(0.1)  # on the wire and read
        server.process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(60)
        assert server.process.wait(timeout=20) == 0
        assert [answer[0] if isinstance(answer, tuple) else answer for answer in answers] == [200] * 8
        assert all(not Path(f"/proc/{pid}").exists() for pid in pids)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        assert "Traceback" not in "".join(server.log)


def test_a_killed_process_is_replaced_and_the_other_serves_meanwhile(model_dir: Path) -> None:
    with running_server(SERVICE_MODEL_DIR=str(model_dir), SERVICE_PROCESSES="2") as server:
        pids = wait_for(lambda: len(found := children(server.process.pid)) == 2 and found, 30, "two children")
        wait_for(lambda: sum("serving model" in line for line in server.log) == 2, 30, "both children serving")
        os.kill(pids[0], signal.SIGKILL)  # out of memory, say
        statuses = [classify(server.url).status_code for _ in range(20)]  # the other one answers
        assert statuses == [200] * 20
        replaced = wait_for(lambda: len(found := children(server.process.pid)) == 2 and pids[0] not in found
                            and found, 30, "a new child in place of the killed one")
        assert pids[1] in replaced
        wait_for(lambda: sum("serving model" in line for line in server.log) == 3, 30, "the new child serving")
        assert any("exited with signal SIGKILL; starting another" in line for line in server.log)
        assert [classify(server.url).status_code for _ in range(20)] == [200] * 20


def test_the_children_stop_when_the_parent_is_killed(model_dir: Path) -> None:
    with running_server(SERVICE_MODEL_DIR=str(model_dir), SERVICE_PROCESSES="2") as server:
        pids = wait_for(lambda: len(found := children(server.process.pid)) == 2 and found, 30, "two children")
        server.process.kill()
        wait_for(lambda: all(not Path(f"/proc/{pid}").exists() or _zombie(pid) for pid in pids), 20,
                 "the orphaned children to exit")


def _zombie(pid: int) -> bool:
    """Return whether pid has exited and waits to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_a_model_that_cannot_be_served_stops_every_process_with_exit_2(model_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "config.json").write_text("{not json")
    result = subprocess.run([sys.executable, "-m", "service"], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env=service_env(SERVICE_MODEL_DIR=str(broken), SERVICE_PROCESSES="2"))
    assert result.returncode == 2, result.stderr
    assert "config.json" in result.stderr and "; stopping" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_a_port_in_use_is_one_line_and_exit_2(model_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "service"], cwd=REPO, capture_output=True, text=True,
                                timeout=60, env=service_env(SERVICE_MODEL_DIR=str(model_dir), SERVICE_PROCESSES="2",
                                                            SERVICE_PORT=str(port)))
    assert result.returncode == 2 and result.stderr.startswith("error: cannot listen on 127.0.0.1:")
    assert "Traceback" not in result.stderr
