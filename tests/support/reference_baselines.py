"""Test oracles moved out of the server: the published baselines on dense LoRA factors of one module, the
plain SVD re-factoring, and the rank-collapse measures (numpy only).

The server's strategies (:mod:`fedhft.broker_server.strategies`) must agree with these on the same inputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedhft.broker_server.aggregation import check_weights
from fedhft.broker_server.aggregation_inputs import AggregationError
from fedhft.broker_server.factor_aggregation import LoraFactors
from fedhft.broker_server.svd import module_seed, truncated_svd

# ---- SVD re-factoring ------------------------------------------------------------------------------------


def _split(u: np.ndarray, s: np.ndarray, vt: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, A) = (U sqrt(S), sqrt(S) Vt), zero-padded to ``rank``."""
    root = np.sqrt(s)
    b = np.zeros((u.shape[0], rank))
    a = np.zeros((rank, vt.shape[1]))
    b[:, : s.size] = u * root
    a[: s.size] = root[:, None] * vt
    return b, a


def refactor(
    delta_w: np.ndarray,
    rank: int,
    method: str = "svd",
    seed: int = 0,
    oversample: int = 10,
    power_iters: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """Best rank-``rank`` factors (B, A) of dW, B = U sqrt(S) (out x rank), A = sqrt(S) Vt (rank x in).

    B @ A is the truncated SVD (Eckart-Young optimal for ``method="svd"``). When rank exceeds
    min(out, in) the extra columns of B and rows of A are zero, so shapes always match the plan.
    Deterministic for a given ``seed``.
    """
    u, s, vt = truncated_svd(delta_w, rank, method, seed, oversample, power_iters)
    return _split(u, s, vt, rank)


def refactor_for_plan(
    global_delta: Mapping[str, np.ndarray],
    ranks: Mapping[str, int],
    method: str = "svd",
    seed: int = 0,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(B, A) per module in a device's plan, with exactly the planned rank for each module."""
    missing = sorted(set(ranks) - set(global_delta))
    if missing:
        raise AggregationError(f"plan names modules with no global dW: {missing}")
    return {
        name: refactor(global_delta[name], int(r), method=method, seed=module_seed(seed, name))
        for name, r in ranks.items()
    }


# ---- rank collapse ------------------------------------------------------------------------------------------


def _singular_values(delta_w: np.ndarray) -> np.ndarray:
    m = np.asarray(delta_w, dtype=np.float64)
    if m.ndim != 2:
        raise AggregationError(f"delta_w must be 2-D, got shape {m.shape}")
    return np.linalg.svd(m, compute_uv=False)


def singular_energy(delta_w: np.ndarray, rank: int) -> np.ndarray:
    """sigma_i^2 / sum_j sigma_j^2 for the top ``rank`` directions (zero-padded; all zeros for dW = 0)."""
    s2 = _singular_values(delta_w) ** 2
    total = s2.sum()
    out = np.zeros(rank)
    if total > 0:
        top = s2[:rank] / total
        out[: top.size] = top
    return out


def _check_band(r_low: int, r_high: int) -> None:
    if not 0 < r_low < r_high:
        raise AggregationError(f"need 0 < r_low < r_high, got r_low={r_low}, r_high={r_high}")


def rank_collapse_ratio(delta_w: np.ndarray, r_low: int, r_high: int) -> float:
    """Energy of singular directions r_low..r_high-1 over that of the top r_low (0.0 for dW = 0).

    Small values mean the directions only high-rank clients can hold have faded (rank collapse).
    """
    _check_band(r_low, r_high)
    s2 = _singular_values(delta_w) ** 2
    head = s2[:r_low].sum()
    return float(s2[r_low:r_high].sum() / head) if head > 0 else 0.0


@dataclass
class CollapseGuard:
    """Outcome of :func:`guard_rank_collapse`."""

    delta_w: np.ndarray
    ratio_before: float
    ratio_after: float
    gain: float  # factor applied to the singular values r_low..r_high-1 (1.0 when untouched)


def guard_rank_collapse(
    delta_w: np.ndarray,
    r_low: int,
    r_high: int,
    floor: float,
    max_gain: float = 4.0,
    min_ratio: float = 1e-12,
) -> CollapseGuard:
    """Keep the tail band from fading: rescale sigma_{r_low..r_high-1} so the collapse ratio is >= floor.

    Policy: if min_ratio < ratio < floor, multiply the band's singular values by
    g = min(sqrt(floor / ratio), max_gain); singular vectors, the top r_low directions and anything
    beyond r_high are left exactly as they were. A ratio <= ``min_ratio`` (no tail, or only rounding
    noise) or >= floor is left untouched (gain 1.0): the guard restores faded directions, it never
    invents new ones.
    """
    _check_band(r_low, r_high)
    if floor < 0 or max_gain < 1:
        raise AggregationError(f"need floor >= 0 and max_gain >= 1, got {floor}, {max_gain}")
    m = np.array(delta_w, dtype=np.float64)
    ratio = rank_collapse_ratio(m, r_low, r_high)
    if ratio <= min_ratio or ratio >= floor:
        return CollapseGuard(delta_w=m, ratio_before=ratio, ratio_after=ratio, gain=1.0)
    gain = min(float(np.sqrt(floor / ratio)), max_gain)
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    band = slice(r_low, min(r_high, s.size))
    m += (gain - 1.0) * (u[:, band] * s[band]) @ vt[band]
    return CollapseGuard(delta_w=m, ratio_before=ratio, ratio_after=ratio * gain**2, gain=gain)


# ---- baselines on dense factors of one module -----------------------------------------------------------


def _normalized(weights: Sequence[float] | np.ndarray, n: int) -> np.ndarray:
    w = check_weights(weights, n)
    if n == 0 or w.sum() <= 0:
        raise AggregationError("need at least one client with positive weight")
    return w / w.sum()


def fedavg_factors(factors: Sequence[LoraFactors], weights: Sequence[float] | np.ndarray) -> LoraFactors:
    """Naive FedAvg: average A and B separately (all clients must share one rank and shape).

    Note avg(B) @ avg(A) != avg(B @ A) in general; this is the baseline FedHFT improves on.
    """
    w = _normalized(weights, len(factors))
    if len({(f.A.shape, f.B.shape) for f in factors}) != 1:
        raise AggregationError("fedavg_factors needs identical ranks and shapes for every client")
    a = sum(wk * f.A for f, wk in zip(factors, w, strict=True))
    b = sum(wk * f.B for f, wk in zip(factors, w, strict=True))
    return LoraFactors(A=a, B=b)


@dataclass
class HetLoraResult:
    """HetLoRA outcome: the padded global factors, each client's truncation, and the weights used."""

    global_factors: LoraFactors  # rank = max client rank
    per_client: list[LoraFactors]  # client k gets rank r_k
    weights: np.ndarray  # normalized aggregation weights


def hetlora_weights(factors: Sequence[LoraFactors], num_samples: Sequence[float] | np.ndarray) -> np.ndarray:
    """HetLoRA sparsity-weighted aggregation weights, proportional to n_k * ||B_k A_k||_F."""
    norms = np.array([np.linalg.norm(f.delta()) for f in factors])
    return _normalized(check_weights(num_samples, len(factors)) * norms, len(factors))


def hetlora_aggregate(factors: Sequence[LoraFactors], num_samples: Sequence[float] | np.ndarray) -> HetLoraResult:
    """HetLoRA: zero-pad A and B to the max rank, weighted-average them, truncate back per client."""
    if not factors:
        raise AggregationError("hetlora_aggregate needs at least one client")
    if len({(f.B.shape[0], f.A.shape[1]) for f in factors}) != 1:
        raise AggregationError("hetlora_aggregate needs one (out, in) shape for every client")
    w = hetlora_weights(factors, num_samples)
    r_max = max(f.rank for f in factors)
    a = np.zeros((r_max, factors[0].A.shape[1]))
    b = np.zeros((factors[0].B.shape[0], r_max))
    for f, wk in zip(factors, w, strict=True):
        a[: f.rank] += wk * f.A
        b[:, : f.rank] += wk * f.B
    per_client = [LoraFactors(A=a[: f.rank].copy(), B=b[:, : f.rank].copy()) for f in factors]
    return HetLoraResult(global_factors=LoraFactors(A=a, B=b), per_client=per_client, weights=w)


@dataclass
class FlexLoraResult:
    """FlexLoRA outcome: the sample-weighted average dW and each client's SVD re-factoring."""

    delta_w: np.ndarray
    per_client: list[LoraFactors]


def flexlora_aggregate(
    factors: Sequence[LoraFactors],
    num_samples: Sequence[float] | np.ndarray,
    ranks: Sequence[int] | None = None,
) -> FlexLoraResult:
    """FlexLoRA: average full dW_k = B_k A_k weighted by samples, then SVD to each client's rank."""
    w = _normalized(num_samples, len(factors))
    if len({(f.B.shape[0], f.A.shape[1]) for f in factors}) != 1:
        raise AggregationError("flexlora_aggregate needs one (out, in) shape for every client")
    targets = [f.rank for f in factors] if ranks is None else [int(r) for r in ranks]
    if len(targets) != len(factors):
        raise AggregationError(f"need one rank per client ({len(factors)}), got {len(targets)}")
    delta = sum(wk * f.delta() for f, wk in zip(factors, w, strict=True))
    u, s, vt = truncated_svd(delta, max(targets))
    per_client = []
    for r in targets:  # one SVD serves every rank: truncations of it are the rank-r optima
        b, a = _split(u[:, :r], s[:r], vt[:r], r)
        per_client.append(LoraFactors(A=a, B=b))
    return FlexLoraResult(delta_w=delta, per_client=per_client)
