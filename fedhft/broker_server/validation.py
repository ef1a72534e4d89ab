"""What the server accepts: the global adapter spec, each client's plan, and the checks on one update.

Pure functions and small dataclasses (numpy + fedhft.protocol; no I/O). For an update on the topic of a
registered client the service runs :func:`decode_checked` (full decode against that client's planned
shapes, with the reason for a rejection as a metric label) and :func:`clip_update` (L2 norm of the rebuilt
ΔW rows); when there is nothing decoded to read the seq from (unknown client, undecodable tensors) it
falls back to :func:`peek_update_header`, so even such a payload is answered on the right ack topic with
the right seq. Then, in arrival order: registration, seq (replays), :func:`check_version`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedhft.broker_server.aggregation_inputs import ClientUpdate, MaskedFactors
from fedhft.errors import FedHFTError
from fedhft.protocol import (
    BadIndices,
    MessageTooLarge,
    Misaddressed,
    MissingTensor,
    NonFiniteTensor,
    ProtocolError,
    ShapeMismatch,
    UnknownTensor,
    UnsupportedVersion,
    UpdateMessage,
    decode_update,
)
from fedhft.protocol.body import peek_header
from fedhft.protocol.envelope import KIND_UPDATE
from fedhft.protocol.manifest import Manifest
from fedhft.protocol.tensor_names import (
    a_name,
    b_rows_name,
    delta_name,
    dense_deltas,
    is_delta_name,
    lora_parts,
    module_names,
    rows_name,
)
from fedhft.protocol.topics import id_problem

# Rejection reasons (also the `reason` label of fedhft_updates_total).
UNKNOWN_CLIENT = "unknown_client"
MALFORMED = "malformed"
WRONG_SHAPE = "wrong_shape"
NON_FINITE = "non_finite"
TOO_LARGE = "too_large"
MISADDRESSED = "misaddressed"
UNSUPPORTED = "unsupported_version"
MANIFEST_MISMATCH = "manifest_mismatch"
OLD_SEQ = "old_seq"
STALE = "stale"
FUTURE_VERSION = "future_version"
REPLAY = "replay"  # reason of a "duplicate" ack
WRONG_TRAINING = "wrong_training"  # LoRA tensors where full fine-tuning deltas belong, or the reverse

TRAINING_TEXT = {"lora": "plan trains LoRA adapters", "full": "plan is full fine-tuning (every parameter)"}
MISMATCH_HINT = {
    "lora": "this server's manifest trains LoRA adapters (full fine-tuning needs a full fine-tuning manifest and "
    "--aggregator fedavg-full)",
    "full": "this server's manifest is a full fine-tuning export (--aggregator fedavg-full), which takes "
    "full fine-tuning clients only",
}
HEADER_SLACK_BYTES = 256 * 1024  # JSON header, metrics and envelope on top of the fp32 tensor bytes


class PlanRejected(FedHFTError):
    """A hello whose plan does not fit the federation's global adapter."""


@dataclass(frozen=True)
class ModuleSpec:
    """One adaptable module of the global adapter."""

    name: str
    in_features: int
    out_features: int
    max_rank: int


