"""The scores a simulation reports, as pure functions: confusion matrix, macro-F1, weighted means, mean ± std.

Macro-F1 averages the per-class F1 over the classes that occur in the labels or the predictions (a class that
is in neither has no F1), so a model that always answers the majority class scores high accuracy on an
imbalanced set but a low macro-F1.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np


def confusion(labels: np.ndarray, predictions: np.ndarray, num_labels: int | None = None) -> np.ndarray:
    """counts[true, predicted] over the examples."""
    y, p = np.asarray(labels, dtype=np.int64), np.asarray(predictions, dtype=np.int64)
    if y.shape != p.shape or y.ndim != 1:
        raise ValueError(f"labels {y.shape} and predictions {p.shape} must be equal 1-D shapes")
    n = num_labels if num_labels is not None else int(max(y.max(initial=-1), p.max(initial=-1)) + 1)
    counts = np.zeros((n, n), dtype=np.int64)
    np.add.at(counts, (y, p), 1)
    return counts


def macro_f1_of(counts: np.ndarray) -> float:
    """Mean F1 = 2·tp / (2·tp + fp + fn) over the classes present in the labels or the predictions."""
    tp = np.diag(counts).astype(np.float64)
    fp = counts.sum(axis=0) - tp
    fn = counts.sum(axis=1) - tp
    present = (counts.sum(axis=0) + counts.sum(axis=1)) > 0
    if not present.any():
        return 0.0
    return float(np.mean(2 * tp[present] / (2 * tp[present] + fp[present] + fn[present])))


def macro_f1(labels: np.ndarray, predictions: np.ndarray) -> float:
    return macro_f1_of(confusion(labels, predictions))


def accuracy(labels: np.ndarray, predictions: np.ndarray) -> float:
    y, p = np.asarray(labels), np.asarray(predictions)
    return float((y == p).mean()) if len(y) else 0.0


def weighted_mean(values: Mapping[str, float], weights: Mapping[str, float]) -> float | None:
    """Σ w·v / Σ w over the keys of ``values`` (None when there are none or every weight is 0)."""
    total = sum(weights[k] for k in values)
    if not values or total <= 0:
        return None
    return sum(v * weights[k] for k, v in values.items()) / total


def mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof 1; 0 for one value); (None, None) when any value is missing."""
    vals = list(values)
    if not vals or any(v is None or (isinstance(v, float) and math.isnan(v)) for v in vals):
        return None, None
    arr = np.asarray(vals, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
