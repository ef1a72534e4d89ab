"""An update as its change since the model its client trained from (FedBuff's Δ), computed on the server.

A device at version m received R = B·A at its ranks (its cluster mixture after SVD, exactly the float32
factors the server published) and the head, trained, and uploads the rows it kept of ΔW' = B'·A' and its
head'. The server rebuilds R from that version's models (:mod:`fedhft.broker_server.version_history`) and
turns the upload into δ = ΔW' − R on the sent rows, kept as factors: δ[rows] = [B'_rows, −B[rows]]·[A'; A]
(rank r' + r), and δ_head = head' − head_m. Version 0's head is the one each device exported, which the server
never sees: a head whose base model carried none changes from the client's current model's head instead, and
is taken as it is when there is none yet (the first flush that has heads).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedhft.broker_server.aggregation_inputs import AggregationError, ClientUpdate, MaskedFactors
from fedhft.protocol.tensor_names import a_name, b_name


def module_change(f: MaskedFactors, base_b: np.ndarray, base_a: np.ndarray) -> MaskedFactors:
    """The sent rows of ΔW' = B_rows·A minus those of the received R = ``base_b``·``base_a``, as factors."""
    base_b, base_a = np.asarray(base_b, np.float64), np.asarray(base_a, np.float64)
    if base_b.ndim != 2 or base_a.ndim != 2 or base_b.shape[1] != base_a.shape[0]:
        raise AggregationError(f"received factors need B (out, r), A (r, in); got {base_b.shape}, {base_a.shape}")
    if base_b.shape[0] != f.out_features or base_a.shape[1] != f.in_features:
        raise AggregationError(
            f"received factors {base_b.shape} / {base_a.shape} do not fit the update ({f.out_features}, "
            f"{f.in_features})"
        )
    rows = f.rows.astype(np.int64)
    b_rows = np.concatenate([np.asarray(f.B_rows, np.float64), -base_b[rows]], axis=1)
    a = np.concatenate([np.asarray(f.A, np.float64), base_a], axis=0)
    return MaskedFactors(A=a, B_rows=b_rows, rows=f.rows, out_features=f.out_features)


def update_change(
    update: ClientUpdate, received: Mapping[str, np.ndarray], current_head: Mapping[str, np.ndarray]
) -> ClientUpdate:
    """``update`` as its change since ``received`` (the model's wire tensors its client got at its base
    version: ``<m>.A``, ``<m>.B`` at its ranks, the head when the model carried one). A module the model
    lacks changes from zero; a head tensor it lacks from ``current_head`` (else it is taken as is)."""
    modules = {}
    for name, f in update.modules.items():
        if a_name(name) in received and b_name(name) in received:
            modules[name] = module_change(f, received[b_name(name)], received[a_name(name)])
        else:
            modules[name] = f
    head = {}
    for key, value in update.head.items():
        base = received.get(key, current_head.get(key))
        v = np.asarray(value, np.float64)
        if base is not None and np.shape(base) != v.shape:
            raise AggregationError(f"head {key!r}: update has shape {v.shape}, its base {np.shape(base)}")
        head[key] = v if base is None else v - np.asarray(base, np.float64)
    return ClientUpdate(update.client_id, update.num_samples, update.base_version, modules, head)
