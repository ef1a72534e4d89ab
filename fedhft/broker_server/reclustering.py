"""Re-estimating soft cluster memberships from the clients' heads (numpy only, pure functions, no I/O).

Every client with a known head is summarized by ``signature(head - global head)`` (the global head is the
cluster heads mixed by the prior), reduced by PCA to a few dimensions, and a diagonal GMM (K fixed, or chosen
by BIC) gives soft memberships, aligned to the previous cluster order and damped by hysteresis. When K changes,
each new cluster starts from the old clusters mixed by its members' old memberships.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedhft.broker_server.aggregation import ClusterState
from fedhft.broker_server.aggregation_inputs import ClientUpdate
from fedhft.broker_server.cluster_mixing import align_state_keys, personalized_delta, resplit_states, snap_one_hot
from fedhft.broker_server.clustering import (
    align_clusters,
    choose_k_bic,
    gmm_fit,
    pca,
    signature,
    update_memberships,
)
from fedhft.broker_server.validation import GlobalSpec

Head = Mapping[str, np.ndarray]


def reference_head(
    states: Sequence[ClusterState], prior: np.ndarray, heads: Mapping[str, Head]
) -> dict[str, np.ndarray]:
    """The global head: cluster heads mixed by ``prior`` (uniform when it does not fit the states), or the mean of
    the clients' ``heads`` when the states have none."""
    if all(s.head for s in states):
        mix = prior if prior.shape == (len(states),) else np.full(len(states), 1 / len(states))
        return personalized_delta(states, mix).head
    values = list(heads.values())
    return {k: np.mean([h[k] for h in values], axis=0) for k in values[0]} if values else {}


def recluster(
    states: list[ClusterState],
    heads: Mapping[str, Head],
    ids: Sequence[str],
    memberships: Mapping[str, np.ndarray],
    prior: np.ndarray,
    spec: GlobalSpec,
    *,
    clusters: int | None,
    max_clusters: int,
    pca_dims: int,
    hysteresis: float,
    seed: int,
) -> tuple[list[ClusterState], dict[str, np.ndarray]] | None:
    """(states, memberships) from the head signatures of clients ``ids`` (K = ``clusters``, or by BIC up to
    ``max_clusters`` when None); None when there are too few clients. ``prior`` is the mean membership over the
    current K clusters, the membership of a client that has none."""
    if len(ids) < 2:
        return None
    ref = reference_head(states, prior, heads)
    x = np.stack([signature(ClientUpdate(cid, 1, 0, {}, dict(heads[cid])), reference_head=ref) for cid in ids])
    xp = pca(x, min(pca_dims, len(ids) - 1))
    if clusters is None:
        choice = choose_k_bic(xp, k_max=min(max_clusters, len(ids)), seed=seed)
        k, resp = choice.k, choice.model.resp
    else:
        if len(ids) < clusters:
            return None
        k, resp = clusters, gmm_fit(xp, clusters, seed=seed).resp
    resp = snap_one_hot(resp)
    if k == len(states):
        resp = damped(ids, resp, memberships, hysteresis)
        kept = {cid: p for cid, p in memberships.items() if cid not in ids and p.shape == (k,)}
        return states, kept | {cid: resp[i] for i, cid in enumerate(ids)}
    old = np.stack([_membership(memberships, cid, prior) for cid in ids])  # aggregation keeps K: k_old == len(prior)
    new_states = align_state_keys(resplit_states(states, old, resp, prior), spec)
    return new_states, {cid: resp[i] for i, cid in enumerate(ids)}


def _membership(memberships: Mapping[str, np.ndarray], client_id: str, prior: np.ndarray) -> np.ndarray:
    p = memberships.get(client_id)
    return p if p is not None and p.shape == prior.shape else prior


def damped(
    ids: Sequence[str], resp: np.ndarray, memberships: Mapping[str, np.ndarray], hysteresis: float
) -> np.ndarray:
    """``resp`` aligned to last round's cluster order, with hysteresis for clients that had a membership."""
    k = resp.shape[1]
    have = [i for i, cid in enumerate(ids) if cid in memberships and memberships[cid].shape == (k,)]
    if not have:
        return resp
    old = np.stack([memberships[ids[i]] for i in have])
    aligned = resp[:, align_clusters(old, resp[have])]
    aligned[have] = update_memberships(old, aligned[have], hysteresis)
    return aligned