@dataclass(frozen=True)
class GlobalSpec:
    """The federation's global adapter: every adaptable module, the head shapes and the LoRA alpha; for a full
    fine-tuning manifest also every parameter (``full_params``: manifest name -> shape)."""

    modules: dict[str, ModuleSpec]
    head_shapes: dict[str, tuple[int, ...]]
    num_labels: int
    lora_alpha: float
    base_model_sha256: str
    full_params: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def training(self) -> str:
        """``"full"`` (full fine-tuning: clients send ``<param>.delta``) or ``"lora"``."""
        return "full" if self.full_params else "lora"

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> GlobalSpec:
        """The spec of any profile's manifest (all profiles of one export share it)."""
        modules = {
            m.name: ModuleSpec(m.name, int(m.in_features), int(m.out_features), int(m.max_rank))
            for m in manifest.global_adapter
        }
        return cls(
            modules=modules,
            head_shapes={k: tuple(int(d) for d in v) for k, v in manifest.head_shapes.items()},
            num_labels=int(manifest.num_labels),
            lora_alpha=float(manifest.lora.get("alpha", 16.0)),
            base_model_sha256=str(manifest.base_model_sha256),
            full_params=(
                {t.name: tuple(int(d) for d in t.shape) for t in manifest.trainable}
                if manifest.training == "full"
                else {}
            ),
        )

    @property
    def max_rank(self) -> int:
        return max((m.max_rank for m in self.modules.values()), default=1)

    def fingerprint(self) -> str:
        """sha256 of the spec's canonical JSON: a state dir only serves the spec it was created for."""
        doc = {
            "modules": {n: [m.in_features, m.out_features, m.max_rank] for n, m in sorted(self.modules.items())},
            "head_shapes": {k: list(v) for k, v in sorted(self.head_shapes.items())},
            "base_model_sha256": self.base_model_sha256,
        }
        if self.full_params:  # LoRA specs keep the fingerprint they always had
            doc["full_params"] = {k: list(v) for k, v in sorted(self.full_params.items())}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class ClientPlan:
    """What a client registered: its rank per adapted module and its upload mask ratio (``training`` "full":
    no modules, it sends ``<param>.delta`` for every parameter of the spec)."""

    ranks: dict[str, int]
    mask_ratio: float
    training: str = "lora"

    @classmethod
    def from_plan(cls, plan: Mapping[str, Any], spec: GlobalSpec) -> ClientPlan:
        """Module ranks from a plan's ``layers`` ({layer, rank, targets}) or an explicit ``ranks`` map.

        Raises PlanRejected naming the problem when a module is unknown or a rank is outside 1..max_rank, or
        when the plan's ``training`` ("lora" unless given) is not the spec's.
        """
        training = str(plan.get("training", "lora"))
        if training != spec.training:
            what = TRAINING_TEXT.get(training, f"plan training {training!r}")
            raise PlanRejected(f"{what}: {MISMATCH_HINT[spec.training]}")
        if training == "full":
            return cls(ranks={}, mask_ratio=1.0, training="full")
        ranks: dict[str, int] = {}
        try:
            if "ranks" in plan:
                ranks = {str(k): int(v) for k, v in dict(plan["ranks"]).items()}
            else:
                for lp in plan["layers"]:
                    for kind in lp["targets"]:
                        ranks[f"layers.{int(lp['layer'])}.{kind}"] = int(lp["rank"])
            mask_ratio = float(plan.get("mask_ratio", 1.0))
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanRejected(f"plan is not a LoRA plan with layers/ranks ({exc!s:.200})") from exc
        if not ranks:
            raise PlanRejected("plan adapts no module")
        for name, r in ranks.items():
            module = spec.modules.get(name)
            if module is None:
                raise PlanRejected(f"plan adapts module {name[:80]!r}, which is not in the global adapter")
            if not 1 <= r <= module.max_rank:
                raise PlanRejected(f"plan gives module {name!r} rank {r}, outside 1..{module.max_rank}")
        if not (math.isfinite(mask_ratio) and 0 < mask_ratio <= 1):
            raise PlanRejected(f"plan mask_ratio must lie in (0, 1], got {mask_ratio}")
        return cls(ranks=dict(sorted(ranks.items())), mask_ratio=mask_ratio)

    def update_shapes(self, spec: GlobalSpec) -> dict[str, tuple[int | None, ...]]:
        """Expected update tensors: ``<m>.A`` (r, in), ``<m>.B_rows`` (k, r), ``<m>.rows`` (k,), the head; for
        full fine-tuning ``<param>.delta`` of every parameter."""
        if self.training == "full":
            return {delta_name(name): shape for name, shape in spec.full_params.items()}
        shapes: dict[str, tuple[int | None, ...]] = {}
        for name, r in self.ranks.items():
            m = spec.modules[name]
            shapes[a_name(name)] = (r, m.in_features)
            shapes[b_rows_name(name)] = (None, r)
            shapes[rows_name(name)] = (None,)
        shapes.update(spec.head_shapes)
        return shapes

    def out_features(self, spec: GlobalSpec) -> dict[str, int]:
        return {name: spec.modules[name].out_features for name in self.ranks}

    def max_update_bytes(self, spec: GlobalSpec) -> int:
        """Upper bound of an honest update: every row (or parameter) sent, in fp32, plus header slack."""
        if self.training == "full":
            return 4 * sum(math.prod(s) for s in spec.full_params.values()) + HEADER_SLACK_BYTES
        values = sum(math.prod(s) for s in spec.head_shapes.values())
        for name, r in self.ranks.items():
            m = spec.modules[name]
            values += r * m.in_features + m.out_features * r + m.out_features
        return 4 * values + HEADER_SLACK_BYTES


@dataclass(frozen=True)
class UpdateHeader:
    """The addressing fields of an update, read without decoding its tensors."""

    task: str
    client_id: str
    seq: int


def peek_update_header(payload: bytes) -> UpdateHeader | None:
    """task, client_id and seq of an update envelope, or None when they cannot be read.

    Reads only the header at the start of the body (fedhft.protocol.body.peek_header), so it is cheap even
    for an oversized payload. Nothing here is trusted: the full decode checks everything again.
    """
    peeked = peek_header(payload, KIND_UPDATE)
    if peeked is None or peeked.fields is None:
        return None
    try:
        task, client_id, seq = peeked.fields["task"], peeked.fields["client_id"], peeked.fields["seq"]
    except KeyError:
        return None
    if id_problem(task) or id_problem(client_id):
        return None
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < 2**63:
        return None
    return UpdateHeader(task=task, client_id=client_id, seq=seq)


def reason_for(exc: ProtocolError) -> str:
    """The rejection reason (a metric label) for a decode error."""
    if isinstance(exc, NonFiniteTensor):
        return NON_FINITE
    if isinstance(exc, (ShapeMismatch, UnknownTensor, MissingTensor, BadIndices)):
        return WRONG_SHAPE
    if isinstance(exc, MessageTooLarge):
        return TOO_LARGE
    if isinstance(exc, Misaddressed):
        return MISADDRESSED
    if isinstance(exc, UnsupportedVersion):
        return UNSUPPORTED
    return MALFORMED


