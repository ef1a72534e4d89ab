"""Choosing K under a minimum cluster size, and soft memberships (numpy only, pure functions, no I/O).

:func:`fit_clusters` fits diagonal GMMs for K in a range (a fixed K is the range K..K) and keeps the K with the
lowest BIC among those whose hard assignment leaves no cluster below ``min_size`` clients; when none in the range
does, the largest smaller K that does, with a note saying so. :func:`soften` turns a posterior into memberships
that are never degenerate: a floor shared by every cluster (exact one-hot posteriors stay shared rows, so clients
of one cluster still share one factorization).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedhft.broker_server.cluster_mixing import snap_one_hot
from fedhft.broker_server.clustering import ClusteringError, choose_k_bic


@dataclass
class ClusterFit:
    """The chosen K, its GMM posterior (n, K), every tried K's BIC, the K rejected for a cluster below the
    minimum size, and ``note``: why K lies outside the asked range ("" when it does not)."""

    k: int
    resp: np.ndarray
    bics: dict[int, float] = field(default_factory=dict)
    rejected: list[int] = field(default_factory=list)
    note: str = ""


def fit_clusters(x: np.ndarray, *, k_min: int, k_max: int, min_size: int, seed: int = 0) -> ClusterFit:
    """GMM clustering of the rows of ``x`` with K in k_min..k_max (clipped to the number of rows) chosen by BIC,
    every cluster holding >= ``min_size`` rows by hard assignment; falls back to the largest smaller K that
    holds it (K = 1 always does)."""
    n = np.asarray(x).shape[0]
    if not 1 <= k_min <= k_max:
        raise ClusteringError(f"need 1 <= min clusters <= max clusters, got {k_min}..{k_max}")
    if min_size < 1:
        raise ClusteringError(f"min cluster size must be >= 1, got {min_size}")
    low, high = min(k_min, n), min(k_max, n)
    rejected: list[int] = []
    try:
        choice = choose_k_bic(x, k_max=high, seed=seed, k_min=low, min_size=min_size)
        return ClusterFit(choice.k, choice.model.resp, choice.bics, choice.rejected)
    except ClusteringError:
        rejected = list(range(low, high + 1))
    for k in range(low - 1, 0, -1):
        try:
            choice = choose_k_bic(x, k_max=k, seed=seed, k_min=k, min_size=min_size)
        except ClusteringError:
            rejected.append(k)
            continue
        asked = f"K = {k_min}" if k_min == k_max else f"K in {k_min}..{k_max}"
        note = f"no fit with {asked} keeps every cluster >= {min_size} of {n} clients; using K = {k}"
        return ClusterFit(choice.k, choice.model.resp, choice.bics, rejected, note)
    raise AssertionError("K = 1 always holds the minimum size")  # pragma: no cover


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
