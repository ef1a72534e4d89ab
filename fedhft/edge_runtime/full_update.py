"""Full fine-tuning on the device (the fedavg-full baseline): dense parameter deltas, as pure numpy functions.

A full fine-tuning package (manifest ``plan["training"] == "full"``) trains every parameter. The device keeps
a copy of the exported (initial) values. It loads a model as initial + Δθ, from the model's
``<param>.delta`` tensors (the global Δθ), and uploads ``<param>.delta`` = trained − loaded values for every
parameter. :func:`spec_for`, :func:`bind_initial`, :func:`update_tensors` and :func:`model_params` take
either kind of spec, so the edge client runs LoRA and full packages through the same calls.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from fedhft.edge_runtime.masking import (
    AdapterMismatch,
    AdapterSpec,
    build_update_tensors,
    checked_tensor,
    model_to_params,
)
from fedhft.protocol.manifest import Manifest
from fedhft.protocol.tensor_names import delta_name


class _HasParameters(Protocol):
    def get_parameters(self) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class FullSpec:
    """Every trainable parameter of a full fine-tuning package (manifest name -> shape) and its initial values.

    ``mask_ratio`` is always 1.0 (updates are dense); it is here because the hello reports it.
    """

    shapes: dict[str, tuple[int, ...]]
    initial: Mapping[str, np.ndarray] = field(default_factory=dict)
    mask_ratio: float = 1.0

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> FullSpec:
        return cls({t.name: tuple(int(d) for d in t.shape) for t in manifest.trainable})

    def with_initial(self, params: Mapping[str, np.ndarray]) -> FullSpec:
        """This spec holding float32 copies of ``params`` (the exported values) as its initial weights."""
        return replace(self, initial={n: checked(params, n, s).copy() for n, s in self.shapes.items()})

    def update_shapes(self) -> dict[str, tuple[int, ...]]:
        """Exact shape of every tensor of this device's update message."""
        return {delta_name(n): s for n, s in self.shapes.items()}


AnySpec = AdapterSpec | FullSpec


checked = checked_tensor  # one implementation (masking.py)


def delta_tensors(
    spec: FullSpec, params: Mapping[str, np.ndarray], start: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The dense update: ``<param>.delta`` = trained ``params`` − the round's ``start`` values, every parameter."""
    return {
        delta_name(n): (checked(params, n, s) - checked(start, n, s)).astype(np.float32) for n, s in spec.shapes.items()
    }


def full_params(spec: FullSpec, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Trainer params initial + Δθ from a model's ``<param>.delta`` tensors (every parameter required)."""
    if set(spec.initial) != set(spec.shapes):
        raise AdapterMismatch("the full fine-tuning spec has no initial weights (bind_initial first)")
    extra = sorted(set(tensors) - set(spec.update_shapes()))
    if extra:
        raise AdapterMismatch(f"the model carries tensors that are not parameter deltas of this package: {extra[:3]}")
    out = {}
    for name, shape in spec.shapes.items():
        value = spec.initial[name] + checked(tensors, delta_name(name), shape)
        if not np.isfinite(value).all():
            raise AdapterMismatch(f"initial + delta of {name!r} overflows float32")
        out[name] = value
    return out


def params_from_model(
    manifest: Manifest, initial_params: Mapping[str, np.ndarray], tensors: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Trainer params of a fedavg-full model for a full fine-tuning package: ``initial_params`` (the exported
    values, e.g. a fresh ``OrtTrainer(dir).get_parameters()``) + the model's ``<param>.delta`` tensors."""
    return full_params(FullSpec.from_manifest(manifest).with_initial(initial_params), tensors)


# ---- either kind of spec (what the edge client calls) ---------------------------------------------------------


def spec_for(manifest: Manifest) -> AnySpec:
    """The update spec of a package: FullSpec for full fine-tuning, else the LoRA AdapterSpec."""
    return FullSpec.from_manifest(manifest) if manifest.training == "full" else AdapterSpec.from_manifest(manifest)


def bind_initial(spec: AnySpec, trainer: _HasParameters) -> AnySpec:
    """A FullSpec with the trainer's current (call it before any checkpoint is loaded: exported) values."""
    return spec.with_initial(trainer.get_parameters()) if isinstance(spec, FullSpec) else spec


def update_tensors(
    spec: AnySpec, params: Mapping[str, np.ndarray], start: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Update wire tensors: dense deltas (full) or the masked LoRA update."""
    if isinstance(spec, FullSpec):
        return delta_tensors(spec, params, start)
    return build_update_tensors(spec, params, start)


def model_params(spec: AnySpec, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Trainer params from model wire tensors: initial + Δθ (full) or this device's LoRA factors."""
    if isinstance(spec, FullSpec):
        return full_params(spec, tensors)
    return model_to_params(spec, tensors)
