"""read_model: config.json -> family, sizes and usable sequence length; refusals name their reason (torch-free)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fedhft.device_profiles.model_shape import ModelLoadError, ModelShape, read_model
from fedhft.device_profiles.planner import base_weight_bytes, plan_lora
from fedhft.device_profiles.profile import load_profile
from tests.support.torchfree import run_torchfree

BERT_BASE = {
    "model_type": "bert",
    "num_hidden_layers": 12,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "vocab_size": 30522,
    "max_position_embeddings": 512,
    "pad_token_id": 0,
}
ROBERTA_BASE = {**BERT_BASE, "model_type": "roberta", "vocab_size": 50265, "max_position_embeddings": 514}
ROBERTA_BASE["pad_token_id"] = 1
DISTILBERT = {
    "model_type": "distilbert",
    "n_layers": 6,
    "dim": 768,
    "hidden_dim": 3072,
    "n_heads": 12,
    "vocab_size": 30522,
    "max_position_embeddings": 512,
    "pad_token_id": 0,
}
ALBERT_BASE = {
    **BERT_BASE,
    "model_type": "albert",
    "vocab_size": 30000,
    "embedding_size": 128,
    "num_hidden_groups": 1,
    "inner_group_num": 1,
}
ELECTRA_SMALL = {
    **BERT_BASE,
    "model_type": "electra",
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_attention_heads": 4,
    "embedding_size": 128,
}


def model_dir(root: Path, config: dict, files: tuple[str, ...] = ("model.safetensors", "tokenizer.json")) -> Path:
    """A directory read_model accepts: config.json plus (empty) weights and tokenizer files."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config))
    for f in files:
        (root / f).write_text("")
    return root


@pytest.mark.parametrize(
    ("config", "family", "layers", "weight_layers", "hidden", "max_seq_len", "embedding"),
    [
        (BERT_BASE, "bert", 12, 12, 768, 512, 768),
        ({**BERT_BASE, "model_type": "camembert", "pad_token_id": 1}, "bert", 12, 12, 768, 510, 768),
        (ROBERTA_BASE, "bert", 12, 12, 768, 512, 768),
        ({**ROBERTA_BASE, "model_type": "xlm-roberta", "vocab_size": 250002}, "bert", 12, 12, 768, 512, 768),
        (ELECTRA_SMALL, "bert", 12, 12, 256, 512, 128),
        (DISTILBERT, "distilbert", 6, 6, 768, 512, 768),
        (ALBERT_BASE, "albert", 12, 1, 768, 512, 128),
        ({**ALBERT_BASE, "num_hidden_groups": 3}, "albert", 12, 3, 768, 512, 128),
    ],
)
def test_each_family_reads_its_own_config_keys(
    tmp_path: Path,
    config: dict,
    family: str,
    layers: int,
    weight_layers: int,
    hidden: int,
    max_seq_len: int,
    embedding: int,
) -> None:
    spec = read_model(model_dir(tmp_path / "m", config))
    assert spec.family.layout == family
    assert (spec.num_layers, spec.weight_layers, spec.hidden_size) == (layers, weight_layers, hidden)
    assert spec.max_seq_len == max_seq_len and spec.embedding_size == embedding
    shape = spec.shape(2, max_seq_len, 8)
    assert shape.num_layers == layers and shape.weight_layer_count == weight_layers
    assert shape.embedding_dim == embedding


def test_roberta_positions_start_after_the_padding_index(tmp_path: Path) -> None:
    spec = read_model(model_dir(tmp_path / "m", ROBERTA_BASE))
    assert spec.position_offset == 2 and spec.max_seq_len == 512
    spec.shape(2, 512, 8)
    with pytest.raises(ModelLoadError, match=r"--max-seq-len 514 is outside 1\.\.512.*positions from id 2"):
        spec.shape(2, 514, 8)


