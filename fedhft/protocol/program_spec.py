"""`executorch/program.json`: what an ExecuTorch training program takes and which tensors it trains.

Written beside the `.pte` by the exporter and read (torch-free) by the ExecuTorch-Python and native trainers.
It maps the program's parameter names (`model.<module path>`) to manifest names, records the accepted
dynamic-shape bounds and the sha256 of every file, so a device can refuse a corrupted or mismatched program
before running anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedhft.atomic import atomic_write_bytes
from fedhft.protocol.manifest import ManifestError, verify_files

SPEC_FORMAT = "fedhft-executorch-program"
SPEC_VERSION = 1
SPEC_NAME = "program.json"
SPEC_DIR = "executorch"


@dataclass(frozen=True)
class ProgramFile:
    path: str  # relative to the directory that holds program.json
    sha256: str
    bytes: int


@dataclass(frozen=True)
class ProgramParameter:
    """One trainable tensor, in the order the program returns its gradients and parameters."""

    name: str  # manifest name, e.g. "layers.1.query.lora_A"
    program_name: str  # fully qualified name inside the program, e.g. "model.encoder.encoder.layer.1...."
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ProgramSpec:
    method: str  # the joint forward+backward method
    inputs: list[str]  # input_ids, attention_mask, labels (int64, batch x seq / batch)
    outputs: list[str]  # loss, logits (then gradients and parameters, as the program's metadata says)
    batch_bounds: tuple[int, int]
    seq_bounds: tuple[int, int]
    pad_token_id: int
    num_labels: int
    files: dict[str, ProgramFile]  # role -> file: "program" (.pte), "weights" (.ptd)
    parameters: list[ProgramParameter]
    exporter: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SPEC_FORMAT,
            "version": SPEC_VERSION,
            "method": self.method,
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
            "bounds": {"batch": list(self.batch_bounds), "seq": list(self.seq_bounds)},
            "pad_token_id": self.pad_token_id,
            "num_labels": self.num_labels,
            "files": {r: {"path": f.path, "sha256": f.sha256, "bytes": f.bytes} for r, f in self.files.items()},
            "parameters": [
                {"name": p.name, "program_name": p.program_name, "shape": list(p.shape)} for p in self.parameters
            ],
            "exporter": dict(self.exporter),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = SPEC_NAME) -> ProgramSpec:
        if d.get("format") != SPEC_FORMAT or d.get("version") != SPEC_VERSION:
            raise ManifestError(
                f"{source}: not a version-{SPEC_VERSION} {SPEC_FORMAT} file "
                f"(format={d.get('format')!r}, version={d.get('version')!r}); re-export"
            )
        try:
            spec = cls(
                method=str(d["method"]),
                inputs=[str(x) for x in d["inputs"]],
                outputs=[str(x) for x in d["outputs"]],
                batch_bounds=_bounds(d["bounds"]["batch"]),
                seq_bounds=_bounds(d["bounds"]["seq"]),
                pad_token_id=int(d["pad_token_id"]),
                num_labels=int(d["num_labels"]),
                files={
                    r: ProgramFile(str(f["path"]), str(f["sha256"]), int(f["bytes"])) for r, f in d["files"].items()
                },
                parameters=[
                    ProgramParameter(str(p["name"]), str(p["program_name"]), tuple(int(s) for s in p["shape"]))
                    for p in d["parameters"]
                ],
                exporter=dict(d.get("exporter", {})),
            )
        except KeyError as e:
            raise ManifestError(f"{source}: missing field {e}") from e
        except (TypeError, ValueError, AttributeError) as e:
            raise ManifestError(f"{source}: malformed field: {e}") from e
        if "program" not in spec.files:
            raise ManifestError(f"{source}: no 'program' file listed")
        if not spec.parameters:
            raise ManifestError(f"{source}: lists no trainable parameters")
        return spec

    def by_name(self) -> dict[str, ProgramParameter]:
        return {p.name: p for p in self.parameters}


def _bounds(v: Any) -> tuple[int, int]:
    lo, hi = (int(x) for x in v)
    if not 1 <= lo <= hi:
        raise ValueError(f"bad bounds {v}")
    return lo, hi


def write_program_spec(spec: ProgramSpec, directory: Path) -> Path:
    """Write `directory/program.json` atomically."""
    path = directory / SPEC_NAME
    atomic_write_bytes(path, (json.dumps(spec.to_dict(), indent=2, sort_keys=True) + "\n").encode())
    return path


def load_program_spec(path: str | Path) -> tuple[ProgramSpec, Path]:
    """Read `program.json` (or the profile dir / executorch dir holding it); return it and its directory."""
    p = Path(path)
    if p.is_dir():
        p = p / SPEC_NAME if (p / SPEC_NAME).is_file() else p / SPEC_DIR / SPEC_NAME
    if not p.is_file():
        raise ManifestError(f"no ExecuTorch program spec at {p} (export with the executorch format)")
    try:
        d = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{p}: not a readable JSON program spec ({e})") from e
    if not isinstance(d, dict):
        raise ManifestError(f"{p}: a program spec must be a JSON object")
    return ProgramSpec.from_dict(d, str(p)), p.parent


def verify_program_files(spec: ProgramSpec, directory: Path) -> dict[str, Path]:
    """Check that every file the spec lists exists and matches its sha256; return role -> path."""
    return verify_files(spec.files, directory, "program.json")
