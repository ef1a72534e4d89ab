"""Save a trained adapter in the Hugging Face peft LoRA format (plus the classifier head), torch-free.

``OUT/adapter_config.json`` + ``OUT/adapter_model.safetensors`` load with
``PeftModel.from_pretrained(BertModel.from_pretrained(base), OUT)``: per-module ``rank_pattern`` and
``alpha_pattern`` make peft's scaling alpha / r equal ours. ``OUT/head.safetensors`` holds ``head.weight``
and ``head.bias`` of the classifier that sits on the masked mean of the last hidden states.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from fedhft.atomic import write_atomic
from fedhft.edge_runtime.masking import AdapterSpec, checked_tensor
from fedhft.errors import FedHFTError
from fedhft.protocol.manifest import Manifest

# Where our canonical module kinds sit inside one BERT-family encoder layer (Hugging Face module paths).
HF_PATHS: dict[str, str] = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attn_out": "attention.output.dense",
    "ffn_in": "intermediate.dense",
    "ffn_out": "output.dense",
}
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
HEAD_NAME = "head.safetensors"
PEFT_PREFIX = "base_model.model."


class AdapterSaveError(FedHFTError):
    """The adapter cannot be written (bad module name, unwritable directory)."""


def hf_module_path(module: str) -> str:
    """``layers.<i>.<kind>`` -> ``encoder.layer.<i>.<hf path>`` (the module's name inside a BertModel)."""
    parts = module.split(".")
    if len(parts) != 3 or parts[0] != "layers" or not parts[1].isdigit() or parts[2] not in HF_PATHS:
        raise AdapterSaveError(f"module {module!r} is not layers.<i>.<{'|'.join(HF_PATHS)}>")
    return f"encoder.layer.{parts[1]}.{HF_PATHS[parts[2]]}"


def peft_config(manifest: Manifest) -> dict[str, object]:
    """The peft LoraConfig (as JSON) of this device's adapter."""
    spec = AdapterSpec.from_manifest(manifest)
    if not spec.modules:
        raise AdapterSaveError("the manifest adapts no module; nothing to save as a LoRA adapter")
    paths = {m.name: hf_module_path(m.name) for m in spec.modules}
    return {
        "peft_type": "LORA",
        "task_type": "FEATURE_EXTRACTION",
        "base_model_name_or_path": manifest.base_model,
        "r": max(m.rank for m in spec.modules),
        "lora_alpha": spec.alpha,
        "rank_pattern": {paths[m.name]: m.rank for m in spec.modules},
        "alpha_pattern": {paths[m.name]: spec.alpha for m in spec.modules},
        "target_modules": sorted(paths.values()),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }


def peft_tensors(manifest: Manifest, params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """peft state-dict keys -> LoRA factors (lora_A (r, in), lora_B (out, r)), float32."""
    spec = AdapterSpec.from_manifest(manifest)
    out: dict[str, np.ndarray] = {}
    for m in spec.modules:
        base = PEFT_PREFIX + hf_module_path(m.name)
        a = checked_tensor(params, f"{m.name}.lora_A", (m.rank, m.in_features))
        b = checked_tensor(params, f"{m.name}.lora_B", (m.out_features, m.rank))
        out[f"{base}.lora_A.weight"] = np.ascontiguousarray(a)
        out[f"{base}.lora_B.weight"] = np.ascontiguousarray(b)
    return out


def save_peft_adapter(out_dir: str | Path, manifest: Manifest, params: Mapping[str, np.ndarray]) -> Path:
    """Write adapter_config.json, adapter_model.safetensors and head.safetensors into ``out_dir``."""
    out = Path(out_dir)
    config = peft_config(manifest)
    tensors = peft_tensors(manifest, params)
    head = {name: checked_tensor(params, name, tuple(shape)) for name, shape in manifest.head_shapes.items()}
    meta = {"format": "pt", "fedhft_base_model": manifest.base_model, "fedhft_profile": manifest.profile_name}
    try:
        out.mkdir(parents=True, exist_ok=True)
        _write_text(out / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(out / WEIGHTS_NAME), metadata=meta)
        save_file(head, str(out / HEAD_NAME), metadata=meta | {"pooling": "masked mean of last hidden state"})
    except OSError as e:
        raise AdapterSaveError(f"cannot write the adapter to {out}: {e.strerror or e}") from e
    return out


def _write_text(path: Path, text: str) -> None:
    write_atomic(path, text.encode())
