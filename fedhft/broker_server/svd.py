"""Truncated SVD of a module's ΔW and its split into the (B, A) factors a device receives (numpy only, no I/O).

Factors follow the wire convention ΔW = B·A with B = U√S and A = √S Vᵀ, ordered by singular value, so the
first r components are the best rank-r approximation. Components with zero singular value would be dead on
the device (an A row and a B column that are both zero get zero gradients), so :func:`split_factors`
re-draws their A rows at LoRA's initial scale, orthogonal to the live rows, and leaves their B columns zero:
B·A is unchanged.
"""

from __future__ import annotations

import math
import zlib

import numpy as np

from fedhft.broker_server.aggregation import AggregationError

REFACTOR_METHODS = ("svd", "randomized")
ZERO_COMPONENT = 1e-9  # singular values below this fraction of the largest are revived


def _fix_signs(u: np.ndarray, vt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flip each singular pair so the largest-magnitude entry of u is positive (deterministic output)."""
    if u.size == 0:
        return u, vt
    pivot = u[np.argmax(np.abs(u), axis=0), np.arange(u.shape[1])]
    signs = np.where(pivot < 0, -1.0, 1.0)
    return u * signs, vt * signs[:, None]


def _randomized_svd(
    m: np.ndarray, rank: int, seed: int, oversample: int, power_iters: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``rank`` SVD by Halko-Martinsson-Tropp range finding with re-orthonormalized power iterations."""
    rng = np.random.default_rng(seed)
    width = min(rank + oversample, min(m.shape))
    q, _ = np.linalg.qr(m @ rng.standard_normal((m.shape[1], width)))
    for _ in range(power_iters):
        z, _ = np.linalg.qr(m.T @ q)
        q, _ = np.linalg.qr(m @ z)
    ub, s, vt = np.linalg.svd(q.T @ m, full_matrices=False)
    return (q @ ub)[:, :rank], s[:rank], vt[:rank]


def truncated_svd(
    delta_w: np.ndarray,
    rank: int,
    method: str = "svd",
    seed: int = 0,
    oversample: int = 10,
    power_iters: int = 2,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-min(rank, min(shape)) singular triplets (U, S, Vt), sign-normalized.

    ``method="randomized"`` falls back to the exact SVD when the sketch would not be smaller than the
    matrix (rank + oversample >= min(shape)).
    """
    if method not in REFACTOR_METHODS:
        raise AggregationError(f"unknown refactor method {method!r}; use one of {REFACTOR_METHODS}")
    m = np.asarray(delta_w, dtype=np.float64)
    if m.ndim != 2:
        raise AggregationError(f"delta_w must be 2-D, got shape {m.shape}")
    if rank < 1:
        raise AggregationError(f"rank must be >= 1, got {rank}")
    r = min(rank, *m.shape)
    if method == "randomized" and r + oversample < min(m.shape):
        u, s, vt = _randomized_svd(m, r, seed, oversample, power_iters)
    else:
        u, s, vt = np.linalg.svd(m, full_matrices=False)
        u, s, vt = u[:, :r], s[:r], vt[:r]
    u, vt = _fix_signs(u, vt)
    return u, s, vt


def svd_method(shape: tuple[int, int], rank: int, randomized_min_dim: int) -> str:
    """``randomized`` for a large module whose rank is small against it, else the exact ``svd``."""
    return "randomized" if min(shape) >= randomized_min_dim and rank * 4 < min(shape) else "svd"


def module_seed(seed: int, name: str) -> int:
    """A per-module seed that is stable across processes (no Python hash randomization)."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**32)


def split_factors(u: np.ndarray, s: np.ndarray, vt: np.ndarray, rank: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, A) of rank ``rank`` from SVD triplets: B = U√S, A = √S Vᵀ, zero-padded, dead components revived."""
    n_out, n_in = u.shape[0], vt.shape[1]
    r = min(rank, s.size)
    root = np.sqrt(s[:r])
    b = np.zeros((n_out, rank))
    a = np.zeros((rank, n_in))
    b[:, :r] = u[:, :r] * root
    a[:r] = root[:, None] * vt[:r]
    top = float(s[0]) if s.size else 0.0
    sv = np.zeros(rank)
    sv[:r] = s[:r]
    dead = np.flatnonzero(sv <= ZERO_COMPONENT * top) if top > 0 else np.arange(rank)
    if dead.size:
        b[:, dead] = 0.0
        a[dead] = revived_rows(np.delete(a, dead, axis=0), dead.size, n_in, seed)
    return b, a


def revived_rows(live: np.ndarray, count: int, n_in: int, seed: int) -> np.ndarray:
    """``count`` rows at LoRA's Kaiming-uniform scale, orthogonal to the rows of ``live``."""
    rng = np.random.default_rng(seed)
    bound = 1.0 / math.sqrt(n_in)
    rows = rng.uniform(-bound, bound, size=(count, n_in))
    if live.size and np.abs(live).max() > 0:
        q, _ = np.linalg.qr(live.T)
        rows -= (rows @ q) @ q.T
    return rows
