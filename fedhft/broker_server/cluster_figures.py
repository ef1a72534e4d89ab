"""Per-cluster figures for metrics, model meta and the report: clients per cluster, hard and soft (numpy only)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ClusterFigures:
    """``hard[c]``: clients whose largest membership is c; ``soft[c]``: the sum of the clients' memberships of c."""

    hard: list[int]
    soft: list[float]

    @property
    def smallest(self) -> int:
        """The size of the smallest cluster by hard assignment (0 with no clients)."""
        return min(self.hard, default=0)

    def meta(self, cluster: int, min_size: int) -> dict[str, float | int]:
        """Model meta of ``cluster``: its hard and soft member counts, the configured minimum size and the
        smallest cluster held now."""
        return {
            "members": self.hard[cluster],
            "soft_members": round(self.soft[cluster], 4),
            "min_cluster_size": min_size,
            "smallest_cluster": self.smallest,
        }


def cluster_figures(memberships: Sequence[np.ndarray], k: int) -> ClusterFigures:
    """Hard and soft client counts of ``k`` clusters from the clients' membership vectors (each of length k)."""
    if not len(memberships):
        return ClusterFigures([0] * k, [0.0] * k)
    p = np.asarray(memberships, dtype=np.float64).reshape(len(memberships), k)  # one row per client
    hard = np.bincount(np.argmax(p, axis=1), minlength=k)
    soft = (p / np.maximum(p.sum(axis=1, keepdims=True), 1e-300)).sum(axis=0)
    return ClusterFigures([int(v) for v in hard], [float(v) for v in soft])
