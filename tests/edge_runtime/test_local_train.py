"""Local training on the tiny export (real ORT), and the offline `edge train` command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

from fedhft.cli import main
from fedhft.cli.edge import train_command
from fedhft.edge_runtime.data import DataError
from fedhft.edge_runtime.local_train import evaluate, open_trainer, train_local
from fedhft.edge_runtime.tokenize import TextEncoder
from fedhft.edge_runtime.trainer import BackendError
from fedhft.protocol.manifest import load_manifest

WORDS = ("good great fine", "bad awful poor", "table chair lamp")


def toy_texts(n: int) -> tuple[list[str], np.ndarray]:
    """Three easy classes: each text repeats words of its class."""
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 3
    texts = [" ".join(rng.choice(WORDS[y].split(), size=6)) for y in labels]
    return texts, labels.astype(np.int64)


def write_csv(path: Path, n: int) -> Path:
    texts, labels = toy_texts(n)
    names = ("pos", "neg", "obj")
    path.write_text("text,label\n" + "".join(f"{t},{names[y]}\n" for t, y in zip(texts, labels, strict=True)))
    return path


def test_training_lowers_the_loss_and_reports_steps(tiny_export: Path) -> None:
    manifest = load_manifest(tiny_export)
    trainer = open_trainer("ort", tiny_export, manifest, learning_rate=5e-3)
    encoder = TextEncoder.for_manifest(manifest, tiny_export)
    texts, labels = toy_texts(48)
    before = evaluate(trainer, encoder, texts, labels, batch_size=16)
    seen: list[tuple[int, int]] = []
    report = train_local(
        trainer, encoder, texts, labels, epochs=5, batch_size=8, seed=1, progress=lambda d, t, _l: seen.append((d, t))
    )
    after = evaluate(trainer, encoder, texts, labels, batch_size=16)
    assert report.steps == 30 and report.samples == 240 and seen[-1] == (30, 30)
    assert 0.0 <= report.accuracy <= 1.0 and report.seconds > 0
    assert before.samples == 48 and before.steps == 3
    assert after.loss < 0.8 * before.loss, (before, after)
    assert after.accuracy > before.accuracy


def test_steps_time_limit_and_stop_are_honoured(tiny_export: Path) -> None:
    manifest = load_manifest(tiny_export)
    trainer = open_trainer("ort", tiny_export, manifest)
    encoder = TextEncoder.for_manifest(manifest, tiny_export)
    texts, labels = toy_texts(10)
    assert train_local(trainer, encoder, texts, labels, steps=7, batch_size=4).steps == 7
    assert train_local(trainer, encoder, texts, labels, steps=10_000, max_seconds=0.05).steps < 10_000
    calls = iter(range(100))
    stopped = train_local(trainer, encoder, texts, labels, steps=50, should_stop=lambda: next(calls) >= 3)
    assert stopped.steps == 3
    with pytest.raises(DataError, match="exactly one"):
        train_local(trainer, encoder, texts, labels, steps=1, epochs=1)
    with pytest.raises(DataError, match="as many labels"):
        train_local(trainer, encoder, texts, labels[:3], steps=1)
    with pytest.raises(BackendError, match="unknown backend"):
        open_trainer("tflite", tiny_export)


def test_edge_train_command_prints_progress_and_saves_an_adapter(tiny_export: Path, tmp_path: Path) -> None:
    data = write_csv(tmp_path / "d.csv", 60)
    out = tmp_path / "adapter"
    args = ["--artifacts", str(tiny_export), "--data", str(data), "--epochs", "3", "--lr", "5e-3"]
    res = CliRunner().invoke(train_command, [*args, "--save-adapter", str(out)])
    assert res.exit_code == 0, res.output
    assert "54 train / 6 eval examples, 3 labels" in res.stderr
    assert "eval before: loss" in res.stderr
    summary = res.stdout.strip().splitlines()[-1]
    assert summary.startswith("trained 21 steps (162 samples)") and "eval loss" in summary and str(out) in summary
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert set(load_file(str(out / "head.safetensors"))) == {"head.weight", "head.bias"}


def test_edge_train_errors_are_one_line(tiny_export: Path, tmp_path: Path) -> None:
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "".join(f"t{i},{i}\n" for i in range(5)))  # 5 labels, the model has 3
    res = CliRunner().invoke(main, ["edge", "train", "--artifacts", str(tiny_export), "--data", str(data)])
    assert res.exit_code == 1
    assert res.stderr.startswith("error: ") and "model has 3 outputs" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    res = CliRunner().invoke(main, ["edge", "train", "--artifacts", str(tmp_path), "--data", str(data)])
    assert res.exit_code == 1 and "no manifest" in res.stderr
