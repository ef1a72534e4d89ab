"""Client clustering for personalized aggregation (numpy only, pure functions, no I/O).

Each client is summarized by a short, L2-normalized :func:`signature` (reduced by :func:`pca`); clients are
grouped by k-means or a diagonal Gaussian mixture (soft memberships), K is chosen by BIC, and
:func:`update_memberships` keeps cluster indices and client assignments stable across rounds (the minimum
cluster size is :mod:`fedhft.broker_server.cluster_fit`'s).
"""

from __future__ import annotations

import copy
import itertools
import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from fedhft.broker_server.aggregation import masked_delta
from fedhft.broker_server.aggregation_inputs import AggregationError, ClientUpdate

T = TypeVar("T")

BRUTE_FORCE_MAX_K = 6  # align clusters by trying every permutation up to this many clusters


class ClusteringError(AggregationError):
    """Clustering inputs that are malformed or inconsistent."""


# --------------------------------------------------------------------------------------------------
# Signatures
# --------------------------------------------------------------------------------------------------


def _unit(v: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(v))
    return v / norm if norm > 0 else v


def _sketch_shape(projection_dim: int) -> tuple[int, int]:
    """(p, q) with p * q >= projection_dim for the two-sided projection L^T dW R."""
    p = math.isqrt(projection_dim)
    p = p if p * p == projection_dim else p + 1
    return p, -(-projection_dim // p)


def _projection_pair(name: str, n_out: int, n_in: int, projection_dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian L (out x p) and R (in x q) fixed by (seed, module name, shape): the same on every client."""
    p, q = _sketch_shape(projection_dim)
    rng = np.random.default_rng([int(seed), zlib.crc32(name.encode()), n_out, n_in])
    return rng.standard_normal((n_out, p)), rng.standard_normal((n_in, q))


def signature(
    update: ClientUpdate,
    projection_dim: int = 64,
    seed: int = 0,
    reference_head: Mapping[str, np.ndarray] | None = None,
) -> np.ndarray:
    """A unit-norm vector describing a client, comparable across clients.

    With a head: the head tensors flattened in key order, minus ``reference_head`` (e.g. the global
    head the client started from) when given. Without one: a fixed random projection to
    ``projection_dim`` of the masked dW zero-filled to full shape, vec(L^T dW R) summed over modules,
    where L, R depend only on (seed, module name, shape); only the sent rows enter the product.
    An update with neither head nor modules gives the zero vector.
    """
    if update.head:
        parts = []
        for key in sorted(update.head):
            v = np.asarray(update.head[key], dtype=np.float64)
            if reference_head is not None and key in reference_head:
                v = v - np.asarray(reference_head[key], dtype=np.float64)
            parts.append(v.ravel())
        return _unit(np.concatenate(parts))
    if projection_dim < 1:
        raise ClusteringError(f"projection_dim must be >= 1, got {projection_dim}")
    total = np.zeros(_sketch_shape(projection_dim))
    for name in sorted(update.modules):
        f = update.modules[name]
        left, right = _projection_pair(name, f.out_features, f.in_features, projection_dim, seed)
        rows, d_rows = masked_delta(f)
        total += left[rows].T @ d_rows @ right  # equals L^T dW R with unsent rows of dW zero
    return _unit(total.ravel()[:projection_dim])


def pca(x: np.ndarray, dims: int) -> np.ndarray:
    """Rows of ``x`` centered and projected on their top ``dims`` principal directions."""
    centered = x - x.mean(0)
    dims = max(1, min(dims, *centered.shape))
    _, _, vt = np.linalg.svd(centered, full_matrices=False)
    return centered @ vt[:dims].T


# --------------------------------------------------------------------------------------------------
# k-means
# --------------------------------------------------------------------------------------------------


@dataclass
class KMeansResult:
    """Cluster centers (k, d), hard labels (n,) and within-cluster sum of squares."""

    centers: np.ndarray
    labels: np.ndarray
    inertia: float


def _check_data(x: np.ndarray, k: int) -> np.ndarray:
    data = np.asarray(x, dtype=np.float64)
    if data.ndim != 2 or not np.isfinite(data).all():
        raise ClusteringError(f"data must be a finite (n, d) array, got shape {data.shape}")
    if not 1 <= k <= data.shape[0]:
        raise ClusteringError(f"need 1 <= k <= n = {data.shape[0]}, got k = {k}")
    return data


def _sq_dists(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """(n, k) squared Euclidean distances."""
    d = (x * x).sum(1)[:, None] - 2.0 * x @ centers.T + (centers * centers).sum(1)[None, :]
    return np.maximum(d, 0.0)


def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding: each next center drawn with probability proportional to D(x)^2."""
    centers = [x[rng.integers(x.shape[0])]]
    for _ in range(1, k):
        d2 = _sq_dists(x, np.array(centers)).min(1)
        total = d2.sum()
        idx = rng.integers(x.shape[0]) if total <= 0 else rng.choice(x.shape[0], p=d2 / total)
        centers.append(x[idx])
    return np.array(centers)


def _lloyd(x: np.ndarray, centers: np.ndarray, max_iter: int) -> KMeansResult:
    """Lloyd iterations until labels stop changing; an emptied cluster takes the worst-fit point."""
    labels = np.full(x.shape[0], -1)
    for _ in range(max_iter):
        d2 = _sq_dists(x, centers)
        new_labels = d2.argmin(1)
        if np.array_equal(new_labels, labels):
            break
        labels = new_labels
        for c in range(centers.shape[0]):
            members = labels == c
            if members.any():
                centers[c] = x[members].mean(0)
            else:
                worst = int(d2[np.arange(x.shape[0]), labels].argmax())
                centers[c], labels[worst] = x[worst], c
    d2 = _sq_dists(x, centers)
    labels = d2.argmin(1)
    return KMeansResult(centers=centers, labels=labels, inertia=float(d2[np.arange(x.shape[0]), labels].sum()))


def kmeans(x: np.ndarray, k: int, seed: int = 0, n_init: int = 10, max_iter: int = 100) -> KMeansResult:
    """k-means with k-means++ seeding; best of ``n_init`` runs by inertia, deterministic per seed."""
    data = _check_data(x, k)
    rng = np.random.default_rng(seed)
    best: KMeansResult | None = None
    for _ in range(max(1, n_init)):
        run = _lloyd(data, _kmeans_pp(data, k, rng), max_iter)
        if best is None or run.inertia < best.inertia:
            best = run
    assert best is not None
    return best


# --------------------------------------------------------------------------------------------------
# Diagonal Gaussian mixture
# --------------------------------------------------------------------------------------------------


@dataclass
class GMMResult:
    """A fitted diagonal-covariance Gaussian mixture."""

    means: np.ndarray  # (k, d)
    variances: np.ndarray  # (k, d)
    weights: np.ndarray  # (k,)
    resp: np.ndarray  # (n, k) soft responsibilities, rows sum to 1
    log_likelihood: float  # total over the n points
    n_iter: int
    converged: bool

    @property
    def labels(self) -> np.ndarray:
        return self.resp.argmax(1)


def _log_joint(x: np.ndarray, means: np.ndarray, variances: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(n, k) log(weight_c) + log N(x | mean_c, diag(var_c))."""
    quad = (((x[:, None, :] - means[None]) ** 2) / variances[None]).sum(2)
    log_det = np.log(2.0 * np.pi * variances).sum(1)
    return np.log(np.maximum(weights, 1e-300))[None] - 0.5 * (quad + log_det[None])


def _logsumexp(a: np.ndarray) -> np.ndarray:
    top = a.max(1, keepdims=True)
    return (top + np.log(np.exp(a - top).sum(1, keepdims=True)))[:, 0]


def _e_step(
    x: np.ndarray, means: np.ndarray, variances: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per-point log-likelihood (n,) and responsibilities (n, k)."""
    joint = _log_joint(x, means, variances, weights)
    per_point = _logsumexp(joint)
    return per_point, np.exp(joint - per_point[:, None])


def _m_step(x: np.ndarray, resp: np.ndarray, floor: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    nk = resp.sum(0) + 1e-12
    means = resp.T @ x / nk[:, None]
    variances = (resp.T @ (x * x)) / nk[:, None] - means**2
    return means, np.maximum(variances, 0.0) + floor, nk / x.shape[0]


def gmm_fit(
    x: np.ndarray,
    k: int,
    seed: int = 0,
    max_iter: int = 200,
    tol: float = 1e-6,
    reg_covar: float = 1e-3,
) -> GMMResult:
    """Fit a diagonal Gaussian mixture by EM, initialized from k-means (deterministic per seed).

    Every variance gets ``reg_covar`` times the data's mean per-feature variance added, so tiny
    clusters cannot collapse to a spike (which would also fool BIC). Stops when the mean per-point
    log-likelihood improves by less than ``tol``.
    """
    data = _check_data(x, k)
    labels = kmeans(data, k, seed=seed).labels
    return _em(data, np.eye(k)[labels], _variance_floor(data, reg_covar), max_iter, tol)


def gmm_refit_without(
    x: np.ndarray, fit: GMMResult, drop: int, max_iter: int = 200, tol: float = 1e-6, reg_covar: float = 1e-3
) -> GMMResult:
    """EM restarted from ``fit`` with component ``drop`` removed: its points go to the remaining components by
    their posterior, then the K - 1 components are refitted."""
    data = _check_data(x, 1)
    keep = [c for c in range(fit.means.shape[0]) if c != drop]
    if not keep:
        raise ClusteringError("cannot drop the only component")
    weights = fit.weights[keep] / fit.weights[keep].sum()
    _, resp = _e_step(data, fit.means[keep], fit.variances[keep], weights)
    return _em(data, resp, _variance_floor(data, reg_covar), max_iter, tol)


def _variance_floor(data: np.ndarray, reg_covar: float) -> float:
    return reg_covar * max(float(data.var(0).mean()), 1e-12)


def _em(data: np.ndarray, resp: np.ndarray, floor: float, max_iter: int, tol: float) -> GMMResult:
    """EM from initial responsibilities ``resp`` (n, k)."""
    means, variances, weights = _m_step(data, resp, floor)
    previous, converged, n_iter = -np.inf, False, 0
    while n_iter < max_iter:
        per_point, resp = _e_step(data, means, variances, weights)
        current = float(per_point.mean())
        if current - previous < tol:
            converged = True
            break
        previous, n_iter = current, n_iter + 1
        means, variances, weights = _m_step(data, resp, floor)
    per_point, resp = _e_step(data, means, variances, weights)
    return GMMResult(
        means=means,
        variances=variances,
        weights=weights,
        resp=resp,
        log_likelihood=float(per_point.sum()),
        n_iter=n_iter,
        converged=converged,
    )


def gmm_bic(result: GMMResult, n: int) -> float:
    """BIC = -2 log L + p log n with p = 2 k d + (k - 1) free parameters."""
    k, d = result.means.shape
    return -2.0 * result.log_likelihood + (2 * k * d + k - 1) * math.log(n)


@dataclass
class BICChoice:
    """The K with the lowest BIC, every K's BIC, and the fitted mixture for the chosen K."""

    k: int
    bics: dict[int, float]
    model: GMMResult


def hard_sizes(resp: np.ndarray) -> np.ndarray:
    """(k,) number of points whose largest responsibility is each cluster."""
    return np.bincount(np.asarray(resp).argmax(1), minlength=resp.shape[1])


def choose_k_bic(x: np.ndarray, k_max: int, seed: int = 0, k_min: int = 1) -> BICChoice:
    """Fit mixtures for K = k_min..min(k_max, n) and return the one with the lowest BIC (no minimum cluster
    size: see :func:`fedhft.broker_server.cluster_fit.fit_clusters` for that)."""
    data = _check_data(x, k_min)
    if k_max < k_min:
        raise ClusteringError(f"need k_max >= k_min, got {k_max} < {k_min}")
    fits = {k: gmm_fit(data, k, seed=seed) for k in range(k_min, min(k_max, data.shape[0]) + 1)}
    bics = {k: gmm_bic(m, data.shape[0]) for k, m in fits.items()}
    best = min(bics, key=lambda k: bics[k])
    return BICChoice(k=best, bics=bics, model=fits[best])


# --------------------------------------------------------------------------------------------------
# Stable memberships across rounds
# --------------------------------------------------------------------------------------------------


def align_clusters(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Permutation ``perm`` so that ``new[:, perm]`` best matches the columns of ``old``.

    Maximizes the soft overlap sum_c (old^T new)[c, perm[c]]: by trying every permutation for
    k <= BRUTE_FORCE_MAX_K, greedily (largest remaining overlap first) above that.
    """
    overlap = np.asarray(old, np.float64).T @ np.asarray(new, np.float64)
    k = overlap.shape[0]
    if k <= BRUTE_FORCE_MAX_K:
        best = max(itertools.permutations(range(k)), key=lambda p: overlap[np.arange(k), list(p)].sum())
        return np.array(best)
    perm = np.full(k, -1)
    work = overlap.copy()
    for _ in range(k):
        c, j = np.unravel_index(np.argmax(work), work.shape)
        perm[c] = j
        work[c, :] = -np.inf
        work[:, j] = -np.inf
    return perm


def update_memberships(old: np.ndarray | None, new_resp: np.ndarray, hysteresis: float) -> np.ndarray:
    """This round's (n, k) memberships, aligned to last round's cluster order and damped.

    New clusters are first permuted to match the old ones (:func:`align_clusters`). Then per client:
    if its aligned argmax is its old argmax, it takes the new (refreshed) row; if the argmax moved,
    it switches only when new_p[new_c] - new_p[old_c] > ``hysteresis``, and otherwise keeps its old
    row. With ``old`` None the new responsibilities are returned as they are. K must not change
    between rounds (start again from ``old=None`` when it does).
    """
    new = np.asarray(new_resp, dtype=np.float64)
    if new.ndim != 2 or not np.isfinite(new).all() or (new < 0).any():
        raise ClusteringError(f"new_resp must be a finite (n, k) array >= 0, got shape {new.shape}")
    if not 0 <= hysteresis <= 1:
        raise ClusteringError(f"hysteresis must lie in [0, 1], got {hysteresis}")
    if old is None:
        return new.copy()
    prev = np.asarray(old, dtype=np.float64)
    if prev.shape != new.shape:
        raise ClusteringError(f"old memberships {prev.shape} and new {new.shape} differ in shape")
    aligned = new[:, align_clusters(prev, new)]
    idx = np.arange(new.shape[0])
    old_c, new_c = prev.argmax(1), aligned.argmax(1)
    take_new = (old_c == new_c) | (aligned[idx, new_c] - aligned[idx, old_c] > hysteresis)
    return np.where(take_new[:, None], aligned, prev)


# --------------------------------------------------------------------------------------------------
# Evaluation and state helpers
# --------------------------------------------------------------------------------------------------


def adjusted_rand_index(labels_true: np.ndarray, labels_pred: np.ndarray) -> float:
    """Hubert-Arabie adjusted Rand index of two labelings (1.0 = identical partitions)."""
    t, p = np.asarray(labels_true).ravel(), np.asarray(labels_pred).ravel()
    if t.shape != p.shape:
        raise ClusteringError(f"label arrays differ in length: {t.size} vs {p.size}")
    if t.size < 2:
        return 1.0
    _, ti = np.unique(t, return_inverse=True)
    _, pi = np.unique(p, return_inverse=True)
    table = np.zeros((ti.max() + 1, pi.max() + 1))
    np.add.at(table, (ti, pi), 1)

    def pairs(v: np.ndarray) -> float:
        return float((v * (v - 1) / 2).sum())

    index, a, b = pairs(table), pairs(table.sum(1)), pairs(table.sum(0))
    expected = a * b / pairs(np.array([t.size]))
    maximum = (a + b) / 2
    return 1.0 if maximum == expected else (index - expected) / (maximum - expected)


def init_cluster_states(initial: T, k: int) -> list[T]:
    """``k`` independent deep copies of ``initial`` (never ``[initial] * k``, which shares one object)."""
    if k < 1:
        raise ClusteringError(f"k must be >= 1, got {k}")
    return [copy.deepcopy(initial) for _ in range(k)]
