"""A test-only aggregation strategy, registered without touching fedhft: ``FEDHFT_STRATEGIES=
"fedavg-uniform=tests.support.strategies_example:UniformFedAvg"``. The whole method is this file (see
fedhft.broker_server.strategies)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedhft.broker_server.aggregation_inputs import ClientUpdate
from fedhft.broker_server.strategies.fedavg import FedAvg


class UniformFedAvg(FedAvg):
    """FedAvg of LoRA factors (and heads) that weighs every client the same, whatever its sample count."""

    name = "fedavg-uniform"

    def to_update(
        self, client_id: str, num_samples: int, base_version: int, tensors: Mapping[str, np.ndarray]
    ) -> ClientUpdate:
        return super().to_update(client_id, 1, base_version, tensors)
