"""A device on a shared runtime (`fedhft edge host`) trains exactly as it does alone: same seed, same update,
even when another device trains on the same loaded runtime between its rounds (real ORT, tiny export)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedhft.edge_runtime.local_train import open_trainer, train_local
from fedhft.edge_runtime.shared_trainer import SharedTrainers
from fedhft.edge_runtime.tokenize import TextEncoder
from fedhft.edge_runtime.trainer import Trainer
from fedhft.protocol.manifest import load_manifest
from tests.edge_runtime.test_local_train import toy_texts

LR = 5e-3


def _round(trainer: Trainer, encoder: TextEncoder, model: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """One federated round: take the server's model, train 4 steps, return the parameters trained."""
    texts, labels = toy_texts(24 + seed % 5)
    trainer.set_parameters(model)
    train_local(trainer, encoder, texts, labels, steps=4, batch_size=4, seed=seed)
    return trainer.get_parameters()


def _models(initial: dict[str, np.ndarray], rounds: int) -> list[dict[str, np.ndarray]]:
    """The models a server sends, one per round (not the device's own result: its AdamW state must carry)."""
    return [{k: v + np.float32(0.01 * r) for k, v in initial.items()} for r in range(rounds)]


def test_a_hosted_device_gives_the_same_updates_as_a_standalone_one(tiny_export: Path, tmp_path: Path) -> None:
    manifest = load_manifest(tiny_export)
    encoder = TextEncoder.for_manifest(manifest, tiny_export)
    alone = open_trainer("ort", tiny_export, manifest, learning_rate=LR)
    models = _models(alone.get_parameters(), 3)
    want = [_round(alone, encoder, m, seed=11 + r) for r, m in enumerate(models)]

    pool = SharedTrainers()
    try:
        a = pool.trainer_for(tiny_export, "ort", LR, manifest)
        b = pool.trainer_for(tiny_export, "ort", LR, manifest)
        assert len(pool.runtimes) == 1  # one loaded runtime for both devices
        got, other = [], []
        for r, m in enumerate(models):  # b trains on the shared runtime between a's rounds
            got.append(_round(a, encoder, m, seed=11 + r))
            if r == 1:
                a.save_state(tmp_path / "a.ckpt")  # as the client does after a round: the swap then saves nothing
            other.append(_round(b, encoder, models[-1 - r], seed=500 + r))
    finally:
        pool.close()
    for w, g in zip(want, got, strict=True):
        assert w.keys() == g.keys()
        for k in w:
            np.testing.assert_array_equal(g[k], w[k], err_msg=k)
    assert any(not np.array_equal(other[0][k], got[0][k]) for k in got[0])  # b really trained something else


def test_a_device_state_saved_on_the_shared_runtime_restores_alone(tiny_export: Path, tmp_path: Path) -> None:
    """The checkpoint a hosted device writes (its own state, not the last owner's) is what a standalone run of
    the device resumes from."""
    manifest = load_manifest(tiny_export)
    encoder = TextEncoder.for_manifest(manifest, tiny_export)
    pool = SharedTrainers()
    try:
        a = pool.trainer_for(tiny_export, "ort", LR, manifest)
        b = pool.trainer_for(tiny_export, "ort", LR, manifest)
        models = _models(a.get_parameters(), 2)
        trained_a = _round(a, encoder, models[0], seed=3)
        _round(b, encoder, models[1], seed=4)
        a.save_state(tmp_path / "a.ckpt")
    finally:
        pool.close()
    alone = open_trainer("ort", tiny_export, manifest, learning_rate=LR)
    alone.load_state(tmp_path / "a.ckpt")
    restored = alone.get_parameters()
    for k in trained_a:
        np.testing.assert_array_equal(restored[k], trained_a[k], err_msg=k)
