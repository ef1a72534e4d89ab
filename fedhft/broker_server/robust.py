"""Poisoning bounds as pure numpy functions: weighted coordinate-wise median and trimmed mean, and norm clipping.

The aggregation rules (:data:`ROBUST_RULES`) combine n values per coordinate, each with a weight; weight 0
means absent (its value is ignored, NaN included).

* ``none``: the weighted mean (what :mod:`fedhft.broker_server.aggregation` does without a rule).
* ``median``: the weighted median, the value where the cumulative weight crosses half the total; when it
  lands exactly on half (an even number of equal weights) the mean of the two middle values, as np.median.
* ``trimmed-mean``: sort, cut ``beta`` of the total weight off each tail, and take the weighted mean of the
  rest; a value straddling a cut counts with the part of its weight inside. With equal weights and an
  integer beta·n this is the usual trimmed mean (drop beta·n values at each end); beta = 0 is the mean.

Few values: both rules are defined whenever the total weight is positive, and they degrade gently instead
of refusing. One value: itself. Two: their (weighted) mean for the trimmed mean, their mean or the heavier
one's value for the median. A trimmed mean removes an outlier completely once beta x n reaches 1 and only
down-weights it below that. Masked uploads would leave many rows with only a few senders, so the ΔW
aggregation (:func:`fedhft.broker_server.aggregation.aggregate_changes`, over changes since the received
model) gives every client that sent a module a vote on each of its rows: a row it did not send votes for no
change. What stays unprotected is a module only a minority sends at all; clipping (below) bounds that.

Weights: the caller's weights (samples x cluster membership) enter the statistics as weights; the staleness
discount scales the changes that vote.
Because ``num_samples`` is self-reported, :func:`capped_samples` caps each sender's count at the median
count before a robust rule uses it, so a minority cannot win the vote by claiming a huge data set.

Clipping bounds how far one update may move the model: its norm is the norm of its change since the
model its client trained from (sent ΔW rows and head, :func:`fedhft.broker_server.aggregation.change_norm`),
the bound is a multiple of the median such norm (:func:`clip_bound`, over the buffer and a window of recent
ones), and a change above it is shrunk by :func:`clip_scales` (the aggregation applies the scale).
Bounding the change, not the adapter's absolute ΔW, is what stops a sign flip: the adapter grows as training
goes on, the per-round change does not.

No NaN is ever produced: coordinates with no weight get ``fill``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from fedhft.errors import FedHFTError

ROBUST_RULES = ("none", "trimmed-mean", "median")
SLIVER = 1e-12  # kept weight below this fraction of the total is rounding noise, not a value's share


class RobustError(FedHFTError, ValueError):
    """A robust-aggregation setting or input that cannot work."""


def check_rule(rule: str, trim_fraction: float) -> None:
    """RobustError unless ``rule`` is one of ROBUST_RULES and 0 <= trim_fraction < 0.5."""
    if rule not in ROBUST_RULES:
        raise RobustError(f"robust rule must be one of {', '.join(ROBUST_RULES)}, got {rule!r}")
    if not (math.isfinite(trim_fraction) and 0.0 <= trim_fraction < 0.5):
        raise RobustError(f"trim fraction must lie in [0, 0.5), got {trim_fraction}")


def _client_axis_last(values: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Checked float64 copies with axis 0 (the clients) moved last and contiguous: sorting along it is fast."""
    v = np.asarray(values, dtype=np.float64)
    w = np.broadcast_to(np.asarray(weights, dtype=np.float64), v.shape)
    if not np.isfinite(w).all() or (w < 0).any():
        raise RobustError("weights must be finite and >= 0")
    present = w > 0
    if not (np.isfinite(v).all() if present.all() else np.isfinite(v[present]).all()):
        raise RobustError("values with a positive weight must be finite")
    return np.ascontiguousarray(np.moveaxis(v, 0, -1)), np.ascontiguousarray(np.moveaxis(w, 0, -1))


def _equal_weights(w: np.ndarray) -> bool:
    """Every entry present with one and the same weight (the common case: one cluster, equal samples)."""
    return w.size > 0 and w.flat[0] > 0 and bool((w == w.flat[0]).all())


