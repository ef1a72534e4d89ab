"""Poisoning bounds around any strategy whose class says ``supports_robust``.

:class:`RobustBounds` is that strategy with a robust rule and/or clipping. The rule (:mod:`fedhft.broker_server.
robust`) swaps the weighted mean (ΔW rows and head) for a coordinate-wise weighted trimmed mean or median over
the clients that sent the module, over their changes, a client that did not send a row voting for no change,
with samples capped at the buffer's median. Clipping shrinks every flushed change whose norm (its deviation
from the model its client trained from) exceeds ``clip_multiple`` x the median norm (this buffer and the
coordinator's recently flushed updates), down to the bound. The inner strategy applies both through :class:`~fedhft.
broker_server.strategies.base.Bounds`; everything else is the inner one's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np

from fedhft.broker_server.aggregation import ClusterState
from fedhft.broker_server.cluster_mixing import head_mixture
from fedhft.broker_server.robust import RobustError, check_rule, clip_bound, clip_scales
from fedhft.broker_server.strategies.base import (
    Aggregated,
    AggregationInput,
    Bounds,
    Flush,
    Received,
    Rejection,
    Strategy,
    SvdOf,
)


class RobustBounds(Strategy):
    """``inner`` with a robust ``rule`` and/or clipping at ``clip_multiple`` (None: no clipping)."""

    def __init__(
        self, inner: Strategy, rule: str = "none", trim_fraction: float = 0.2, clip_multiple: float | None = None
    ) -> None:
        if not inner.supports_robust:
            raise RobustError(f"strategy {inner.name} does not support robust rules or clipping")
        check_rule(rule, trim_fraction)
        super().__init__(inner.spec, inner.settings)
        self.inner = inner
        self.rule, self.trim_fraction, self.clip_multiple = rule, trim_fraction, clip_multiple
        self.name, self.training = inner.name, inner.training
        self.accepts_masked, self.supports_robust = inner.accepts_masked, inner.supports_robust
        self.clusters, self.shared_model = inner.clusters, inner.shared_model
        self.needs_received = inner.needs_received

    def aggregate(
        self, states: Sequence[ClusterState], updates: Sequence[AggregationInput], flush: Flush
    ) -> Aggregated:
        norms, scales = self._clip(states, updates, flush)
        bounds = Bounds(self.rule, self.trim_fraction, scales)
        out = self.inner.aggregate(states, updates, replace(flush, bounds=bounds))
        clipped = 0 if scales is None else int((scales < 1.0).sum())
        return replace(out, update_norms=norms, clipped=clipped)

    def _clip(
        self, states: Sequence[ClusterState], updates: Sequence[AggregationInput], flush: Flush
    ) -> tuple[list[float], np.ndarray | None]:
        """(deviations, clip scales) under clip_multiple, ([], None) without it: each update's change norm since
        the model it trained from, and the scale that brings it down to multiple x the median deviation of this
        buffer and the recently flushed ones."""
        if self.clip_multiple is None:
            return [], None
        heads: dict[bytes, dict[str, np.ndarray]] = {}
        norms = []
        for u, received in zip(updates, flush.received, strict=True):
            p = None if flush.memberships is None else flush.memberships[u.client_id]
            key = b"" if p is None else p.tobytes()
            if key not in heads:
                heads[key] = head_mixture(states, p)
            norms.append(self.inner.deviation(u, received, heads[key]))
        return norms, clip_scales(norms, clip_bound([*flush.recent_norms, *norms], self.clip_multiple))

    # ---- the inner strategy's -----------------------------------------------------------------------------------
    def initial_state(self) -> ClusterState:
        return self.inner.initial_state()

    def update_problem(self, tensors: Mapping[str, np.ndarray]) -> Rejection | None:
        return self.inner.update_problem(tensors)

    def to_update(
        self, client_id: str, num_samples: int, base_version: int, tensors: Mapping[str, np.ndarray]
    ) -> AggregationInput:
        return self.inner.to_update(client_id, num_samples, base_version, tensors)

    def deviation(self, update: AggregationInput, received: Received, current_head: Mapping[str, np.ndarray]) -> float:
        return self.inner.deviation(update, received, current_head)

    def module_names(self, state: ClusterState) -> list[str]:
        return self.inner.module_names(state)

    def delta(self, state: ClusterState, name: str) -> np.ndarray | None:
        return self.inner.delta(state, name)

    def model_tensors(
        self, state: ClusterState, ranks: Mapping[str, int], version: int, svd: SvdOf
    ) -> dict[str, np.ndarray]:
        return self.inner.model_tensors(state, ranks, version, svd)
