"""Server-side aggregation of LoRA updates (numpy only, pure functions, no I/O).

A LoRA adapter on a frozen linear layer W (out x in) is dW = B @ A with A (r x in) and B (out x r).
Client k trains its own rank r_k and uploads a *masked slice*: the output rows ``rows_k`` it kept,
``B_rows = B[rows_k]`` and its full ``A``. The server rebuilds dW_k[rows_k] = B_rows @ A exactly and
knows nothing about the client's other rows.

FedHFT-style aggregation works in dW space: each row of the global dW is the weighted average of
that row over the clients that sent it; rows nobody sent keep their previous value. The global dW
is then re-factored per device to that device's planned rank by truncated SVD.

Baselines (fedavg of factors, HetLoRA, FlexLoRA) take dense, unmasked :class:`LoraFactors` of one
module and exist for comparisons only.

Poisoning bounds: the masked ΔW and head aggregation take an optional robust ``rule`` (coordinate-wise
trimmed mean or median over the clients that sent each row, :mod:`fedhft.broker_server.robust`) in place
of the weighted mean.

All arithmetic is float64; outputs are float64 arrays that never alias the inputs.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedhft.broker_server.robust import capped_samples, check_rule, robust_combine
from fedhft.errors import FedHFTError

REFACTOR_METHODS = ("svd", "randomized")
ROBUST_CHUNK = 1 << 20  # values a robust rule sorts at once (senders x rows x in): its temporaries stay ~64 MB


class AggregationError(FedHFTError, ValueError):
    """Inputs to an aggregation step that are malformed or inconsistent."""


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


@dataclass
class MaskedFactors:
    """One module's masked upload: dW[rows] = B_rows @ A; the other rows are unknown.

    Arrays are coerced on construction; shapes are checked by :meth:`check` (a
    :class:`ClientUpdate` checks each of its modules, naming it).
    """

    A: np.ndarray  # (r, in)
    B_rows: np.ndarray  # (k, r)
    rows: np.ndarray  # (k,) distinct ints in [0, out_features)
    out_features: int

    def __post_init__(self) -> None:
        self.A = np.asarray(self.A)
        self.B_rows = np.asarray(self.B_rows)
        self.rows = np.asarray(self.rows)

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.A.shape[1])

    def check(self, name: str = "<module>") -> None:
        """Raise AggregationError naming ``name`` unless shapes, row indices and values are valid."""
        a, b, rows = self.A, self.B_rows, self.rows
        if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
            raise AggregationError(f"module {name!r}: A must be (r, in) with r, in >= 1, got {a.shape}")
        if b.ndim != 2 or b.shape[1] != a.shape[0]:
            raise AggregationError(f"module {name!r}: B_rows must be (k, {a.shape[0]}), got {b.shape}")
        if rows.ndim != 1 or rows.shape[0] != b.shape[0]:
            raise AggregationError(f"module {name!r}: rows must be ({b.shape[0]},), got {rows.shape}")
        if rows.size and not np.issubdtype(rows.dtype, np.integer):
            raise AggregationError(f"module {name!r}: rows must be integers, got {rows.dtype}")
        if int(self.out_features) < 1:
            raise AggregationError(f"module {name!r}: out_features must be >= 1, got {self.out_features}")
        if rows.size and (rows.min() < 0 or rows.max() >= self.out_features):
            raise AggregationError(f"module {name!r}: rows must lie in [0, {self.out_features})")
        if np.unique(rows).size != rows.size:
            raise AggregationError(f"module {name!r}: rows must be distinct")
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise AggregationError(f"module {name!r}: factors contain NaN or inf")


@dataclass
class ClientUpdate:
    """One client's upload: masked factors per module plus its dense classifier head."""

    client_id: str
    num_samples: int
    base_version: int  # global version the client started from
    modules: dict[str, MaskedFactors]
    head: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. head.weight (C, H), head.bias (C,)

    def __post_init__(self) -> None:
        if not self.client_id:
            raise AggregationError("client_id must be non-empty")
        if self.num_samples < 0:
            raise AggregationError(f"client {self.client_id!r}: num_samples must be >= 0")
        if self.base_version < 0:
            raise AggregationError(f"client {self.client_id!r}: base_version must be >= 0")
        for name, factors in self.modules.items():
            factors.check(name)
        self.head = {k: np.asarray(v) for k, v in self.head.items()}
        for key, value in self.head.items():
            if not np.isfinite(value).all():
                raise AggregationError(f"client {self.client_id!r}: head {key!r} contains NaN or inf")


@dataclass
class LoraFactors:
    """Dense (unmasked) LoRA factors of one module, used by the baseline aggregators only."""

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


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------