def _sorted_by_value(v: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Values and weights sorted along the last axis by value, absent entries (weight 0) last as 0."""
    present = w > 0
    order = np.argsort(np.where(present, v, np.inf), axis=-1)  # ties hold equal values: any order will do
    return np.take_along_axis(np.where(present, v, 0.0), order, -1), np.take_along_axis(w, order, -1)


def _kept_weights(w: np.ndarray, trim_fraction: float) -> np.ndarray:
    """Per sorted entry, the part of its weight inside [beta, 1 - beta] of the total (slivers dropped)."""
    total = w.sum(-1, keepdims=True)
    upper = np.cumsum(w, -1)
    keep = np.minimum(upper, (1.0 - trim_fraction) * total) - np.maximum(upper - w, trim_fraction * total)
    return np.where(keep > SLIVER * total, keep, 0.0)


def weighted_median(values: np.ndarray, weights: np.ndarray, fill: float = 0.0) -> np.ndarray:
    """Coordinate-wise weighted median along axis 0 (``weights`` broadcast to ``values``); ``fill`` where
    no entry has weight."""
    v, w = _client_axis_last(values, weights)
    if v.shape[-1] == 0:
        return np.full(v.shape[:-1], fill)
    if _equal_weights(w):
        v = np.sort(v, axis=-1)
        n = v.shape[-1]
        return 0.5 * (v[..., (n - 1) // 2] + v[..., n // 2])
    v, w = _sorted_by_value(v, w)
    total = w.sum(-1)
    cum = np.cumsum(w, -1)
    half, tol = (total / 2.0)[..., None], (SLIVER * total)[..., None]
    lo = np.argmax(cum >= half - tol, axis=-1)[..., None]
    hi = np.argmax(cum > half + tol, axis=-1)[..., None]
    median = 0.5 * (np.take_along_axis(v, lo, -1)[..., 0] + np.take_along_axis(v, hi, -1)[..., 0])
    return np.where(total > 0, median, fill)


def weighted_trimmed_mean(
    values: np.ndarray, weights: np.ndarray, trim_fraction: float, fill: float = 0.0
) -> np.ndarray:
    """Coordinate-wise weighted mean along axis 0 after cutting ``trim_fraction`` of the total weight off
    each tail (see the module docstring); ``fill`` where no entry has weight."""
    check_rule("trimmed-mean", trim_fraction)
    v, w = _client_axis_last(values, weights)
    if v.shape[-1] == 0:
        return np.full(v.shape[:-1], fill)
    if _equal_weights(w):  # the same kept share for every coordinate: one sort and a dot product
        keep = _kept_weights(np.ones(v.shape[-1]), trim_fraction)
        return np.sort(v, axis=-1) @ (keep / keep.sum())
    v, w = _sorted_by_value(v, w)
    keep = _kept_weights(w, trim_fraction)
    kept = keep.sum(-1)
    mean = (keep * v).sum(-1) / np.where(kept > 0, kept, 1.0)
    return np.where(kept > 0, mean, fill)


def weighted_mean(values: np.ndarray, weights: np.ndarray, fill: float = 0.0) -> np.ndarray:
    """Coordinate-wise weighted mean along axis 0; ``fill`` where no entry has weight."""
    v = np.asarray(values, dtype=np.float64)
    w = np.broadcast_to(np.asarray(weights, dtype=np.float64), v.shape)
    total = w.sum(0)
    num = (w * np.where(w > 0, v, 0.0)).sum(0)
    return np.where(total > 0, num / np.where(total > 0, total, 1.0), fill)


def robust_combine(
    values: np.ndarray, weights: np.ndarray, rule: str, trim_fraction: float = 0.2, fill: float = 0.0
) -> np.ndarray:
    """``rule`` (none | trimmed-mean | median) over axis 0 of ``values`` with ``weights`` (0 = absent)."""
    check_rule(rule, trim_fraction)
    if rule == "median":
        return weighted_median(values, weights, fill)
    if rule == "trimmed-mean":
        return weighted_trimmed_mean(values, weights, trim_fraction, fill)
    return weighted_mean(values, weights, fill)


def capped_samples(num_samples: Sequence[float] | np.ndarray) -> np.ndarray:
    """Each self-reported sample count capped at the median count (float64; empty in, empty out)."""
    n = np.asarray(num_samples, dtype=np.float64)
    if n.size == 0:
        return n
    return np.minimum(n, float(np.median(n)))


def clip_bound(norms: Iterable[float], multiple: float) -> float | None:
    """``multiple`` x the median of the finite, positive ``norms``; None when there is none."""
    if not (math.isfinite(multiple) and multiple > 0):
        raise RobustError(f"clip multiple must be > 0, got {multiple}")
    usable = [float(x) for x in norms if math.isfinite(x) and x > 0]
    return multiple * float(np.median(usable)) if usable else None


def clip_scales(norms: Sequence[float] | np.ndarray, bound: float | None) -> np.ndarray:
    """Per-update scale in (0, 1]: bound / norm where a norm exceeds ``bound``, else 1 (all 1 without a bound)."""
    n = np.asarray(norms, dtype=np.float64)
    if bound is None:
        return np.ones(n.shape)
    if not (math.isfinite(bound) and bound > 0):
        raise RobustError(f"clip bound must be > 0, got {bound}")
    return np.where(n > bound, bound / np.where(n > bound, n, 1.0), 1.0)
