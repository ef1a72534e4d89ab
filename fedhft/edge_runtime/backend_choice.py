"""`--backend auto`: the training backend a package runs here, read from its manifest.

ORT when the package has ORT artifacts and onnxruntime is installed, else the native ExecuTorch trainer when
the package has an ExecuTorch program and the trainer binary is found; otherwise one line says what is missing.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fedhft.edge_runtime.native_backend import find_trainer_binary
from fedhft.edge_runtime.trainer import BackendError
from fedhft.protocol.manifest import Manifest, load_manifest

AUTO = "auto"


def onnxruntime_installed() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None  # found without importing it


def native_trainer_found() -> bool:
    try:
        find_trainer_binary()
    except BackendError:
        return False
    return True


def choose_backend(profile_dir: str | Path, manifest: Manifest | None = None) -> str:
    """The backend `--backend auto` runs for the package in ``profile_dir``: "ort" or "native"."""
    manifest = manifest or load_manifest(profile_dir)
    formats = sorted(manifest.artifacts)
    if "ort" in formats and onnxruntime_installed():
        return "ort"
    if "executorch" in formats and native_trainer_found():
        return "native"
    missing = []
    if "ort" in formats:
        missing.append("its ORT artifacts need onnxruntime (pip install 'fedhft[edge]' on x86_64)")
    if "executorch" in formats:
        missing.append("its ExecuTorch program needs the native trainer fedhft-et-trainer (set $FEDHFT_NATIVE_TRAINER)")
    if not missing:
        missing.append("it has neither ORT artifacts nor an ExecuTorch program")
    raise BackendError(f"no training backend for {profile_dir} (formats {formats}): {'; '.join(missing)}")
