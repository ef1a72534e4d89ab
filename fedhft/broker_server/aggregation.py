"""FedBuff over masked ΔW rows: the changes of a flush, averaged per row and added to cluster states (numpy only).

A LoRA adapter on a frozen linear layer W (out x in) is dW = B @ A with A (r x in) and B (out x r).
Client k trains its own rank r_k and uploads a *masked slice* (:class:`~fedhft.broker_server.
aggregation_inputs.MaskedFactors`): the output rows ``rows_k`` it kept, ``B_rows = B[rows_k]`` and its full
``A``. The server rebuilds dW_k[rows_k] = B_rows @ A exactly and knows nothing about the client's other rows.

Aggregation is FedBuff's (Nguyen et al., AISTATS 2022) in dW space: what is averaged is each client's
*change* since the model it trained from, δ_k = dW'_k − R_k on the rows it sent (:mod:`fedhft.broker_server.
changes` builds it), never dW'_k itself. Per row, g = Σ_k n_k s(τ_k) δ_k / Σ_k n_k over the clients that sent
that row, s(τ) = (1 + τ) ** -a the staleness discount (:func:`aggregate_changes`): as in FedBuff, staleness
discounts a change and is not normalized away, so a stale change alone in a flush moves its rows by
server_lr · s(τ) · δ. The cluster's dW row moves by server_lr · g; rows nobody sent stay
(:func:`aggregate_buffer`). The models re-factor the dW per device by truncated SVD (:mod:`fedhft.broker_server.
svd`).

Poisoning bounds: the row and head aggregation take an optional robust ``rule`` (coordinate-wise trimmed
mean or median over the clients that sent each module, :mod:`fedhft.broker_server.robust`) in place of the
weighted mean, and clip scales that shrink changes.

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
# Masked aggregation of changes in dW space
# --------------------------------------------------------------------------------------------------


@dataclass
class AggregatedModule:
    """A module's aggregated change per row (zero where no one sent it) and each row's senders' total weight."""

    change: np.ndarray  # (out, in)
    coverage: np.ndarray  # (out,); 0 where the row keeps its value

    @property
    def covered(self) -> np.ndarray:
        """Boolean row mask: rows some client with positive weight sent."""
        return self.coverage > 0


def masked_delta(f: MaskedFactors) -> tuple[np.ndarray, np.ndarray]:
    """The rows a client sent and their exact values: (rows, B_rows @ A)."""
    f.check()
    return f.rows.astype(np.int64), f.B_rows.astype(np.float64) @ f.A.astype(np.float64)


def _module_shapes(
    updates: Sequence[ClientUpdate], shapes: Mapping[str, tuple[int, int]] | None
) -> dict[str, tuple[int, int]]:
    """(out, in) per module sent, from ``shapes`` and the uploads; AggregationError on any disagreement."""
    resolved: dict[str, tuple[int, ...]] = {}
    sources: list[tuple[str, str, tuple[int, ...]]] = []
    for name, shape in (shapes or {}).items():
        sources.append(("shapes", name, tuple(int(d) for d in shape)))
    for u in updates:
        for name, f in u.modules.items():
            sources.append((f"client {u.client_id!r}", name, (int(f.out_features), f.in_features)))
    for origin, name, shape in sources:
        if len(shape) != 2:
            raise AggregationError(f"module {name!r}: {origin} gives a non-2-D shape {shape}")
        if resolved.setdefault(name, shape) != shape:
            raise AggregationError(f"module {name!r}: {origin} has shape {shape}, expected {resolved[name]}")
    sent = {name for u in updates for name in u.modules}
    return {name: (shape[0], shape[1]) for name, shape in resolved.items() if name in sent}


