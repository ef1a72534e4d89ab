"""Masked ΔW aggregation of LoRA updates and the FedBuff flush over cluster states (numpy only, pure functions).

A LoRA adapter on a frozen linear layer W (out x in) is dW = B @ A with A (r x in) and B (out x r).
Client k trains its own rank r_k and uploads a *masked slice* (:class:`~fedhft.broker_server.
aggregation_inputs.MaskedFactors`): the output rows ``rows_k`` it kept, ``B_rows = B[rows_k]`` and its full
``A``. The server rebuilds dW_k[rows_k] = B_rows @ A exactly and knows nothing about the client's other rows.

Aggregation works in dW space: each row of the global dW is the weighted average of that row over the
clients that sent it; rows nobody sent keep their previous value (:func:`aggregate_delta_w`). The models
re-factor the global dW per device by truncated SVD (:mod:`fedhft.broker_server.svd`).

Poisoning bounds: the masked ΔW and head aggregation take an optional robust ``rule`` (coordinate-wise
trimmed mean or median over the clients that sent each row, :mod:`fedhft.broker_server.robust`) in place
of the weighted mean.

All arithmetic is float64; outputs are float64 arrays that never alias the inputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedhft.broker_server.aggregation_inputs import AggregationError, ClientUpdate, MaskedFactors
from fedhft.broker_server.robust import capped_samples, check_rule, robust_combine

ROBUST_CHUNK = 1 << 20  # values a robust rule sorts at once (senders x rows x in): its temporaries stay ~64 MB


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


def check_weights(weights: Sequence[float] | np.ndarray, n: int) -> np.ndarray:
    """One finite weight >= 0 per update, as float64; AggregationError otherwise."""
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
    w = check_weights(weights, len(updates))
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
    w = check_weights(weights, len(updates))
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
# FedBuff-style buffered, clustered aggregation (pure state transitions)
# --------------------------------------------------------------------------------------------------


@dataclass
class ClusterState:
    """One cluster's global model as its strategy keeps it (persisted as is): named arrays in ``modules`` (ΔW per
    module for the ΔW strategies) and the dense head."""

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
