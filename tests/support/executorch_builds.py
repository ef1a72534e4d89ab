"""Shared, session-cached builds for the ExecuTorch and native-trainer tests.

One tiny-BERT profile package holds both formats of the same model (same plan, seed and int8 base): the
lead's pipeline writes the ORT artifacts, `export_executorch_for_profile` rebuilds the identical model from
the manifest and adds `executorch/`. The ExecuTorch export is the slow part (~30 s), so it happens once per
pytest session whichever test module asks first (this module is imported once, its cache is shared).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fedhft.edge_runtime.native_backend import DEFAULT_BUILD_DIR, SOURCE_DIR, build_native

NUM_LABELS = 3
MAX_SEQ_LEN = 32
LR = 5e-3
_CACHE: dict[str, Path] = {}


def tiny_plan(model_dir: Path, profile_path: Path):  # noqa: ANN201 (LoraPlan, imported lazily)
    """Rank-4 adapters on query, value and ffn_in of the top layer: small, so the export stays fast."""
    from fedhft.device_profiles.model_shape import read_model
    from fedhft.device_profiles.planner import uniform_plan
    from fedhft.device_profiles.profile import load_profile

    shape = read_model(model_dir).shape(NUM_LABELS, MAX_SEQ_LEN, 8)
    return uniform_plan(
        shape, load_profile(profile_path), rank=4, depth=1, targets=("query", "value", "ffn_in"), int8=True
    )


def both_formats(tmp_path_factory: pytest.TempPathFactory, model_dir: Path, profile_path: Path) -> Path:
    """The profile directory with `ort/` and `executorch/` artifacts of the same tiny model (cached).

    Uses the export pipeline for both formats where it offers "executorch"; otherwise exports ORT with it
    and adds ExecuTorch with `export_executorch_for_profile`.
    """
    if "both" not in _CACHE:
        from fedhft.device_profiles.profile import load_profile
        from fedhft.export import pipeline
        from fedhft.export.executorch_export import export_executorch_for_profile

        formats = tuple(f for f in ("ort", "executorch") if f in pipeline.FORMATS)
        out = tmp_path_factory.mktemp("et-export")
        res = pipeline.export_profile(
            model_dir,
            load_profile(profile_path),
            out,
            formats=formats,
            opts=pipeline.ExportOptions(num_labels=NUM_LABELS, max_seq_len=MAX_SEQ_LEN, int8=True),
            plan=tiny_plan(model_dir, profile_path),
        )
        if "executorch" not in formats:
            export_executorch_for_profile(res.directory, model_dir)
        _CACHE["both"] = res.directory
    return _CACHE["both"]


def vouch(profile_dir: Path, rel_path: str) -> None:
    """Re-record the sha256 and size of `rel_path` wherever the package lists it (program.json, manifest),
    so a test can hand the runtime a bad file that every checksum vouches for."""
    import json

    from fedhft.protocol.manifest import sha256_file

    path = profile_dir / rel_path
    digest, size = sha256_file(path), path.stat().st_size
    spec_path = profile_dir / "executorch" / "program.json"
    if rel_path != "executorch/program.json":
        spec = json.loads(spec_path.read_text())
        for f in spec["files"].values():
            if "executorch/" + f["path"] == rel_path:
                f.update(sha256=digest, bytes=size)
        spec_path.write_text(json.dumps(spec))
    manifest_path = profile_dir / "manifest.json"
    m = json.loads(manifest_path.read_text())
    for f in m["artifacts"].get("executorch", {}).values():
        if f["path"] == "executorch/program.json":
            f.update(sha256=sha256_file(spec_path), bytes=spec_path.stat().st_size)
        if f["path"] == rel_path:
            f.update(sha256=digest, bytes=size)
    manifest_path.write_text(json.dumps(m))


def copy_profile(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def native_binary() -> Path:
    """The native trainer, (re)built into build/native when missing or older than its sources."""
    if "native" not in _CACHE:
        binary = DEFAULT_BUILD_DIR / "fedhft-et-trainer"
        newest = max(p.stat().st_mtime for p in SOURCE_DIR.iterdir() if p.is_file())
        if not binary.is_file() or binary.stat().st_mtime < newest:
            binary = build_native(DEFAULT_BUILD_DIR)
        _CACHE["native"] = binary
    return _CACHE["native"]


def batch(seed: int = 0, b: int = 8, s: int = 24, pad_from: int | None = 20):  # noqa: ANN201
    """A deterministic batch (ids, mask, labels) with right padding from `pad_from`."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 5000, size=(b, s))
    mask = np.ones_like(ids)
    if pad_from is not None:
        mask[:, pad_from:] = 0
    return ids, mask, np.arange(b) % NUM_LABELS
