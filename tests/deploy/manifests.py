"""Offline checks of the deploy/ manifests: Kubernetes' own schemas and the KServe SDK's API models.

Core kinds go through kubernetes-validate (bundled schemas, strict: unknown fields are errors).
For KServe's kinds, the SDK's generated API models name every field and its type: the document is
walked against them, unknown keys are errors, required fields are checked by the model classes
themselves, and the Kubernetes types inside (containers, probes, ...) are checked against
kubernetes-validate's schema of that type. Only the SDK's wheel is fetched (pip download
--no-deps): the SDK package itself imports its whole model server, which would pull in
dependencies that conflict with this project's pins.

A kustomize overlay is checked as kubectl applies it: rendered by the kustomize that kubectl carries
(`kubectl kustomize`), or a standalone `kustomize build`.
"""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from functools import cache
from importlib.resources import files
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from referencing import Registry, Resource

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KSERVE_SDK_VERSION = "0.21.0"
KSERVE_CACHE = REPO / ".cache" / "kserve-sdk"
# The Kubernetes versions checked: the oldest and the newest kubernetes-validate carries.
KUBERNETES_VERSIONS = ("1.25", kubernetes_validate.latest_version())
_DEFINITIONS = "https://kubernetes.io/api/_definitions.json"
_PRIMITIVES: dict[str, tuple[type, ...]] = {"str": (str,), "int": (int,), "bool": (bool,), "float": (int, float),
                                            "object": (object,)}


class ManifestError(AssertionError):
    """A manifest breaks a schema; the message lists where and why."""


def load(path: Path) -> list[dict[str, Any]]:
    """Return the YAML documents of a manifest file."""
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def manifests(folder: str) -> dict[str, dict[str, Any]]:
    """Return the documents under deploy/<folder> by kind (one of each kind per folder)."""
    documents: dict[str, dict[str, Any]] = {}
    for path in sorted((DEPLOY / folder).glob("*.yaml")):
        for document in load(path):
            assert document["kind"] not in documents, f"two {document['kind']} documents in deploy/{folder}"
            documents[document["kind"]] = document
    return documents


def render(folder: str) -> dict[str, dict[str, Any]]:
    """Return the documents that kustomize builds from deploy/<folder> by kind (one of each kind)."""
    kubectl, kustomize = shutil.which("kubectl"), shutil.which("kustomize")
    if kubectl:
        command = [kubectl, "kustomize", str(DEPLOY / folder)]
    elif kustomize:
        command = [kustomize, "build", str(DEPLOY / folder)]
    else:
        pytest.skip("neither kubectl nor kustomize is installed: the kustomize overlays cannot be rendered")
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if result.returncode:
        raise ManifestError(f"{' '.join(command)} failed: {result.stderr.strip()[-1000:]}")
    documents: dict[str, dict[str, Any]] = {}
    for document in yaml.safe_load_all(result.stdout):
        if document:
            assert document["kind"] not in documents, f"two {document['kind']} documents from deploy/{folder}"
            documents[document["kind"]] = document
    return documents


def validate_core(document: dict[str, Any], version: str) -> None:
    """Validate a core Kubernetes document strictly against the schemas of one Kubernetes version."""
    try:
        kubernetes_validate.validate(document, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(item) for item in exc.path) or "(top)"
        raise ManifestError(f"{document['kind']} against Kubernetes {exc.version}: {where}: {exc.message}") from None


def kserve_wheel() -> Path:
    """Return the KServe SDK wheel, downloaded once into .cache with pip (no dependencies)."""
    pattern = f"kserve-{KSERVE_SDK_VERSION}-*.whl"
    found = sorted(KSERVE_CACHE.glob(pattern))
    if not found:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                   "--dest", str(KSERVE_CACHE), f"kserve=={KSERVE_SDK_VERSION}"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        found = sorted(KSERVE_CACHE.glob(pattern))
        if result.returncode or not found:
            raise ManifestError(f"cannot download the KServe SDK wheel ({' '.join(command[2:])}): "
                                f"{result.stderr.strip()[-500:]}")
    return found[-1]


