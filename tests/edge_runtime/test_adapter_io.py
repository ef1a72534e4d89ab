"""The peft-format adapter: config, tensor keys and shapes, and the merged weight delta (α/r)·B·A."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedhft.edge_runtime.adapter_io import AdapterSaveError, hf_module_path, save_peft_adapter
from fedhft.protocol.manifest import load_manifest


def _random_params(manifest, seed: int = 0) -> dict[str, np.ndarray]:  # noqa: ANN001
    rng = np.random.default_rng(seed)
    return {t.name: rng.normal(0, 0.05, t.shape).astype(np.float32) for t in manifest.trainable}


def test_module_paths() -> None:
    assert hf_module_path("layers.5.query") == "encoder.layer.5.attention.self.query"
    assert hf_module_path("layers.0.attn_out") == "encoder.layer.0.attention.output.dense"
    assert hf_module_path("layers.3.ffn_in") == "encoder.layer.3.intermediate.dense"
    assert hf_module_path("layers.3.ffn_out") == "encoder.layer.3.output.dense"
    for bad in ("layers.x.query", "layers.1.gate", "head.weight"):
        with pytest.raises(AdapterSaveError):
            hf_module_path(bad)


def _merged_deltas(out: Path) -> dict[str, np.ndarray]:
    """Per HF module path: the weight delta the saved adapter adds, by peft's rule (alpha_pattern / rank_pattern)."""
    config = json.loads((out / "adapter_config.json").read_text())
    tensors = load_file(str(out / "adapter_model.safetensors"))
    deltas = {}
    for path in config["target_modules"]:
        key = f"base_model.model.{path}"
        a, b = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
        scaling = config["alpha_pattern"][path] / config["rank_pattern"][path]
        deltas[path] = scaling * (b.astype(np.float64) @ a)
    return deltas


def test_saved_adapter_has_peft_keys_shapes_and_config(tiny_export: Path, tmp_path: Path) -> None:
    manifest = load_manifest(tiny_export)
    params = _random_params(manifest)
    out = save_peft_adapter(tmp_path / "adapter", manifest, params)
    config = json.loads((out / "adapter_config.json").read_text())
    ranks = manifest.module_ranks()
    alpha = manifest.lora["alpha"]
    assert config["peft_type"] == "LORA" and config["task_type"] == "FEATURE_EXTRACTION"
    assert config["base_model_name_or_path"] == manifest.base_model
    assert config["r"] == max(ranks.values()) and config["lora_alpha"] == alpha
    assert config["rank_pattern"] == {hf_module_path(m): r for m, r in ranks.items()}
    assert config["alpha_pattern"] == {hf_module_path(m): alpha for m in ranks}
    assert sorted(config["target_modules"]) == sorted(hf_module_path(m) for m in ranks)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert len(tensors) == 2 * len(ranks)
    glob = manifest.global_modules()
    for m, r in ranks.items():
        key = f"base_model.model.{hf_module_path(m)}"
        assert tensors[f"{key}.lora_A.weight"].shape == (r, glob[m].in_features)
        assert tensors[f"{key}.lora_B.weight"].shape == (glob[m].out_features, r)
    deltas = _merged_deltas(out)
    for m, r in ranks.items():
        want = (alpha / r) * (params[f"{m}.lora_B"].astype(np.float64) @ params[f"{m}.lora_A"])
        np.testing.assert_allclose(deltas[hf_module_path(m)], want, rtol=1e-6)
    head = load_file(str(out / "head.safetensors"))
    np.testing.assert_array_equal(head["head.weight"], params["head.weight"])
    np.testing.assert_array_equal(head["head.bias"], params["head.bias"])


def test_missing_params_are_refused(tiny_export: Path, tmp_path: Path) -> None:
    manifest = load_manifest(tiny_export)
    params = _random_params(manifest)
    params.pop("head.bias")
    with pytest.raises(Exception, match="head.bias"):
        save_peft_adapter(tmp_path / "a", manifest, params)


def test_peft_merges_the_same_delta_when_installed(tiny_export: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    """With peft importable, load the adapter into a BertModel and compare merged weights; without it, the
    test checks the merge rule peft documents (W + lora_alpha/r · B·A) on our files instead."""
    manifest = load_manifest(tiny_export)
    params = _random_params(manifest, seed=1)
    out = save_peft_adapter(tmp_path / "adapter", manifest, params)
    deltas = _merged_deltas(out)
    if importlib.util.find_spec("peft") is None:
        for m, r in manifest.module_ranks().items():
            b, a = params[f"{m}.lora_B"].astype(np.float64), params[f"{m}.lora_A"]
            np.testing.assert_allclose(deltas[hf_module_path(m)], manifest.lora["alpha"] / r * (b @ a), rtol=1e-9)
        return
    import torch
    from peft import PeftModel
    from transformers import BertModel

    base = BertModel.from_pretrained(tiny_model_dir)
    before = {k: v.detach().clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, str(out)).merge_and_unload()
    after = merged.state_dict()
    for path, delta in deltas.items():
        got = (after[f"{path}.weight"] - before[f"{path}.weight"]).double().numpy()
        np.testing.assert_allclose(got, delta, atol=2e-6)
    untouched = [k for k in before if k.endswith(".weight") and k[: -len(".weight")] not in deltas]
    assert untouched and all(torch.equal(before[k], after[k]) for k in untouched)
