"""FedHFT masked uploads and model loading, as pure numpy functions on tensors named by the manifest.

Device (trainer) tensors: ``<m>.lora_A`` (r, in), ``<m>.lora_B`` (out, r) with the update
ΔW = (alpha / r) · B · A, plus ``head.weight`` / ``head.bias``. Wire tensors carry the scaling folded into
B so that ΔW = B_wire · A exactly (see fedhft.protocol.messages for the names):

* update: ``<m>.A`` = A, ``<m>.B_rows`` = (alpha / r) · B[rows], ``<m>.rows`` = the ceil(mask_ratio · out)
  rows of ΔW whose *change* this round, ΔW_end − ΔW_start, has the largest L2 norm (ties: lower index);
* model: ``<m>.A`` (R, in), ``<m>.B`` (out, R) ordered by singular value, so the device keeps the first r
  components: A_local = A[:r], B_local = B[:, :r] / (alpha / r).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from fedhft.errors import FedHFTError
from fedhft.protocol.manifest import Manifest
from fedhft.protocol.tensor_names import a_name, b_name, b_rows_name, rows_name


class AdapterMismatch(FedHFTError):
    """Tensors that do not fit this device's adapter (missing module, wrong shape, non-finite values)."""


@dataclass(frozen=True)
class ModuleSpec:
    """One adapted module on this device: its global name, its rank r here, its shape and the global max R."""

    name: str
    rank: int
    in_features: int
    out_features: int
    max_rank: int


@dataclass(frozen=True)
class AdapterSpec:
    """What masking needs to know about a device's adapter (built from a manifest, or by hand)."""

    modules: tuple[ModuleSpec, ...]
    alpha: float
    mask_ratio: float
    head_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> AdapterSpec:
        glob = manifest.global_modules()
        modules = tuple(
            ModuleSpec(name, rank, glob[name].in_features, glob[name].out_features, glob[name].max_rank)
            for name, rank in sorted(manifest.module_ranks().items())
        )
        heads = {k: tuple(v) for k, v in manifest.head_shapes.items()}
        return cls(modules, float(manifest.lora["alpha"]), manifest.mask_ratio, heads)

    def scaling(self, module: ModuleSpec) -> float:
        return self.alpha / module.rank

    def kept_rows(self, module: ModuleSpec) -> int:
        return kept_rows(module.out_features, self.mask_ratio)

    def update_shapes(self) -> dict[str, tuple[int, ...]]:
        """Exact shape of every tensor of this device's update message."""
        shapes: dict[str, tuple[int, ...]] = dict(self.head_shapes)
        for m in self.modules:
            k = self.kept_rows(m)
            shapes |= {a_name(m.name): (m.rank, m.in_features), b_rows_name(m.name): (k, m.rank)}
            shapes[rows_name(m.name)] = (k,)
        return shapes

    def out_features(self) -> dict[str, int]:
        return {m.name: m.out_features for m in self.modules}


def kept_rows(out_features: int, mask_ratio: float) -> int:
    """Rows uploaded per module: ceil(mask_ratio · out), at least 1 (a ratio like 0.1 · 30 counts as 3)."""
    if not 0.0 < mask_ratio <= 1.0:
        raise AdapterMismatch(f"mask ratio must be in (0, 1], got {mask_ratio}")
    return min(out_features, max(1, math.ceil(round(mask_ratio * out_features, 9))))


def delta_change_row_norms(a: np.ndarray, b: np.ndarray, a0: np.ndarray, b0: np.ndarray, scale: float) -> np.ndarray:
    """L2 norm of each row of scale · (b·a − b0·a0), without forming the (out, in) matrices.

    b·a − b0·a0 = (b − b0)·a + b0·(a − a0) = C·D with C = [b − b0, b0] (out, 2r), D = [a; a − a0] (2r, in);
    |row_i|² = c_i (D Dᵀ) c_iᵀ. Differences are taken before any product, so small changes keep precision.
    """
    a, b, a0, b0 = (np.asarray(x, dtype=np.float64) for x in (a, b, a0, b0))
    c = np.concatenate([b - b0, b0], axis=1)
    d = np.concatenate([a, a - a0], axis=0)
    gram = d @ d.T
    sq = np.einsum("ij,jk,ik->i", c, gram, c)
    return np.sqrt(np.clip(sq, 0.0, None)) * abs(scale)


