"""Factor-space math of the FedAvg-of-LoRA and HetLoRA strategies (pure numpy, no I/O).

These baselines keep global LoRA factors instead of ΔW: per module A (R x in) and B (out x R), R the
module's global max rank, in the wire convention (LoRA scaling folded into B, so ΔW = B·A). Version 0
is LoRA's initialization, A at its Kaiming-uniform scale (the same rows the ΔW path sends at version 0)
and B = 0; a module keeps it until some client sends that module.

A flush, per module, over the updates that carry it (FedBuff in factor space): each client's dense factors
are zero-padded to c = the largest rank among them, and its change is that minus the first c components of
the global factors at the version it trained from (:func:`padded_change`); the first c components move by
η · Σ_k w_k s_k Δ_k / Σ_k w_k (η the server lr, s_k the staleness discount (1 + τ_k) ** -a, which is not
normalized away). With η = 1 and every update from the current version this is the synchronous rule: the
first c components become the weighted mean of the padded factors (zero padding: a client of rank r < c
votes for zero beyond r, HetLoRA's self-pruning). Components beyond c keep their value, so a client with a
larger rank still gets live LoRA-initialized A rows instead of dead zero ones. Weights w_k: ``fedavg`` n_k
(FedAvg of the factors: B̄·Ā, not the mean of B_k·A_k), ``hetlora`` n_k·‖B_k A_k‖_F (HetLoRA's sparsity
weighting). Heads follow the ΔW path's rule. A client's model is the first r_k components of every module
it adapts (HetLoRA's truncation).

Only dense uploads (every output row of every module) are factors, so these strategies reject masked ones
(:mod:`fedhft.broker_server.strategies.fedavg`, :mod:`~fedhft.broker_server.strategies.hetlora`).

Persistence: the state is a :class:`ClusterState` whose ``modules`` hold ``<m>.A`` and ``<m>.B`` (the
wire names of a model's tensors), so the state store commits it like a ΔW state (atomic, versioned).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedhft.broker_server.aggregation_inputs import AggregationError, MaskedFactors
from fedhft.broker_server.validation import ModuleSpec


@dataclass
class LoraFactors:
    """Dense (unmasked) LoRA factors of one module: what a dense upload is in factor space."""

    A: np.ndarray  # (r, in)
    B: np.ndarray  # (out, r)

    def __post_init__(self) -> None:
        self.A = np.asarray(self.A, dtype=np.float64)
        self.B = np.asarray(self.B, dtype=np.float64)
        if self.A.ndim != 2 or self.B.ndim != 2 or self.B.shape[1] != self.A.shape[0]:
            raise AggregationError(f"LoRA factors need A (r, in), B (out, r); got {self.A.shape}, {self.B.shape}")

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def delta(self) -> np.ndarray:
        """The full product B @ A."""
        return self.B @ self.A


def dense_factors(f: MaskedFactors) -> LoraFactors:
    """The full factors of a dense upload (B[rows] = B_rows); AggregationError when rows are missing."""
    if np.unique(f.rows).size != f.out_features:
        raise AggregationError(f"a factor aggregator needs every row: got {f.rows.size} of {f.out_features}")
    b = np.zeros((f.out_features, f.rank))
    b[f.rows.astype(np.int64)] = f.B_rows
    return LoraFactors(A=f.A, B=b)


def initial_factors(module: ModuleSpec, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Version 0 at rank R: (A, B) with A drawn at LoRA's Kaiming-uniform scale and B = 0."""
    bound = 1.0 / math.sqrt(module.in_features)
    a = np.random.default_rng(seed).uniform(-bound, bound, size=(module.max_rank, module.in_features))
    return a, np.zeros((module.out_features, module.max_rank))


def delta_norm(f: LoraFactors) -> float:
    """‖B·A‖_F from r x r products (no out x in matrix)."""
    return math.sqrt(max(float(np.sum((f.B.T @ f.B) * (f.A @ f.A.T))), 0.0))


def padded_change(
    factors: Sequence[LoraFactors],
    bases: Sequence[LoraFactors],
    weights: Sequence[float] | np.ndarray,
    discounts: Sequence[float] | np.ndarray | None = None,
) -> LoraFactors:
    """Σ_k w_k d_k (pad(F_k) − base_k) / Σ_k w_k: every A and B zero-padded to c = the largest rank among
    ``factors``, each base (the first c global components the client trained from) of rank c, ``discounts``
    d_k (staleness, default 1) outside the normalization."""
    w = np.asarray(weights, dtype=np.float64)
    n = len(factors)
    d = np.ones(n) if discounts is None else np.asarray(discounts, dtype=np.float64)
    if not factors or w.shape != (n,) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise AggregationError("need one finite weight >= 0 per client and a positive total")
    if len(bases) != n or d.shape != (n,) or not np.isfinite(d).all() or (d < 0).any():
        raise AggregationError("need one base and one discount >= 0 per client")
    w = w / w.sum()
    rank = max(f.rank for f in factors)
    a = np.zeros((rank, factors[0].A.shape[1]))
    b = np.zeros((factors[0].B.shape[0], rank))
    for f, base, wk, dk in zip(factors, bases, w, d, strict=True):
        if base.A.shape != (rank, a.shape[1]) or base.B.shape != (b.shape[0], rank):
            raise AggregationError(f"base factors {base.A.shape} / {base.B.shape} are not of rank {rank}")
        a -= (wk * dk) * base.A
        b -= (wk * dk) * base.B
        a[: f.rank] += (wk * dk) * f.A
        b[:, : f.rank] += (wk * dk) * f.B
    return LoraFactors(A=a, B=b)
