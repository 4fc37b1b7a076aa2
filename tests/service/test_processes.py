"""SERVICE_PROCESSES=2 on a real port: both processes serve, /metrics counts both, stops and failures.

On 2 cores each child has one intra-op thread, so the children are forked from a parent that loaded
the model (the default here); SERVICE_ORT_THREADS=2 makes each child a `python -m service` of its own.
"""

from __future__ import annotations

import http.client
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

from service.config import Settings
from service.processes import bind, can_fork, cpu_share
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


FORKED = {"SERVICE_PROCESSES": "2", "SERVICE_ORT_THREADS": "1"}
STARTED = {"SERVICE_PROCESSES": "2", "SERVICE_ORT_THREADS": "2"}  # a pool thread a fork would not copy


def memory(pid: int) -> dict[str, int]:
    """Return the kB fields of /proc/<pid>/smaps_rollup (Rss, Pss, Private_Dirty, ...)."""
    lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]
    return {key: int(rest.split()[0]) for key, _, rest in (line.partition(":") for line in lines)}


@pytest.mark.parametrize("mode", [FORKED, STARTED], ids=["forked", "started"])
def test_two_processes_share_the_port_and_metrics_count_every_request(model_dir: Path, mode: dict) -> None:
    with running_server(SERVICE_MODEL_DIR=str(model_dir), **mode) as server:
        pids = wait_for(lambda: len(found := children(server.process.pid)) == 2 and found, 30, "two children")
        info = requests.get(f"{server.url}/info", timeout=10).json()
        assert info["threads"]["processes"] == 2 and info["threads"]["batch_workers"] >= 1
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda _: classify(server.url), range(96)))
        assert {response.status_code for response in answers} == {200}
        bodies = {response.text for response in answers}
        assert len(bodies) == 1 and json.loads(bodies.pop())["label"] == "POSITIVE"  # the same model in both
        # prometheus_client maps its value files: the folder is where the child's counter file is
        maps = Path(f"/proc/{pids[0]}/maps").read_text().split()
        metrics_dir = str(Path(next(f for f in maps if f.endswith(f"/counter_{pids[0]}.db"))).parent)
        per_process = [sentiment_requests(metrics_dir, pid) for pid in pids]
        assert all(count > 0 for count in per_process) and sum(per_process) == 96, per_process
        scraped = requests.get(f"{server.url}/metrics", timeout=10).text  # answered by one of them: the sum
        assert 'service_requests_total{method="POST",route="/sentiment",status="200"} 96.0' in scraped
    assert not Path(metrics_dir).exists()  # the parent removes the folder when it stops


@pytest.mark.parametrize(("config", "forked"), [
    ({"ORT_THREADS": "1"}, True),
    ({"ORT_THREADS": "2"}, False),  # a session's thread pool: a fork copies only the calling thread
    ({"ORT_THREADS": "1", "ORT_LONE_THREADS": "1"}, True),
    ({"ORT_THREADS": "1", "ORT_LONE_THREADS": "2"}, False),  # the lone session's pool, likewise
    ({"ORT_THREADS": "1", "BACKEND": "pytorch"}, False),
])
def test_children_are_forked_only_when_no_session_has_a_thread_pool(model_dir: Path, config: dict,
                                                                    forked: bool) -> None:
    settings = Settings.from_mapping({"MODEL_DIR": str(model_dir), "PROCESSES": "2", **config})
    assert can_fork(settings) is forked


