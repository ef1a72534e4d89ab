"""Factor-space server state of the FedAvg-of-LoRA and HetLoRA baselines (pure numpy, no I/O).

These baselines keep global LoRA factors instead of ΔW: per module A (R x in) and B (out x R), R the
module's global max rank, in the wire convention (LoRA scaling folded into B, so ΔW = B·A). Version 0
is LoRA's initialization, A at its Kaiming-uniform scale (the same rows the ΔW path sends at version 0)
and B = 0; a module keeps it until some client sends that module.

A flush, per module, over the updates that carry it: each client's dense factors are zero-padded to
c = the largest rank among them and averaged with weights w_k normalized over those clients; the first
c components become (1 - η)·old + η·average (η = the server lr; 1, i.e. replaced, by default).
Components beyond c keep their value, so a client with a larger rank still gets live LoRA-initialized A
rows instead of dead zero ones. Weights: ``fedavg`` n_k·s_k (FedAvg of the factors: B̄·Ā, not the mean
of B_k·A_k), ``hetlora`` n_k·s_k·‖B_k A_k‖_F (HetLoRA's sparsity weighting); s_k is the FedBuff
staleness weight (1 with exponent 0). Heads follow the ΔW path's rule. A client's model is the first
r_k components of every module it adapts (HetLoRA's truncation).

Only dense uploads (every output row of every module) are factors, so these aggregators, and
``flexlora`` (the ΔW path fed dense uploads: sample-weighted mean of B_k·A_k, then SVD to each client's
rank), reject masked ones: :func:`masked_modules`.

Persistence: the state is a :class:`ClusterState` whose ``modules`` hold ``<m>.A`` and ``<m>.B`` (the
wire names of a model's tensors), so the state store commits it like a ΔW state (atomic, versioned).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from fedhft.broker_server.aggregation import (
    AggregationError,
    ClientUpdate,
    ClusterState,
    LoraFactors,
    MaskedFactors,
    aggregate_buffer,
    staleness_weight,
)
from fedhft.broker_server.validation import GlobalSpec, ModuleSpec, module_names

AGGREGATORS = ("fedhft", "fedavg", "hetlora", "flexlora", "fedavg-full")  # fedavg-full: full_aggregation.py
FACTOR_AGGREGATORS = ("fedavg", "hetlora")  # state in factor space; flexlora uses the ΔW state
MASKED = "masked"  # rejection reason: a baseline aggregator got an update without every row


def masked_modules(tensors: Mapping[str, np.ndarray], spec: GlobalSpec) -> list[str]:
    """The modules of an update's wire tensors that do not carry every output row."""
    return [
        name
        for name in module_names(tensors)
        if np.unique(np.asarray(tensors[f"{name}.rows"])).size != spec.modules[name].out_features
    ]


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


def factor_weights(kind: str, factors: Sequence[LoraFactors], base: np.ndarray) -> np.ndarray:
    """Unnormalized weights: ``base`` (samples x staleness) for fedavg, times ‖B_k A_k‖_F for hetlora."""
    if kind == "fedavg":
        return np.asarray(base, dtype=np.float64)
    if kind == "hetlora":
        return np.asarray(base, dtype=np.float64) * np.array([delta_norm(f) for f in factors])
    raise AggregationError(f"unknown factor aggregator {kind!r}; use one of {FACTOR_AGGREGATORS}")


def padded_average(factors: Sequence[LoraFactors], weights: Sequence[float] | np.ndarray) -> LoraFactors:
    """Σ_k w_k·pad(F_k) / Σ_k w_k, every A and B zero-padded to the largest rank among ``factors``."""
    w = np.asarray(weights, dtype=np.float64)
    if not factors or w.shape != (len(factors),) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise AggregationError("need one finite weight >= 0 per client and a positive total")
    w = w / w.sum()
    rank = max(f.rank for f in factors)
    a = np.zeros((rank, factors[0].A.shape[1]))
    b = np.zeros((factors[0].B.shape[0], rank))
    for f, wk in zip(factors, w, strict=True):
        a[: f.rank] += wk * f.A
        b[:, : f.rank] += wk * f.B
    return LoraFactors(A=a, B=b)


@dataclass(frozen=True)
class FactorAggregator:
    """The factor-space strategy the coordinator uses for ``fedavg`` and ``hetlora``."""

    kind: str
    spec: GlobalSpec
    seed_of: Callable[[str], int]  # module name -> seed of its version-0 A

    def __post_init__(self) -> None:
        if self.kind not in FACTOR_AGGREGATORS:
            raise AggregationError(f"unknown factor aggregator {self.kind!r}; use one of {FACTOR_AGGREGATORS}")

    def module_names(self, state: ClusterState) -> list[str]:
        """Modules someone has sent (those the state holds)."""
        return sorted(k[:-2] for k in state.modules if k.endswith(".A") and k[:-2] in self.spec.modules)

    def global_factors(self, state: ClusterState, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(A (R, in), B (out, R)) of module ``name``: the state's, or version 0's when it has none."""
        if f"{name}.A" in state.modules:
            return state.modules[f"{name}.A"], state.modules[f"{name}.B"]
        return initial_factors(self.spec.modules[name], self.seed_of(name))

    def client_factors(self, state: ClusterState, name: str, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """(B, A) of a client with rank ``rank``: the first ``rank`` components."""
        a, b = self.global_factors(state, name)
        return b[:, :rank].copy(), a[:rank].copy()

    def delta(self, state: ClusterState, name: str) -> np.ndarray:
        """The global ΔW = B·A of module ``name``."""
        a, b = self.global_factors(state, name)
        return b @ a

    def aggregate(
        self,
        state: ClusterState,
        updates: Sequence[ClientUpdate],
        current_version: int,
        staleness_exponent: float,
        server_lr: float = 1.0,
    ) -> ClusterState:
        """The state after one flush of ``updates`` (dense; inputs are not modified)."""
        base = np.array(
            [u.num_samples * staleness_weight(current_version, u.base_version, staleness_exponent) for u in updates]
        )
        modules = {k: np.array(v, dtype=np.float64) for k, v in state.modules.items()}
        for name in sorted({n for u in updates for n in u.modules}):
            senders = [
                (dense_factors(u.modules[name]), bk) for u, bk in zip(updates, base, strict=True) if name in u.modules
            ]
            factors = [f for f, _ in senders]
            weights = factor_weights(self.kind, factors, np.array([bk for _, bk in senders]))
            if not weights.sum() > 0:
                continue
            avg = padded_average(factors, weights)
            a, b = (np.array(x, dtype=np.float64) for x in self.global_factors(state, name))
            c = avg.rank
            a[:c] = (1.0 - server_lr) * a[:c] + server_lr * avg.A
            b[:, :c] = (1.0 - server_lr) * b[:, :c] + server_lr * avg.B
            modules[f"{name}.A"], modules[f"{name}.B"] = a, b
        heads_only = [replace(u, modules={}) for u in updates]
        head = aggregate_buffer(
            [ClusterState({}, state.head)], heads_only, current_version, staleness_exponent, None, server_lr
        )[0].head
        return ClusterState(modules=modules, head=head)