def aggregate_changes(
    changes: Sequence[ClientUpdate],
    weights: Sequence[float] | np.ndarray,
    shapes: Mapping[str, tuple[int, int]] | None = None,
    *,
    rule: str = "none",
    trim_fraction: float = 0.2,
    scales: Sequence[float] | np.ndarray | None = None,
) -> dict[str, AggregatedModule]:
    """Per module, row-masked weighted mean of the clients' changes (FedBuff's g, per row).

    ``changes`` are updates whose sent rows are changes δ_k = ΔW'_k − R_k (:mod:`fedhft.broker_server.changes`).
    Row i of module m gets g[i] = Σ_k w_k s_k δ_k[i] / Σ_k w_k over the clients k that sent row i of m with
    w_k > 0; rows nobody sent get g = 0 and coverage 0. ``weights`` w_k are per-client weights (the caller
    multiplies samples and cluster membership); ``scales`` s_k (one per change, in (0, 1], default 1) discount
    each change (staleness times a clip scale) without entering the normalization, so one stale change moves
    its rows by s_k δ_k. ``shapes`` ((out, in) per module) are only checked.
    A robust ``rule`` (trimmed-mean, median) takes that weighted statistic, element by element, over every
    client that sent module m, a client that did not send row i voting for no change: the mask uploads the
    rows that changed most, so an unsent row changed little, and a minority that alone sends a row cannot
    set it (the vote is over the discounted changes s_k δ_k).
    """
    w = check_weights(weights, len(changes))
    s = _check_scales(scales, len(changes))
    check_rule(rule, trim_fraction)
    result: dict[str, AggregatedModule] = {}
    for name, shape in _module_shapes(changes, shapes).items():
        if rule == "none":
            g, coverage = _mean_rows(changes, w, s, name, shape)
        else:
            g, coverage = _robust_rows(changes, w, s, name, shape, rule, trim_fraction)
        g[coverage <= 0] = 0.0
        result[name] = AggregatedModule(change=g, coverage=coverage)
    return result


def _check_scales(scales: Sequence[float] | np.ndarray | None, n: int) -> np.ndarray:
    """Per-update clip scales (all ones when None); AggregationError unless each lies in (0, 1]."""
    if scales is None:
        return np.ones(n)
    s = np.asarray(scales, dtype=np.float64)
    if s.shape != (n,) or not np.isfinite(s).all() or (s <= 0).any() or (s > 1).any():
        raise AggregationError(f"need one clip scale in (0, 1] per update ({n}), got {s.tolist()[:8]}")
    return s


def change_norm(u: ClientUpdate) -> float:
    """How far a change moves the model it is aggregated into, as one vector: its sent rows and head."""
    total = 0.0
    for f in u.modules.values():
        _, d_rows = masked_delta(f)
        total += float(np.sum(d_rows * d_rows))
    for value in u.head.values():
        v = np.asarray(value, np.float64)
        total += float(np.sum(v * v))
    return float(np.sqrt(total))


