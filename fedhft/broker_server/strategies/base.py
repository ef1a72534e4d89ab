"""The strategy interface: what an aggregation method decides, as pure functions of states and typed updates.

A strategy says, in class-level capabilities, what it can serve (``training``, ``accepts_masked``,
``supports_robust``, ``clusters``, ``shared_model``, ``needs_received``) and implements: the check of an
update's wire tensors (:meth:`Strategy.update_problem`), the typed aggregation input built once per update
(:meth:`Strategy.to_update`), one flush over the cluster states (:meth:`Strategy.aggregate`, which returns new
states and changes nothing), and the model tensors of a state at a client's ranks (:meth:`Strategy.
model_tensors`). Aggregation is FedBuff's: a flush adds the staleness-discounted mean *change* since the model
each client trained from; the coordinator hands a strategy that model (:class:`Received`, rebuilt from the
versions it keeps) for every update. The coordinator (:mod:`fedhft.broker_server.federation`) owns the buffer,
versions, memberships, clustering and persistence; a strategy does no I/O and keeps no state between calls.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedhft.broker_server.aggregation import ClusterState
from fedhft.broker_server.aggregation_inputs import ClientUpdate, DenseUpdate
from fedhft.broker_server.validation import WRONG_TRAINING, GlobalSpec, to_client_update
from fedhft.protocol.tensor_names import (
    HEAD_BIAS,
    HEAD_WEIGHT,
    a_name,
    b_name,
    dense_deltas,
    is_delta_name,
    module_names,
    rows_name,
)

MASKED = "masked"  # rejection reason: a dense-only strategy got an update without every row

AggregationInput = ClientUpdate | DenseUpdate
Triplets = tuple[np.ndarray, np.ndarray, np.ndarray]  # (U, S, Vt) of a module's ΔW
SvdOf = Callable[[str], Triplets]  # module name -> the (cached) top-R SVD of the model's ΔW of that module


@dataclass(frozen=True)
class StrategySettings:
    """The coordinator settings a strategy's math uses."""

    staleness_exponent: float = 0.5  # FedBuff weight (1 + tau) ** -a
    server_lr: float = 1.0  # eta: new = old + eta * (discounted mean change)
    seed: int = 0


@dataclass(frozen=True)
class Bounds:
    """Poisoning bounds of one flush, filled in by :class:`~fedhft.broker_server.strategies.robust_bounds.
    RobustBounds` (the defaults bound nothing)."""

    rule: str = "none"  # none | trimmed-mean | median
    trim_fraction: float = 0.2
    clip_scales: np.ndarray | None = None  # one per update, in (0, 1]


@dataclass(frozen=True)
class Received:
    """The model an update's client trained from: its base version, and ``tensors(ranks)``, that version's wire
    tensors of the client's model at ``ranks`` (module -> rank): exactly what the server published to it."""

    version: int
    tensors: Callable[[Mapping[str, int]], Mapping[str, np.ndarray]]


@dataclass(frozen=True)
class Flush:
    """What one flush knows besides the states and the updates."""

    version: int  # the current global version (staleness is measured from it)
    memberships: Mapping[str, np.ndarray] | None = None  # client -> membership over the states; None: one cluster
    recent_norms: Sequence[float] = ()  # deviations of recently flushed updates (for clipping)
    bounds: Bounds = field(default_factory=Bounds)
    received: Sequence[Received] = ()  # per update, the model it trained from (strategies with needs_received)


@dataclass(frozen=True)
class Aggregated:
    """A flush's outcome: the new states and, under clipping, each update's deviation and how many were clipped."""

    states: list[ClusterState]
    update_norms: list[float] = field(default_factory=list)
    clipped: int = 0


@dataclass(frozen=True)
class Rejection:
    """Why a strategy refuses an update: ``reason`` is the metric label, ``detail`` the ack text."""

    reason: str
    detail: str


def training_problem(tensors: Mapping[str, np.ndarray], training: str, name: str) -> str | None:
    """Why an update's tensors are not the kind strategy ``name`` trains (``training`` "lora" | "full")."""
    dense = any(is_delta_name(n) for n in tensors)
    if training == "full" and (not dense or len(dense_deltas(tensors)) != len(tensors)):
        return f"aggregator {name} takes dense parameter deltas (<param>.delta); this update carries LoRA tensors"
    if training != "full" and dense:
        return f"aggregator {name} takes LoRA factors; this update carries dense deltas (full fine-tuning)"
    return None


def masked_modules(tensors: Mapping[str, np.ndarray], spec: GlobalSpec) -> list[str]:
    """The modules of an update's wire tensors that do not carry every output row."""
    return [
        name
        for name in module_names(tensors)
        if np.unique(np.asarray(tensors[rows_name(name)])).size != spec.modules[name].out_features
    ]


