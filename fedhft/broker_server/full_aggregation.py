"""Math of the ``fedavg-full`` strategy: FedAvg of full fine-tuning (pure numpy, no I/O).

Every client trains every weight and uploads, per parameter ``p``, ``<p>.delta`` = its trained value minus
the value of the model it received: already FedBuff's change, so the server needs no earlier version. It keeps
the global Δθ from the exported initial weights (the same on every client: no clustering, no masks, no
factors). A flush, per parameter, over the updates that carry it: Δθ ← Δθ + η · Σ_k n_k s_k δ_k / Σ_k n_k
with n_k the samples, s_k = (1 + τ_k) ** -a the FedBuff staleness discount (outside the normalization: a
stale update alone moves Δθ by η s_k δ_k) and η the server lr. With η = 1 and fresh updates this is FedAvg:
the new model is the sample-weighted mean of the clients' trained models. Version 0 is Δθ = 0 (the exported
weights).

Models carry ``<p>.delta`` = Δθ for every parameter, in float32; a device loads initial + Δθ.

Persistence: the state is a :class:`ClusterState` whose ``modules`` map parameter names to Δθ (float64), so
the state store commits it like the other aggregators' states.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedhft.broker_server.aggregation import ClusterState, staleness_weight
from fedhft.broker_server.aggregation_inputs import AggregationError, DenseUpdate
from fedhft.protocol.tensor_names import delta_name


def aggregate_full(
    state: ClusterState,
    updates: Sequence[DenseUpdate],
    current_version: int,
    staleness_exponent: float,
    server_lr: float = 1.0,
) -> ClusterState:
    """The state after one flush: Δθ_p + η · (discounted weighted mean of δ_p over the updates carrying p).

    Inputs are not modified; a parameter no update carries keeps its value. AggregationError on a shape that
    differs from the state's or another update's, on non-finite values, or on a bad weight or server lr.
    """
    if not np.isfinite(server_lr) or server_lr <= 0:
        raise AggregationError(f"server_lr must be > 0, got {server_lr}")
    weights = np.array([u.num_samples for u in updates], dtype=np.float64)
    discounts = [staleness_weight(current_version, u.base_version, staleness_exponent) for u in updates]
    if not np.isfinite(weights).all() or (weights < 0).any():
        raise AggregationError("update weights must be finite and >= 0")
    modules = {k: np.array(v, dtype=np.float64) for k, v in state.modules.items()}
    for name in sorted({n for u in updates for n in u.deltas}):
        senders = [
            (np.asarray(u.deltas[name]), w, d)
            for u, w, d in zip(updates, weights, discounts, strict=True)
            if name in u.deltas
        ]
        total = sum(w for _, w, _ in senders)
        if not total > 0:
            continue
        shape = modules[name].shape if name in modules else senders[0][0].shape
        acc = np.zeros(shape)
        for delta, w, d in senders:
            if delta.shape != shape:
                raise AggregationError(f"parameter {name!r}: delta of shape {delta.shape}, expected {shape}")
            if not np.isfinite(delta).all():
                raise AggregationError(f"parameter {name!r}: delta contains NaN or inf")
            acc += (w * d / total) * delta.astype(np.float64)
        modules[name] = modules.get(name, 0.0) + server_lr * acc
    return ClusterState(modules=modules, head={})


def full_model_tensors(state: ClusterState, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Model wire tensors: ``<p>.delta`` = the global Δθ of every parameter in ``shapes`` (zero if never sent)."""
    out = {}
    for name, shape in shapes.items():
        value = state.modules.get(name)
        out[delta_name(name)] = (
            np.zeros(shape, dtype=np.float32) if value is None else np.asarray(value, dtype=np.float32)
        )
    return out
