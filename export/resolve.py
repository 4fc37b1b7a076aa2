"""Turn what the user named (a hub id or a local folder) into a local checkpoint with provenance.

Everything downstream exports from a local folder, so a hub model is first downloaded at a resolved
commit. Where the Hub cannot be reached (edge sites, this project's machines) the user hears so within
seconds, with the suggestion to export from a local folder instead.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from export.sources import sha256_file

HUB_TIMEOUT_S = 10.0
# owner/name or name: letters, digits, '-', '_', '.'; the Hub's own rule, minus its length limits
HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")


class ExportError(RuntimeError):
    """A problem the user can fix; its message is printed as it is, without a traceback."""


@dataclass
class Source:
    """A local checkpoint folder and where it came from, for the manifest."""

    path: Path
    provenance: dict = field(default_factory=dict)


def resolve(model: str, revision: str | None = None) -> Source:
    """Return the local checkpoint for a local folder or a hub id, or raise ExportError."""
    local = Path(model).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ExportError(f"{model} is a file; give the folder that holds config.json and the weights.")
        return Source(path=local.resolve(), provenance=_local_provenance(local.resolve()))
    if not HUB_ID.match(model):
        raise ExportError(f"{model} is neither an existing folder nor a Hugging Face Hub id (owner/name).")
    return _from_hub(model, revision)


def _local_provenance(path: Path) -> dict:
    """Describe a local checkpoint: its path and a checksum over its config and weights."""
    files = sorted(p for p in path.iterdir() if p.is_file() and (p.name in WEIGHT_FILES or p.name == "config.json"
                                                                   or p.name.startswith("model-")))
    return {
        "kind": "local",
        "path": str(path),
        "files_sha256": {p.name: sha256_file(p) for p in files},
    }


def _from_hub(repo_id: str, revision: str | None) -> Source:
    """Download a hub model at a resolved commit, failing fast when the Hub is out of reach."""
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", str(int(HUB_TIMEOUT_S)))
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(int(HUB_TIMEOUT_S)))
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    hint = (f"No folder {repo_id} exists here either. "
            "Where the Hub is out of reach, download the model on a machine that has it "
            "(for example with `hf download " + repo_id + " --local-dir DIR`), copy the folder here and "
            "run `make export MODEL=DIR`.")
    try:
        info = HfApi().model_info(repo_id, revision=revision, timeout=HUB_TIMEOUT_S)
        path = snapshot_download(repo_id, revision=info.sha, etag_timeout=HUB_TIMEOUT_S,
                                 allow_patterns=["*.json", "*.txt", "*.model", "*.safetensors", "*.bin"],
                                 ignore_patterns=["*onnx*", "*.h5", "*.msgpack", "*.ot", "*tflite*"])
    except RepositoryNotFoundError:
        raise ExportError(f"The Hugging Face Hub has no model {repo_id!r} (or it is private and no token "
                          f"is set). Check the id, or export a local folder: make export MODEL=DIR.") from None
    except RevisionNotFoundError:
        raise ExportError(f"{repo_id} has no revision {revision!r}.") from None
    except GatedRepoError:
        raise ExportError(f"{repo_id} is gated: accept its terms on the Hub and set HF_TOKEN.") from None
    except OfflineModeIsEnabled:
        raise ExportError(f"HF_HUB_OFFLINE is set, so {repo_id} cannot be fetched. {hint}") from None
    except HFValidationError as exc:
        raise ExportError(f"{repo_id!r} is neither an existing folder nor a valid Hugging Face Hub id: "
                          f"{first_line(exc)}") from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        # requests' ConnectionError and Timeout are OSErrors; so are DNS failures.
        reason = type(exc).__name__
        raise ExportError(f"Could not reach the Hugging Face Hub for {repo_id} ({reason}). {hint}") from None
    provenance = {"kind": "hub", "repo_id": repo_id, "revision": info.sha, "requested_revision": revision}
    return Source(path=Path(path), provenance=provenance)


def first_line(message: object, limit: int = 300) -> str:
    """Return the first line of an exception's (or any) message, cut to limit characters."""
    line = (str(message).strip().splitlines() or [""])[0]
    return line if len(line) <= limit else line[:limit] + " ..."


def check_classifier(path: Path) -> dict:
    """Return the checkpoint's config if it is a sequence or token classifier with weights, else raise ExportError."""
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ExportError(f"{path} has no config.json: it is not a Hugging Face checkpoint folder.")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExportError(f"{config_path} is not valid JSON ({exc}).") from None
    if not isinstance(config, dict):
        raise ExportError(f"{config_path} is not a JSON object: it is not a model's config.")
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list) or not all(isinstance(name, str) for name in architectures):
        raise ExportError(f"{config_path}: 'architectures' must be a list of class names.")
    if not any(a.endswith(("ForSequenceClassification", "ForTokenClassification")) for a in architectures):
        found = ", ".join(architectures) or "no architecture"
        raise ExportError(f"{path} is not a sequence classifier (config.json names {found}; expected "
                          f"*ForSequenceClassification or *ForTokenClassification). Fine-tune a classification "
                          f"head first.")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ExportError(f"{path} has no weights ({' or '.join(WEIGHT_FILES[:2])}).")
    if not (path / "tokenizer.json").is_file() and not (path / "vocab.txt").is_file() \
            and not any(path.glob("*.model")):
        raise ExportError(f"{path} has no tokenizer files (tokenizer.json, vocab.txt or *.model).")
    if (path / "tokenizer.json").is_file():  # what the service will load: a broken one fails here, by name
        from tokenizers import Tokenizer

        try:
            Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as exc:  # noqa: BLE001 - tokenizers raises its own Exception for any bad file
            raise ExportError(f"{path / 'tokenizer.json'} cannot be read as a tokenizer: "
                              f"{first_line(exc, 200)}.") from None
    return config