def test_forked_children_share_the_loaded_model_with_their_parent(model_dir: Path) -> None:
    with running_server(SERVICE_MODEL_DIR=str(model_dir), **FORKED) as server:
        pids = wait_for(lambda: len(found := children(server.process.pid)) == 2 and found, 30, "two children")
        wait_for(lambda: sum("serving model" in line for line in server.log) == 2, 30, "both children serving")
        assert any("starting 2 server processes (forked after loading the model)" in line for line in server.log)
        # a fork copies only the calling thread: the parent must have no other one (tokenizers' pool,
        # an onnxruntime pool, the loader's) when it forks, nor later, when it replaces a child
        assert len(list(Path(f"/proc/{server.process.pid}/task").iterdir())) == 1
        parent = memory(server.process.pid)
        assert parent["Rss"] > 60_000  # the parent holds the session and the tokenizer
        for pid in pids:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            assert b"--listen-fd" not in cmdline  # forked, not started
            child = memory(pid)
            # the session, the tokenizer and the code are the parent's pages: most of a child's RSS
            # is shared (a child that loads the model itself has over half of its RSS private)
            private = child["Private_Clean"] + child["Private_Dirty"]
            assert private < 0.4 * child["Rss"], child
        assert classify(server.url).json()["label"] == "POSITIVE"


