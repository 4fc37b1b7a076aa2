"""Fixtures of the image tests: a real docker daemon, the image built by `make image`'s script, containers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TEST_IMAGE = "onnx-classifier:pytest"
BUILD_TIMEOUT = 1800  # seconds; from scratch: debootstrap ~1-2.5 min, wheels, then the build
START_TIMEOUT = 60.0  # seconds from docker run to /ready; ~2 s here, but the CI machine may be busy


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    """Run a docker command and return its result (text); fail the test with its output if it fails."""
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode:
        pytest.fail(f"docker {' '.join(args[:3])} ... exited with {result.returncode}:\n{result.stderr[-3000:]}",
                    pytrace=False)
    return result


def _daemon_answers() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def docker_daemon() -> Iterator[None]:
    """Make sure a docker daemon answers: start one with deploy/docker-host.sh when none does."""
    if _daemon_answers():
        yield
        return
    if os.geteuid() != 0:
        pytest.skip("no docker daemon answers and starting one (deploy/docker-host.sh) needs root")
    started = subprocess.run(["bash", str(REPO / "deploy" / "docker-host.sh")], capture_output=True, text=True,
                             timeout=900)
    if started.returncode:
        pytest.fail(f"deploy/docker-host.sh could not start a docker daemon:\n{started.stderr[-3000:]}",
                    pytrace=False)
    pid = int(started.stdout.split()[-1])
    try:
        yield
    finally:  # leave the machine as it was: stop the daemon this session started
        os.kill(pid, signal.SIGTERM)
        for _ in range(150):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)


@pytest.fixture(scope="session")
def image(docker_daemon: None, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Build the image with the script `make image` runs, and return its name."""
    log = tmp_path_factory.mktemp("image") / "build.log"
    with log.open("w") as out:
        built = subprocess.run([sys.executable, str(REPO / "deploy" / "image.py"), "--image", TEST_IMAGE],
                               stdout=out, stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT)
    if built.returncode:
        pytest.fail(f"deploy/image.py exited with {built.returncode}:\n{log.read_text()[-4000:]}", pytrace=False)
    return TEST_IMAGE


def free_port() -> int:
    """Return a TCP port free on loopback just now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Container:
    """A running container of the image on the host network."""

    id: str
    url: str

    def inspect(self) -> dict:
        """Return `docker inspect` of the container."""
        return json.loads(docker("inspect", self.id).stdout)[0]

    def logs(self) -> str:
        """Return what the container wrote to stdout and stderr."""
        result = docker("logs", self.id, check=False)
        return result.stdout + result.stderr


def request(url: str, body: object | bytes | None = None, timeout: float = 30) -> tuple[int, object]:
    """Send GET (no body) or POST (JSON) and return the status and the decoded JSON answer."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


@contextmanager
def running(image: str, *docker_args: str, **environment: str) -> Iterator[Container]:
    """Run the image with `--network host` on a free port, wait for /ready, remove it at exit."""
    port = free_port()
    settings = [f"--env={key}={value}" for key, value in {"SERVICE_PORT": str(port), **environment}.items()]
    container = Container(docker("run", "--detach", "--network", "host", *settings, *docker_args, image).stdout.strip(),
                          f"http://127.0.0.1:{port}")
    try:
        wait_ready(container)
        yield container
    finally:
        docker("rm", "--force", container.id, check=False)


def wait_ready(container: Container) -> None:
    """Poll /ready until 200; fail with the container's log if it exits or the time runs out."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        try:
            if request(f"{container.url}/ready", timeout=2)[0] == 200:
                return
        except OSError:
            pass  # not listening yet
        if not container.inspect()["State"]["Running"]:
            pytest.fail(f"the container exited before /ready answered 200:\n{container.logs()}", pytrace=False)
        time.sleep(0.1)
    pytest.fail(f"{container.url}/ready did not answer 200 within {START_TIMEOUT} s:\n{container.logs()}",
                pytrace=False)


@pytest.fixture(scope="module")
def served(image: str) -> Iterator[Container]:
    """Return one container of the image with its defaults, shared by a test module."""
    with running(image) as container:
        yield container
