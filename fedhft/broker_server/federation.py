"""The coordinator: buffered (FedBuff) clustered aggregation and per-client / per-cluster model factors.

No MQTT and no disk: the service feeds it accepted updates (:meth:`Federation.add_pending`), asks whether
a flush is due, gets an :class:`AggregationResult` from :meth:`Federation.aggregate` (which changes
nothing), persists it, and only then calls :meth:`Federation.apply`. Models are built from the applied
state.

Flush rule (FedBuff): M pending updates, or W seconds since the oldest one arrived. A flush takes every
pending update (more than M under load), so the server never falls behind and, with server_lr 1, a
row's new value is the weighted mean over all of them rather than over the last M only. Updates older
than ``max_staleness`` versions by then are dropped, not aggregated.

Clustering: after ``warmup_aggregations`` flushes, every client with a known head is summarized by
``signature(head - global head)`` (the global head is the cluster heads mixed by the mean membership),
reduced by PCA to a few dimensions, and a diagonal GMM (K fixed, or chosen by BIC) gives soft
memberships p_kc, re-estimated every ``recluster_every`` flushes with hysteresis. Cluster states start
as independent copies; when K changes, each new cluster starts from the old clusters mixed by its
members' old memberships.

Models: version 0 (before any aggregation) is ΔW = 0, which gives every device the same LoRA-initialized
A and B = 0 for its planned modules and no head (devices keep their exported one). Cluster c's model is
its ΔW_c factored at the global max rank R (published on
``model/cluster/<c>``). A client's model is ITS mixture Σ_c p_kc ΔW_c factored to ITS planned ranks:
memberships are soft, so two clients of the "same" cluster generally need different matrices, and a
device must receive factors of exactly its planned shapes; hence one model per client
(``model/client/<id>``). Factors follow the wire convention ΔW = B·A (B = U√S, A = √S Vᵀ, ordered by
singular value, so the first r components are the best rank-r approximation). Components with zero
singular value would be dead on the device (A row and B column both zero get zero gradients), so their
A rows are re-drawn at LoRA's initial scale, orthogonal to the live rows, with B columns left zero:
B·A is unchanged.

Aggregators (``FederationConfig.aggregator``): ``fedhft`` is all of the above. The baselines run
without clustering and take dense updates only (a masked one is rejected, or dropped at a flush, with
reason ``masked``): ``flexlora`` is the ΔW path above fed dense uploads (FlexLoRA: the sample-weighted
mean of B_k·A_k, SVD to each client's rank); ``fedavg`` and ``hetlora`` keep LoRA factors instead of ΔW
(:mod:`fedhft.broker_server.factor_aggregation`, same persisted state type). ``fedavg-full`` is FedAvg of
full fine-tuning (:mod:`fedhft.broker_server.full_aggregation`): clients send ``<param>.delta`` for every
parameter, the state is the global Δθ, and since every client's model is that same Δθ it is published once
per version, on ``model/cluster/0``; a client gets its ``model/client/<id>`` copy when it registers.
An update of the other kind (LoRA tensors for fedavg-full, dense deltas for the others) is rejected with
reason ``wrong_training``.

Poisoning bounds (:mod:`fedhft.broker_server.robust`; the ΔW path only: fedhft and flexlora). ``robust``
swaps the weighted mean (ΔW rows and head) for a coordinate-wise weighted trimmed mean or median over the
clients that sent the module, a client that did not send a row voting for its current value, with
samples capped at the buffer's median. ``clip_multiple`` shrinks every flushed update whose deviation
from its client's current model (sent ΔW rows and head) exceeds that multiple of the median deviation
(this buffer and the last ``CLIP_WINDOW`` flushed updates; the window lives in memory, so after a restart
it starts from the buffer) toward the current model, down to that bound. ``--clip-norm`` is another
thing: a fixed bound on an update's absolute ΔW, applied at ingest by the service.
"""

from __future__ import annotations

