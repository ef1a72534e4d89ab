"""Messages of the fedhft wire protocol (plain dataclasses; message_codecs.py turns them into bytes and back).

Tensor naming convention. For each adapted module ``<m>`` (a global module name such as
``layers.5.query``; names use ``[A-Za-z0-9._-]``):

UpdateMessage (client -> server), the FedHFT masked LoRA upload:

* ``<m>.A``       float32 (r, in_features)  the client's LoRA A;
* ``<m>.B_rows``  float32 (k, r)            the k uploaded rows of the client's LoRA B;
* ``<m>.rows``    int32   (k,)              sorted unique output-row indices those rows are: the client
  uploads only the rows of ΔW = B·A with the largest norms (the FedHFT mask); 0 <= k <= out_features.

ModelMessage (server -> clients), the full adapter of one cluster or client:

* ``<m>.A``  float32 (R, in_features);
* ``<m>.B``  float32 (out_features, R).

Both may carry the classifier head ``head.weight`` float32 (num_labels, hidden) and ``head.bias`` float32
(num_labels,), always as a pair. A module's tensors always come together (A, B_rows and rows; or A and
B), with ``A.shape[0]`` equal to the rank dimension of B / B_rows.

Dense messages (full fine-tuning, the ``fedavg-full`` baseline) carry one tensor per model parameter
``<param>`` (a trainable tensor's manifest name, e.g. ``encoder.embeddings.word_embeddings.weight`` or
``head.weight``) and nothing else:

* ``<param>.delta``  float32, the parameter's shape: in an update, trained − received-model values; in a
  model, the global Δθ from the exported initial weights (the device loads initial + Δθ).

fedhft.protocol.tensor_names builds and parses these names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

ACK_STATUSES = ("accepted", "rejected", "duplicate")


@dataclass(eq=False)
class UpdateMessage:
    """Client -> server: the adapter rows a client trained from model ``base_version``."""

    task: str
    client_id: str
    seq: int  # >= 0, per-client sequence number (the server drops duplicates)
    base_version: int  # >= 0, the model version the client trained from
    num_samples: int  # > 0, local examples seen (aggregation weight)
    loss: float  # finite, mean local training loss
    metrics: dict[str, float]  # finite values
    profile: str  # device profile name
    manifest_sha256: str  # 64 lowercase hex: the export manifest the client runs
    created_at: float  # unix time
    tensors: dict[str, np.ndarray]


@dataclass(eq=False)
class ModelMessage:
    """Server -> clients: a signed adapter (full A and B) for a cluster or one client."""

    task: str
    version: int  # >= 0, monotone per target
    target: str  # "cluster/<k>" or "client/<client_id>"
    created_at: float  # unix time
    key_id: str  # fingerprint of the signing key ("" lets encode_model fill it in)
    meta: dict[str, float | int | str]
    tensors: dict[str, np.ndarray]


@dataclass
class HelloMessage:
    """Client -> server: registration with the device profile and the training plan it runs."""

    task: str
    client_id: str
    profile: str
    manifest_sha256: str
    plan: dict[str, Any]  # JSON-able
    created_at: float


@dataclass
class AckMessage:
    """Server -> client: the verdict on update ``seq``; ``version`` is the server's current model version."""

    task: str
    client_id: str
    seq: int
    status: str  # one of ACK_STATUSES
    reason: str
    version: int
