"""Infinity (infinity-emb), the runnable peer: its own pinned virtualenv under .cache/, made on first use.

`python -m bench.infinity` installs it ahead of a run; `python -m bench` installs it when the
`infinity` backend is chosen and goes on without that backend when the install cannot happen.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
INFINITY = "infinity-emb[server,optimum]==0.0.78"
# On this project's machines pip takes this release as a CPU wheel from local disk; a bare `torch`
# (or a range admitting newer releases) pulls a multi-GB CUDA build.
TORCH = "torch==2.13.0"
VENV = REPO / ".cache" / "bench-infinity-0.0.78"
INSTALL_TIMEOUT = 1800  # seconds per pip step: the dependency set is large on a slow mirror


class InstallError(RuntimeError):
    """Infinity cannot be installed or started here; the message says why in one line."""


def executable(venv: Path | None = None) -> Path:
    """Return the `infinity_emb` command of the virtualenv (default VENV)."""
    return (venv or VENV) / "bin" / "infinity_emb"


def ensure_installed(venv: Path | None = None, announce: Callable[[str], None] = print) -> Path:
    """Return the `infinity_emb` command, installing torch and then Infinity into venv if needed."""
    venv = venv or VENV
    marker = venv / ".installed"
    wanted = f"{TORCH} {INFINITY}\n"
    if marker.is_file() and marker.read_text() == wanted and executable(venv).is_file():
        return executable(venv)
    announce(f"installing {INFINITY} into {_shown(venv)} (first use; a few minutes)")
    python = venv / "bin" / "python"
    if not python.is_file():
        _step([sys.executable, "-m", "venv", str(venv)], "python -m venv")
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    _step([*pip, TORCH], f"pip install {TORCH}")
    constraints = venv / "constraints.txt"
    constraints.write_text(f"{TORCH}\n")  # Infinity's own ranges must not move torch off the CPU wheel
    _step([*pip, "-c", str(constraints), INFINITY], f"pip install -c constraints.txt {INFINITY}")
    _step([str(python), "-c", "import infinity_emb, optimum.onnxruntime"], "importing infinity_emb")
    if not executable(venv).is_file():
        raise InstallError(f"{INFINITY} installed no infinity_emb command in {_shown(venv)}")
    marker.write_text(wanted)
    return executable(venv)


def command(program: Path, model_name: str, port: int | str) -> list[str]:
    """Return the command serving the model folder that is the working directory, on 127.0.0.1:port."""
    # --model-id .: with a folder path Infinity passes the full path as the ONNX file name, which
    # optimum-onnx rejects. --no-model-warmup: its warm-up sends more tokens than the model has
    # positions. --log-level warning: no access-log line per request (this service writes none).
    return [str(program), "v2", "--model-id", ".", "--served-model-name", model_name,
            "--engine", "optimum", "--device", "cpu", "--onnx-disable-optimize", "--no-model-warmup",
            "--log-level", "warning", "--host", "127.0.0.1", "--port", str(port)]


def environment() -> dict[str, str]:
    """Return the variables Infinity needs here: the Hub offline, telemetry off."""
    return {"HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0"}


def prepare_model(model_dir: Path, folder: Path) -> Path:
    """Return a copy of the model folder for Infinity to start in (it writes its cache there)."""
    target = folder / f"infinity-{model_dir.name}"
    if not target.is_dir():
        shutil.copytree(model_dir, target)
    return target


def _step(argv: list[str], what: str) -> None:
    """Run one install step or raise InstallError with the step and its last line of output."""
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise InstallError(f"cannot install Infinity: `{what}` took over {INSTALL_TIMEOUT} s") from None
    except OSError as exc:
        raise InstallError(f"cannot install Infinity: `{what}` could not run ({exc.strerror})") from None
    if result.returncode != 0:
        lines = [line.strip() for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        last = lines[-1] if lines else "no output"
        raise InstallError(f"cannot install Infinity: `{what}` exited with {result.returncode}: {last}")


def _shown(path: Path) -> str:
    """Return a path relative to the repository when it lies inside it."""
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def main(argv: list[str] | None = None) -> int:
    """Install Infinity into its virtualenv; print where, or one error line; return the exit code."""
    parser = argparse.ArgumentParser(prog="python -m bench.infinity", description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=None, help=f"virtualenv folder (default {_shown(VENV)})")
    args = parser.parse_args(argv)
    try:
        path = ensure_installed(args.venv.resolve() if args.venv else None,
                                announce=lambda line: print(line, file=sys.stderr))
    except InstallError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
