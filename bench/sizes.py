"""Installed size of what each backend needs to serve: the dependency closure's files on disk."""

from __future__ import annotations

import os
import re
from importlib.metadata import Distribution, PackageNotFoundError, distribution, distributions
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
# What each served backend imports at run time, besides the HTTP layer. `onnx` is requirements.txt.
HTTP = ("flask", "waitress", "prometheus-client")
BACKEND_ROOTS = {
    "pytorch": HTTP + ("torch", "transformers"),
    "optimum": HTTP + ("optimum-onnx", "onnxruntime", "transformers", "torch"),
}


def requirement_names(path: Path) -> list[str]:
    """Return the distribution names a requirements file lists (no nested -r files)."""
    names = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            names.append(Requirement(line).name)
    return names


def closure(roots: tuple[str, ...] | list[str]) -> set[str]:
    """Return the installed distributions that roots need, following Requires-Dist without extras."""
    seen: set[str] = set()
    pending = list(roots)
    while pending:
        name = _canonical(pending.pop())
        if name in seen:
            continue
        try:
            requires = distribution(name).requires or []
        except PackageNotFoundError:
            continue  # an optional platform dependency that is not installed here
        seen.add(name)
        for text in requires:
            requirement = Requirement(text)
            # evaluate markers as pip does for a plain install: no extras requested
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(requirement.name)
    return seen


def disk_mb(name: str | Distribution) -> float:
    """Return the disk usage (du's blocks, MiB) of the files a distribution installed."""
    total = 0
    for file in (distribution(name) if isinstance(name, str) else name).files or []:
        path = Path(file.locate())
        try:
            total += os.lstat(path).st_blocks * 512
        except FileNotFoundError:
            continue  # RECORD lists files that may be gone (for example removed __pycache__)
    return total / 2**20


def footprint() -> dict[str, dict[str, object]]:
    """Return, per backend, the distributions it needs and their total and per-package MiB."""
    roots = {"onnx": requirement_names(REPO / "requirements.txt"), **BACKEND_ROOTS}
    result: dict[str, dict[str, object]] = {}
    for backend, names in roots.items():
        sizes = {name: round(disk_mb(name), 1) for name in sorted(closure(names))}
        result[backend] = {"total_mb": round(sum(sizes.values()), 1),
                           "packages": dict(sorted(sizes.items(), key=lambda item: -item[1]))}
    return result


def venv_footprint(venv: Path) -> dict[str, object] | None:
    """Return the total and per-package MiB of every distribution in a virtualenv but the installers."""
    folders = sorted(venv.glob("lib/python*/site-packages"))
    if not folders:
        return None
    sizes = {}
    for dist in distributions(path=[str(folder) for folder in folders]):
        name = _canonical(dist.metadata["Name"])
        if name not in ("pip", "setuptools", "wheel"):
            sizes[name] = round(disk_mb(dist), 1)
    return {"total_mb": round(sum(sizes.values()), 1),
            "packages": dict(sorted(sizes.items(), key=lambda item: -item[1]))}


def _canonical(name: str) -> str:
    """Return the PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()
