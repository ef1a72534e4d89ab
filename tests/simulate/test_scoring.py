"""The evaluator scores a model with accuracy and macro-F1 from the same predictions (a fake trainer: no ORT),
and the plots' step curves and seed bands."""

from __future__ import annotations

import numpy as np
import pytest

from fedhft.edge_runtime.trainer import StepResult
from fedhft.simulate.evaluator import Evaluator
from fedhft.simulate.plots import band, step_values


class FakeTrainer:
    """Predicts the class written in each text ("2" -> class 2) whatever the parameters."""

    def __init__(self) -> None:
        self.loaded: list[dict] = []

    def set_parameters(self, params: dict) -> None:
        self.loaded.append(params)

    def eval_step(self, input_ids: np.ndarray, attention_mask: np.ndarray, labels: np.ndarray) -> StepResult:
        logits = np.eye(3)[input_ids[:, 0]]
        return StepResult(loss=0.5, logits=logits)


class FakeEncoder:
    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        ids = np.array([[int(t)] for t in texts])
        return ids, np.ones_like(ids)


def test_score_reports_accuracy_and_macro_f1_of_the_same_predictions() -> None:
    ev = Evaluator(broker="", task="t", profile_dir="", texts=[], labels=np.array([]))
    ev.trainer, ev.encoder = FakeTrainer(), FakeEncoder()
    ev._params = lambda tensors: dict(tensors)  # type: ignore[method-assign]
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    preds = ["0", "1", "0", "1", "2", "2", "2", "0", "2", "2"]
    s = ev._score({"w": np.zeros(1)}, preds * 4, np.tile(labels, 4))  # 40 examples: two batches, order kept
    assert s.n == 40 and s.accuracy == pytest.approx(0.7) and s.loss == pytest.approx(0.5)
    assert s.macro_f1 == pytest.approx((4 / 6 + 2 / 4 + 8 / 10) / 3)
    assert ev.trainer.loaded == [{"w": np.zeros(1)}]


def test_step_values_hold_each_version_until_the_next() -> None:
    grid = np.array([0.0, 10.0, 15.0, 20.0, 99.0])
    out = step_values([10.0, 20.0], [0.5, 0.8], grid)
    assert np.isnan(out[0]) and out[1:].tolist() == [0.5, 0.5, 0.8, 0.8]


def test_band_is_mean_and_sample_std_over_seeds() -> None:
    grid, mean, std = band([([0.0, 10.0], [0.4, 0.6]), ([0.0, 10.0], [0.6, 1.0])])
    assert grid[0] == 0.0 and grid[-1] == 10.0
    assert mean[0] == pytest.approx(0.5) and std[0] == pytest.approx(np.std([0.4, 0.6], ddof=1))
    assert mean[-1] == pytest.approx(0.8)
    _, mean1, std1 = band([([5.0], [0.3])])
    assert np.isnan(mean1[0]) and mean1[-1] == 0.3 and std1[-1] == 0.0
