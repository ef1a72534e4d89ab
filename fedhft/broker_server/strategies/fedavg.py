"""``fedavg``: FedAvg of the LoRA factors A and B (dense uploads only), kept in factor space.

The state holds global factors per module, ``<m>.A`` (R x in) and ``<m>.B`` (out x R); a flush adds to each
module's first c components the server lr times the staleness-discounted, sample-weighted mean change of the
clients' zero-padded factors since the global factors they trained from, and a client's model is the first r_k
components (:mod:`fedhft.broker_server.factor_aggregation` has the math and the version-0 factors).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from fedhft.broker_server.aggregation import ClusterState, aggregate_buffer, staleness_weight
from fedhft.broker_server.aggregation_inputs import AggregationError, ClientUpdate
from fedhft.broker_server.changes import update_change
from fedhft.broker_server.factor_aggregation import LoraFactors, dense_factors, initial_factors, padded_change
from fedhft.broker_server.strategies.base import Aggregated, Flush, LoraStrategy, SvdOf
from fedhft.broker_server.svd import module_seed
from fedhft.protocol.tensor_names import a_name, b_name, module_names


class FedAvg(LoraStrategy):
    """FedAvg of LoRA factors: B̄·Ā, not the mean of B_k·A_k."""

    name = "fedavg"

    def weights(self, factors: Sequence[LoraFactors], base: np.ndarray) -> np.ndarray:
        """Unnormalized weights of the senders of one module: ``base`` (samples x staleness)."""
        return np.asarray(base, dtype=np.float64)

    def module_names(self, state: ClusterState) -> list[str]:
        """Modules someone has sent (those the state holds)."""
        return [m for m in module_names(state.modules) if m in self.spec.modules]

    def global_factors(self, state: ClusterState, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(A (R, in), B (out, R)) of module ``name``: the state's, or version 0's when it has none."""
        if a_name(name) in state.modules:
            return state.modules[a_name(name)], state.modules[b_name(name)]
        return initial_factors(self.spec.modules[name], module_seed(self.settings.seed, name))

    def factors(
        self, state: ClusterState, name: str, rank: int, version: int, svd: SvdOf
    ) -> tuple[np.ndarray, np.ndarray]:
        """(B, A) of a client with rank ``rank``: the first ``rank`` components."""
        a, b = self.global_factors(state, name)
        return b[:, :rank].copy(), a[:rank].copy()

    def delta(self, state: ClusterState, name: str) -> np.ndarray:
        """The global ΔW = B·A of module ``name``."""
        a, b = self.global_factors(state, name)
        return b @ a

    def aggregate(self, states: Sequence[ClusterState], updates: Sequence[ClientUpdate], flush: Flush) -> Aggregated:
        """The state after one flush of ``updates`` as changes (dense; inputs are not modified)."""
        if len(flush.received) != len(updates):
            raise AggregationError(f"need the received model of each of {len(updates)} updates")
        state = states[0]  # no clustering: one state
        exponent, server_lr = self.settings.staleness_exponent, self.settings.server_lr
        samples = np.array([u.num_samples for u in updates], dtype=np.float64)
        discounts = np.array([staleness_weight(flush.version, u.base_version, exponent) for u in updates])
        modules = {k: np.array(v, dtype=np.float64) for k, v in state.modules.items()}
        for name in sorted({n for u in updates for n in u.modules}):
            senders = [k for k, u in enumerate(updates) if name in u.modules]
            factors = [dense_factors(updates[k].modules[name]) for k in senders]
            weights = self.weights(factors, samples[senders])
            if not weights.sum() > 0:
                continue
            c = max(f.rank for f in factors)
            bases = [flush.received[k].tensors({name: c}) for k in senders]
            change = padded_change(
                factors, [LoraFactors(A=t[a_name(name)], B=t[b_name(name)]) for t in bases], weights, discounts[senders]
            )
            a, b = (np.array(x, dtype=np.float64) for x in self.global_factors(state, name))
            a[:c] += server_lr * change.A
            b[:, :c] += server_lr * change.B
            modules[a_name(name)], modules[b_name(name)] = a, b
        heads = [
            update_change(replace(u, modules={}), r.tensors({}), state.head)
            for u, r in zip(updates, flush.received, strict=True)
        ]
        (head_state,) = aggregate_buffer(
            [ClusterState({}, state.head)], heads, flush.version, exponent, None, server_lr
        )
        return Aggregated([ClusterState(modules=modules, head=head_state.head)])