class UpdateRejected(FedHFTError):
    """An update the server refuses; ``reason`` is its metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def decode_checked(payload: bytes, spec: GlobalSpec, plan: ClientPlan, task: str, client_id: str) -> UpdateMessage:
    """Decode ``payload`` against the client's planned shapes; UpdateRejected with the reason otherwise."""
    limit = plan.max_update_bytes(spec)
    if len(payload) > limit:
        raise UpdateRejected(TOO_LARGE, f"payload of {len(payload)} bytes is over this client's {limit}")
    try:
        return decode_update(
            payload,
            plan.update_shapes(spec),
            max_bytes=limit,
            out_features=plan.out_features(spec),
            expected_task=task,
            expected_client_id=client_id,
        )
    except ProtocolError as exc:
        if isinstance(exc, (UnknownTensor, MissingTensor)):
            peeked = peek_header(payload, KIND_UPDATE)
            mismatch = training_mismatch(plan, peeked.tensor_names if peeked is not None else ())
            if mismatch:
                raise UpdateRejected(WRONG_TRAINING, mismatch) from exc
        raise UpdateRejected(reason_for(exc), str(exc)) from exc


def training_mismatch(plan: ClientPlan, names: Sequence[str]) -> str | None:
    """Why an update's tensor names (from its peeked header) are the other training kind than the plan's:
    dense ``<param>.delta`` from a LoRA client or LoRA tensors from a full fine-tuning client; None otherwise."""
    if not names:
        return None
    dense = [is_delta_name(n) for n in names]
    if plan.training == "full" and not any(dense):
        return "client registered full fine-tuning (<param>.delta for every parameter) but sent LoRA tensors"
    if plan.training != "full" and all(dense):
        return "client registered a LoRA plan but sent dense parameter deltas (full fine-tuning)"
    return None


def check_version(base_version: int, current: int, max_staleness: int) -> None:
    """UpdateRejected unless current - max_staleness <= base_version <= current."""
    if base_version > current:
        raise UpdateRejected(FUTURE_VERSION, f"base_version {base_version} is newer than version {current}")
    if current - base_version > max_staleness:
        raise UpdateRejected(
            STALE, f"base_version {base_version} is older than {current} - max_staleness {max_staleness}"
        )


def delta_norm(tensors: Mapping[str, np.ndarray]) -> float:
    """L2 norm of every rebuilt ΔW row, B_rows @ A, over all modules, and of every dense ``<param>.delta``.

    Uses ||B A||_F^2 = sum((B^T B) * (A A^T)), which costs r x r products instead of the k x in rows.
    """
    dense = (np.asarray(v, dtype=np.float64) for v in dense_deltas(tensors).values())
    total = sum(float(np.sum(np.square(v))) for v in dense)
    for name in module_names(tensors):
        a = np.asarray(tensors[a_name(name)], dtype=np.float32)
        b = np.asarray(tensors[b_rows_name(name)], dtype=np.float32)
        total += float(np.sum((b.T @ b).astype(np.float64) * (a @ a.T).astype(np.float64)))
    return math.sqrt(max(total, 0.0))


def scale_update(tensors: Mapping[str, np.ndarray], scale: float) -> dict[str, np.ndarray]:
    """The update with every ΔW scaled by ``scale`` (B_rows and dense deltas scaled; A and the head untouched)."""
    out = dict(tensors)
    if scale != 1.0:
        for name in module_names(tensors):
            out[b_rows_name(name)] = (np.asarray(tensors[b_rows_name(name)], np.float64) * scale).astype(np.float32)
        for name in filter(is_delta_name, tensors):
            out[name] = (np.asarray(tensors[name], np.float64) * scale).astype(np.float32)
    return out


def clip_update(tensors: dict[str, np.ndarray], clip_norm: float | None) -> tuple[dict[str, np.ndarray], float]:
    """(tensors, scale): ΔW scaled by clip_norm / norm when its L2 norm exceeds clip_norm, else as is."""
    if clip_norm is None or clip_norm <= 0:
        return tensors, 1.0
    norm = delta_norm(tensors)
    if norm <= clip_norm:
        return tensors, 1.0
    scale = clip_norm / norm
    return scale_update(tensors, scale), scale


def to_client_update(
    client_id: str, num_samples: int, base_version: int, tensors: Mapping[str, np.ndarray], spec: GlobalSpec
) -> ClientUpdate:
    """The aggregation input of one update's tensors (wire factors: ΔW[rows] = B_rows @ A exactly)."""
    parts = lora_parts(tensors)
    modules = {
        name: MaskedFactors(A=f.A, B_rows=f.B_rows, rows=f.rows, out_features=spec.modules[name].out_features)
        for name, f in parts.modules.items()
    }
    return ClientUpdate(
        client_id=client_id, num_samples=num_samples, base_version=base_version, modules=modules, head=parts.head
    )
