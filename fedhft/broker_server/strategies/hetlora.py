"""``hetlora``: HetLoRA, FedAvg of zero-padded LoRA factors weighted by samples x ‖B_k A_k‖_F (sparsity weighting)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedhft.broker_server.factor_aggregation import LoraFactors, delta_norm
from fedhft.broker_server.strategies.fedavg import FedAvg


class HetLoRA(FedAvg):
    """As :class:`FedAvg`, each sender weighted by its update's norm too; a client's model is its rank's truncation."""

    name = "hetlora"

    def weights(self, factors: Sequence[LoraFactors], base: np.ndarray) -> np.ndarray:
        return np.asarray(base, dtype=np.float64) * np.array([delta_norm(f) for f in factors])