import math
import time
import zlib
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from fedhft.broker_server.aggregation import (
    ClientUpdate,
    ClusterState,
    aggregate_buffer,
    deviation_norm,
    personalized_delta,
    should_aggregate,
    truncated_svd,
)
from fedhft.broker_server.clustering import (
    align_clusters,
    choose_k_bic,
    gmm_fit,
    init_cluster_states,
    signature,
    update_memberships,
)
from fedhft.broker_server.factor_aggregation import (
    AGGREGATORS,
    FACTOR_AGGREGATORS,
    MASKED,
    FactorAggregator,
    masked_modules,
)
from fedhft.broker_server.full_aggregation import (
    FULL,
    DenseUpdate,
    aggregate_full,
    dense_deltas,
    full_model_tensors,
    spec_problem,
    training_problem,
)
from fedhft.broker_server.robust import ROBUST_RULES, clip_bound, clip_scales
from fedhft.broker_server.validation import (
    STALE,
    WRONG_TRAINING,
    ClientPlan,
    GlobalSpec,
    UpdateRejected,
    to_client_update,
)
from fedhft.errors import FedHFTError
from fedhft.protocol import HEAD_BIAS, HEAD_WEIGHT

ONE_HOT_SNAP = 1e-9  # memberships within this of one-hot are treated as one-hot (shared factorization)
ZERO_COMPONENT = 1e-9  # singular values below this fraction of the largest are revived
CLIP_WINDOW = 64  # flushed update norms remembered for --clip-multiple's running median
ROBUST_AGGREGATORS = ("fedhft", "flexlora")  # the ΔW path, where the poisoning bounds apply


class FederationError(FedHFTError):
    """A coordinator setting or input that cannot work."""


@dataclass(frozen=True)
class FederationConfig:
    """Aggregation and clustering settings (the server's command-line options)."""

    buffer_size: int = 8
    window_seconds: float = 30.0
    staleness_exponent: float = 0.5
    max_staleness: int = 10
    clusters: int | None = 1  # None: choose K by BIC
    max_clusters: int = 8
    warmup_aggregations: int = 2
    recluster_every: int = 5
    hysteresis: float = 0.1
    server_lr: float = 1.0
    seed: int = 0
    randomized_min_dim: int = 128  # modules with min(out, in) >= this use randomized SVD
    pca_dims: int = 8
    robust: str = "none"  # none | trimmed-mean | median (poisoning bound; see the module docstring)
    trim_fraction: float = 0.2  # weight cut off each tail by robust="trimmed-mean"
    clip_multiple: float | None = None  # clip flushed updates to this x the running median deviation
    aggregator: str = "fedhft"  # fedhft | fedavg | hetlora | flexlora | fedavg-full (see the module docstring)

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
        if self.clusters is not None and self.clusters < 1:
            problems.append(f"clusters must be >= 1 or auto, got {self.clusters}")
        if self.max_clusters < 1:
            problems.append(f"max clusters must be >= 1, got {self.max_clusters}")
        if self.warmup_aggregations < 0 or self.recluster_every < 1:
            problems.append("warmup aggregations must be >= 0 and recluster-every >= 1")
        if not 0 <= self.hysteresis <= 1:
            problems.append(f"hysteresis must lie in [0, 1], got {self.hysteresis}")
        if not (math.isfinite(self.server_lr) and self.server_lr > 0):
            problems.append(f"server lr must be > 0, got {self.server_lr}")
        if self.aggregator not in AGGREGATORS:
            problems.append(f"aggregator must be one of {', '.join(AGGREGATORS)}, got {self.aggregator!r}")
        elif self.dense_only and self.clustering:
            problems.append(f"aggregator {self.aggregator} runs without clustering; use clusters 1")
        if self.robust not in ROBUST_RULES:
            problems.append(f"robust must be one of {', '.join(ROBUST_RULES)}, got {self.robust!r}")
        elif self.robust != "none" and self.aggregator not in ROBUST_AGGREGATORS:
            problems.append(f"robust {self.robust} works on ΔW: use aggregator {' or '.join(ROBUST_AGGREGATORS)}")
        if not (math.isfinite(self.trim_fraction) and 0 <= self.trim_fraction < 0.5):
            problems.append(f"trim fraction must lie in [0, 0.5), got {self.trim_fraction}")
        if self.clip_multiple is not None and not (math.isfinite(self.clip_multiple) and self.clip_multiple > 0):
            problems.append(f"clip multiple must be > 0, got {self.clip_multiple}")
        elif self.clip_multiple is not None and self.aggregator not in ROBUST_AGGREGATORS:
            problems.append(f"clip multiple works on ΔW: use aggregator {' or '.join(ROBUST_AGGREGATORS)}")
        if problems:
            raise FederationError("; ".join(problems))

    @property
    def clustering(self) -> bool:
        return self.clusters is None or self.clusters > 1

    @property
    def dense_only(self) -> bool:
        """Baselines aggregate dense uploads (every row) only."""
        return self.aggregator != "fedhft"