def test_defaults_leave_the_bert_estimates_unchanged() -> None:
    plain = ModelShape(6, 384, 1536, 12, 30522, 512, 5, 128, 8)
    explicit = ModelShape(6, 384, 1536, 12, 30522, 512, 5, 128, 8, embedding_size=384, weight_layers=6)
    before = 6 * plain.layer_linear_params + (30522 + 512 + 2) * 384 + 6 * (9 * 384 + 1536)  # the formula so far
    assert plain.total_params == explicit.total_params == before
    assert base_weight_bytes(plain, True) == base_weight_bytes(explicit, True)


def test_shared_and_factorized_weights_shrink_the_base(tmp_path: Path) -> None:
    bert = read_model(model_dir(tmp_path / "b", BERT_BASE)).shape(2, 32, 8)
    albert = read_model(model_dir(tmp_path / "a", ALBERT_BASE)).shape(2, 32, 8)
    assert albert.total_params < bert.total_params / 8  # ALBERT-base: ~12 M parameters against BERT's ~110 M
    assert 11_000_000 < albert.total_params < 13_000_000
    assert base_weight_bytes(albert, True) < base_weight_bytes(bert, True) / 8
    prof = load_profile("laptop-x86-16gb")
    a, b = plan_lora(albert, prof, min_compression=None), plan_lora(bert, prof, min_compression=None)
    assert a.estimate.base_weights_mb < b.estimate.base_weights_mb
    assert a.estimate.step_gflop == pytest.approx(b.estimate.step_gflop, rel=0.05)  # same compute per layer


@pytest.mark.parametrize(
    ("config", "files", "message"),
    [
        ({**BERT_BASE, "model_type": "gpt2"}, None, "model type 'gpt2' is not supported"),
        ({k: v for k, v in BERT_BASE.items() if k != "num_hidden_layers"}, None, "'num_hidden_layers' is missing"),
        ({**DISTILBERT, "n_layers": "six"}, None, "'n_layers' is 'six', not a count"),
        ({**ALBERT_BASE, "inner_group_num": 2}, None, "inner_group_num != 1 is not supported"),
        ({**BERT_BASE, "num_attention_heads": 5}, None, "not a valid encoder"),
        (BERT_BASE, ("model.safetensors",), "no tokenizer.json and no vocab.txt"),
        (ROBERTA_BASE, ("model.safetensors", "vocab.json"), "no tokenizer.json and no vocab.json + merges.txt"),
        (BERT_BASE, ("tokenizer.json",), "has no weights"),
    ],
)
def test_refusals_name_the_reason(tmp_path: Path, config: dict, files: tuple[str, ...] | None, message: str) -> None:
    d = model_dir(tmp_path / "m", config, files) if files else model_dir(tmp_path / "m", config)
    with pytest.raises(ModelLoadError, match=re.escape(message)):
        read_model(d)


def test_broken_config_and_sharded_weights(tmp_path: Path) -> None:
    d = model_dir(tmp_path / "m", BERT_BASE, ("tokenizer.json",))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s-1.safetensors"}}))
    with pytest.raises(ModelLoadError, match="names shards that are missing"):
        read_model(d)
    (d / "s-1.safetensors").write_text("")
    assert read_model(d).num_layers == 12
    (d / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot read"):
        read_model(d)


def test_plan_reads_models_torch_free(tmp_path: Path) -> None:
    d = model_dir(tmp_path / "m", ALBERT_BASE)
    res = run_torchfree(
        "import json, sys\n"
        "from click.testing import CliRunner\n"
        "from fedhft.cli import main\n"
        f"r = CliRunner().invoke(main, ['plan', '--model', {str(d)!r}, '--profile', 'laptop-x86-16gb',"
        " '--max-seq-len', '32', '--json'])\n"
        "print(json.dumps({'code': r.exit_code, 'out': r.output, 'torch': 'torch' in sys.modules}))\n"
    )
    assert res["code"] == 0, res["out"]
    assert res["torch"] is False
    assert json.loads(res["out"])["num_layers"] == 12
