"""Save a trained adapter in the Hugging Face peft LoRA format (plus the classifier head), torch-free.

For a BERT model, ``OUT/adapter_config.json`` + ``OUT/adapter_model.safetensors`` are a ``SEQ_CLS`` adapter whose
base is the exported model (its local directory, or the hub id of the packaged MiniLM): they load with
``AutoPeftModelForSequenceClassification.from_pretrained(OUT, num_labels=N)`` or
``PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(base, num_labels=N), OUT)``, the head
as peft's ``modules_to_save`` ``classifier``. Per-module ``rank_pattern`` and ``alpha_pattern`` make peft's
scaling alpha / r equal ours. fedhft's head sits on the masked mean of the last hidden states (not on BERT's
pooler): the edge's logits are ``classifier(masked_mean(model.bert(...).last_hidden_state))``. Other model types
get a ``FEATURE_EXTRACTION`` adapter of their encoder. ``OUT/head.safetensors`` also holds the head.
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
HEAD_MODULE = "classifier"  # the head's name in BertForSequenceClassification, peft's modules_to_save
SEQ_CLS_ENCODERS = {"bert": "bert"}  # model type -> encoder attribute of its ...ForSequenceClassification, whose
# `classifier` is one linear layer (hidden -> labels), as fedhft's head is


class AdapterSaveError(FedHFTError):
    """The adapter cannot be written (bad module name, unwritable directory)."""


def hf_module_path(module: str) -> str:
    """``layers.<i>.<kind>`` -> ``encoder.layer.<i>.<hf path>`` (the module's name inside a BertModel)."""
    parts = module.split(".")
    if len(parts) != 3 or parts[0] != "layers" or not parts[1].isdigit() or parts[2] not in HF_PATHS:
        raise AdapterSaveError(f"module {module!r} is not layers.<i>.<{'|'.join(HF_PATHS)}>")
    return f"encoder.layer.{parts[1]}.{HF_PATHS[parts[2]]}"


def peft_base(manifest: Manifest) -> str:
    """What the adapter names as its base: the packaged model's hub id, else the exported model's directory
    (both from the manifest; an old manifest without them gives its base model's name)."""
    return str(manifest.extra.get("hub_id") or manifest.extra.get("model_dir") or manifest.base_model)


def _encoder(manifest: Manifest) -> str | None:
    """The encoder attribute of the sequence classifier (None: save a feature-extraction adapter)."""
    return SEQ_CLS_ENCODERS.get(str(manifest.extra.get("model_type", "bert")))  # exports before the field: BERT


def peft_config(manifest: Manifest) -> dict[str, object]:
    """The peft LoraConfig (as JSON) of this device's adapter."""
    spec = AdapterSpec.from_manifest(manifest)
    if not spec.modules:
        raise AdapterSaveError("the manifest adapts no module; nothing to save as a LoRA adapter")
    paths = {m.name: hf_module_path(m.name) for m in spec.modules}
    seq_cls = _encoder(manifest) is not None
    return {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS" if seq_cls else "FEATURE_EXTRACTION",
        "base_model_name_or_path": peft_base(manifest),
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
        "modules_to_save": [HEAD_MODULE] if seq_cls else None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }


def peft_tensors(manifest: Manifest, params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """peft state-dict keys -> LoRA factors (lora_A (r, in), lora_B (out, r)) and, for a sequence classifier,
    the head as ``classifier.weight``/``.bias``; float32."""
    spec = AdapterSpec.from_manifest(manifest)
    encoder = _encoder(manifest)
    prefix = PEFT_PREFIX + (f"{encoder}." if encoder else "")
    out: dict[str, np.ndarray] = {}
    for m in spec.modules:
        base = prefix + hf_module_path(m.name)
        a = checked_tensor(params, f"{m.name}.lora_A", (m.rank, m.in_features))
        b = checked_tensor(params, f"{m.name}.lora_B", (m.out_features, m.rank))
        out[f"{base}.lora_A.weight"] = np.ascontiguousarray(a)
        out[f"{base}.lora_B.weight"] = np.ascontiguousarray(b)
    if encoder:
        for name, shape in manifest.head_shapes.items():  # head.weight, head.bias
            value = checked_tensor(params, name, tuple(shape))
            out[f"{PEFT_PREFIX}{HEAD_MODULE}.{name.rsplit('.', 1)[1]}"] = np.ascontiguousarray(value, dtype=np.float32)
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
