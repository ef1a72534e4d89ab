"""The peft-format adapter: config, tensor keys and shapes, the merged weight delta (α/r)·B·A, and the saved
adapter loaded by peft both ways (PeftModel, AutoPeftModelForSequenceClassification) giving the edge's logits."""

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
        key = f"base_model.model.bert.{path}"
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
    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS"
    assert config["base_model_name_or_path"] == manifest.extra["model_dir"]  # a real, local base
    assert Path(config["base_model_name_or_path"], "config.json").is_file()
    assert config["modules_to_save"] == ["classifier"]
    assert config["r"] == max(ranks.values()) and config["lora_alpha"] == alpha
    assert config["rank_pattern"] == {hf_module_path(m): r for m, r in ranks.items()}
    assert config["alpha_pattern"] == {hf_module_path(m): alpha for m in ranks}
    assert sorted(config["target_modules"]) == sorted(hf_module_path(m) for m in ranks)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert len(tensors) == 2 * len(ranks) + 2
    np.testing.assert_array_equal(tensors["base_model.model.classifier.weight"], params["head.weight"])
    np.testing.assert_array_equal(tensors["base_model.model.classifier.bias"], params["head.bias"])
    glob = manifest.global_modules()
    for m, r in ranks.items():
        key = f"base_model.model.bert.{hf_module_path(m)}"
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
    from transformers import BertForSequenceClassification

    base = BertForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=manifest.num_labels)
    before = {k: v.detach().clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, str(out)).merge_and_unload()
    after = merged.state_dict()
    for path, delta in deltas.items():
        got = (after[f"bert.{path}.weight"] - before[f"bert.{path}.weight"]).double().numpy()
        np.testing.assert_allclose(got, delta, atol=2e-6)
    np.testing.assert_array_equal(after["classifier.weight"].numpy(), params["head.weight"])  # modules_to_save
    adapted = {f"bert.{path}" for path in deltas} | {"classifier"}
    untouched = [k for k in before if k.endswith(".weight") and k[: -len(".weight")] not in adapted]
    assert untouched and all(torch.equal(before[k], after[k]) for k in untouched)


@pytest.fixture(scope="module")
def fp32_export(tiny_model_dir: Path, tiny_profile_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model exported with an fp32 base, so the edge computes what transformers computes."""
    from fedhft.device_profiles.profile import load_profile
    from fedhft.export.pipeline import ExportOptions, export_profile

    opts = ExportOptions(num_labels=3, max_seq_len=32, min_compression=None, int8=False)
    out = tmp_path_factory.mktemp("fp32-export")
    return export_profile(tiny_model_dir, load_profile(tiny_profile_path), out, opts=opts).directory


def test_peft_loads_the_adapter_both_ways_with_the_edge_logits(fp32_export: Path, tmp_path: Path) -> None:
    import torch  # peft: the dev extra installs it
    from peft import AutoPeftModelForSequenceClassification, PeftModel
    from transformers import AutoModelForSequenceClassification

    from fedhft.edge_runtime.ort_backend import OrtTrainer
    from fedhft.edge_runtime.tokenize import TextEncoder

    manifest = load_manifest(fp32_export)
    trainer = OrtTrainer(fp32_export)
    params = {k: v * 20 if ".lora_" in k else v for k, v in _random_params(manifest, seed=2).items()}
    trainer.set_parameters(params)  # large enough that a missing or misplaced factor shows in the logits
    ids, mask = TextEncoder.for_manifest(manifest, fp32_export).encode(["a short text", "another one, longer", "x"])
    edge = trainer.eval_step(ids, mask, np.zeros(len(ids), np.int64)).logits
    out = save_peft_adapter(tmp_path / "adapter", manifest, trainer.get_parameters())
    base_dir = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]

    def logits(model: torch.nn.Module) -> np.ndarray:
        """fedhft's head on the masked mean of the last hidden states, through the peft model's own modules."""
        model.eval()
        inner = model.get_base_model()
        m = torch.from_numpy(mask)
        with torch.no_grad():
            hidden = inner.bert(input_ids=torch.from_numpy(ids), attention_mask=m).last_hidden_state
            mf = m.unsqueeze(-1).float()
            return inner.classifier((hidden * mf).sum(1) / mf.sum(1).clamp_min(1.0)).numpy()

    plain = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=manifest.num_labels)
    via_peft_model = logits(PeftModel.from_pretrained(plain, str(out)))
    auto = AutoPeftModelForSequenceClassification.from_pretrained(str(out), num_labels=manifest.num_labels)
    np.testing.assert_allclose(via_peft_model, edge, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(logits(auto), edge, atol=1e-4, rtol=1e-4)
    with auto.disable_adapter():
        assert np.abs(logits(auto) - edge).max() > 1e-2  # the LoRA factors and the head change the logits
