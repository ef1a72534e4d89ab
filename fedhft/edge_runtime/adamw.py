"""AdamW in numpy, with exactly the semantics of ONNX Runtime's training artifacts.

`onnxruntime.training.artifacts.generate_artifacts(optimizer=OptimType.AdamW)` builds an `AdamWOptimizer`
node with betas (0.9, 0.999), eps 1e-6, weight decay 0, bias correction on and `adam_mode=1` (the Hugging
Face variant). Per step t = 1, 2, ... (ORT feeds step + 1) and per tensor, all in float32:

    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    lr_t = lr * sqrt(1 - b2**t) / (1 - b1**t)      (bias correction folded into the learning rate)
    p = p - lr_t * m / (sqrt(v) + eps)
    p = p - lr * weight_decay * p                    (decay after the update)

torch.optim.AdamW differs only in where eps sits (it divides sqrt(v) by sqrt(1 - b2**t) first); the native
trainer (native/trainer.cpp) implements the same formula as this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedhft.atomic import atomic_write_bytes
from fedhft.edge_runtime.trainer import BackendError

STATE_FORMAT = "fedhft-adamw-state"
STATE_VERSION = "1"


@dataclass(frozen=True)
class AdamWConfig:
    """ORT's AdamW defaults (onnxblock.optim.AdamW)."""

    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-6
    weight_decay: float = 0.0
    bias_correction: bool = True


def corrected_lr(lr: float, step: int, cfg: AdamWConfig) -> np.float32:
    """The bias-corrected step size for 1-based step `step`, rounded as ORT's kernel rounds it."""
    lr32 = np.float32(lr)
    if not cfg.bias_correction:
        return lr32
    # ORT: alpha/beta are float attributes; std::pow(float, int64) is computed in double, then cast to float.
    a = np.float32(1.0 - float(np.float32(cfg.beta1)) ** step)
    b = np.float32(1.0 - float(np.float32(cfg.beta2)) ** step)
    return np.float32(lr32 * np.sqrt(b) / a)


def adamw_update(
    param: np.ndarray, grad: np.ndarray, m: np.ndarray, v: np.ndarray, lr: float, step: int, cfg: AdamWConfig
) -> None:
    """One in-place AdamW update of float32 arrays `param`, `m`, `v` (step is 1-based)."""
    b1, b2 = np.float32(cfg.beta1), np.float32(cfg.beta2)
    g = np.asarray(grad, dtype=np.float32)
    m *= b1
    m += (np.float32(1) - b1) * g
    v *= b2
    v += (np.float32(1) - b2) * g * g
    upd = corrected_lr(lr, step, cfg) * m
    upd /= np.sqrt(v) + np.float32(cfg.eps)
    param -= upd
    if cfg.weight_decay:
        param -= np.float32(lr) * np.float32(cfg.weight_decay) * param


@dataclass
class AdamW:
    """AdamW state over named float32 tensors; `step` counts completed updates (as ORT's checkpoint does)."""

    shapes: dict[str, tuple[int, ...]]
    lr: float = 1e-3
    cfg: AdamWConfig = field(default_factory=AdamWConfig)
    step: int = 0
    m: dict[str, np.ndarray] = field(default_factory=dict)
    v: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, shape in self.shapes.items():
            self.m.setdefault(name, np.zeros(shape, np.float32))
            self.v.setdefault(name, np.zeros(shape, np.float32))

    def apply(self, params: Mapping[str, np.ndarray], grads: Mapping[str, np.ndarray]) -> None:
        """Update every tensor of `params` in place from `grads` (same names) and count one step."""
        t = self.step + 1
        for name in self.shapes:
            adamw_update(params[name], grads[name], self.m[name], self.v[name], self.lr, t, self.cfg)
        self.step = t

    def reset(self) -> None:
        self.step = 0
        for name in self.shapes:
            self.m[name][...] = 0
            self.v[name][...] = 0


def save_train_state(
    path: Path, params: Mapping[str, np.ndarray], opt: AdamW, extra: Mapping[str, str] | None = None
) -> None:
    """Write parameters and AdamW moments/step to one safetensors file, atomically."""
    from safetensors.numpy import save

    tensors: dict[str, np.ndarray] = {}
    for name in opt.shapes:
        tensors[f"param/{name}"] = np.ascontiguousarray(params[name], dtype=np.float32)
        tensors[f"m/{name}"] = opt.m[name]
        tensors[f"v/{name}"] = opt.v[name]
    meta = {"format": STATE_FORMAT, "version": STATE_VERSION, "step": str(opt.step), "lr": repr(opt.lr)}
    meta.update(extra or {})
    atomic_write_bytes(Path(path), save(tensors, metadata=meta))


def load_train_state(
    path: Path, shapes: Mapping[str, tuple[int, ...]]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray], int, dict[str, str]]:
    """Read a file written by `save_train_state`; check names, shapes and finiteness against `shapes`.

    Returns (params, m, v, step, metadata).
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        raw = Path(path).read_bytes()
        tensors = load(raw)
        meta = _metadata(raw)
    except (OSError, SafetensorError, ValueError) as e:
        raise BackendError(f"{path}: not a readable training state ({e})") from e
    if meta.get("format") != STATE_FORMAT or meta.get("version") != STATE_VERSION:
        raise BackendError(f"{path}: not a {STATE_FORMAT} v{STATE_VERSION} file")
    out: tuple[dict[str, np.ndarray], ...] = ({}, {}, {})
    for name, shape in shapes.items():
        for kind, dest in zip(("param", "m", "v"), out, strict=True):
            arr = tensors.get(f"{kind}/{name}")
            if arr is None:
                raise BackendError(f"{path}: training state lacks '{kind}/{name}' (saved from another model?)")
            if tuple(arr.shape) != tuple(shape) or arr.dtype != np.float32:
                raise BackendError(f"{path}: '{kind}/{name}' has shape {arr.shape}, expected {tuple(shape)}")
            if not np.isfinite(arr).all():
                raise BackendError(f"{path}: '{kind}/{name}' has non-finite values")
            dest[name] = arr
    try:
        step = int(meta["step"])
    except (KeyError, ValueError) as e:
        raise BackendError(f"{path}: training state has no valid step") from e
    return out[0], out[1], out[2], step, meta


def _metadata(raw: bytes) -> dict[str, str]:
    import json
    import struct

    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    return dict(header.get("__metadata__", {}))