def _mean_rows(
    changes: Sequence[ClientUpdate], w: np.ndarray, s: np.ndarray, name: str, shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """(weighted mean change of each row over its senders (0 where none), coverage) of module ``name``."""
    numerator = np.zeros(shape)
    coverage = np.zeros(shape[0])
    for u, wk, sk in zip(changes, w, s, strict=True):
        if name not in u.modules or wk == 0:
            continue
        rows, d_rows = masked_delta(u.modules[name])
        numerator[rows] += (wk * sk) * d_rows  # rows are distinct, so fancy += is exact
        coverage[rows] += wk
    hit = coverage > 0
    numerator[hit] /= coverage[hit, None]
    return numerator, coverage


def _robust_rows(
    changes: Sequence[ClientUpdate],
    w: np.ndarray,
    s: np.ndarray,
    name: str,
    shape: tuple[int, int],
    rule: str,
    trim: float,
) -> tuple[np.ndarray, np.ndarray]:
    """(robust ``rule`` of each row's change over the clients that sent the module, unsent rows voting for no
    change; coverage), in chunks of rows."""
    n_out, n_in = shape
    senders = []
    coverage = np.zeros(n_out)
    for u, wk, sk in zip(changes, w, s, strict=True):
        if name in u.modules and wk > 0:
            rows, d_rows = masked_delta(u.modules[name])
            senders.append((rows, sk * d_rows, wk))
            coverage[rows] += wk
    out = np.zeros((n_out, n_in))
    if not senders:
        return out, coverage
    weights = np.array([wk for _, _, wk in senders]).reshape(-1, 1, 1)
    step = max(1, ROBUST_CHUNK // (len(senders) * n_in))
    for r0 in range(0, n_out, step):
        r1 = min(n_out, r0 + step)
        values = np.zeros((len(senders), r1 - r0, n_in))  # unsent rows vote for no change
        for k, (rows, d_rows, _) in enumerate(senders):
            inside = (rows >= r0) & (rows < r1)
            values[k, rows[inside] - r0] = d_rows[inside]
        out[r0:r1] = robust_combine(values, weights, rule, trim)
    return out, coverage


def aggregate_head_changes(
    changes: Sequence[ClientUpdate],
    weights: Sequence[float] | np.ndarray,
    *,
    rule: str = "none",
    trim_fraction: float = 0.2,
    scales: Sequence[float] | np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Weighted mean change of each dense head tensor over the clients that sent it (only tensors with a
    positive total weight), each change discounted by its scale, as in :func:`aggregate_changes`. A robust
    ``rule`` takes that weighted statistic element by element instead."""
    w = check_weights(weights, len(changes))
    s = _check_scales(scales, len(changes))
    check_rule(rule, trim_fraction)
    out: dict[str, np.ndarray] = {}
    for key in sorted({k for u in changes for k in u.head}):
        senders = [
            (sk * np.asarray(u.head[key], np.float64), wk)
            for u, wk, sk in zip(changes, w, s, strict=True)
            if key in u.head and wk > 0
        ]
        if len({v.shape for v, _ in senders}) > 1:
            raise AggregationError(f"head {key!r}: inconsistent shapes {sorted({v.shape for v, _ in senders})}")
        total = sum(wk for _, wk in senders)
        if not total > 0:
            continue
        if rule != "none":
            stacked = np.stack([v for v, _ in senders])
            weights_k = np.array([wk for _, wk in senders]).reshape((-1,) + (1,) * (stacked.ndim - 1))
            out[key] = robust_combine(stacked, weights_k, rule, trim_fraction)
        else:
            out[key] = sum(wk * v for v, wk in senders) / total
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


def aggregate_buffer(
    cluster_states: Sequence[ClusterState],
    changes: Sequence[ClientUpdate],
    current_version: int,
    staleness_exponent: float,
    memberships: Mapping[str, np.ndarray] | None = None,
    server_lr: float = 1.0,
    *,
    rule: str = "none",
    trim_fraction: float = 0.2,
    clip_scales: Sequence[float] | np.ndarray | None = None,
) -> list[ClusterState]:
    """One FedBuff flush of ``changes`` over K cluster states (K = 1 for plain FedBuff); inputs are not modified.

    Change k weighs w_kc = n_k · p_kc in cluster c (p = 1 when ``memberships`` is None) and is discounted by
    s(τ_k) = (1 + τ_k) ** -a, τ_k = current − base version. Per cluster and row: ΔW_c[i] += η · g_c[i] with
    g_c[i] = Σ_k w_kc s(τ_k) δ_k[i] / Σ_k w_kc over the clients that sent row i (:func:`aggregate_changes`);
    rows nobody sent stay bit for bit. The head: head_c += η · its g_c. η = ``server_lr`` (> 0). With fresh
    changes (τ = 0) g is the weighted mean change, so η = 1 with every change from the current model gives
    the weighted mean of the trained models. A module the state lacks starts from zero (version 0 is ΔW = 0);
    a head tensor it lacks starts at g (nothing had a head to move from: η does not apply). With a robust
    ``rule`` g is that weighted statistic (samples capped at the buffer's median count: :func:`fedhft.
    broker_server.robust.capped_samples`). ``clip_scales`` (one per change, in (0, 1]) shrink changes further.
    """
    if not cluster_states:
        raise AggregationError("need at least one cluster state")
    if not np.isfinite(server_lr) or server_lr <= 0:
        raise AggregationError(f"server_lr must be > 0, got {server_lr}")
    check_rule(rule, trim_fraction)
    samples = np.array([u.num_samples for u in changes], dtype=np.float64)
    if rule != "none":
        samples = capped_samples(samples)
    scales = _check_scales(clip_scales, len(changes)) * np.array(
        [staleness_weight(current_version, u.base_version, staleness_exponent) for u in changes],
        dtype=np.float64,
    )
    p = _membership_matrix(changes, memberships, len(cluster_states))
    new_states = []
    for c, state in enumerate(cluster_states):
        w = samples * p[:, c]
        modules = {k: np.array(v, dtype=np.float64) for k, v in state.modules.items()}
        for name, m in aggregate_changes(changes, w, rule=rule, trim_fraction=trim_fraction, scales=scales).items():
            dw = modules.setdefault(name, np.zeros(m.change.shape))
            if dw.shape != m.change.shape:
                raise AggregationError(f"module {name!r}: state has shape {dw.shape}, changes {m.change.shape}")
            hit = m.covered
            dw[hit] += server_lr * m.change[hit]
        head = {k: np.array(v, dtype=np.float64) for k, v in state.head.items()}
        for key, g in aggregate_head_changes(changes, w, rule=rule, trim_fraction=trim_fraction, scales=scales).items():
            if key not in head:
                head[key] = g
            elif head[key].shape != g.shape:
                raise AggregationError(f"head {key!r}: state has shape {head[key].shape}, changes {g.shape}")
            else:
                head[key] = head[key] + server_lr * g
        new_states.append(ClusterState(modules=modules, head=head))
    return new_states