def top_rows(norms: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest norms (ties: lower index first), sorted ascending, as int32."""
    order = np.lexsort((np.arange(norms.size), -np.asarray(norms, dtype=np.float64)))
    return np.sort(order[:k]).astype(np.int32)


def checked_tensor(params: Mapping[str, np.ndarray], name: str, shape: tuple[int, ...]) -> np.ndarray:
    """``params[name]`` as float32 after checking it exists, has ``shape`` and is finite."""
    if name not in params:
        raise AdapterMismatch(f"tensor {name!r} is missing")
    arr = np.asarray(params[name], dtype=np.float32)
    if arr.shape != shape:
        raise AdapterMismatch(f"tensor {name!r} has shape {arr.shape}, expected {shape}")
    if not np.isfinite(arr).all():
        raise AdapterMismatch(f"tensor {name!r} holds NaN or inf")
    return arr


def _lora(spec_module: ModuleSpec, params: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    m = spec_module
    a = checked_tensor(params, f"{m.name}.lora_A", (m.rank, m.in_features))
    b = checked_tensor(params, f"{m.name}.lora_B", (m.out_features, m.rank))
    return a, b


def build_update_tensors(
    spec: AdapterSpec, params: Mapping[str, np.ndarray], start: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The masked update (wire names) of trained ``params`` relative to the round's ``start`` params."""
    out: dict[str, np.ndarray] = {}
    for m in spec.modules:
        a, b = _lora(m, params)
        a0, b0 = _lora(m, start)
        s = spec.scaling(m)
        rows = top_rows(delta_change_row_norms(a, b, a0, b0, s), spec.kept_rows(m))
        out[a_name(m.name)] = a.copy()
        out[b_rows_name(m.name)] = (np.float32(s) * b[rows]).astype(np.float32)
        out[rows_name(m.name)] = rows
    for name, shape in spec.head_shapes.items():
        out[name] = checked_tensor(params, name, shape).copy()
    return out


def model_to_params(spec: AdapterSpec, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Trainer params of this device's ranks from model-message tensors (rank-R factors, scaling folded).

    Keeps the first r components (fewer in the model: the missing ones are zero, ΔW is unchanged).
    The head is returned only when the model carries it; modules this device does not adapt are ignored.
    """
    params: dict[str, np.ndarray] = {}
    for m in spec.modules:
        name_a, name_b = a_name(m.name), b_name(m.name)
        if name_a not in tensors or name_b not in tensors:
            raise AdapterMismatch(f"the model lacks module {m.name!r} that this device adapts")
        a = np.asarray(tensors[name_a], dtype=np.float32)
        b = np.asarray(tensors[name_b], dtype=np.float32)
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != m.in_features or b.shape[0] != m.out_features:
            raise AdapterMismatch(
                f"module {m.name!r}: model factors {a.shape} / {b.shape} do not fit "
                f"in={m.in_features}, out={m.out_features}"
            )
        if a.shape[0] != b.shape[1]:
            raise AdapterMismatch(f"module {m.name!r}: A has {a.shape[0]} rows, B {b.shape[1]} columns")
        r = min(m.rank, a.shape[0])
        local_a = np.zeros((m.rank, m.in_features), dtype=np.float32)
        local_b = np.zeros((m.out_features, m.rank), dtype=np.float32)
        local_a[:r] = a[:r]
        local_b[:, :r] = b[:, :r] / np.float32(spec.scaling(m))
        params[f"{m.name}.lora_A"] = local_a
        params[f"{m.name}.lora_B"] = local_b
    present = [name for name in spec.head_shapes if name in tensors]
    if present and len(present) != len(spec.head_shapes):
        raise AdapterMismatch(f"the model carries only {present} of the head {sorted(spec.head_shapes)}")
    for name in present:
        params[name] = checked_tensor(tensors, name, spec.head_shapes[name]).copy()
    for name, arr in params.items():
        if not np.isfinite(arr).all():
            raise AdapterMismatch(f"model tensor for {name!r} holds NaN or inf")
    return params


def params_to_model_tensors(spec: AdapterSpec, params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Model-message tensors (rank r, scaling folded into B) of this device's trainer params."""
    out: dict[str, np.ndarray] = {}
    for m in spec.modules:
        a, b = _lora(m, params)
        out[a_name(m.name)] = a.copy()
        out[b_name(m.name)] = (np.float32(spec.scaling(m)) * b).astype(np.float32)
    for name, shape in spec.head_shapes.items():
        if name in params:
            out[name] = checked_tensor(params, name, shape).copy()
    return out