@cache
def kserve_models() -> ModuleType:
    """Return the SDK's `kserve.models` from its wheel, without running kserve/__init__.py."""
    wheel = kserve_wheel()
    saved = {name: module for name, module in sys.modules.items() if name == "kserve" or name.startswith("kserve.")}
    for name in saved:
        del sys.modules[name]
    # The generated models import only six and kserve.configuration; a bare package object whose
    # path is inside the wheel (zipimport) lets them load without the model server's imports.
    package = ModuleType("kserve")
    package.__path__ = [f"{wheel}/kserve"]
    sys.modules["kserve"] = package
    try:
        return importlib.import_module("kserve.models")
    finally:
        for name in [n for n in sys.modules if n == "kserve" or n.startswith("kserve.")]:
            del sys.modules[name]
        sys.modules.update(saved)


@cache
def _kubernetes_definitions() -> tuple[Registry, dict[str, str]]:
    """Return a registry of the newest strict Kubernetes definitions and their ids by short name."""
    version = kubernetes_validate.latest_version()
    path = files("kubernetes_validate") / "kubernetes-json-schema" / f"v{version}-local-strict" / "_definitions.json"
    contents = json.loads(path.read_text())
    registry = Resource.from_contents(contents) @ Registry()
    names: dict[str, str] = {}
    # "V1Container" in the SDK is io.k8s.api.core.v1.Container; core wins over other groups' v1 types
    for key in sorted(contents["$defs"], key=lambda k: not k.startswith("io.k8s.api.core.")):
        group_version, _, kind = key.rpartition(".")
        names.setdefault(group_version.rpartition(".")[2].capitalize() + kind, key)
    return registry, names


def validate_kserve(document: dict[str, Any]) -> None:
    """Validate a KServe document (apiVersion serving.kserve.io/...) against the SDK's models."""
    group, _, version = document["apiVersion"].partition("/")
    if group != "serving.kserve.io":
        raise ManifestError(f"{document['apiVersion']} is not a KServe API version")
    model = f"{version.capitalize()}{document['kind']}"
    if not hasattr(kserve_models(), model):
        raise ManifestError(f"the KServe SDK {KSERVE_SDK_VERSION} has no {model} ({document['apiVersion']} "
                            f"{document['kind']})")
    errors = _kserve_errors(document, model, document["kind"])
    if errors:
        raise ManifestError("\n".join(errors))


def _kserve_errors(value: Any, type_name: str, where: str) -> list[str]:
    """Return where value breaks the SDK type type_name ("list[V1EnvVar]", "V1beta1ModelSpec", ...)."""
    if type_name.startswith("list["):
        if not isinstance(value, list):
            return [f"{where}: expected a list, got {value!r:.60}"]
        return [e for index, item in enumerate(value)
                for e in _kserve_errors(item, type_name[5:-1], f"{where}[{index}]")]
    if type_name.startswith("dict("):
        if not isinstance(value, dict):
            return [f"{where}: expected a mapping, got {value!r:.60}"]
        inner = type_name[5:-1].split(", ", 1)[1]
        return [e for key, item in value.items() for e in _kserve_errors(item, inner, f"{where}.{key}")]
    if type_name in _PRIMITIVES:
        expected = _PRIMITIVES[type_name]
        if not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected):
            return [f"{where}: expected {type_name}, got {value!r:.60}"]
        return []
    model = getattr(kserve_models(), type_name, None)
    if model is None:
        return _kubernetes_errors(value, type_name, where)
    if not isinstance(value, dict):
        return [f"{where}: expected a {type_name} mapping, got {value!r:.60}"]
    attributes = {key: attribute for attribute, key in model.attribute_map.items()}
    errors = [f"{where}.{key}: not a field of {type_name}" for key in value if key not in attributes]
    for key, item in value.items():
        if key in attributes:
            errors += _kserve_errors(item, model.openapi_types[attributes[key]], f"{where}.{key}")
    try:
        model(**{attributes[key]: item for key, item in value.items() if key in attributes})
    except ValueError as exc:  # the generated setters reject a missing required field
        errors.append(f"{where}: {exc}")
    return errors


def _kubernetes_errors(value: Any, type_name: str, where: str) -> list[str]:
    """Return where value breaks the Kubernetes type that the SDK calls type_name (V1Container, ...)."""
    registry, names = _kubernetes_definitions()
    if type_name not in names:
        return [f"{where}: no Kubernetes schema for the SDK type {type_name}"]
    validator = jsonschema.Draft202012Validator({"$ref": f"{_DEFINITIONS}#/$defs/{names[type_name]}"},
                                                registry=registry)
    return [f"{where}{''.join(f'.{p}' if isinstance(p, str) else f'[{p}]' for p in error.absolute_path)}: "
            f"{error.message}" for error in validator.iter_errors(value)]
