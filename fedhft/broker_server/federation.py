"""The coordinator: buffered (FedBuff) clustered aggregation by a strategy, and the models it publishes.

No MQTT and no disk: the service feeds it accepted updates (:meth:`Federation.add_pending`, which builds each
update's typed aggregation input once), asks whether a flush is due, gets an :class:`AggregationResult` from
:meth:`Federation.aggregate` (which changes nothing), persists it, and only then calls :meth:`Federation.apply`.
Models are built from the applied state (:mod:`fedhft.broker_server.models`).

Strategies (``FederationConfig.aggregator``, :mod:`fedhft.broker_server.strategies`) own the math: which updates
they take (an update of the other training kind is rejected with reason ``wrong_training``, a masked one by a
dense-only strategy with reason ``masked``, or dropped at a flush when stored under another aggregator), how a
flush changes the cluster states, and the model tensors of a state. The coordinator owns the rest.

Flush rule (FedBuff): M pending updates, or W seconds since the oldest one arrived. A flush takes every
pending update (more than M under load), so the server never falls behind. The strategy adds the server lr
times the staleness-discounted mean of the updates' *changes* since the model each client trained from; that
model is rebuilt from the last ``max_staleness`` + 1 versions this coordinator keeps (:mod:`fedhft.
broker_server.version_history`, restored after a restart from the state store). Updates older than
``max_staleness`` versions by then, or whose version is no longer kept, are dropped as ``stale``.

Clustering (strategies with ``clusters``): after ``warmup_aggregations`` flushes, and then every
``recluster_every``, soft memberships are re-estimated from the clients' signatures (ΔW sketch, head or both;
every cluster at least ``min_cluster_size`` clients: :mod:`fedhft.broker_server.reclustering`); a client's model
mixes the cluster states by its membership.

Poisoning bounds (``robust``, ``clip_multiple``; strategies with ``supports_robust``) wrap the strategy
(:mod:`fedhft.broker_server.strategies.robust_bounds`). Clipping compares an update with the median deviation
of this buffer and the last ``CLIP_WINDOW`` flushed updates, a window kept here, in memory (after a restart it
starts from the buffer). ``--clip-norm`` is another thing: a fixed bound on an update's absolute ΔW, applied
at ingest by the service.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace

import numpy as np

from fedhft.broker_server.aggregation import ClusterState, should_aggregate
from fedhft.broker_server.aggregation_inputs import ClientUpdate
from fedhft.broker_server.cluster_figures import ClusterFigures, cluster_figures
from fedhft.broker_server.models import ModelFactors, VersionModels
from fedhft.broker_server.reclustering import ClusterSettings, client_signatures, delta_sketch, recluster
from fedhft.broker_server.robust import ROBUST_RULES
from fedhft.broker_server.strategies import StrategyError, available, get_strategy, names_where
from fedhft.broker_server.strategies.base import AggregationInput, Flush, Received, Strategy, StrategySettings
from fedhft.broker_server.strategies.robust_bounds import RobustBounds
from fedhft.broker_server.validation import STALE, ClientPlan, GlobalSpec, UpdateRejected
from fedhft.broker_server.version_history import PastVersion, VersionHistory, mean_membership
from fedhft.errors import FedHFTError
from fedhft.logs import event
from fedhft.protocol.tensor_names import head_tensors

log = logging.getLogger("fedhft.server")

CLIP_WINDOW = 64  # flushed update norms remembered for --clip-multiple's running median


class FederationError(FedHFTError):
    """A coordinator setting or input that cannot work."""


@dataclass(frozen=True)
class FederationConfig:
    """Aggregation and clustering settings (the server's command-line options)."""

    buffer_size: int = 8
    window_seconds: float = 30.0
    staleness_exponent: float = 0.5
    max_staleness: int = 10
    clusters: int | None = 1  # None: choose K by BIC in min_clusters..max_clusters
    min_clusters: int = 1
    max_clusters: int = 8
    min_cluster_size: int = 2  # a fit leaving a cluster with fewer clients (hard assignment) is not used
    membership_floor: float = 0.1  # memberships = (1 - floor) x posterior + floor / K: never degenerate
    cluster_signature: str = "delta"  # head | delta | both (reclustering.SIGNATURES): bench/cluster_signature.py
    warmup_aggregations: int = 2
    recluster_every: int = 5
    hysteresis: float = 0.1
    server_lr: float = 1.0
    seed: int = 0
    randomized_min_dim: int = 128  # modules with min(out, in) >= this use randomized SVD
    pca_dims: int = 3  # signatures reduced to this many principal components (bench/cluster_signature.py)
    robust: str = "none"  # none | trimmed-mean | median (poisoning bound; see the module docstring)
    trim_fraction: float = 0.2  # weight cut off each tail by robust="trimmed-mean"
    clip_multiple: float | None = None  # clip flushed updates to this x the running median deviation
    aggregator: str = "fedhft"  # a strategy name (fedhft.broker_server.strategies.available())

    def __post_init__(self) -> None:
        problems = []
        if self.buffer_size < 1:
            problems.append(f"buffer size must be >= 1, got {self.buffer_size}")
        if not self.window_seconds > 0:
            problems.append(f"window seconds must be > 0, got {self.window_seconds}")
        if self.staleness_exponent < 0:
            problems.append(f"staleness exponent must be >= 0, got {self.staleness_exponent}")
        if self.max_staleness < 0:
            problems.append(f"max staleness must be >= 0, got {self.max_staleness}")
        if self.warmup_aggregations < 0 or self.recluster_every < 1:
            problems.append("warmup aggregations must be >= 0 and recluster-every >= 1")
        problems += self.cluster_settings.problems()
        if not (math.isfinite(self.server_lr) and self.server_lr > 0):
            problems.append(f"server lr must be > 0, got {self.server_lr}")
        strategy = self._strategy_class(problems)
        if strategy is not None and self.clustering and not strategy.clusters:
            problems.append(f"aggregator {self.aggregator} runs without clustering; use clusters 1")
        robust_ok = strategy is not None and strategy.supports_robust
        if self.robust not in ROBUST_RULES:
            problems.append(f"robust must be one of {', '.join(ROBUST_RULES)}, got {self.robust!r}")
        elif self.robust != "none" and not robust_ok:
            problems.append(f"robust {self.robust} works on ΔW: use aggregator {_robust_names()}")
        if not (math.isfinite(self.trim_fraction) and 0 <= self.trim_fraction < 0.5):
            problems.append(f"trim fraction must lie in [0, 0.5), got {self.trim_fraction}")
        if self.clip_multiple is not None and not (math.isfinite(self.clip_multiple) and self.clip_multiple > 0):
            problems.append(f"clip multiple must be > 0, got {self.clip_multiple}")
        elif self.clip_multiple is not None and not robust_ok:
            problems.append(f"clip multiple works on ΔW: use aggregator {_robust_names()}")
        if problems:
            raise FederationError("; ".join(problems))

    def _strategy_class(self, problems: list[str]) -> type[Strategy] | None:
        """The aggregator's strategy class, or None with the problem appended."""
        names = available()
        if self.aggregator not in names:
            problems.append(f"aggregator must be one of {', '.join(names)}, got {self.aggregator!r}")
            return None
        try:
            return get_strategy(self.aggregator)
        except StrategyError as exc:
            problems.append(str(exc))
            return None

    @property
    def cluster_settings(self) -> ClusterSettings:
        return ClusterSettings(**{f.name: getattr(self, f.name) for f in fields(ClusterSettings)})

    @property
    def clustering(self) -> bool:
        return self.clusters is None or self.clusters > 1

    def strategy(self, spec: GlobalSpec) -> Strategy:
        """The configured strategy for ``spec``, inside its poisoning bounds when any is set."""
        settings = StrategySettings(self.staleness_exponent, self.server_lr, self.seed)
        strategy = get_strategy(self.aggregator)(spec, settings)
        if self.robust == "none" and self.clip_multiple is None:
            return strategy
        return RobustBounds(strategy, self.robust, self.trim_fraction, self.clip_multiple)


def _robust_names() -> str:
    return " or ".join(names_where(supports_robust=True))


def spec_problem(strategy: Strategy, spec: GlobalSpec) -> str | None:
    """Why a manifest (``spec.training`` "lora" | "full") cannot serve ``strategy`` (None when it can)."""
    if strategy.training == "full" and spec.training != "full":
        return (
            f"--aggregator {strategy.name} needs a full fine-tuning manifest (export with full_finetune); "
            "this one is LoRA"
        )
    if strategy.training != "full" and spec.training == "full":
        full = " or ".join(names_where(training="full"))
        return f"the manifest is a full fine-tuning export: use --aggregator {full}, not {strategy.name}"
    return None


@dataclass
class PendingUpdate:
    """An accepted, durably stored update waiting for the next flush: its wire tensors (already clipped) and
    ``update``, the strategy's typed aggregation input built from them once, when the coordinator takes the
    update (:meth:`Federation.add_pending`)."""

    id: int
    client_id: str
    seq: int
    base_version: int
    num_samples: int
    received_at: float
    tensors: Mapping[str, np.ndarray]
    virtual_time: float = 0.0  # the device's simulated clock when it sent this (0 outside `fedhft simulate`)
    update: AggregationInput | None = field(default=None, repr=False)

    @property
    def head(self) -> dict[str, np.ndarray]:
        return head_tensors(self.tensors)


@dataclass
class AggregationResult:
    """Everything one flush changes; nothing is applied until :meth:`Federation.apply`."""

    version: int
    states: list[ClusterState]
    memberships: dict[str, np.ndarray]
    aggregated_ids: list[int]
    dropped: dict[int, str]
    aggregations: int
    last_cluster_round: int
    reclustered: bool
    seconds: float
    virtual_time: float = 0.0
    update_norms: list[float] = field(default_factory=list)  # flushed updates' deviations (with clip_multiple)
    clipped: int = 0  # updates shrunk by clip_multiple


# -------------------------------------------------------------------------------------------- coordinator


class Federation:
    """Buffered clustered aggregation over registered clients (in memory; the caller persists)."""

    def __init__(
        self,
        spec: GlobalSpec,
        config: FederationConfig,
        *,
        version: int = 0,
        states: Sequence[ClusterState] | None = None,
        memberships: Mapping[str, Sequence[float]] | None = None,
        aggregations: int = 0,
        last_cluster_round: int = -1,
        virtual_time: float = 0.0,
        history: Sequence[PastVersion] = (),
    ) -> None:
        """``history``: earlier versions (from the state store) to rebuild what stale updates trained from."""
        self.spec = spec
        self.config = config
        self.strategy = config.strategy(spec)
        problem = spec_problem(self.strategy, spec)
        if problem:
            raise FederationError(problem)
        self.version = int(version)
        self.virtual_time = float(virtual_time)  # simulated time of the latest version: max over its updates
        self.states: list[ClusterState] = list(states) if states else [self.strategy.initial_state()]
        k = len(self.states)
        self.memberships: dict[str, np.ndarray] = {
            cid: np.asarray(p, dtype=np.float64) for cid, p in (memberships or {}).items() if len(p) == k
        }
        self.aggregations = int(aggregations)
        self.last_cluster_round = int(last_cluster_round)
        self.clients: dict[str, ClientPlan] = {}
        self.heads: dict[str, dict[str, np.ndarray]] = {}
        self.sketches: dict[str, np.ndarray] = {}  # client -> ΔW sketch of its latest update (delta signatures)
        self._fallbacks: set[int] = set()  # K the clustering fell back to, already logged
        self.pending: list[PendingUpdate] = []
        self._norms: deque[float] = deque(maxlen=CLIP_WINDOW)  # recent update deviations (clip_multiple)
        self.history = VersionHistory(config.max_staleness + 1 if self.strategy.needs_received else 1)
        version_0 = PastVersion(0, [self.strategy.initial_state()])  # never stored: it is the strategy's start
        for past in sorted([version_0, *history], key=lambda h: h.version):
            if self.version - self.history.depth < past.version < self.version:
                self.history.add(self._version_models(past.states, past.version), past.memberships)
        self.models = self._version_models()
        self.history.add(self.models, self.memberships)

    # ---- registry ---------------------------------------------------------------------------------------
    @property
    def num_clusters(self) -> int:
        return len(self.states)

    def register(self, client_id: str, plan: ClientPlan) -> None:
        self.clients[client_id] = plan

    def set_head(self, client_id: str, head: Mapping[str, np.ndarray]) -> None:
        """The client's latest head (the source of its clustering signature)."""
        self.heads[client_id] = {k: np.asarray(v, dtype=np.float64) for k, v in head.items()}

    def follow(self, version: int) -> None:
        """Take the version another process committed: an ingest process's federation only checks updates
        (roles.py), against the version the aggregator last committed."""
        self.version = int(version)

    def check_update(self, tensors: Mapping[str, np.ndarray]) -> None:
        """UpdateRejected (reason ``wrong_training``) when the update's kind (LoRA or dense deltas) is not the
        strategy's, or (``masked``) when a dense-only strategy gets an update without every row."""
        problem = self.strategy.update_problem(tensors)
        if problem:
            raise UpdateRejected(problem.reason, problem.detail)

    def add_pending(self, pending: PendingUpdate) -> None:
        """Take an accepted update: its typed aggregation input is built here, once."""
        self._input(pending)
        self.pending.append(pending)
        if pending.head:
            self.set_head(pending.client_id, pending.head)
        self._keep_sketch(pending)

    def _keep_sketch(self, pending: PendingUpdate) -> None:
        """The ΔW sketch of the client's latest update, when the clustering signature uses it."""
        cfg = self.config
        if cfg.clustering and cfg.cluster_signature != "head" and isinstance(pending.update, ClientUpdate):
            sketch = delta_sketch(pending.update, seed=cfg.seed)
            if sketch is not None:
                self.sketches[pending.client_id] = sketch

    def _input(self, pending: PendingUpdate) -> AggregationInput:
        """The update's typed aggregation input (built on first use)."""
        if pending.update is None:
            pending.update = self.strategy.to_update(
                pending.client_id, pending.num_samples, pending.base_version, pending.tensors
            )
        return pending.update

    def prior(self) -> np.ndarray:
        """The mean membership of clients that have one (uniform when none has)."""
        return mean_membership(self.memberships, self.clients, self.num_clusters)

    def membership_of(self, client_id: str) -> np.ndarray:
        p = self.memberships.get(client_id)
        return p if p is not None and p.shape == (self.num_clusters,) else self.prior()

    # ---- triggering -------------------------------------------------------------------------------------
    def oldest_pending_at(self) -> float | None:
        return min((p.received_at for p in self.pending), default=None)

    def due(self, now: float) -> bool:
        """FedBuff flush rule: M updates pending, or the oldest pending one waited W seconds."""
        oldest = self.oldest_pending_at()
        age = None if oldest is None else now - oldest
        return should_aggregate(len(self.pending), self.config.buffer_size, age, self.config.window_seconds)

    def seconds_until_due(self, now: float) -> float | None:
        """Seconds until the window expires (0 when due now); None with nothing pending."""
        oldest = self.oldest_pending_at()
        if oldest is None:
            return None
        if len(self.pending) >= self.config.buffer_size:
            return 0.0
        return max(0.0, oldest + self.config.window_seconds - now)

    # ---- aggregation ---------------------------------------------------------------------------------
    def aggregate(self) -> AggregationResult:
        """One flush of every pending update (too-stale ones are dropped); changes nothing until apply()."""
        t0 = time.perf_counter()
        cfg = self.config
        keep: list[PendingUpdate] = []
        received: list[Received] = []
        dropped: dict[int, str] = {}
        for p in self.pending:
            tau = self.version - p.base_version
            needs = self.strategy.needs_received and 0 <= tau
            base = self.history.received(p.base_version, p.client_id, self.clients) if needs else None
            if tau < 0 or tau > cfg.max_staleness:
                dropped[p.id] = STALE
            elif problem := self.strategy.update_problem(p.tensors):  # e.g. stored under another aggregator
                dropped[p.id] = problem.reason
            elif needs and base is None:  # its version is no longer kept (after a restart)
                dropped[p.id] = STALE
            else:
                keep.append(p)
                if base is not None:  # one per kept update when the strategy needs them, else none
                    received.append(base)
        if not keep:
            return AggregationResult(
                version=self.version,
                states=self.states,
                memberships=dict(self.memberships),
                aggregated_ids=[],
                dropped=dropped,
                aggregations=self.aggregations,
                last_cluster_round=self.last_cluster_round,
                reclustered=False,
                seconds=time.perf_counter() - t0,
                virtual_time=self.virtual_time,
            )
        memberships = None
        if self.num_clusters > 1:
            memberships = {p.client_id: self.membership_of(p.client_id) for p in keep}
        flush = Flush(self.version, memberships, tuple(self._norms), received=tuple(received))
        out = self.strategy.aggregate(self.states, [self._input(p) for p in keep], flush)
        states = out.states
        aggregations = self.aggregations + 1
        all_memberships = dict(self.memberships)
        last_round, reclustered = self.last_cluster_round, False
        if self._recluster_due(aggregations):
            outcome = self._recluster(states)
            if outcome is not None:
                states, all_memberships = outcome
                last_round, reclustered = aggregations, True
        return AggregationResult(
            version=self.version + 1,
            states=states,
            memberships=all_memberships,
            aggregated_ids=[p.id for p in keep],
            dropped=dropped,
            aggregations=aggregations,
            last_cluster_round=last_round,
            reclustered=reclustered,
            seconds=time.perf_counter() - t0,
            virtual_time=max(self.virtual_time, *(p.virtual_time for p in keep)),
            update_norms=out.update_norms,
            clipped=out.clipped,
        )

    def apply(self, result: AggregationResult) -> None:
        """Adopt a persisted result."""
        done = set(result.aggregated_ids) | set(result.dropped)
        self.pending = [p for p in self.pending if p.id not in done]
        if not result.aggregated_ids:
            return
        self.version = result.version
        self.states = list(result.states)
        k = self.num_clusters
        self.memberships = {cid: p for cid, p in result.memberships.items() if p.shape == (k,)}
        self.aggregations = result.aggregations
        self.last_cluster_round = result.last_cluster_round
        self.virtual_time = result.virtual_time
        self._norms.extend(result.update_norms)
        self.models = self._version_models()
        self.history.add(self.models, self.memberships)

    def _recluster_due(self, aggregations: int) -> bool:
        cfg = self.config
        if not cfg.clustering or aggregations < cfg.warmup_aggregations:
            return False
        return self.last_cluster_round < 0 or aggregations - self.last_cluster_round >= cfg.recluster_every

    def _recluster(self, states: list[ClusterState]) -> tuple[list[ClusterState], dict[str, np.ndarray]] | None:
        """New memberships (and states when K changes) from the clients' signatures (``cluster_signature``)."""
        cfg = self.config
        prior = self.prior()
        ids, x = client_signatures(cfg.cluster_signature, self.clients, self.heads, self.sketches, states, prior)
        out = recluster(states, x, ids, self.memberships, prior, self.spec, cfg.cluster_settings)
        if out is None:
            return None
        if out.fit.note and out.fit.k not in self._fallbacks:
            self._fallbacks.add(out.fit.k)
            event(log, "clusters: " + out.fit.note, logging.WARNING, min_cluster_size=cfg.min_cluster_size)
        return out.states, out.memberships

    # ---- models -----------------------------------------------------------------------------------------
    def _version_models(
        self, states: Sequence[ClusterState] | None = None, version: int | None = None
    ) -> VersionModels:
        """The models of the current version (or of earlier ``states`` at ``version``)."""
        cfg = self.config
        return VersionModels(
            self.spec,
            self.strategy,
            self.states if states is None else states,
            self.version if version is None else version,
            seed=cfg.seed,
            randomized_min_dim=cfg.randomized_min_dim,
            virtual_time=self.virtual_time if version is None else 0.0,
        )

    def cluster_models(self) -> list[ModelFactors]:
        """Each cluster's model at every module's global max rank R (modules someone has sent)."""
        figures, size = self.cluster_figures(), self.config.min_cluster_size
        return [
            replace(m, meta={**m.meta, **figures.meta(int(m.meta["cluster"]), size)})
            for m in self.models.cluster_models()
        ]

    def client_model(self, client_id: str) -> ModelFactors:
        """The client's personalized mixture factored to exactly its planned ranks."""
        return self.models.client_model(client_id, self.membership_of(client_id), self.clients[client_id].ranks)

    def client_models(self, client_ids: Iterable[str] | None = None) -> list[ModelFactors]:
        if self.strategy.shared_model:  # every client's model is the one on cluster/0; client/<id> at registration
            return []
        ids = sorted(self.clients) if client_ids is None else list(client_ids)
        return [self.client_model(cid) for cid in ids if cid in self.clients]

    def collapse_ratios(self) -> list[float]:
        """Per cluster: mean over modules of the energy in singular directions r_low..R-1 over the top
        r_low (r_low = the smallest registered rank of the module); NaN where undefined."""
        low: dict[str, int] = {}
        for plan in self.clients.values():
            for name, r in plan.ranks.items():
                low[name] = min(r, low.get(name, r))
        return self.models.collapse_ratios(low)

    def cluster_figures(self) -> ClusterFigures:
        """Registered clients per cluster, hard (largest membership) and soft (sum of memberships)."""
        k = self.num_clusters
        prior: np.ndarray | None = None  # computed once (an O(clients) mean), not once per client without one
        rows = []
        for cid in self.clients:
            p = self.memberships.get(cid)
            if p is None or p.shape != (k,):
                p = prior = self.prior() if prior is None else prior
            rows.append(p)
        return cluster_figures(rows, k)

    def clients_per_cluster(self) -> list[int]:
        return self.cluster_figures().hard
