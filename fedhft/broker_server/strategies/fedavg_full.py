"""``fedavg-full``: FedAvg of full fine-tuning. Clients send ``<param>.delta`` for every parameter; the state is
the global Δθ (:mod:`fedhft.broker_server.full_aggregation` has the math) and every client's model is that one
Δθ, published once per version. Devices upload trained − received, FedBuff's change already, so this strategy
needs no earlier version (``needs_received`` False)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedhft.broker_server.aggregation import ClusterState
from fedhft.broker_server.aggregation_inputs import DenseUpdate
from fedhft.broker_server.full_aggregation import aggregate_full, full_model_tensors
from fedhft.broker_server.strategies.base import Aggregated, Flush, Strategy, SvdOf
from fedhft.protocol.tensor_names import dense_deltas


class FedAvgFull(Strategy):
    """Staleness-discounted, sample-weighted mean of dense parameter deltas added to the global Δθ."""

    name = "fedavg-full"
    training = "full"
    shared_model = True
    needs_received = False

    def to_update(
        self, client_id: str, num_samples: int, base_version: int, tensors: Mapping[str, np.ndarray]
    ) -> DenseUpdate:
        return DenseUpdate(num_samples, base_version, dense_deltas(tensors))

    def aggregate(self, states: Sequence[ClusterState], updates: Sequence[DenseUpdate], flush: Flush) -> Aggregated:
        s = self.settings
        return Aggregated([aggregate_full(states[0], updates, flush.version, s.staleness_exponent, s.server_lr)])

    def delta(self, state: ClusterState, name: str) -> np.ndarray | None:
        return None  # no low-rank modules: Δθ is the model itself

    def model_tensors(
        self, state: ClusterState, ranks: Mapping[str, int], version: int, svd: SvdOf
    ) -> dict[str, np.ndarray]:
        """``<p>.delta`` = Δθ for every parameter of the spec, whatever the ranks."""
        return full_model_tensors(state, self.spec.full_params)
