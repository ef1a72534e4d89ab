"""The manifest: the only thing an edge runtime (and a server) knows about an exported model.

Written by `fedhft export` as `OUT/<profile>/manifest.json`; read here without torch. It names the plan, the
trainable tensors (and where each sits in the federation's global adapter), the inputs, the tokenizer, the
quantization and the sha256 of every artifact.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedhft.errors import FedHFTError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
TRAININGS = ("lora", "full")  # plan["training"]: LoRA adapters (default) or full fine-tuning


class ManifestError(FedHFTError):
    """A manifest or one of the artifacts it names is missing, malformed or does not match."""


@dataclass(frozen=True)
class AdaptableModule:
    """One entry of the global adapter spec: a linear module every device may adapt, up to `max_rank`."""

    name: str  # canonical, e.g. "layers.5.query"
    layer: int
    kind: str
    in_features: int
    out_features: int
    max_rank: int


@dataclass(frozen=True)
class TrainableTensor:
    """A tensor the device trains. A LoRA A (r, in) is rows [0, r) of the global A (R, in); a LoRA B
    (out, r) is columns [0, r) of the global B (out, R); head tensors are whole."""

    name: str  # manifest name, e.g. "layers.5.query.lora_A", "head.weight"
    graph_name: str  # name in the training artifacts (ORT checkpoint, ExecuTorch program)
    shape: tuple[int, ...]
    module: str | None
    factor: str  # "A" | "B" | "head" | "full"
    rank: int


@dataclass(frozen=True)
class ArtifactFile:
    path: str  # relative to the profile directory
    sha256: str
    bytes: int


@dataclass
class Manifest:
    schema_version: int
    base_model: str
    base_model_sha256: str
    profile: dict[str, Any]
    plan: dict[str, Any]
    num_labels: int
    max_seq_len: int
    tokenizer: str  # file name, relative to the profile directory
    inputs: list[str]
    outputs: list[str]
    quantization: dict[str, Any]
    lora: dict[str, Any]  # alpha, scaling rule, mask ratio
    trainable: list[TrainableTensor]
    global_adapter: list[AdaptableModule]
    head_shapes: dict[str, tuple[int, ...]]
    artifacts: dict[str, dict[str, ArtifactFile]]  # format -> role -> file
    extra: dict[str, Any] = field(default_factory=dict)

    # ---- derived views --------------------------------------------------------------------------------
    @property
    def profile_name(self) -> str:
        return str(self.profile["name"])

    @property
    def mask_ratio(self) -> float:
        return float(self.plan["mask_ratio"])

    @property
    def training(self) -> str:
        """``"full"`` when every weight trains (a full fine-tuning export), else ``"lora"``: ``plan["training"]``,
        or for exports that predate that field, full when every trainable tensor is of factor "full"."""
        declared = self.plan.get("training")
        if declared is not None:
            return str(declared)
        return "full" if self.trainable and all(t.factor == "full" for t in self.trainable) else "lora"

    def trainable_by_name(self) -> dict[str, TrainableTensor]:
        return {t.name: t for t in self.trainable}

    def module_ranks(self) -> dict[str, int]:
        """Adapted module -> rank, for this device."""
        return {t.module: t.rank for t in self.trainable if t.module is not None and t.factor == "A"}

    def global_modules(self) -> dict[str, AdaptableModule]:
        return {m.name: m for m in self.global_adapter}

    # ---- (de)serialization -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["trainable"] = [dict(asdict(t), shape=list(t.shape)) for t in self.trainable]
        d["head_shapes"] = {k: list(v) for k, v in self.head_shapes.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "manifest") -> Manifest:
        try:
            if d.get("schema_version") != SCHEMA_VERSION:
                raise ManifestError(
                    f"{source}: schema_version {d.get('schema_version')!r} is not supported (expected "
                    f"{SCHEMA_VERSION}); re-export the model with this fedhft"
                )
            trainable = [TrainableTensor(**dict(t, shape=tuple(t["shape"]))) for t in d["trainable"]]
            global_adapter = [AdaptableModule(**m) for m in d["global_adapter"]]
            artifacts = {
                fmt: {role: ArtifactFile(**a) for role, a in files.items()} for fmt, files in d["artifacts"].items()
            }
            head_shapes = {k: tuple(v) for k, v in d["head_shapes"].items()}
            simple = {
                k: d[k]
                for k in (
                    "schema_version",
                    "base_model",
                    "base_model_sha256",
                    "profile",
                    "plan",
                    "num_labels",
                    "max_seq_len",
                    "tokenizer",
                    "inputs",
                    "outputs",
                    "quantization",
                    "lora",
                )
            }
            m = cls(
                trainable=trainable,
                global_adapter=global_adapter,
                artifacts=artifacts,
                head_shapes=head_shapes,
                extra=d.get("extra", {}),
                **simple,
            )
        except ManifestError:
            raise
        except KeyError as e:
            raise ManifestError(f"{source}: missing field {e}") from e
        except (TypeError, ValueError, AttributeError) as e:
            raise ManifestError(f"{source}: malformed field: {e}") from e
        m.validate(source)
        return m

    def validate(self, source: str = "manifest") -> None:
        if self.num_labels < 2:
            raise ManifestError(f"{source}: num_labels must be >= 2, got {self.num_labels}")
        if self.max_seq_len < 1:
            raise ManifestError(f"{source}: max_seq_len must be >= 1, got {self.max_seq_len}")
        if self.training not in TRAININGS:
            raise ManifestError(f"{source}: plan training {self.training!r} is not one of {TRAININGS}")
        if self.training == "full" and any(t.factor != "full" for t in self.trainable):
            raise ManifestError(f"{source}: a full fine-tuning manifest lists LoRA or head factors as trainable")
        gm = self.global_modules()
        for t in self.trainable:
            if any(int(s) < 1 for s in t.shape):
                raise ManifestError(f"{source}: trainable '{t.name}' has a bad shape {t.shape}")
            if t.module is None:
                continue
            g = gm.get(t.module)
            if g is None:
                raise ManifestError(
                    f"{source}: trainable '{t.name}' names module '{t.module}' missing from the global adapter"
                )
            expect = (t.rank, g.in_features) if t.factor == "A" else (g.out_features, t.rank)
            if tuple(t.shape) != expect or t.rank > g.max_rank:
                raise ManifestError(
                    f"{source}: trainable '{t.name}' has shape {t.shape}, expected {expect} with rank <= {g.max_rank}"
                )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate `path` (a manifest.json or the profile directory that holds one)."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST_NAME
    if not p.is_file():
        raise ManifestError(f"no manifest at {p}")
    try:
        d = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{p}: not a readable JSON manifest ({e})") from e
    if not isinstance(d, dict):
        raise ManifestError(f"{p}: a manifest must be a JSON object")
    return Manifest.from_dict(d, source=str(p))


def verify_files(files: Mapping[str, Any], directory: Path, source: str) -> dict[str, Path]:
    """Check that every listed file (``.path``, ``.sha256``) exists under `directory` and matches; role -> path."""
    out: dict[str, Path] = {}
    for role, art in files.items():
        path = directory / art.path
        if not path.is_file():
            raise ManifestError(f"{path}: artifact '{role}' is missing")
        digest = sha256_file(path)
        if digest != art.sha256:
            raise ManifestError(
                f"{path}: sha256 {digest[:12]}… does not match {source}'s {art.sha256[:12]}… "
                "(corrupted or replaced artifact; re-export)"
            )
        out[role] = path
    return out


def verify_artifacts(manifest: Manifest, profile_dir: Path, fmt: str) -> dict[str, Path]:
    """Check that every file of format `fmt` exists and matches its sha256; return role -> path."""
    files = manifest.artifacts.get(fmt)
    if not files:
        raise ManifestError(
            f"{profile_dir}: the manifest has no '{fmt}' artifacts (exported formats: {sorted(manifest.artifacts)})"
        )
    return verify_files(files, profile_dir, "the manifest")


def write_manifest(manifest: Manifest, profile_dir: Path) -> Path:
    path = profile_dir / MANIFEST_NAME
    path.write_text(json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n")
    return path