@dataclass
class PendingUpdate:
    """An accepted, durably stored update waiting for the next flush (wire tensors, already clipped).

    The aggregation input (:class:`ClientUpdate`) is built at flush time, keeping the ingest path short.
    """

    id: int
    client_id: str
    seq: int
    base_version: int
    num_samples: int
    received_at: float
    tensors: Mapping[str, np.ndarray]
    virtual_time: float = 0.0  # the device's simulated clock when it sent this (0 outside `fedhft simulate`)

    def client_update(self, spec: GlobalSpec) -> ClientUpdate:
        return to_client_update(self.client_id, self.num_samples, self.base_version, self.tensors, spec)

    @property
    def head(self) -> dict[str, np.ndarray]:
        return {k: self.tensors[k] for k in (HEAD_WEIGHT, HEAD_BIAS) if k in self.tensors}


def virtual_time_of(metrics: Mapping[str, float]) -> float:
    """The simulated device clock an update reports (``metrics["virtual_time"]``), 0 when absent or invalid."""
    value = metrics.get("virtual_time", 0.0) if isinstance(metrics, Mapping) else 0.0
    try:
        value = float(value)
    except (TypeError, ValueError):
        return 0.0
    return value if math.isfinite(value) and value > 0 else 0.0


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


@dataclass(frozen=True)
class ModelFactors:
    """One model to publish: target ``cluster/<k>`` or ``client/<id>``, wire tensors, meta."""

    target: str
    tensors: dict[str, np.ndarray]
    meta: dict[str, float | int | str] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- pure math


def split_factors(u: np.ndarray, s: np.ndarray, vt: np.ndarray, rank: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, A) of rank ``rank`` from SVD triplets: B = U√S, A = √S Vᵀ, zero-padded, dead components revived."""
    n_out, n_in = u.shape[0], vt.shape[1]
    r = min(rank, s.size)
    root = np.sqrt(s[:r])
    b = np.zeros((n_out, rank))
    a = np.zeros((rank, n_in))
    b[:, :r] = u[:, :r] * root
    a[:r] = root[:, None] * vt[:r]
    top = float(s[0]) if s.size else 0.0
    sv = np.zeros(rank)
    sv[:r] = s[:r]
    dead = np.flatnonzero(sv <= ZERO_COMPONENT * top) if top > 0 else np.arange(rank)
    if dead.size:
        b[:, dead] = 0.0
        a[dead] = revived_rows(np.delete(a, dead, axis=0), dead.size, n_in, seed)
    return b, a


def revived_rows(live: np.ndarray, count: int, n_in: int, seed: int) -> np.ndarray:
    """``count`` rows at LoRA's Kaiming-uniform scale, orthogonal to the rows of ``live``."""
    rng = np.random.default_rng(seed)
    bound = 1.0 / math.sqrt(n_in)
    rows = rng.uniform(-bound, bound, size=(count, n_in))
    if live.size and np.abs(live).max() > 0:
        q, _ = np.linalg.qr(live.T)
        rows -= (rows @ q) @ q.T
    return rows


def svd_method(shape: tuple[int, int], rank: int, randomized_min_dim: int) -> str:
    return "randomized" if min(shape) >= randomized_min_dim and rank * 4 < min(shape) else "svd"


