"""`fedhft plan` and `fedhft export` on models they cannot use: one `error:` line each, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedhft.cli import main
from tests.device_profiles.test_model_shape import ALBERT_BASE, BERT_BASE, DISTILBERT, ROBERTA_BASE, model_dir


def run_cli(command: str, d: Path, out: Path, *extra: str) -> tuple[int, str]:
    args = [command, "--model", str(d), "--profile", "laptop-x86-16gb", "--max-seq-len", "32", *extra]
    if command == "export":
        args += ["--out", str(out)]
    r = CliRunner().invoke(main, args)
    assert isinstance(r.exception, SystemExit | None), f"uncaught {r.exception!r}"
    return r.exit_code, r.output


def assert_one_error_line(code: int, output: str, message: str) -> None:
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert code == 1, output
    assert len(errors) == 1 and message in errors[0], output
    assert output.rstrip().endswith(errors[0]) and "Traceback" not in output


def placeholder_tokenizer(path: Path) -> None:
    """The 5-token tokenizer transformers 5 falls back to without a vocabulary file."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordPiece

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}
    Tokenizer(WordPiece(vocab, unk_token="[UNK]")).save(str(path))


CASES = {
    "unsupported type": ({**BERT_BASE, "model_type": "gpt2"}, None, "model type 'gpt2' is not supported"),
    "missing size": ({k: v for k, v in DISTILBERT.items() if k != "n_layers"}, None, "'n_layers' is missing"),
    "albert inner groups": ({**ALBERT_BASE, "inner_group_num": 2}, None, "inner_group_num != 1"),
    "no tokenizer": (BERT_BASE, ("model.safetensors",), "no tokenizer.json and no vocab.txt"),
    "no weights": (BERT_BASE, ("tokenizer.json",), "has no weights"),
}


@pytest.mark.parametrize("command", ["plan", "export"])
@pytest.mark.parametrize("case", list(CASES))
def test_unusable_model_dir_gives_one_line(case: str, command: str, tmp_path: Path) -> None:
    config, files, message = CASES[case]
    d = model_dir(tmp_path / "m", config, files) if files else model_dir(tmp_path / "m", config)
    assert_one_error_line(*run_cli(command, d, tmp_path / "o"), message)


@pytest.mark.parametrize("command", ["plan", "export"])
def test_too_long_roberta_input_gives_one_line(command: str, tmp_path: Path) -> None:
    d = model_dir(tmp_path / "m", ROBERTA_BASE)
    code, out = run_cli(command, d, tmp_path / "o", "--max-seq-len", "514")
    assert_one_error_line(code, out, "--max-seq-len 514 is outside 1..512")


@pytest.mark.parametrize("command", ["plan", "export"])
def test_broken_config_and_missing_shard_give_one_line(command: str, tmp_path: Path) -> None:
    d = model_dir(tmp_path / "a", BERT_BASE)
    (d / "config.json").write_text("{")
    assert_one_error_line(*run_cli(command, d, tmp_path / "o"), "cannot read")
    d = model_dir(tmp_path / "b", BERT_BASE, ("tokenizer.json",))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model-1-of-2.safetensors"}}))
    assert_one_error_line(*run_cli(command, d, tmp_path / "o"), "names shards that are missing")


def test_placeholder_or_unconvertible_tokenizer_is_refused_by_export(tmp_path: Path) -> None:
    d = model_dir(tmp_path / "a", BERT_BASE, ("model.safetensors",))
    placeholder_tokenizer(d / "tokenizer.json")
    assert_one_error_line(*run_cli("export", d, tmp_path / "o"), "has only 5 tokens for a model with 30522 embeddings")
    d = model_dir(tmp_path / "b", {**ALBERT_BASE, "vocab_size": 100}, ("model.safetensors",))
    (d / "spiece.model").write_bytes(b"not a sentencepiece model")
    assert_one_error_line(*run_cli("export", d, tmp_path / "o"), "cannot build a tokenizer from spiece.model")
    assert not any((tmp_path / "o").iterdir()), "nothing half-written"


def test_plan_takes_every_family(tmp_path: Path) -> None:
    for name, config in {"distilbert": DISTILBERT, "albert": ALBERT_BASE, "roberta": ROBERTA_BASE}.items():
        code, out = run_cli("plan", model_dir(tmp_path / name, config), tmp_path / "o", "--json")
        assert code == 0, out
        assert json.loads(out)["num_layers"] == (6 if name == "distilbert" else 12)