class Strategy(ABC):
    """One aggregation method. Subclasses set the capabilities and implement the abstract methods."""

    name: str = ""  # the --aggregator value (the registry's key)
    training: str = "lora"  # "lora" (LoRA factors) | "full" (dense parameter deltas)
    accepts_masked: bool = False  # takes masked uploads (else every row of every module)
    supports_robust: bool = False  # may be wrapped in RobustBounds (implements deviation())
    clusters: bool = False  # may run with K > 1 clusters
    shared_model: bool = False  # every client gets the same model, published once on cluster/0
    needs_received: bool = True  # aggregates changes since the received model (Flush.received); False: uploads
    # are changes already (fedavg-full: devices send trained − received)

    def __init__(self, spec: GlobalSpec, settings: StrategySettings | None = None) -> None:
        self.spec = spec
        self.settings = settings or StrategySettings()

    def initial_state(self) -> ClusterState:
        """Version 0's state (the model before any aggregation)."""
        return ClusterState(modules={}, head={})

    def update_problem(self, tensors: Mapping[str, np.ndarray]) -> Rejection | None:
        """Why an update's wire tensors cannot be aggregated here: the other training kind (``wrong_training``),
        or masked rows for a strategy that needs every row (``masked``); None when they can."""
        problem = training_problem(tensors, self.training, self.name)
        if problem:
            return Rejection(WRONG_TRAINING, problem)
        masked = [] if self.accepts_masked else masked_modules(tensors, self.spec)
        if masked:
            detail = f"aggregator {self.name} takes dense updates (mask ratio 1.0); {masked[0]!r} is masked"
            return Rejection(MASKED, detail)
        return None

    @abstractmethod
    def to_update(
        self, client_id: str, num_samples: int, base_version: int, tensors: Mapping[str, np.ndarray]
    ) -> AggregationInput:
        """The typed aggregation input of one accepted update (built once, when the coordinator takes it)."""

    @abstractmethod
    def aggregate(
        self, states: Sequence[ClusterState], updates: Sequence[AggregationInput], flush: Flush
    ) -> Aggregated:
        """The states after one flush of ``updates`` (inputs are not modified)."""

    def deviation(self, update: AggregationInput, received: Received, current_head: Mapping[str, np.ndarray]) -> float:
        """How far ``update`` moves the model: the norm of its change since ``received`` (robust-capable
        strategies: the norm clipping bounds); ``current_head``, its client's current head, stands in for a
        received model without one."""
        raise NotImplementedError(f"strategy {self.name} does not measure deviations (supports_robust is False)")

    def module_names(self, state: ClusterState) -> list[str]:
        """The adapted modules a state holds (someone has sent)."""
        return sorted(state.modules)

    def delta(self, state: ClusterState, name: str) -> np.ndarray | None:
        """The ΔW of module ``name`` in ``state`` (None when no one has sent it)."""
        return state.modules.get(name)

    @abstractmethod
    def model_tensors(
        self, state: ClusterState, ranks: Mapping[str, int], version: int, svd: SvdOf
    ) -> dict[str, np.ndarray]:
        """Wire tensors of ``state``'s model at ``ranks`` (module -> rank) for global version ``version``; ``svd``
        gives the cached SVD of a module's ΔW (:meth:`delta`) for strategies that factor by SVD."""


class LoraStrategy(Strategy):
    """A LoRA strategy: :class:`ClientUpdate` inputs, models of (B, A) per module at the client's ranks plus the
    head."""

    def to_update(
        self, client_id: str, num_samples: int, base_version: int, tensors: Mapping[str, np.ndarray]
    ) -> ClientUpdate:
        return to_client_update(client_id, num_samples, base_version, tensors, self.spec)

    @abstractmethod
    def factors(
        self, state: ClusterState, name: str, rank: int, version: int, svd: SvdOf
    ) -> tuple[np.ndarray, np.ndarray]:
        """(B (out, rank), A (rank, in)) of module ``name`` in ``state``'s model."""

    def model_tensors(
        self, state: ClusterState, ranks: Mapping[str, int], version: int, svd: SvdOf
    ) -> dict[str, np.ndarray]:
        tensors: dict[str, np.ndarray] = {}
        for name, r in ranks.items():
            b, a = self.factors(state, name, int(r), version, svd)
            tensors[a_name(name)] = a.astype(np.float32)
            tensors[b_name(name)] = b.astype(np.float32)
        if HEAD_WEIGHT in state.head and HEAD_BIAS in state.head:
            tensors[HEAD_WEIGHT] = np.asarray(state.head[HEAD_WEIGHT], dtype=np.float32)
            tensors[HEAD_BIAS] = np.asarray(state.head[HEAD_BIAS], dtype=np.float32)
        return tensors