def staleness_weight(current_version: int, base_version: int, exponent: float) -> float:
    """FedBuff-style staleness discount (1 + tau) ** -exponent with tau = current - base >= 0."""
    tau = current_version - base_version
    if tau < 0:
        raise AggregationError(f"base version {base_version} is newer than current version {current_version}")
    if exponent < 0:
        raise AggregationError(f"staleness exponent must be >= 0, got {exponent}")
    return float((1.0 + tau) ** -exponent)


def _check_weights(weights: Sequence[float] | np.ndarray, n: int) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,):
        raise AggregationError(f"need one weight per update ({n}), got shape {w.shape}")
    if not np.isfinite(w).all() or (w < 0).any():
        raise AggregationError("weights must be finite and >= 0")
    return w


# --------------------------------------------------------------------------------------------------
# Masked aggregation in dW space
# --------------------------------------------------------------------------------------------------


@dataclass
class AggregatedModule:
    """A module's aggregated dW and, per output row, the total weight of clients that sent it."""

    delta_w: np.ndarray  # (out, in)
    coverage: np.ndarray  # (out,); 0 where the row kept its previous value

    @property
    def covered(self) -> np.ndarray:
        """Boolean row mask: rows some client with positive weight sent."""
        return self.coverage > 0


def masked_delta(f: MaskedFactors) -> tuple[np.ndarray, np.ndarray]:
    """The rows a client sent and their exact values: (rows, B_rows @ A)."""
    f.check()
    return f.rows.astype(np.int64), f.B_rows.astype(np.float64) @ f.A.astype(np.float64)


def _module_shapes(
    updates: Sequence[ClientUpdate],
    shapes: Mapping[str, tuple[int, int]] | None,
    previous: Mapping[str, np.ndarray] | None,
) -> dict[str, tuple[int, int]]:
    """Resolve (out, in) per module from shapes, previous and uploads; raise on any disagreement."""
    resolved: dict[str, tuple[int, ...]] = {}
    sources: list[tuple[str, str, tuple[int, ...]]] = []
    for name, shape in (shapes or {}).items():
        sources.append(("shapes", name, (int(shape[0]), int(shape[1]))))
    for name, value in (previous or {}).items():
        sources.append(("previous", name, tuple(int(d) for d in np.shape(value))))
    for u in updates:
        for name, f in u.modules.items():
            sources.append((f"client {u.client_id!r}", name, (int(f.out_features), f.in_features)))
    for origin, name, shape in sources:
        if len(shape) != 2:
            raise AggregationError(f"module {name!r}: {origin} gives a non-2-D shape {shape}")
        if resolved.setdefault(name, shape) != shape:
            raise AggregationError(f"module {name!r}: {origin} has shape {shape}, expected {resolved[name]}")
    return {name: (shape[0], shape[1]) for name, shape in resolved.items()}


def aggregate_delta_w(
    updates: Sequence[ClientUpdate],
    weights: Sequence[float] | np.ndarray,
    shapes: Mapping[str, tuple[int, int]] | None = None,
    previous: Mapping[str, np.ndarray] | None = None,
    *,
    rule: str = "none",
    trim_fraction: float = 0.2,
    scales: Sequence[float] | np.ndarray | None = None,
) -> dict[str, AggregatedModule]:
    """Row-masked weighted average of client dW per module (FedHFT aggregation).

    Row i of module m becomes sum_k w_k dW_k[i] / sum_k w_k over the clients k that sent row i of m
    with w_k > 0. Rows with no such client keep ``previous[m][i]`` (zero when ``previous`` is None or
    lacks m) and get coverage 0. ``weights`` are final per-client weights (the caller multiplies
    samples, staleness and cluster membership). ``shapes`` ((out, in) per module) is optional and
    only checked; modules in ``previous`` or ``shapes`` that no client sent are returned unchanged.
    A robust ``rule`` (trimmed-mean, median) replaces the mean, element by element, by that weighted
    statistic over every client that sent module m (weight w_k), where a client that did not send row i
    votes for the row's current value ``previous[m][i]``: the mask uploads the rows that changed most, so
    an unsent row changed little, and a minority that alone sends a row cannot set it. Coverage and the
    rows nobody sent are as for the mean. ``scales`` (clipping, one per update in (0, 1]) shrink each
    update's sent rows toward the current ones first: previous[rows] + s_k (dW_k[rows] - previous[rows]).
    """
    w = _check_weights(weights, len(updates))
    s = _check_scales(scales, len(updates))
    check_rule(rule, trim_fraction)
    result: dict[str, AggregatedModule] = {}
    for name, (n_out, n_in) in _module_shapes(updates, shapes, previous).items():
        old = previous.get(name) if previous is not None else None
        delta = np.zeros((n_out, n_in)) if old is None else np.array(old, dtype=np.float64)
        if rule == "none":
            combined, coverage = _mean_rows(updates, w, s, name, delta)
        else:
            combined, coverage = _robust_rows(updates, w, s, name, delta, rule, trim_fraction)
        hit = coverage > 0
        delta[hit] = combined[hit]
        result[name] = AggregatedModule(delta_w=delta, coverage=coverage)
    return result


