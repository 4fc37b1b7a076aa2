"""Build the service's container image (`make image`): base image, wheels, then `docker build`.

The base is BASE when it is present or can be pulled. Where no registry can be reached, the
default base is replaced by a Debian base built here with debootstrap and kept as a local image,
so a second build does not rebuild it. The wheels of requirements.txt are downloaded on the host
with the host's own pip settings (indexes, find-links, constraints, CA certificate) for the base's
Python and platform, and handed to the build in its context: the build needs no network, and none
of those settings reaches the image (the wheels stay in the build stage).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_IMAGE = "onnx-classifier:latest"
DEFAULT_BASE = "python:3.11-slim"
LOCAL_BASE = "onnx-classifier-base"
SUITE = "bookworm"  # Debian 12: Python 3.11, as in the default base
PACKAGES = ("python3", "python3-venv", "ca-certificates")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
WHEELS = REPO / ".cache" / "image" / "wheels"  # the Dockerfile copies it from the build context
PULL_TIMEOUT = 300  # seconds; an unreachable registry usually fails at once, a firewalled one hangs
# Removed from the debootstrap tree: package lists, downloaded packages, docs (not copyright
# files), man pages and translations, as Debian's own slim images leave out.
_TRIM = r"""set -eu
rm -rf var/lib/apt/lists/* var/cache/apt/*.bin var/cache/apt/archives/*.deb var/log/*.log
find usr/share/doc -mindepth 1 -not -name copyright -not -type d -delete
find usr/share/doc -mindepth 1 -type d -empty -delete
rm -rf usr/share/man/* usr/share/info/* usr/share/locale/* usr/share/lintian
"""


class BuildError(RuntimeError):
    """A step of the build failed; the message says which and what to do."""


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run a command, raising BuildError with its output when it fails."""
    try:
        return subprocess.run(command, check=True, text=True, **kwargs)
    except FileNotFoundError:
        raise BuildError(f"{command[0]} is not installed") from None
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or exc.stdout or "").strip()[-2000:]
        raise BuildError(f"{' '.join(command[:3])} ... exited with {exc.returncode}"
                         + (f":\n{detail}" if detail else "")) from None


def image_exists(name: str) -> bool:
    """Return whether the docker daemon has an image of that name."""
    return subprocess.run(["docker", "image", "inspect", name], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL).returncode == 0


def check_docker() -> None:
    """Raise BuildError unless a docker daemon answers."""
    try:
        subprocess.run(["docker", "info"], check=True, capture_output=True, timeout=30)
    except FileNotFoundError:
        raise BuildError("docker is not installed (Debian: apt-get install -y docker.io)") from None
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        raise BuildError("no docker daemon answers (`docker info` fails): start one; on a machine "
                         "like this project's CI, deploy/docker-host.sh installs and starts it") from None


def resolve_base(base: str, mirror: str | None) -> str:
    """Return the base image to build on: BASE itself, or the local Debian base in its stead."""
    if image_exists(base):
        return base
    print(f"pulling {base} ...", file=sys.stderr)
    try:
        pulled = subprocess.run(["docker", "pull", base], capture_output=True, text=True,
                                timeout=PULL_TIMEOUT)
        reason = (pulled.stderr or pulled.stdout).strip().splitlines()[-1:] if pulled.returncode else None
    except subprocess.TimeoutExpired:
        reason = [f"no answer within {PULL_TIMEOUT} s"]
    if not reason:
        return base
    if base != DEFAULT_BASE:
        raise BuildError(f"cannot pull {base}: {' '.join(reason)}")
    print(f"cannot pull {base} ({' '.join(reason)}): using a Debian {SUITE} base built with "
          "debootstrap instead", file=sys.stderr)
    return debootstrap_base(mirror or debian_mirror())


def debian_mirror() -> str:
    """Return the Debian mirror this machine's apt uses, or Debian's default mirror."""
    release = Path("/etc/os-release")
    if not release.is_file() or "ID=debian" not in release.read_text().split():
        return DEFAULT_MIRROR
    sources = Path("/etc/apt")
    for path in [sources / "sources.list", *sorted((sources / "sources.list.d").glob("*.list"))]:
        for line in path.read_text().splitlines() if path.is_file() else ():
            words = re.sub(r"\[[^]]*\]", " ", line.split("#")[0]).split()  # drop [arch=... signed-by=...]
            if len(words) >= 3 and words[0] == "deb" and "-" not in words[2]:
                return words[1]
    for path in sorted((sources / "sources.list.d").glob("*.sources")):
        for stanza in path.read_text().split("\n\n"):
            fields = dict(line.split(":", 1) for line in stanza.splitlines()
                          if ":" in line and not line.startswith((" ", "#")))
            fields = {key.strip(): value.split() for key, value in fields.items()}
            if ("deb" in fields.get("Types", []) and fields.get("URIs")
                    and any("-" not in suite for suite in fields.get("Suites", []))):
                return fields["URIs"][0]
    return DEFAULT_MIRROR


def debootstrap_base(mirror: str) -> str:
    """Return the local Debian base image, building it with debootstrap unless it exists."""
    recipe = hashlib.sha256(json.dumps([SUITE, PACKAGES, _TRIM]).encode()).hexdigest()[:12]
    name = f"{LOCAL_BASE}:{SUITE}-{recipe}"
    if image_exists(name):
        print(f"using the cached base {name}", file=sys.stderr)
        return name
    if os.geteuid() != 0:
        raise BuildError("building the Debian base with debootstrap needs root: run as root, or give "
                         "BASE= an image this docker daemon has or can pull")
    if shutil.which("debootstrap") is None:
        run(["apt-get", "update", "-qq"], capture_output=True)
        run(["apt-get", "install", "-y", "-qq", "debootstrap"], capture_output=True)
    root = Path(tempfile.mkdtemp(prefix="onnx-classifier-base-", dir="/var/tmp"))
    try:
        print(f"debootstrap {SUITE} from {mirror} (a minute or two) ...", file=sys.stderr)
        run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(root), mirror],
            capture_output=True)
        run(["sh", "-c", _TRIM], cwd=root)
        tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        try:
            run(["docker", "import", "--change", "ENV LANG=C.UTF-8", "--change", 'CMD ["python3"]', "-", name],
                stdin=tar.stdout, capture_output=True)
        finally:
            tar.stdout.close()
            tar.wait()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"built the base {name}", file=sys.stderr)
    return name


def fetch_wheels(base: str) -> None:
    """Download the wheels of requirements.txt for the base's Python into WHEELS, with host pip."""
    probe = run(["docker", "run", "--rm", "--network", "none", "--entrypoint", "python3", base, "-c",
                 "import json, platform, sys; print(json.dumps([sys.version_info[:2], "
                 "platform.libc_ver(), platform.machine()]))"], capture_output=True)
    (major, minor), (libc, libc_version), machine = json.loads(probe.stdout)
    if libc != "glibc":
        raise BuildError(f"the base {base} must be a glibc Linux with python3 (found {libc or 'no glibc'})")
    glibc_major, glibc_minor = (int(part) for part in libc_version.split(".")[:2])
    # pip does not widen a --platform to the older manylinux tags the base also runs: list them
    platforms = [f"manylinux_{glibc_major}_{m}_{machine}" for m in range(glibc_minor, 4, -1)]
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    platforms += [f"{alias}_{machine}" for m, alias in legacy.items() if m <= glibc_minor]
    requirements = REPO / "requirements.txt"
    key = hashlib.sha256(json.dumps([requirements.read_text(), major, minor, platforms]).encode()).hexdigest()
    stamp = WHEELS / ".requirements-sha256"
    if stamp.is_file() and stamp.read_text() == key:
        print(f"using the wheels in {WHEELS.relative_to(REPO)} (delete it to download them again)", file=sys.stderr)
        return
    staging = WHEELS.with_name("wheels.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    print(f"downloading the wheels for CPython {major}.{minor} on {platforms[0]} ...", file=sys.stderr)
    run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--only-binary=:all:",
         "--implementation", "cp", "--python-version", f"{major}.{minor}", "--abi", f"cp{major}{minor}",
         *(f"--platform={platform}" for platform in platforms), "--dest", str(staging),
         "--requirement", str(requirements)], capture_output=True)
    (staging / stamp.name).write_text(key)
    shutil.rmtree(WHEELS, ignore_errors=True)
    staging.rename(WHEELS)


def build(image: str, base: str) -> None:
    """Run docker build on the repository with the given base."""
    print(f"building {image} on {base} ...", file=sys.stderr)
    run(["docker", "build", "--build-arg", f"BASE={base}", "--tag", image, str(REPO)])


def main(argv: list[str] | None = None) -> int:
    """Build the image; return 0, or 1 with a one-line reason when a step fails."""
    parser = argparse.ArgumentParser(prog="python3 deploy/image.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default=DEFAULT_IMAGE, help=f"name:tag to build [{DEFAULT_IMAGE}]")
    parser.add_argument("--base", default=DEFAULT_BASE,
                        help=f"base image with python3 and venv [{DEFAULT_BASE}; when it cannot be pulled, "
                             f"a Debian {SUITE} base built with debootstrap]")
    parser.add_argument("--mirror", default=os.environ.get("DEBIAN_MIRROR"),
                        help="Debian mirror for debootstrap [DEBIAN_MIRROR, else the one apt uses here]")
    args = parser.parse_args(argv)
    try:
        check_docker()
        base = resolve_base(args.base, args.mirror)
        fetch_wheels(base)
        build(args.image, base)
        size = run(["docker", "image", "inspect", "--format", "{{.Size}}", args.image], capture_output=True)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"built {args.image} on {base}: {int(size.stdout) / 1e6:.0f} MB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
