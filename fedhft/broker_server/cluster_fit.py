"""Choosing K under a minimum cluster size, and soft memberships (numpy only, pure functions, no I/O).

:func:`fit_clusters` fits diagonal GMMs for K in a range (a fixed K is the range K..K). A fit whose hard
assignment leaves a cluster below ``min_size`` clients has its smallest cluster merged away: that component is
dropped, its clients go to the others by posterior, and EM refits K - 1 components, until every cluster holds
the minimum (an outlier joins its nearest group instead of forming its own). Among the fits that land in the
range the lowest BIC wins; when none does, the largest K below the range, with a note saying so.
:func:`soften` turns a posterior into memberships that are never degenerate: a floor shared by every cluster
(exact one-hot posteriors stay shared rows, so clients of one cluster still share one factorization).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedhft.broker_server.cluster_mixing import snap_one_hot
from fedhft.broker_server.clustering import (
    ClusteringError,
    GMMResult,
    gmm_bic,
    gmm_fit,
    gmm_refit_without,
    hard_sizes,
)


@dataclass
class ClusterFit:
    """The chosen K and its GMM posterior (n, K); ``bics``: the BIC of each K reached (directly or by merging);
    ``merged``: the K whose direct fit left a cluster below the minimum size; ``note``: why K lies outside the
    asked range ("" when it does not)."""

    k: int
    resp: np.ndarray
    bics: dict[int, float] = field(default_factory=dict)
    merged: list[int] = field(default_factory=list)
    note: str = ""


def merge_small(x: np.ndarray, fit: GMMResult, min_size: int) -> GMMResult:
    """``fit`` with its smallest cluster merged away (:func:`gmm_refit_without`) while any cluster holds fewer
    than ``min_size`` points by hard assignment; one cluster always qualifies."""
    while fit.means.shape[0] > 1 and (sizes := hard_sizes(fit.resp)).min() < min_size:
        fit = gmm_refit_without(x, fit, int(sizes.argmin()))
    return fit


def fit_clusters(x: np.ndarray, *, k_min: int, k_max: int, min_size: int, seed: int = 0) -> ClusterFit:
    """GMM clustering of the rows of ``x`` with K in k_min..k_max (clipped to the number of rows) chosen by BIC,
    every cluster holding >= ``min_size`` rows by hard assignment (see the module docstring)."""
    data = np.asarray(x, dtype=np.float64)
    n = data.shape[0]
    if not 1 <= k_min <= k_max:
        raise ClusteringError(f"need 1 <= min clusters <= max clusters, got {k_min}..{k_max}")
    if min_size < 1:
        raise ClusteringError(f"min cluster size must be >= 1, got {min_size}")
    best: dict[int, tuple[float, GMMResult]] = {}  # K reached -> (BIC, fit)
    merged = []
    for k in range(min(k_min, n), min(k_max, n) + 1):
        fit = gmm_fit(data, k, seed=seed)
        if hard_sizes(fit.resp).min() < min_size and k > 1:
            merged.append(k)
            fit = merge_small(data, fit, min_size)
        reached, bic = fit.means.shape[0], gmm_bic(fit, n)
        if reached not in best or bic < best[reached][0]:
            best[reached] = (bic, fit)
    in_range = [k for k in best if k >= k_min]
    k = min(in_range, key=lambda c: best[c][0]) if in_range else max(best)
    note = ""
    if not in_range:
        asked = f"K = {k_min}" if k_min == k_max else f"K in {k_min}..{k_max}"
        note = f"no fit with {asked} keeps every cluster >= {min_size} of {n} clients; using K = {k}"
    return ClusterFit(k, best[k][1].resp, {c: b for c, (b, _) in sorted(best.items())}, merged, note)


def soften(resp: np.ndarray, floor: float) -> np.ndarray:
    """Memberships from a posterior: rows renormalized, rows within numerical precision of one-hot made exactly
    one-hot, then mixed with the uniform row, (1 - floor) * p + floor / K (K = 1 gives all ones)."""
    if not 0 <= floor <= 1:
        raise ClusteringError(f"membership floor must lie in [0, 1], got {floor}")
    out = snap_one_hot(resp)
    k = out.shape[1]
    if k == 1:
        return np.ones_like(out)
    return out if floor == 0 else (1.0 - floor) * out + floor / k


def membership_entropy(resp: np.ndarray) -> float:
    """Mean over rows of the membership entropy divided by log K: 0 = every row one-hot, 1 = every row uniform."""
    p = np.asarray(resp, dtype=np.float64)
    if p.shape[1] < 2:
        return 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(1)
    return float(h.mean() / np.log(p.shape[1]))
