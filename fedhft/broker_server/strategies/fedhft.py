"""``fedhft``: masked ΔW aggregation with clustering, re-factored by SVD to each client's ranks.

Each row of a cluster's ΔW is the weighted mean of that row over the clients that sent it (samples x staleness
x membership); rows nobody sent keep their value (:func:`fedhft.broker_server.aggregation.aggregate_buffer`). A
client's model is its membership mixture of the cluster states, factored by truncated SVD at its planned ranks
(:mod:`fedhft.broker_server.svd`). Poisoning bounds apply (robust rules, clipping by deviation).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedhft.broker_server.aggregation import ClusterState, aggregate_buffer, deviation_norm
from fedhft.broker_server.aggregation_inputs import ClientUpdate
from fedhft.broker_server.cluster_mixing import align_state_keys
from fedhft.broker_server.strategies.base import Aggregated, Flush, LoraStrategy, SvdOf
from fedhft.broker_server.svd import module_seed, split_factors


class FedHFT(LoraStrategy):
    """Masked ΔW rows, SVD per client rank, soft clusters."""

    name = "fedhft"
    accepts_masked = True
    supports_robust = True
    clusters = True

    def aggregate(self, states: Sequence[ClusterState], updates: Sequence[ClientUpdate], flush: Flush) -> Aggregated:
        bounds = flush.bounds
        new = aggregate_buffer(
            list(states),
            updates,
            flush.version,
            self.settings.staleness_exponent,
            flush.memberships,
            self.settings.server_lr,
            rule=bounds.rule,
            trim_fraction=bounds.trim_fraction,
            clip_scales=bounds.clip_scales,
        )
        return Aggregated(align_state_keys(new, self.spec))

    def deviation(self, update: ClientUpdate, model: ClusterState) -> float:
        """Its sent ΔW rows and head minus those of ``model``, as one vector's norm."""
        return deviation_norm(update, model.modules, model.head)

    def factors(
        self, state: ClusterState, name: str, rank: int, version: int, svd: SvdOf
    ) -> tuple[np.ndarray, np.ndarray]:
        """The first ``rank`` SVD components of the model's ΔW (dead ones revived, seeded by version)."""
        u, s, vt = svd(name)
        return split_factors(u, s, vt, rank, module_seed(self.settings.seed + version, name))
