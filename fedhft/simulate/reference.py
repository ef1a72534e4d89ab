"""What answering without a model scores on a run's test sets: the fleet's majority training label on the
global test set, and each client's own majority training label on its own test set (personalized, weighted by
test examples like the methods' figures). A report prints it beside the methods; pure functions.
"""

from __future__ import annotations

import numpy as np

from fedhft.simulate.data import FederatedSplit
from fedhft.simulate.metrics import accuracy, macro_f1, weighted_mean


def majority_label(labels: np.ndarray) -> int:
    """The most frequent label (ties to the smallest)."""
    y = np.asarray(labels, dtype=np.int64)
    if not len(y):
        raise ValueError("no labels to take a majority of")
    return int(np.bincount(y).argmax())


def guess_scores(train_labels: np.ndarray, test_labels: np.ndarray) -> tuple[float, float]:
    """(accuracy, macro-F1) on `test_labels` of always answering the majority of `train_labels`."""
    y = np.asarray(test_labels, dtype=np.int64)
    guess = np.full_like(y, majority_label(train_labels))
    return accuracy(y, guess), macro_f1(y, guess)


def reference(labels: np.ndarray, split: FederatedSplit) -> dict[str, float | int | None]:
    """The no-model scores of one seed's split (labels indexed by the split's example indices)."""
    y = np.asarray(labels, dtype=np.int64)
    train = np.concatenate([c.train for c in split.clients])
    g_acc, g_f1 = guess_scores(y[train], y[split.global_test])
    accs, f1s, n = {}, {}, {}
    for c in split.clients:
        if len(c.train) and len(c.test):
            key = str(c.client)
            accs[key], f1s[key] = guess_scores(y[c.train], y[c.test])
            n[key] = len(c.test)
    p_acc, p_f1 = weighted_mean(accs, n), weighted_mean(f1s, n)
    return {
        "global_label": majority_label(y[train]),
        "global_accuracy": round(g_acc, 4),
        "global_macro_f1": round(g_f1, 4),
        "personalized_accuracy": None if p_acc is None else round(p_acc, 4),
        "personalized_macro_f1": None if p_f1 is None else round(p_f1, 4),
    }
