"""Shared fixtures: a tiny random BERT built from a config, and its exported training package."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

TINY_PROFILE = """
name = "tiny-test"
description = "test device"
arch = "x86_64"
ram_mb = 2048
train_memory_fraction = 0.5
fp32_gflops = 50.0
uplink_mbps = 20.0
downlink_mbps = 50.0
runtimes = ["ort"]
default_runtime = "ort"
target_step_seconds = 5.0
target_upload_seconds = 10.0
batch_size = 8
sources = ["test fixture"]
"""


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import BertConfig, BertModel

    from fedhft.device_profiles.model_shape import packaged_model_dir

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny-bert")
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(cfg).save_pretrained(d)
    for f in ("tokenizer.json", "vocab.txt"):
        shutil.copyfile(packaged_model_dir() / f, d / f)
    return d


@pytest.fixture(scope="session")
def tiny_profile_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("profiles") / "tiny-test.toml"
    p.write_text(TINY_PROFILE)
    return p


@pytest.fixture(scope="session")
def tiny_export(tiny_model_dir: Path, tiny_profile_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model exported (ORT, int8 base) for the tiny test profile; returns the profile dir."""
    from fedhft.device_profiles.profile import load_profile
    from fedhft.export.pipeline import ExportOptions, export_profile

    out = tmp_path_factory.mktemp("export")
    res = export_profile(
        tiny_model_dir,
        load_profile(tiny_profile_path),
        out,
        opts=ExportOptions(num_labels=3, max_seq_len=32, min_compression=None),
    )
    return res.directory


@pytest.fixture
def mosquitto(tmp_path: Path):  # noqa: ANN201
    """A fresh Mosquitto on 127.0.0.1:<free port>, stopped by PID after the test."""
    from tests.support.mosquitto import Mosquitto

    broker = Mosquitto(tmp_path / "broker").start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def postgres_url():  # noqa: ANN201
    """A fresh PostgreSQL database (random name, dropped afterwards) as a postgresql:// URL; fails when the
    server of FEDHFT_TEST_POSTGRES (default postgresql://postgres@127.0.0.1:5432/test) is unreachable."""
    from tests.support.postgres import PostgresUnreachable, fresh_database

    unreachable = None
    try:
        with fresh_database() as url:
            yield url
    except PostgresUnreachable as exc:
        unreachable = str(exc)
    if unreachable:
        pytest.fail(unreachable, pytrace=False)


@pytest.fixture(params=["sqlite", "postgres"])
def state_spec(request: pytest.FixtureRequest, tmp_path: Path) -> str | Path:
    """The server's --state on each backend: a state directory, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return tmp_path / "state"
    return request.getfixturevalue("postgres_url")
