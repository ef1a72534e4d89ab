"""Re-estimating soft cluster memberships from the clients' signatures (numpy only, pure functions, no I/O).

A client's signature (:data:`SIGNATURES`) is its head minus the global head (the cluster heads mixed by the
prior), a fixed random sketch of its uploaded ΔW rows, or both; signatures are reduced by PCA to a few
dimensions and a diagonal GMM (K fixed, or chosen by BIC in a range; every cluster at least a minimum size,
:mod:`fedhft.broker_server.cluster_fit`) gives memberships, floored so they stay soft, aligned to the previous
cluster order and damped by hysteresis. When K changes, each new cluster starts from the old clusters mixed by
its members' old memberships.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedhft.broker_server.aggregation import ClusterState
from fedhft.broker_server.aggregation_inputs import ClientUpdate
from fedhft.broker_server.cluster_fit import ClusterFit, fit_clusters, soften
from fedhft.broker_server.cluster_mixing import align_state_keys, personalized_delta, resplit_states
from fedhft.broker_server.clustering import ClusteringError, align_clusters, pca, signature, update_memberships
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


SIGNATURES = ("head", "delta", "both")  # what a client's clustering signature is made of


@dataclass(frozen=True)
class ClusterSettings:
    """How clients are clustered: the clustering fields of :class:`~fedhft.broker_server.federation.FederationConfig`
    (same names)."""

    clusters: int | None  # None: K by BIC in min_clusters..max_clusters
    min_clusters: int
    max_clusters: int
    min_cluster_size: int  # fewest clients a cluster may hold (hard assignment)
    membership_floor: float  # :func:`fedhft.broker_server.cluster_fit.soften`
    cluster_signature: str  # one of SIGNATURES
    pca_dims: int
    hysteresis: float
    seed: int

    def problems(self) -> list[str]:
        """What is wrong with these settings (empty when nothing is)."""
        problems = []
        if self.clusters is not None and self.clusters < 1:
            problems.append(f"clusters must be >= 1 or auto, got {self.clusters}")
        if not 1 <= self.min_clusters <= self.max_clusters:
            problems.append(f"need 1 <= min clusters <= max clusters, got {self.min_clusters}..{self.max_clusters}")
        if self.min_cluster_size < 1:
            problems.append(f"min cluster size must be >= 1, got {self.min_cluster_size}")
        if not (math.isfinite(self.membership_floor) and 0 <= self.membership_floor < 1):
            problems.append(f"membership floor must lie in [0, 1), got {self.membership_floor}")
        if self.cluster_signature not in SIGNATURES:
            sig = self.cluster_signature
            problems.append(f"cluster signature must be one of {', '.join(SIGNATURES)}, got {sig!r}")
        if not 0 <= self.hysteresis <= 1:
            problems.append(f"hysteresis must lie in [0, 1], got {self.hysteresis}")
        return problems


def delta_sketch(update: ClientUpdate, projection_dim: int = 64, seed: int = 0) -> np.ndarray | None:
    """The unit-norm random sketch of the client's uploaded ΔW rows (:func:`signature` without the head), or None
    when the update has no modules."""
    if not update.modules:
        return None
    return signature(ClientUpdate(update.client_id, 1, 0, dict(update.modules), {}), projection_dim, seed)


def client_signatures(
    source: str,
    clients: Iterable[str],
    heads: Mapping[str, Head],
    sketches: Mapping[str, np.ndarray],
    states: Sequence[ClusterState],
    prior: np.ndarray,
) -> tuple[list[str], np.ndarray]:
    """(ids, (n, d) signatures) of the ``clients`` that have what ``source`` needs, sorted: the head minus the
    global head (:func:`reference_head`) for "head", the ΔW sketch (:func:`delta_sketch`) for "delta", both side
    by side for "both", each block centered and scaled to unit mean squared norm so that neither outweighs the
    other in the PCA."""
    if source not in SIGNATURES:
        raise ClusteringError(f"cluster signature must be one of {', '.join(SIGNATURES)}, got {source!r}")
    use_head, use_delta = source in ("head", "both"), source in ("delta", "both")
    ids = sorted(c for c in clients if (not use_head or c in heads) and (not use_delta or c in sketches))
    if not ids:
        return [], np.zeros((0, 0))
    parts = []
    if use_head:
        ref = reference_head(states, prior, heads)
        parts.append(np.stack([signature(ClientUpdate(c, 1, 0, {}, dict(heads[c])), reference_head=ref) for c in ids]))
    if use_delta:
        parts.append(np.stack([sketches[c] for c in ids]))
    if len(parts) == 1:
        return ids, parts[0]
    return ids, np.hstack([_standardized(b) for b in parts])


def _standardized(block: np.ndarray) -> np.ndarray:
    """Rows centered, then scaled so their mean squared norm is 1 (unchanged when they are all equal)."""
    centered = block - block.mean(0)
    rms = float(np.sqrt((centered**2).sum(1).mean()))
    return centered / rms if rms > 0 else centered


@dataclass
class Reclustered:
    """New cluster states and memberships, and the K fit behind them (its ``note`` says when K fell back)."""

    states: list[ClusterState]
    memberships: dict[str, np.ndarray]
    fit: ClusterFit


def recluster(
    states: list[ClusterState],
    x: np.ndarray,
    ids: Sequence[str],
    memberships: Mapping[str, np.ndarray],
    prior: np.ndarray,
    spec: GlobalSpec,
    settings: ClusterSettings,
) -> Reclustered | None:
    """(states, memberships) from the signatures ``x`` (one row per client of ``ids``): K = ``settings.clusters``,
    or by BIC in min_clusters..max_clusters when None, every cluster holding >= ``min_cluster_size`` clients (else
    a smaller K, merged); memberships softened by ``membership_floor``. None with fewer than two clients (or
    than a fixed K). ``prior`` is the mean membership over the current K clusters, the membership of a client
    that has none."""
    cfg = settings
    if len(ids) < max(2, cfg.clusters or 1):
        return None
    xp = pca(x, min(cfg.pca_dims, len(ids) - 1))
    k_min, k_max = (cfg.min_clusters, cfg.max_clusters) if cfg.clusters is None else (cfg.clusters, cfg.clusters)
    fit = fit_clusters(xp, k_min=k_min, k_max=k_max, min_size=cfg.min_cluster_size, seed=cfg.seed)
    k, resp = fit.k, soften(fit.resp, cfg.membership_floor)
    if k == len(states):
        resp = damped(ids, resp, memberships, cfg.hysteresis)
        kept = {cid: p for cid, p in memberships.items() if cid not in ids and p.shape == (k,)}
        return Reclustered(states, kept | {cid: resp[i] for i, cid in enumerate(ids)}, fit)
    old = np.stack([_membership(memberships, cid, prior) for cid in ids])  # aggregation keeps K: k_old == len(prior)
    new_states = align_state_keys(resplit_states(states, old, resp, prior), spec)
    return Reclustered(new_states, {cid: resp[i] for i, cid in enumerate(ids)}, fit)


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
