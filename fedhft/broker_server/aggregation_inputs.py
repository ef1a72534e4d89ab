"""The typed aggregation inputs: what one accepted update becomes, once, for its strategy (numpy only, no I/O).

A LoRA update is a :class:`ClientUpdate`: per module the masked slice a client uploads (the output rows it
kept, ``B_rows = B[rows]`` and its full ``A``, so the server rebuilds ΔW[rows] = B_rows @ A exactly) plus its
dense head. A full fine-tuning update is a :class:`DenseUpdate`: one δ per parameter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from fedhft.errors import FedHFTError


class AggregationError(FedHFTError, ValueError):
    """Inputs to an aggregation step that are malformed or inconsistent."""


@dataclass
class MaskedFactors:
    """One module's masked upload: dW[rows] = B_rows @ A; the other rows are unknown.

    Arrays are coerced on construction; shapes are checked by :meth:`check` (a
    :class:`ClientUpdate` checks each of its modules, naming it).
    """

    A: np.ndarray  # (r, in)
    B_rows: np.ndarray  # (k, r)
    rows: np.ndarray  # (k,) distinct ints in [0, out_features)
    out_features: int

    def __post_init__(self) -> None:
        self.A = np.asarray(self.A)
        self.B_rows = np.asarray(self.B_rows)
        self.rows = np.asarray(self.rows)

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.A.shape[1])

    def check(self, name: str = "<module>") -> None:
        """Raise AggregationError naming ``name`` unless shapes, row indices and values are valid."""
        a, b, rows = self.A, self.B_rows, self.rows
        if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
            raise AggregationError(f"module {name!r}: A must be (r, in) with r, in >= 1, got {a.shape}")
        if b.ndim != 2 or b.shape[1] != a.shape[0]:
            raise AggregationError(f"module {name!r}: B_rows must be (k, {a.shape[0]}), got {b.shape}")
        if rows.ndim != 1 or rows.shape[0] != b.shape[0]:
            raise AggregationError(f"module {name!r}: rows must be ({b.shape[0]},), got {rows.shape}")
        if rows.size and not np.issubdtype(rows.dtype, np.integer):
            raise AggregationError(f"module {name!r}: rows must be integers, got {rows.dtype}")
        if int(self.out_features) < 1:
            raise AggregationError(f"module {name!r}: out_features must be >= 1, got {self.out_features}")
        if rows.size and (rows.min() < 0 or rows.max() >= self.out_features):
            raise AggregationError(f"module {name!r}: rows must lie in [0, {self.out_features})")
        if rows.size > 1 and not (np.diff(rows) > 0).all() and np.unique(rows).size != rows.size:  # sorted: no sort
            raise AggregationError(f"module {name!r}: rows must be distinct")
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise AggregationError(f"module {name!r}: factors contain NaN or inf")


@dataclass
class ClientUpdate:
    """One client's upload: masked factors per module plus its dense classifier head."""

    client_id: str
    num_samples: int
    base_version: int  # global version the client started from
    modules: dict[str, MaskedFactors]
    head: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. head.weight (C, H), head.bias (C,)

    def __post_init__(self) -> None:
        if not self.client_id:
            raise AggregationError("client_id must be non-empty")
        if self.num_samples < 0:
            raise AggregationError(f"client {self.client_id!r}: num_samples must be >= 0")
        if self.base_version < 0:
            raise AggregationError(f"client {self.client_id!r}: base_version must be >= 0")
        for name, factors in self.modules.items():
            factors.check(name)
        self.head = {k: np.asarray(v) for k, v in self.head.items()}
        for key, value in self.head.items():
            if not np.isfinite(value).all():
                raise AggregationError(f"client {self.client_id!r}: head {key!r} contains NaN or inf")


@dataclass(frozen=True)
class DenseUpdate:
    """One client's full fine-tuning upload: parameter name -> δ (trained − received model)."""

    num_samples: int
    base_version: int
    deltas: Mapping[str, np.ndarray]