def established(pid: int, port: int) -> int:
    """Return the TCP connections to port that process pid holds open."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target.removeprefix("socket:[").rstrip("]"))
    count = 0
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()  # local address, remote, state (01: established), ..., inode
            if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port and fields[9] in inodes:
                count += 1
    return count


def test_a_burst_of_keep_alive_connections_is_shared_between_the_forked_processes(model_dir: Path) -> None:
    # A client pool opening its connections at once: without the shared counts, the process awake
    # first accepted all 8 of them, every time, and the other process' core stayed idle.
    with running_server(SERVICE_MODEL_DIR=str(model_dir), **FORKED) as server:
        pids = wait_for(lambda: len(found := children(server.process.pid)) == 2 and found, 30, "two children")
        wait_for(lambda: sum("serving model" in line for line in server.log) == 2, 30, "both children serving")
        port = urlsplit(server.url).port
        for _ in range(3):
            clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(8)]
            try:
                counts = wait_for(lambda: sum(found := [established(pid, port) for pid in pids]) == 8 and found,
                                  10, "the 8 connections accepted")
                assert min(counts) >= 2, counts
            finally:
                for client in clients:
                    client.close()
            wait_for(lambda: sum(established(pid, port) for pid in pids) == 0, 10, "the connections closed")
        assert classify(server.url).status_code == 200


def test_a_process_that_stopped_accepting_leaves_the_connections_to_the_other(model_dir: Path) -> None:
    with running_server(SERVICE_MODEL_DIR=str(model_dir), **FORKED) as server:
        pids = wait_for(lambda: len(found := children(server.process.pid)) == 2 and found, 30, "two children")
        wait_for(lambda: sum("serving model" in line for line in server.log) == 2, 30, "both children serving")
        os.kill(pids[0], signal.SIGSTOP)  # it has the fewest connections (none) but takes none of them
        try:
            port = urlsplit(server.url).port
            clients = [http.client.HTTPConnection("127.0.0.1", port, timeout=10) for _ in range(6)]
            for client in clients:  # each kept open, so the other process holds more and more of them
                client.request("POST", "/sentiment", body=json.dumps({"text": POSITIVE}),
                               headers={"Content-Type": "application/json"})
                assert client.getresponse().status == 200
            # at most one handed back for balance (the stopped process took none: no second one for 1 s)
            assert established(pids[0], port) == 0 and established(pids[1], port) >= 5
            for client in clients:
                client.close()
        finally:
            os.kill(pids[0], signal.SIGCONT)


def test_keep_alive_connections_that_landed_on_one_process_are_handed_back_until_even(model_dir: Path) -> None:
    # Connections can land unevenly (a process busy or stopped while a pool connects, or counting
    # connections whose clients already left); keep-alive clients would stay there for good. The
    # fuller process answers with Connection: close now and then, and the client's reconnect lands
    # on the other process. Without that, this stays 6 and 0.
    with running_server(SERVICE_MODEL_DIR=str(model_dir), **FORKED) as server:
        pids = wait_for(lambda: len(found := children(server.process.pid)) == 2 and found, 30, "two children")
        wait_for(lambda: sum("serving model" in line for line in server.log) == 2, 30, "both children serving")
        port = urlsplit(server.url).port
        sessions = [requests.Session() for _ in range(6)]  # each a keep-alive client that reconnects
        closes: list[str] = []

        def ask(session: requests.Session) -> None:
            answer = session.post(f"{server.url}/sentiment", json={"text": POSITIVE}, timeout=30)
            assert answer.status_code == 200 and answer.json()["label"] == "POSITIVE"
            if answer.headers.get("Connection") == "close":
                closes.append(answer.headers["Connection"])

        os.kill(pids[0], signal.SIGSTOP)
        try:
            for session in sessions:
                ask(session)
            assert established(pids[0], port) == 0
        finally:
            os.kill(pids[0], signal.SIGCONT)
        deadline = time.monotonic() + 10
        with ThreadPoolExecutor(len(sessions)) as pool:
            # rounds of one request on each connection until even: 3 moves, at least 0.05 s apart
            while sorted(counts := [established(pid, port) for pid in pids]) != [3, 3]:
                assert time.monotonic() < deadline, counts
                list(pool.map(ask, sessions))
            handed_back = len(closes)
            assert 3 <= handed_back <= 4, closes  # the three moves, and one while the other was stopped
            for _ in range(20):  # even now: nothing more is handed back, each client keeps its connection
                list(pool.map(ask, sessions))
        assert len(closes) == handed_back
        assert sorted(established(pid, port) for pid in pids) == [3, 3]
        for session in sessions:
            session.close()


@pytest.mark.parametrize("to", ["parent", "every process"])  # every process: systemd's control-group kill
def test_sigterm_drains_every_process_and_exits_0(model_dir: Path, to: str) -> None:
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
        for pid in pids if to == "every process" else []:
            os.kill(pid, signal.SIGTERM)
        for thread in threads:
            thread.join(60)
        assert server.process.wait(timeout=20) == 0
        assert [answer[0] if isinstance(answer, tuple) else answer for answer in answers] == [200] * 8
        assert all(not Path(f"/proc/{pid}").exists() for pid in pids)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        assert "Traceback" not in "".join(server.log)


# SIGKILL: out of memory, say; SIGTERM: an operator stops one process, which drains without closing the socket
# it shares (only the parent does that, when the whole service stops)
@pytest.mark.parametrize(("stop", "logged"), [(signal.SIGKILL, "exited with signal SIGKILL; starting another"),
                                              (signal.SIGTERM, "exited with code 0; starting another")],
                         ids=["SIGKILL", "SIGTERM"])
def test_a_killed_process_is_replaced_and_the_other_serves_meanwhile(model_dir: Path, stop: signal.Signals,
                                                                     logged: str) -> None:
    with running_server(SERVICE_MODEL_DIR=str(model_dir), SERVICE_PROCESSES="2") as server:
        pids = wait_for(lambda: len(found := children(server.process.pid)) == 2 and found, 30, "two children")
        wait_for(lambda: sum("serving model" in line for line in server.log) == 2, 30, "both children serving")
        os.kill(pids[0], stop)
        statuses = [classify(server.url).status_code for _ in range(20)]  # the other one answers
        assert statuses == [200] * 20
        replaced = wait_for(lambda: len(found := children(server.process.pid)) == 2 and pids[0] not in found
                            and found, 30, "a new child in place of the killed one")
        assert pids[1] in replaced
        wait_for(lambda: sum("serving model" in line for line in server.log) == 3, 30, "the new child serving")
        assert any(logged in line for line in server.log)
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


@pytest.mark.parametrize("mode", [FORKED, STARTED], ids=["forked", "started"])
def test_a_model_that_cannot_be_served_stops_every_process_with_exit_2(model_dir: Path, tmp_path: Path,
                                                                       mode: dict) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "config.json").write_text("{not json")
    result = subprocess.run([sys.executable, "-m", "service"], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env=service_env(SERVICE_MODEL_DIR=str(broken), **mode))
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "config.json" in line]
    if mode is FORKED:  # the parent loads the model: one line, and no child was started
        assert len(errors) == 1 and errors[0].startswith("error: "), result.stderr
        assert "server process" not in result.stderr
    else:  # each child's own line, then the parent's
        assert errors and "; stopping" in result.stderr
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


@pytest.mark.parametrize(("cpus", "processes", "shares"), [
    ([0, 1], 2, [{0}, {1}]),
    ([0, 1, 2, 3, 4, 5, 6, 7], 2, [{0, 2, 4, 6}, {1, 3, 5, 7}]),  # a quota of 2 cores on an 8-core mask
    ([3, 5, 9], 3, [{3}, {5}, {9}]),
    ([0, 1], 4, [None] * 4),  # more processes than CPUs: the kernel shares the cores between them
    ([0, 1, 2, 3], 1, [None]),
])
def test_each_process_gets_an_equal_part_of_the_cpu_mask(cpus: list[int], processes: int, shares: list) -> None:
    assert [cpu_share(cpus, number, processes) for number in range(processes)] == shares


def allowed_cpus(pid: int) -> str:
    """Return a process' Cpus_allowed_list, e.g. 0-1."""
    status = Path(f"/proc/{pid}/status").read_text()
    return next(line.split(":", 1)[1].strip() for line in status.splitlines() if line.startswith("Cpus_allowed_list"))


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning two processes needs two usable CPUs")
@pytest.mark.parametrize("mode", [FORKED, STARTED], ids=["forked", "started"])
def test_each_process_is_pinned_to_its_own_cpus_unless_told_not_to(model_dir: Path, mode: dict) -> None:
    mask = sorted(os.sched_getaffinity(0))[:2]
    pinned: dict[str, list[str]] = {}
    reported: dict[str, set[str]] = {}
    for pin in ("true", "false"):
        with running_server(SERVICE_MODEL_DIR=str(model_dir), SERVICE_PIN_PROCESSES=pin, **mode) as server:
            pids = wait_for(lambda: len(found := children(server.process.pid)) == 2 and found, 30, "two children")
            pinned[pin] = sorted(allowed_cpus(pid) for pid in pids)
            reported[pin] = {",".join(str(cpu) for cpu in requests.get(
                f"{server.url}/info", timeout=10, headers={"Connection": "close"}).json()["cpus"]) for _ in range(40)}
            assert allowed_cpus(server.process.pid) == allowed_cpus(os.getpid())  # the parent keeps its mask
    everything = allowed_cpus(os.getpid())
    assert len(set(pinned["true"])) == 2 and everything not in pinned["true"]
    if len(os.sched_getaffinity(0)) == 2:
        assert pinned["true"] == [str(cpu) for cpu in mask]
        assert reported["true"] <= {str(cpu) for cpu in mask}  # /info says which CPUs a process has
    assert pinned["false"] == [everything, everything]
    assert reported["false"] == {",".join(str(cpu) for cpu in sorted(os.sched_getaffinity(0)))}


def test_the_connection_limit_is_the_services_split_between_the_processes(model_dir: Path) -> None:
    from service.app import create_app
    from service.serve import GracefulServer

    app = create_app({"MODEL_DIR": str(model_dir), "PROCESSES": "2", "CONNECTION_LIMIT": "301",
                      "PORT": "0", "WARMUP": "false"})
    settings = app.extensions["service.settings"]
    alone = GracefulServer(app, settings)  # the one process: the whole limit
    sockets = bind("127.0.0.1", 0)
    child = GracefulServer(app, settings, sockets)  # one of two children on the parent's sockets: half
    try:
        assert (alone.connection_limit, child.connection_limit) == (301, 151)
    finally:
        for server in (alone, child):
            server.server.close()
        for sock in sockets:
            sock.close()
