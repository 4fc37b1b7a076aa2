"""A memory-mapped copy of a model whose weights are inline in model.onnx.

onnxruntime copies a model's inline initializers into its heap, so each process holds all of them
resident whether or not they are ever read. Most of a small encoder's size is its fp32
word-embedding table, most of whose rows no request touches. Weights in an ONNX external-data file
are memory-mapped instead and used in place. Only the pages that are read become resident, and they
are clean file pages, which the kernel can drop and which processes serving the same copy share.

`make export` writes new models in that layout already. For a model that is not, the service writes
the same graph with its weights moved to a data file, once, in a cache folder, and loads that copy.
onnxruntime's own serializer does the writing, with graph optimization off, so the copy is the same
graph and gives the same scores; serving needs no `onnx` package. A copy is named after model.onnx's
sha256 (checked against the manifest at start-up) and the onnxruntime version. It is written in a
temporary folder and renamed into place, so a crash or a concurrent start never leaves a partial
copy where the next start would load it; a copy that another user owns or may write is not loaded.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from service import runtime

logger = logging.getLogger(__name__)

DATA_FILE = "model.onnx.data"  # a served model's weights, beside model.onnx (the export writes it too)
# A model.onnx this large carries its weights inline (a graph alone is far smaller), so smaller files
# gain nothing from a copy.
INLINE_BYTES = 8 * 2**20
# A partial copy this old was left by a killed process: writing one takes seconds.
ABANDONED_SECONDS = 3600
# Initializers from this size go to the data file; smaller ones (shapes, scalars) stay in the graph.
_EXTERNAL_MIN_BYTES = 1024


def default_cache_dir() -> Path:
    """Return $XDG_CACHE_HOME/onnx-text-classify, or ~/.cache/onnx-text-classify."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "onnx-text-classify"


def has_inline_weights(model: Path) -> bool:
    """Return whether model.onnx is large enough to hold its weights inline."""
    return model.stat().st_size >= INLINE_BYTES


def mapped_copy(model: Path, sha256: str, cache_dir: Path) -> Path | None:
    """Return the cached copy of model with its weights in a data file, writing it if needed.

    Return None, after one warning line, when the copy cannot be written (a read-only or full
    disk) or another user may have written it: the caller then loads model itself.
    """
    folder = _folder(sha256, cache_dir)
    if _complete(folder):
        return _trusted(folder)
    work = None
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(cache_dir)
        work = Path(tempfile.mkdtemp(prefix=".partial-", dir=cache_dir))
        os.chmod(work, 0o755)  # mkdtemp's 0700 would hide a copy made at image build from the service's user
        _write(model, work / "model.onnx")
        try:
            os.rename(work, folder)  # atomic; refused if the folder exists
        except OSError:
            if not _complete(folder):  # not another process' finished copy: a real failure
                raise
            return _trusted(folder)
        work = None
    except Exception as exc:  # OSError, or onnxruntime's own types when it cannot read or write
        hint = "; set SERVICE_CACHE_DIR to a writable folder" if isinstance(exc, OSError) else ""
        logger.warning("serving %s with its weights in memory: its memory-mapped copy could not be written "
                       "in %s (%s)%s", model, cache_dir, f"{type(exc).__name__}: {exc}".splitlines()[0], hint)
        return None
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    logger.info("wrote a memory-mapped copy of %s in %s", model, folder)
    return _trusted(folder)


def existing_copy(sha256: str, cache_dir: Path) -> Path | None:
    """Return the cached copy of the model with this sha256 if one was written before, else None."""
    folder = _folder(sha256, cache_dir)
    return _trusted(folder) if _complete(folder) else None


def _folder(sha256: str, cache_dir: Path) -> Path:
    """Return the folder of a model's copy: named after its sha256 and this onnxruntime version."""
    return cache_dir / f"{sha256.lower()[:32]}-onnxruntime-{runtime.onnxruntime().__version__}"


def discard(copy: Path) -> None:
    """Remove a cached copy that onnxruntime could not load, so that it is written again."""
    shutil.rmtree(copy.parent, ignore_errors=True)


def _remove_abandoned(cache_dir: Path) -> None:
    """Remove partial copies left by a process killed while writing (older than any write takes)."""
    cutoff = time.time() - ABANDONED_SECONDS
    for partial in cache_dir.glob(".partial-*"):
        try:
            if partial.stat().st_mtime < cutoff:
                shutil.rmtree(partial, ignore_errors=True)
        except OSError:  # gone meanwhile
            continue


def _trusted(folder: Path) -> Path | None:
    """Return folder's model.onnx if only this user or root can have written the copy, else None.

    The copy is loaded without checking its content against anything, so in a folder others can
    write to (a shared cache), one planted by another user is refused, as ssh refuses such keys.
    """
    owners = {os.getuid(), 0}
    for path in (folder, folder / "model.onnx", folder / DATA_FILE):
        try:
            info = path.stat()
        except OSError as exc:  # removed by another process (a cache being cleaned) since it was found
            logger.warning("serving the model with its weights in memory: the memory-mapped copy %s "
                           "could not be read (%s)", folder, f"{type(exc).__name__}: {exc}")
            return None
        if info.st_uid not in owners or info.st_mode & 0o022:
            logger.warning("serving the model with its weights in memory: the memory-mapped copy %s is "
                           "owned by another user or writable by others", folder)
            return None
    return folder / "model.onnx"


def _complete(folder: Path) -> bool:
    """Return whether folder holds a finished copy (both files: they are renamed in together)."""
    return (folder / "model.onnx").is_file() and (folder / DATA_FILE).is_file()


def _write(model: Path, target: Path) -> None:
    """Write model's unoptimized graph to target, its initializers to DATA_FILE beside it."""
    ort = runtime.onnxruntime()
    options = ort.SessionOptions()
    # no graph rewriting: the copy is the model's own graph, only its weights move
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.optimized_model_filepath = str(target)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", DATA_FILE)
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                     str(_EXTERNAL_MIN_BYTES))
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    ort.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])
    if not (target.is_file() and (target.parent / DATA_FILE).is_file()):
        raise OSError(f"onnxruntime wrote no {DATA_FILE}")
    # on disk before the rename makes the copy visible: after a crash, never a renamed copy of zeros
    for path in (target, target.parent / DATA_FILE):
        path.chmod(0o644)  # whatever the umask: _trusted() refuses a copy others may write
        with path.open("rb") as handle:
            os.fsync(handle.fileno())

