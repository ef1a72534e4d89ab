"""Macro-F1 against a hand-computed confusion matrix, weighted means, mean ± std."""

from __future__ import annotations

import numpy as np
import pytest

from fedhft.simulate.metrics import accuracy, confusion, macro_f1, mean_std, weighted_mean


def test_macro_f1_matches_a_hand_computed_confusion() -> None:
    y = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    p = np.array([0, 1, 0, 1, 2, 2, 2, 0, 2, 2])
    assert confusion(y, p, 3).tolist() == [[2, 1, 0], [0, 1, 1], [1, 0, 4]]
    # class 0: tp 2, fp 1, fn 1 -> 4/6; class 1: tp 1, fp 1, fn 1 -> 2/4; class 2: tp 4, fp 1, fn 1 -> 8/10
    assert macro_f1(y, p) == pytest.approx((4 / 6 + 2 / 4 + 8 / 10) / 3, abs=1e-12)
    assert accuracy(y, p) == pytest.approx(0.7)


def test_a_majority_guess_has_high_accuracy_and_low_macro_f1() -> None:
    y = np.array([1] * 82 + [0] * 18)  # ~82% positive, as the Clothing "recommended" label
    guess = np.ones_like(y)
    assert accuracy(y, guess) == pytest.approx(0.82)
    # class 1: tp 82, fp 18 -> F1 164/182; class 0: never predicted -> 0
    assert macro_f1(y, guess) == pytest.approx((164 / 182) / 2)
    assert macro_f1(y, guess) < 0.46 < accuracy(y, guess)
    assert macro_f1(y, y) == 1.0


def test_classes_absent_from_labels_and_predictions_do_not_count() -> None:
    y, p = np.array([3, 3, 5]), np.array([3, 3, 5])
    assert macro_f1(y, p) == 1.0  # labels 0, 1, 2 and 4 occur nowhere: no F1 to average


def test_weighted_mean_weights_by_test_examples() -> None:
    acc = {"a": 1.0, "b": 0.5}
    assert weighted_mean(acc, {"a": 6, "b": 2}) == pytest.approx(0.875)
    assert weighted_mean(acc, {"a": 1, "b": 1}) == pytest.approx(0.75)
    assert weighted_mean({}, {}) is None


def test_mean_std_is_sample_std_and_missing_if_any_seed_misses() -> None:
    m, s = mean_std([0.8, 0.9, 1.0])
    assert m == pytest.approx(0.9) and s == pytest.approx(0.1)
    assert mean_std([0.7]) == (0.7, 0.0)
    assert mean_std([0.7, None]) == (None, None)
    assert mean_std([]) == (None, None)