def module_seed(seed: int, name: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**32)


def pca(x: np.ndarray, dims: int) -> np.ndarray:
    """Rows of ``x`` centered and projected on their top ``dims`` principal directions."""
    centered = x - x.mean(0)
    dims = max(1, min(dims, *centered.shape))
    _, _, vt = np.linalg.svd(centered, full_matrices=False)
    return centered @ vt[:dims].T


def snap_one_hot(resp: np.ndarray) -> np.ndarray:
    """Rows within ONE_HOT_SNAP of one-hot become exactly one-hot; others are renormalized."""
    out = np.array(resp, dtype=np.float64)
    out /= out.sum(1, keepdims=True)
    near = out.max(1) >= 1.0 - ONE_HOT_SNAP
    out[near] = np.eye(out.shape[1])[out[near].argmax(1)]
    return out


def align_state_keys(states: Sequence[ClusterState], spec: GlobalSpec) -> list[ClusterState]:
    """States holding the same modules and head keys: a missing module is zero, a missing head tensor the
    mean of the clusters that have it."""
    modules = sorted({m for s in states for m in s.modules})
    heads = sorted({h for s in states for h in s.head})
    out = []
    for s in states:
        mods = {}
        for m in modules:
            spec_m = spec.modules.get(m)
            default_shape = (
                (spec_m.out_features, spec_m.in_features)
                if spec_m
                else next(t.modules[m].shape for t in states if m in t.modules)
            )
            mods[m] = s.modules[m] if m in s.modules else np.zeros(default_shape)
        head = {}
        for h in heads:
            if h in s.head:
                head[h] = s.head[h]
            else:
                head[h] = np.mean([t.head[h] for t in states if h in t.head], axis=0)
        out.append(ClusterState(modules=mods, head=head))
    return out


