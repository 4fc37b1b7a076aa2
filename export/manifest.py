"""The manifest that travels with every exported model folder."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
from pathlib import Path

from export.sources import sha256_file

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TRACKED_PACKAGES = ("optimum", "optimum-onnx", "onnxruntime", "onnx", "transformers", "tokenizers", "torch")


def package_versions() -> dict[str, str | None]:
    """Return the installed versions of the packages that shape an export."""
    versions: dict[str, str | None] = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def file_checksums(folder: Path) -> dict[str, str]:
    """Return sha256 of every file in folder (relative paths, sorted), the manifest itself excluded."""
    return {p.relative_to(folder).as_posix(): sha256_file(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}


def write(folder: Path, body: dict) -> dict:
    """Write manifest.json into folder with format version, creation time and file checksums."""
    manifest = {"format_version": FORMAT_VERSION,
                "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                **body,
                "files": file_checksums(folder)}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest


def verify(folder: Path) -> list[str]:
    """Return the files whose sha256 differs from the manifest, or that are missing."""
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    problems = []
    for name, expected in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif sha256_file(path) != expected:
            problems.append(f"{name}: sha256 differs")
    return problems
