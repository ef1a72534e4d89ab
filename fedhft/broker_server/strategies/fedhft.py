"""``fedhft``: FedBuff over masked ΔW rows with clustering, re-factored by SVD to each client's ranks.

A flush turns each update into its change since the model its client received (δ = ΔW' − R on the rows it
sent, the head's too: :mod:`fedhft.broker_server.changes`) and adds, per cluster and row, the server lr times
the staleness-discounted mean change over the clients that sent that row (samples x membership weights);
rows nobody sent keep their value (:func:`fedhft.broker_server.aggregation.aggregate_buffer`). A client's
model is its membership mixture of the cluster states, factored by truncated SVD at its planned ranks
(:mod:`fedhft.broker_server.svd`). Poisoning bounds apply to the changes (robust rules, clipping by norm).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from fedhft.broker_server.aggregation import ClusterState, aggregate_buffer, change_norm
from fedhft.broker_server.aggregation_inputs import AggregationError, ClientUpdate
from fedhft.broker_server.changes import update_change
from fedhft.broker_server.cluster_mixing import align_state_keys, head_mixture
from fedhft.broker_server.strategies.base import Aggregated, Flush, LoraStrategy, Received, SvdOf
from fedhft.broker_server.svd import module_seed, split_factors


class FedHFT(LoraStrategy):
    """Masked ΔW rows as changes, SVD per client rank, soft clusters."""

    name = "fedhft"
    accepts_masked = True
    supports_robust = True
    clusters = True

    def aggregate(self, states: Sequence[ClusterState], updates: Sequence[ClientUpdate], flush: Flush) -> Aggregated:
        bounds = flush.bounds
        new = aggregate_buffer(
            list(states),
            self.changes(states, updates, flush),
            flush.version,
            self.settings.staleness_exponent,
            flush.memberships,
            self.settings.server_lr,
            rule=bounds.rule,
            trim_fraction=bounds.trim_fraction,
            clip_scales=bounds.clip_scales,
        )
        return Aggregated(align_state_keys(new, self.spec))

    def changes(
        self, states: Sequence[ClusterState], updates: Sequence[ClientUpdate], flush: Flush
    ) -> list[ClientUpdate]:
        """Every update as its change since the model it trained from (``flush.received``)."""
        if len(flush.received) != len(updates):
            raise AggregationError(f"need the received model of each of {len(updates)} updates")
        out = []
        for u, received in zip(updates, flush.received, strict=True):
            p = None if flush.memberships is None else flush.memberships[u.client_id]
            out.append(self.change(u, received, lambda p=p: head_mixture(states, p)))
        return out

    def change(
        self, update: ClientUpdate, received: Received, current_head: Callable[[], Mapping[str, np.ndarray]]
    ) -> ClientUpdate:
        """``update`` minus the model ``received`` at its ranks; ``current_head()``, the client's current head,
        stands in for a received model without one (asked only then)."""
        tensors = received.tensors({name: f.rank for name, f in update.modules.items()})
        missing = any(k not in tensors for k in update.head)
        return update_change(update, tensors, current_head() if missing else {})

    def deviation(self, update: ClientUpdate, received: Received, current_head: Mapping[str, np.ndarray]) -> float:
        """The norm of its change (sent ΔW rows and head) since the model it trained from."""
        return change_norm(self.change(update, received, lambda: current_head))

    def factors(
        self, state: ClusterState, name: str, rank: int, version: int, svd: SvdOf
    ) -> tuple[np.ndarray, np.ndarray]:
        """The first ``rank`` SVD components of the model's ΔW (dead ones revived, seeded by version)."""
        u, s, vt = svd(name)
        return split_factors(u, s, vt, rank, module_seed(self.settings.seed + version, name))