def resplit_states(
    states: Sequence[ClusterState], old: np.ndarray, new: np.ndarray, prior: np.ndarray
) -> list[ClusterState]:
    """K_new states from K_old ones: new cluster c starts from the old clusters mixed by its members' old
    memberships (``old`` (n, K_old), ``new`` (n, K_new)); independent copies when K_old = 1."""
    if len(states) == 1:
        return init_cluster_states(states[0], new.shape[1])
    out = []
    for c in range(new.shape[1]):
        mix = new[:, c] @ old
        out.append(personalized_delta(states, mix if mix.sum() > 0 else prior))
    return out


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
    ) -> None:
        self.spec = spec
        self.config = config
        self.version = int(version)
        self.virtual_time = float(virtual_time)  # simulated time of the latest version: max over its updates
        self.states: list[ClusterState] = list(states) if states else [ClusterState(modules={}, head={})]
        k = len(self.states)
        self.memberships: dict[str, np.ndarray] = {
            cid: np.asarray(p, dtype=np.float64) for cid, p in (memberships or {}).items() if len(p) == k
        }
        self.aggregations = int(aggregations)
        self.last_cluster_round = int(last_cluster_round)
        self.clients: dict[str, ClientPlan] = {}
        self.heads: dict[str, dict[str, np.ndarray]] = {}
        self.pending: list[PendingUpdate] = []
        self._mix_cache: dict[bytes, ClusterState] = {}
        self._svd_cache: dict[tuple[bytes, str], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._norms: deque[float] = deque(maxlen=CLIP_WINDOW)  # recent update deviations (clip_multiple)
        self.factor: FactorAggregator | None = None  # set for the factor-space baselines
        if config.aggregator in FACTOR_AGGREGATORS:
            self.factor = FactorAggregator(config.aggregator, spec, partial(module_seed, config.seed))
        problem = spec_problem(spec.training, config.aggregator)
        if problem:
            raise FederationError(problem)
        self.full = config.aggregator == FULL  # fedavg-full: the state is the global Δθ of every parameter
        self._full_cache: tuple[int, dict[str, np.ndarray]] | None = None

    # ---- registry ---------------------------------------------------------------------------------------
    @property
    def num_clusters(self) -> int:
        return len(self.states)

    def register(self, client_id: str, plan: ClientPlan) -> None:
        self.clients[client_id] = plan

    def set_head(self, client_id: str, head: Mapping[str, np.ndarray]) -> None:
        """The client's latest head (the source of its clustering signature)."""
        self.heads[client_id] = {k: np.asarray(v, dtype=np.float64) for k, v in head.items()}

    def check_update(self, tensors: Mapping[str, np.ndarray]) -> None:
        """UpdateRejected (reason ``wrong_training``) when the update's kind (LoRA or dense deltas) is not the
        aggregator's, or (``masked``) when a baseline aggregator gets an update without every row."""
        problem = training_problem(tensors, self.config.aggregator)
        if problem:
            raise UpdateRejected(WRONG_TRAINING, problem)
        masked = masked_modules(tensors, self.spec) if self.config.dense_only else []
        if masked:
            detail = (
                f"aggregator {self.config.aggregator} takes dense updates (mask ratio 1.0); {masked[0]!r} is masked"
            )
            raise UpdateRejected(MASKED, detail)

    def add_pending(self, pending: PendingUpdate) -> None:
        self.pending.append(pending)
        if pending.head:
            self.set_head(pending.client_id, pending.head)

    def prior(self) -> np.ndarray:
        """The mean membership of clients that have one (uniform when none has)."""
        k = self.num_clusters
        known = [p for cid, p in self.memberships.items() if cid in self.clients]
        if not known:
            return np.full(k, 1.0 / k)
        mean = np.mean(known, axis=0)
        return mean / mean.sum()

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
        dropped: dict[int, str] = {}
        for p in self.pending:
            tau = self.version - p.base_version
            if tau < 0 or tau > cfg.max_staleness:
                dropped[p.id] = STALE
            elif cfg.dense_only and masked_modules(p.tensors, self.spec):  # stored under another aggregator
                dropped[p.id] = MASKED
            else:
                keep.append(p)
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
        updates = [p.client_update(self.spec) for p in keep]
        norms, scales = self._clip_scales(updates)
        memberships = None
        if self.num_clusters > 1:
            memberships = {u.client_id: self.membership_of(u.client_id) for u in updates}
        if self.full:
            dense = [DenseUpdate(p.num_samples, p.base_version, dense_deltas(p.tensors)) for p in keep]
            states = [aggregate_full(self.states[0], dense, self.version, cfg.staleness_exponent, cfg.server_lr)]
        elif self.factor is not None:
            states = [
                self.factor.aggregate(self.states[0], updates, self.version, cfg.staleness_exponent, cfg.server_lr)
            ]
        else:
            states = aggregate_buffer(
                self.states,
                updates,
                self.version,
                cfg.staleness_exponent,
                memberships,
                cfg.server_lr,
                rule=cfg.robust,
                trim_fraction=cfg.trim_fraction,
                clip_scales=scales,
            )
            states = align_state_keys(states, self.spec)
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
            update_norms=norms,
            clipped=0 if scales is None else int((scales < 1.0).sum()),
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
        self._mix_cache.clear()
        self._svd_cache.clear()

    def _clip_scales(self, updates: Sequence[ClientUpdate]) -> tuple[list[float], np.ndarray | None]:
        """(deviations, clip scales) under clip_multiple, ([], None) without it: each update's deviation from
        its client's current model (cluster mixture), and the scale that brings it down to multiple x the
        median deviation of this buffer and the remembered window."""
        multiple = self.config.clip_multiple
        if multiple is None:
            return [], None
        norms = []
        for u in updates:
            model = self._mixture(self.membership_of(u.client_id))
            norms.append(deviation_norm(u, model.modules, model.head))
        return norms, clip_scales(norms, clip_bound([*self._norms, *norms], multiple))

    def _recluster_due(self, aggregations: int) -> bool:
        cfg = self.config
        if not cfg.clustering or aggregations < cfg.warmup_aggregations:
            return False
        return self.last_cluster_round < 0 or aggregations - self.last_cluster_round >= cfg.recluster_every

    def reference_head(self, states: Sequence[ClusterState]) -> dict[str, np.ndarray]:
        """The global head: cluster heads mixed by the prior (mean of client heads if states have none)."""
        if all(s.head for s in states):
            prior = self.prior() if len(states) == self.num_clusters else np.full(len(states), 1 / len(states))
            return personalized_delta(states, prior).head
        heads = list(self.heads.values())
        return {k: np.mean([h[k] for h in heads], axis=0) for k in heads[0]} if heads else {}

    def _recluster(self, states: list[ClusterState]) -> tuple[list[ClusterState], dict[str, np.ndarray]] | None:
        """New memberships (and states when K changes) from the clients' head signatures."""
        cfg = self.config
        ids = sorted(cid for cid in self.heads if cid in self.clients)
        if len(ids) < 2:
            return None
        ref = self.reference_head(states)
        x = np.stack([signature(ClientUpdate(cid, 1, 0, {}, self.heads[cid]), reference_head=ref) for cid in ids])
        xp = pca(x, min(cfg.pca_dims, len(ids) - 1))
        if cfg.clusters is None:
            choice = choose_k_bic(xp, k_max=min(cfg.max_clusters, len(ids)), seed=cfg.seed)
            k, resp = choice.k, choice.model.resp
        else:
            if len(ids) < cfg.clusters:
                return None
            k, resp = cfg.clusters, gmm_fit(xp, cfg.clusters, seed=cfg.seed).resp
        resp = snap_one_hot(resp)
        k_old = len(states)
        if k == k_old:
            resp = self._damped(ids, resp)
            kept = {cid: p for cid, p in self.memberships.items() if cid not in ids and p.shape == (k,)}
            return states, kept | {cid: resp[i] for i, cid in enumerate(ids)}
        old = np.stack([self.membership_of(cid) for cid in ids])  # aggregation keeps K: k_old == num_clusters
        new_states = align_state_keys(resplit_states(states, old, resp, self.prior()), self.spec)
        return new_states, {cid: resp[i] for i, cid in enumerate(ids)}

    def _damped(self, ids: Sequence[str], resp: np.ndarray) -> np.ndarray:
        """``resp`` aligned to last round's cluster order, with hysteresis for clients that had a membership."""
        k = resp.shape[1]
        have = [i for i, cid in enumerate(ids) if cid in self.memberships and self.memberships[cid].shape == (k,)]
        if not have:
            return resp
        old = np.stack([self.memberships[ids[i]] for i in have])
        aligned = resp[:, align_clusters(old, resp[have])]
        aligned[have] = update_memberships(old, aligned[have], self.config.hysteresis)
        return aligned

    # ---- models -----------------------------------------------------------------------------------------
    def _module_names(self, state: ClusterState) -> list[str]:
        """The modules a state holds (someone has sent)."""
        return self.factor.module_names(state) if self.factor is not None else sorted(state.modules)

    def _mixture(self, p: np.ndarray) -> ClusterState:
        key = p.tobytes()
        if key not in self._mix_cache:
            hot = np.flatnonzero(p == 1.0)
            if hot.size == 1 and np.count_nonzero(p) == 1:
                self._mix_cache[key] = self.states[int(hot[0])]
            else:
                self._mix_cache[key] = personalized_delta(self.states, p)
        return self._mix_cache[key]

    def _svd(self, p: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Top-R singular triplets of the mixture's ΔW of ``name`` (zero ΔW when no one sent it yet)."""
        key = (p.tobytes(), name)
        if key not in self._svd_cache:
            m = self.spec.modules[name]
            state = self._mixture(p)
            dw = self.factor.delta(state, name) if self.factor is not None else state.modules.get(name)
            if dw is None:
                dw = np.zeros((m.out_features, m.in_features))
            method = svd_method(dw.shape, m.max_rank, self.config.randomized_min_dim)
            self._svd_cache[key] = truncated_svd(
                dw, m.max_rank, method=method, seed=module_seed(self.config.seed, name)
            )
        return self._svd_cache[key]

    def _factors(self, p: np.ndarray, ranks: Mapping[str, int]) -> dict[str, np.ndarray]:
        tensors: dict[str, np.ndarray] = {}
        for name, r in ranks.items():
            if self.factor is not None:  # the first r components of the global factors
                b, a = self.factor.client_factors(self._mixture(p), name, int(r))
            else:
                u, s, vt = self._svd(p, name)
                b, a = split_factors(u, s, vt, int(r), module_seed(self.config.seed + self.version, name))
            tensors[f"{name}.A"] = a.astype(np.float32)
            tensors[f"{name}.B"] = b.astype(np.float32)
        head = self._mixture(p).head
        if HEAD_WEIGHT in head and HEAD_BIAS in head:
            tensors[HEAD_WEIGHT] = np.asarray(head[HEAD_WEIGHT], dtype=np.float32)
            tensors[HEAD_BIAS] = np.asarray(head[HEAD_BIAS], dtype=np.float32)
        return tensors

    def _time_meta(self) -> dict[str, float]:
        return {"virtual_time": round(self.virtual_time, 4)} if self.virtual_time > 0 else {}

    def _full_tensors(self) -> dict[str, np.ndarray]:
        """fedavg-full: the global Δθ as model tensors, built once per version (every client gets the same)."""
        if self._full_cache is None or self._full_cache[0] != self.version:
            self._full_cache = (self.version, full_model_tensors(self.states[0], self.spec.full_params))
        return self._full_cache[1]

    def cluster_models(self) -> list[ModelFactors]:
        """Each cluster's ΔW factored at every module's global max rank R (modules someone has sent)."""
        out = []
        k = self.num_clusters
        if self.full:  # the one global model (nothing to send before the first aggregation)
            meta = {"kind": "cluster", "cluster": 0, "clusters": 1, **self._time_meta()}
            return [ModelFactors("cluster/0", self._full_tensors(), meta)] if self.states[0].modules else []
        for c, state in enumerate(self.states):
            ranks = {
                name: self.spec.modules[name].max_rank
                for name in self._module_names(state)
                if name in self.spec.modules
            }
            meta: dict[str, float | int | str] = {"kind": "cluster", "cluster": c, "clusters": k, **self._time_meta()}
            tensors = self._factors(np.eye(k)[c], ranks)
            if tensors:  # nothing to send before the first aggregation
                out.append(ModelFactors(f"cluster/{c}", tensors, meta))
        return out

    def client_model(self, client_id: str) -> ModelFactors:
        """The client's personalized mixture factored to exactly its planned ranks."""
        plan = self.clients[client_id]
        p = self.membership_of(client_id)
        meta: dict[str, float | int | str] = {
            "kind": "client",
            "cluster": int(np.argmax(p)),
            "clusters": self.num_clusters,
            "membership": ",".join(f"{x:.6g}" for x in p),
            **self._time_meta(),
        }
        tensors = self._full_tensors() if self.full else self._factors(p, plan.ranks)
        return ModelFactors(f"client/{client_id}", tensors, meta)

    def client_models(self, client_ids: Iterable[str] | None = None) -> list[ModelFactors]:
        if self.full:  # every client's model is the global one on cluster/0; client/<id> goes out at registration
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
        out = []
        k = self.num_clusters
        for c, state in enumerate(self.states):
            ratios = []
            for name in self._module_names(state):
                spec_m = self.spec.modules.get(name)
                if spec_m is None or name not in low or low[name] >= spec_m.max_rank:
                    continue
                _, s, _ = self._svd(np.eye(k)[c], name)
                s2 = s**2
                head = s2[: low[name]].sum()
                if head > 0:
                    ratios.append(float(s2[low[name] : spec_m.max_rank].sum() / head))
            out.append(float(np.mean(ratios)) if ratios else float("nan"))
        return out

    def clients_per_cluster(self) -> list[int]:
        counts = [0] * self.num_clusters
        for cid in self.clients:
            counts[int(np.argmax(self.membership_of(cid)))] += 1
        return counts