def _check_scales(scales: Sequence[float] | np.ndarray | None, n: int) -> np.ndarray:
    """Per-update clip scales (all ones when None); AggregationError unless each lies in (0, 1]."""
    if scales is None:
        return np.ones(n)
    s = np.asarray(scales, dtype=np.float64)
    if s.shape != (n,) or not np.isfinite(s).all() or (s <= 0).any() or (s > 1).any():
        raise AggregationError(f"need one clip scale in (0, 1] per update ({n}), got {s.tolist()[:8]}")
    return s


def _sent_rows(f: MaskedFactors, current: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(rows, their values) of an upload, shrunk toward ``current`` by ``scale`` (clipping) when < 1."""
    rows, d_rows = masked_delta(f)
    if scale != 1.0:
        d_rows = current[rows] + scale * (d_rows - current[rows])
    return rows, d_rows


def deviation_norm(u: ClientUpdate, modules: Mapping[str, np.ndarray], head: Mapping[str, np.ndarray]) -> float:
    """How far an update moves the model it is aggregated into, as one vector: its sent dW rows minus
    those rows of ``modules`` (zero where a module is missing) and its head minus ``head`` (tensors
    ``head`` lacks do not count)."""
    total = 0.0
    for name, f in u.modules.items():
        rows, d_rows = masked_delta(f)
        if name in modules:
            d_rows = d_rows - np.asarray(modules[name], dtype=np.float64)[rows]
        total += float(np.sum(d_rows * d_rows))
    for key, value in u.head.items():
        if key in head:
            diff = np.asarray(value, np.float64) - np.asarray(head[key], np.float64)
            total += float(np.sum(diff * diff))
    return float(np.sqrt(total))


def _mean_rows(
    updates: Sequence[ClientUpdate], w: np.ndarray, s: np.ndarray, name: str, current: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(weighted mean of each row over its senders (0 where none), coverage) of module ``name``."""
    numerator = np.zeros(current.shape)
    coverage = np.zeros(current.shape[0])
    for u, wk, sk in zip(updates, w, s, strict=True):
        if name not in u.modules or wk == 0:
            continue
        rows, d_rows = _sent_rows(u.modules[name], current, sk)
        numerator[rows] += wk * d_rows  # rows are distinct, so fancy += is exact
        coverage[rows] += wk
    hit = coverage > 0
    numerator[hit] /= coverage[hit, None]
    return numerator, coverage


def _robust_rows(
    updates: Sequence[ClientUpdate],
    w: np.ndarray,
    s: np.ndarray,
    name: str,
    current: np.ndarray,
    rule: str,
    trim: float,
) -> tuple[np.ndarray, np.ndarray]:
    """(robust ``rule`` of each row over the clients that sent the module, unsent rows voting ``current``;
    coverage), in chunks of rows."""
    n_out, n_in = current.shape
    senders = []
    coverage = np.zeros(n_out)
    for u, wk, sk in zip(updates, w, s, strict=True):
        if name in u.modules and wk > 0:
            rows, d_rows = _sent_rows(u.modules[name], current, sk)
            senders.append((rows, d_rows, wk))
            coverage[rows] += wk
    out = np.zeros((n_out, n_in))
    if not senders:
        return out, coverage
    weights = np.array([wk for _, _, wk in senders]).reshape(-1, 1, 1)
    step = max(1, ROBUST_CHUNK // (len(senders) * n_in))
    for r0 in range(0, n_out, step):
        r1 = min(n_out, r0 + step)
        values = np.repeat(current[None, r0:r1], len(senders), axis=0)  # unsent rows vote the current value
        for k, (rows, d_rows, _) in enumerate(senders):
            inside = (rows >= r0) & (rows < r1)
            values[k, rows[inside] - r0] = d_rows[inside]
        out[r0:r1] = robust_combine(values, weights, rule, trim)
    return out, coverage


def aggregate_head(
    updates: Sequence[ClientUpdate],
    weights: Sequence[float] | np.ndarray,
    previous: Mapping[str, np.ndarray] | None = None,
    *,
    rule: str = "none",
    trim_fraction: float = 0.2,
    scales: Sequence[float] | np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Plain weighted average of each dense head tensor over the clients that sent it.

    A tensor with zero total weight keeps its ``previous`` value (zero if there is none). A robust
    ``rule`` takes that weighted statistic element by element instead of the mean. ``scales`` shrink each
    sent tensor toward ``previous`` (when it has one) first, as in :func:`aggregate_delta_w`.
    """
    w = _check_weights(weights, len(updates))
    s = _check_scales(scales, len(updates))
    check_rule(rule, trim_fraction)
    keys = sorted({k for u in updates for k in u.head} | set(previous or {}))
    out: dict[str, np.ndarray] = {}
    for key in keys:
        old = None if previous is None or key not in previous else np.asarray(previous[key], np.float64)
        senders = []
        for u, wk, sk in zip(updates, w, s, strict=True):
            if key in u.head:
                value = np.asarray(u.head[key], np.float64)
                senders.append((value if old is None or sk == 1.0 else old + sk * (value - old), wk))
        shapes = {v.shape for v, _ in senders} | (set() if old is None else {old.shape})
        if len(shapes) != 1:
            raise AggregationError(f"head {key!r}: inconsistent shapes {sorted(shapes)}")
        total = sum(wk for _, wk in senders)
        if total > 0 and rule != "none":
            stacked = np.stack([v for v, _ in senders])
            weights_k = np.array([wk for _, wk in senders]).reshape((-1,) + (1,) * (stacked.ndim - 1))
            out[key] = robust_combine(stacked, weights_k, rule, trim_fraction)
        elif total > 0:
            out[key] = sum(wk * v for v, wk in senders) / total
        else:
            out[key] = np.zeros(shapes.pop()) if old is None else old.copy()
    return out


# --------------------------------------------------------------------------------------------------
# Re-factoring dW into per-device (B, A)
# --------------------------------------------------------------------------------------------------


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


def _module_seed(seed: int, name: str) -> int:
    """A per-module seed that is stable across processes (no Python hash randomization)."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**32)


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
        name: refactor(global_delta[name], int(r), method=method, seed=_module_seed(seed, name))
        for name, r in ranks.items()
    }


# --------------------------------------------------------------------------------------------------
# Rank collapse
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Baselines on dense factors of one module
# --------------------------------------------------------------------------------------------------


def _normalized(weights: Sequence[float] | np.ndarray, n: int) -> np.ndarray:
    w = _check_weights(weights, n)
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
    return _normalized(_check_weights(num_samples, len(factors)) * norms, len(factors))


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


# --------------------------------------------------------------------------------------------------
# FedBuff-style buffered, clustered aggregation (pure state transitions)
# --------------------------------------------------------------------------------------------------


@dataclass
class ClusterState:
    """One cluster's global adapter: dW per module and the dense head."""

    modules: dict[str, np.ndarray]
    head: dict[str, np.ndarray] = field(default_factory=dict)

    def copy(self) -> ClusterState:
        """A deep copy sharing no arrays or dicts with this state."""
        return ClusterState(
            modules={k: np.array(v, copy=True) for k, v in self.modules.items()},
            head={k: np.array(v, copy=True) for k, v in self.head.items()},
        )


def should_aggregate(buffer_len: int, buffer_size: int, oldest_age_s: float | None, window_s: float) -> bool:
    """Flush when the buffer is full, or when it is non-empty and its oldest update waited window_s."""
    if buffer_size < 1:
        raise AggregationError(f"buffer_size must be >= 1, got {buffer_size}")
    if buffer_len >= buffer_size:
        return True
    return buffer_len > 0 and oldest_age_s is not None and oldest_age_s >= window_s


def _membership_matrix(
    updates: Sequence[ClientUpdate], memberships: Mapping[str, np.ndarray] | None, k: int
) -> np.ndarray:
    """(n, K) membership p_kc; all ones when memberships is None."""
    if memberships is None:
        return np.ones((len(updates), k))
    rows = []
    for u in updates:
        if u.client_id not in memberships:
            raise AggregationError(f"no cluster membership for client {u.client_id!r}")
        p = np.asarray(memberships[u.client_id], dtype=np.float64)
        if p.shape != (k,) or not np.isfinite(p).all() or (p < 0).any():
            raise AggregationError(f"client {u.client_id!r}: membership must be {k} finite values >= 0")
        rows.append(p)
    return np.array(rows).reshape(len(updates), k)


def _mix(old: np.ndarray, new: np.ndarray, rows: np.ndarray | None, lr: float) -> np.ndarray:
    """(1 - lr) old + lr new, on ``rows`` only (all of it when rows is None); old elsewhere, exactly."""
    out = np.array(old, dtype=np.float64)
    if rows is None:
        return (1.0 - lr) * out + lr * new
    out[rows] = (1.0 - lr) * out[rows] + lr * new[rows]
    return out


def _head_weight(updates: Sequence[ClientUpdate], w: np.ndarray, key: str) -> float:
    """Total weight of the clients that sent head tensor ``key``."""
    return float(sum(wk for u, wk in zip(updates, w, strict=True) if key in u.head))


def aggregate_buffer(
    cluster_states: Sequence[ClusterState],
    updates: Sequence[ClientUpdate],
    current_version: int,
    staleness_exponent: float,
    memberships: Mapping[str, np.ndarray] | None = None,
    server_lr: float = 1.0,
    *,
    rule: str = "none",
    trim_fraction: float = 0.2,
    clip_scales: Sequence[float] | np.ndarray | None = None,
) -> list[ClusterState]:
    """One FedBuff flush over K cluster states (K = 1 for plain FedBuff); inputs are not modified.

    Update k weighs samples_k * staleness_k * p_kc in cluster c (p = 1 when ``memberships`` is None).
    Per cluster, dW_c <- (1 - eta) dW_c + eta * masked_average on rows with coverage > 0 only; other
    rows are left bit-for-bit as they were. The head mixes the same way when it had positive weight.
    Modules the state lacks start from zero. eta = ``server_lr`` (> 0). With a robust ``rule`` the
    masked average is that weighted statistic (same weights, samples capped at the buffer's median
    count: :func:`fedhft.broker_server.robust.capped_samples`). ``clip_scales`` (one per update, in
    (0, 1]) shrink each update toward each cluster's current dW rows and head before aggregating.
    """
    if not cluster_states:
        raise AggregationError("need at least one cluster state")
    if not np.isfinite(server_lr) or server_lr <= 0:
        raise AggregationError(f"server_lr must be > 0, got {server_lr}")
    check_rule(rule, trim_fraction)
    samples = np.array([u.num_samples for u in updates], dtype=np.float64)
    if rule != "none":
        samples = capped_samples(samples)
    base = samples * np.array(
        [staleness_weight(current_version, u.base_version, staleness_exponent) for u in updates],
        dtype=np.float64,
    )
    p = _membership_matrix(updates, memberships, len(cluster_states))
    new_states = []
    for c, state in enumerate(cluster_states):
        w = base * p[:, c]
        agg = aggregate_delta_w(
            updates, w, previous=state.modules, rule=rule, trim_fraction=trim_fraction, scales=clip_scales
        )
        modules = {
            name: _mix(state.modules.get(name, np.zeros_like(m.delta_w)), m.delta_w, m.covered, server_lr)
            for name, m in agg.items()
        }
        head = {key: np.array(v, dtype=np.float64) for key, v in state.head.items()}
        heads = aggregate_head(
            updates, w, previous=state.head, rule=rule, trim_fraction=trim_fraction, scales=clip_scales
        )
        for key, value in heads.items():
            if _head_weight(updates, w, key) > 0:
                head[key] = _mix(head.get(key, np.zeros_like(value)), value, None, server_lr)
        new_states.append(ClusterState(modules=modules, head=head))
    return new_states


def personalized_delta(cluster_states: Sequence[ClusterState], membership_k: np.ndarray) -> ClusterState:
    """A client's personalized model: sum_c p_kc * state_c for dW and head (p normalized to sum 1)."""
    p = np.asarray(membership_k, dtype=np.float64)
    if p.shape != (len(cluster_states),) or not np.isfinite(p).all() or (p < 0).any() or p.sum() <= 0:
        raise AggregationError(f"membership must be {len(cluster_states)} values >= 0 with a positive sum")
    p = p / p.sum()
    first = cluster_states[0]
    for state in cluster_states[1:]:
        if set(state.modules) != set(first.modules) or set(state.head) != set(first.head):
            raise AggregationError("cluster states must hold the same modules and head tensors")
    return ClusterState(
        modules={n: _mixture(p, [s.modules[n] for s in cluster_states]) for n in first.modules},
        head={n: _mixture(p, [s.head[n] for s in cluster_states]) for n in first.head},
    )


def _mixture(p: np.ndarray, arrays: Sequence[np.ndarray]) -> np.ndarray:
    """sum_c p_c * arrays[c] in float64."""
    out = np.zeros(np.shape(arrays[0]))
    for pc, arr in zip(p, arrays, strict=True):
        out += pc * np.asarray(arr, dtype=np.float64)
    return out
