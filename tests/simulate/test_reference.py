"""The no-model reference: the fleet's majority label on the global test set, each client's own majority on its
test set (weighted by test size), and the line the report prints across seeds."""

from __future__ import annotations

import numpy as np
import pytest

from fedhft.simulate.data import ClientSplit, FederatedSplit
from fedhft.simulate.reference import guess_scores, majority_label, reference
from fedhft.simulate.report import build_report, table

#            0  1  2  3  4  5  6  7  8  9 10 11 12 13
LABELS = np.array([0, 0, 0, 1, 1, 2, 2, 0, 1, 2, 1, 1, 0, 2])
SPLIT = FederatedSplit(
    global_test=np.array([10, 11, 12, 13]),  # labels 1, 1, 0, 2
    clients=[
        ClientSplit(0, train=np.array([0, 1, 2, 3]), test=np.array([7, 8])),  # train majority 0; test 0, 1
        ClientSplit(1, train=np.array([4, 5, 6]), test=np.array([9])),  # train 1, 2, 2: majority 2; test 2
    ],
)


def test_majority_label_ties_to_the_smallest_and_refuses_nothing() -> None:
    assert majority_label(np.array([2, 1, 2, 1])) == 1
    with pytest.raises(ValueError):
        majority_label(np.array([], dtype=np.int64))


def test_guess_scores_a_constant_answer() -> None:
    acc, f1 = guess_scores(np.array([1, 1, 0]), np.array([1, 0, 1, 2]))
    # always 1: tp 2, fp 2 (labels 0 and 2), so F1(1) = 4 / 6; classes 0 and 2 score 0
    assert acc == pytest.approx(0.5) and f1 == pytest.approx((4 / 6) / 3)


def test_reference_of_a_hand_built_split() -> None:
    ref = reference(LABELS, SPLIT)
    # fleet train labels 0,0,0,1,1,2,2: majority 0; global test 1,1,0,2 -> 1 of 4 right
    assert ref["global_label"] == 0 and ref["global_accuracy"] == 0.25
    assert ref["global_macro_f1"] == pytest.approx(round((2 / 5) / 3, 4))  # F1(0) = 2·1 / (2 + 3 + 0)
    # client 0 answers 0 on [0, 1] (1/2 right), client 1 answers 2 on [2] (right): weighted by test size 2 and 1
    assert ref["personalized_accuracy"] == pytest.approx(round((0.5 * 2 + 1.0 * 1) / 3, 4))
    assert ref["personalized_macro_f1"] == pytest.approx(round(((2 / 3) / 2 * 2 + 1.0) / 3, 4))


def test_report_carries_and_prints_the_reference_across_seeds() -> None:
    def run(seed: int, acc: float) -> dict:
        ref = {"global_label": 0, "global_accuracy": acc, "global_macro_f1": 0.1}
        ref |= {"personalized_accuracy": 0.6, "personalized_macro_f1": 0.3}
        curve = [{"version": 1, "accuracy": 0.9, "macro_f1": 0.9, "virtual_time": 10.0, "wall_time": 1.0}]
        return {"method": "fedhft", "seed": seed, "accuracy_curve": curve, "reference": ref}

    rep = build_report([run(0, 0.2), run(1, 0.3), {"method": "fedhft", "seed": 2, "accuracy_curve": []}], {})
    ref = rep["reference"]
    assert ref["seeds"] == [0, 1] and ref["global_accuracy"]["mean"] == pytest.approx(0.25)
    line = next(x for x in table(rep).splitlines() if x.startswith("no model"))
    assert "no model (2 seeds)" in line and "global acc 0.250±0.071" in line and "personalized acc 0.600±0.000" in line
    assert "reference" not in build_report([run(0, 0.2) | {"reference": None}], {})
