"""Mixing cluster states by soft memberships (numpy only, pure functions, no I/O).

A client with membership p over K clusters has the personalized model Σ_c p_c · state_c (ΔW and head); when
K changes, each new cluster starts from the old ones mixed by its members' old memberships.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedhft.broker_server.aggregation import AggregationError, ClusterState
from fedhft.broker_server.clustering import init_cluster_states
from fedhft.broker_server.validation import GlobalSpec

ONE_HOT_SNAP = 1e-9  # memberships within this of one-hot are treated as one-hot (shared factorization)


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


def mixture_of(states: Sequence[ClusterState], membership: np.ndarray | None) -> ClusterState:
    """The model of a client with ``membership``: the state itself when it is one-hot (or None with one
    cluster), else :func:`personalized_delta`."""
    if membership is None:
        return states[0]
    hot = np.flatnonzero(membership == 1.0)
    if hot.size == 1 and np.count_nonzero(membership) == 1:
        return states[int(hot[0])]
    return personalized_delta(states, membership)


def head_mixture(states: Sequence[ClusterState], membership: np.ndarray | None) -> dict[str, np.ndarray]:
    """The head of :func:`mixture_of` alone (no ΔW is mixed): the head a client with ``membership`` gets."""
    if membership is None or len(states) == 1:
        return {k: np.asarray(v, dtype=np.float64) for k, v in states[0].head.items()}
    p = np.asarray(membership, dtype=np.float64)
    p = p / p.sum()
    return {k: _mixture(p, [s.head[k] for s in states]) for k in states[0].head if all(k in s.head for s in states)}


def snap_one_hot(resp: np.ndarray) -> np.ndarray:
    """Rows within ONE_HOT_SNAP of one-hot become exactly one-hot; others are renormalized."""
    out = np.array(resp, dtype=np.float64)
    out /= out.sum(1, keepdims=True)
    near = out.max(1) >= 1.0 - ONE_HOT_SNAP
    out[near] = np.eye(out.shape[1])[out[near].argmax(1)]
    return out


def align_state_keys(states: Sequence[ClusterState], spec: GlobalSpec) -> list[ClusterState]:
    """States holding the same modules and head keys: a missing module is zero, a missing head tensor the
    mean of the clusters that have it."""
    modules = sorted({m for s in states for m in s.modules})
    heads = sorted({h for s in states for h in s.head})
    out = []
    for s in states:
        mods = {}
        for m in modules:
            spec_m = spec.modules.get(m)
            default_shape = (
                (spec_m.out_features, spec_m.in_features)
                if spec_m
                else next(t.modules[m].shape for t in states if m in t.modules)
            )
            mods[m] = s.modules[m] if m in s.modules else np.zeros(default_shape)
        head = {}
        for h in heads:
            if h in s.head:
                head[h] = s.head[h]
            else:
                head[h] = np.mean([t.head[h] for t in states if h in t.head], axis=0)
        out.append(ClusterState(modules=mods, head=head))
    return out


def resplit_states(
    states: Sequence[ClusterState], old: np.ndarray, new: np.ndarray, prior: np.ndarray
) -> list[ClusterState]:
    """K_new states from K_old ones: new cluster c starts from the old clusters mixed by its members' old
    memberships (``old`` (n, K_old), ``new`` (n, K_new)); independent copies when K_old = 1."""
    if len(states) == 1:
        return init_cluster_states(states[0], new.shape[1])
    out = []
    for c in range(new.shape[1]):
        mix = new[:, c] @ old
        out.append(personalized_delta(states, mix if mix.sum() > 0 else prior))
    return out
