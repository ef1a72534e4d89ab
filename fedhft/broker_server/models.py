"""The models of one applied version: cluster and per-client wire tensors, built by the strategy from the states.

Version 0 (before any aggregation) is ΔW = 0, which gives every device the same LoRA-initialized A and B = 0
for its planned modules and no head (devices keep their exported one). Cluster c's model is its state factored
at every module's global max rank R (published on ``model/cluster/<c>``). A client's model is ITS mixture
Σ_c p_kc state_c factored to ITS planned ranks: memberships are soft, so two clients of the "same" cluster
generally need different matrices, and a device must receive factors of exactly its planned shapes; hence one
model per client (``model/client/<id>``). A ``shared_model`` strategy (fedavg-full) gives every client the same
model, published once per version on ``model/cluster/0``; a client gets its ``model/client/<id>`` copy when it
registers. Mixtures and SVDs are cached: many clients share a membership, and models are immutable per version.
The last few factored tensor sets are cached too: every client that registers between two versions has the same
(prior) membership, and clients of one profile the same ranks, so a wave of new devices is factored once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedhft.broker_server.aggregation import ClusterState
from fedhft.broker_server.cluster_mixing import mixture_of
from fedhft.broker_server.strategies.base import Strategy, Triplets
from fedhft.broker_server.svd import module_seed, svd_method, truncated_svd
from fedhft.broker_server.validation import GlobalSpec

TENSOR_CACHE = 8  # factored tensor sets kept per version (each one a full model at some ranks)


@dataclass(frozen=True)
class ModelFactors:
    """One model to publish: target ``cluster/<k>`` or ``client/<id>``, wire tensors, meta."""

    target: str
    tensors: dict[str, np.ndarray]
    meta: dict[str, float | int | str] = field(default_factory=dict)


class VersionModels:
    """The models of ``states`` at global ``version`` (build a new one for every applied version)."""

    def __init__(
        self,
        spec: GlobalSpec,
        strategy: Strategy,
        states: Sequence[ClusterState],
        version: int,
        *,
        seed: int,
        randomized_min_dim: int,
        virtual_time: float = 0.0,
    ) -> None:
        self.spec, self.strategy, self.states, self.version = spec, strategy, list(states), version
        self.seed, self.randomized_min_dim, self.virtual_time = seed, randomized_min_dim, virtual_time
        self._mix_cache: dict[bytes, ClusterState] = {}
        self._svd_cache: dict[tuple[bytes, str], Triplets] = {}
        self._shared: dict[str, np.ndarray] | None = None
        self._tensor_cache: dict[tuple[bytes, tuple[tuple[str, int], ...]], dict[str, np.ndarray]] = {}

    def mixture(self, p: np.ndarray) -> ClusterState:
        """The states mixed by membership ``p``."""
        key = p.tobytes()
        if key not in self._mix_cache:
            self._mix_cache[key] = mixture_of(self.states, p)
        return self._mix_cache[key]

    def svd(self, p: np.ndarray, name: str) -> Triplets:
        """Top-R singular triplets of the mixture's ΔW of ``name`` (zero ΔW when no one sent it yet)."""
        key = (p.tobytes(), name)
        if key not in self._svd_cache:
            m = self.spec.modules[name]
            dw = self.strategy.delta(self.mixture(p), name)
            if dw is None:
                dw = np.zeros((m.out_features, m.in_features))
            method = svd_method(dw.shape, m.max_rank, self.randomized_min_dim)
            self._svd_cache[key] = truncated_svd(dw, m.max_rank, method=method, seed=module_seed(self.seed, name))
        return self._svd_cache[key]

    def tensors(self, p: np.ndarray, ranks: Mapping[str, int]) -> dict[str, np.ndarray]:
        """Wire tensors of the model of membership ``p`` at ``ranks``."""
        if self.strategy.shared_model:
            if self._shared is None:
                self._shared = self.strategy.model_tensors(self.states[0], {}, self.version, self._no_svd)
            return self._shared
        key = (p.tobytes(), tuple(sorted((name, int(r)) for name, r in ranks.items())))
        cached = self._tensor_cache.get(key)
        if cached is None:
            cached = self.strategy.model_tensors(self.mixture(p), ranks, self.version, lambda name: self.svd(p, name))
            if len(self._tensor_cache) >= TENSOR_CACHE:
                del self._tensor_cache[next(iter(self._tensor_cache))]  # the oldest
            self._tensor_cache[key] = cached
        return cached

    def forget(self) -> None:
        """Drop the cached mixtures (a full ΔW each) and shared model, rebuilt on demand: for a superseded version.
        The SVDs stay (small: (out + in) x R per module and membership), so rebuilding what a client received at
        this version costs no new SVD."""
        self._mix_cache.clear()
        self._tensor_cache.clear()
        self._shared = None

    @staticmethod
    def _no_svd(name: str) -> Triplets:
        raise ValueError(f"a shared model is not factored by SVD (module {name!r})")

    def _time_meta(self) -> dict[str, float]:
        return {"virtual_time": round(self.virtual_time, 4)} if self.virtual_time > 0 else {}

    def cluster_models(self) -> list[ModelFactors]:
        """Each cluster's model at every module's global max rank R (modules someone has sent); nothing before
        the first aggregation. A shared model is the one ``cluster/0``."""
        k = len(self.states)
        if self.strategy.shared_model:
            meta: dict[str, float | int | str] = {"kind": "cluster", "cluster": 0, "clusters": 1, **self._time_meta()}
            return [ModelFactors("cluster/0", self.tensors(np.ones(1), {}), meta)] if self.states[0].modules else []
        out = []
        for c, state in enumerate(self.states):
            ranks = {
                name: self.spec.modules[name].max_rank
                for name in self.strategy.module_names(state)
                if name in self.spec.modules
            }
            meta = {"kind": "cluster", "cluster": c, "clusters": k, **self._time_meta()}
            tensors = self.tensors(np.eye(k)[c], ranks)
            if tensors:
                out.append(ModelFactors(f"cluster/{c}", tensors, meta))
        return out

    def client_model(self, client_id: str, p: np.ndarray, ranks: Mapping[str, int]) -> ModelFactors:
        """The client's model: its mixture ``p`` factored to exactly its planned ``ranks``."""
        meta: dict[str, float | int | str] = {
            "kind": "client",
            "cluster": int(np.argmax(p)),
            "clusters": len(self.states),
            "membership": ",".join(f"{x:.6g}" for x in p),
            **self._time_meta(),
        }
        return ModelFactors(f"client/{client_id}", self.tensors(p, ranks), meta)

    def collapse_ratios(self, low: Mapping[str, int]) -> list[float]:
        """Per cluster: mean over modules of the energy in singular directions low..R-1 over the top ``low``
        (``low[m]`` = the smallest registered rank of module m); NaN where undefined."""
        out = []
        k = len(self.states)
        for c, state in enumerate(self.states):
            ratios = []
            for name in self.strategy.module_names(state):
                spec_m = self.spec.modules.get(name)
                if spec_m is None or name not in low or low[name] >= spec_m.max_rank:
                    continue
                _, s, _ = self.svd(np.eye(k)[c], name)
                s2 = s**2
                head = s2[: low[name]].sum()
                if head > 0:
                    ratios.append(float(s2[low[name] : spec_m.max_rank].sum() / head))
            out.append(float(np.mean(ratios)) if ratios else float("nan"))
        return out
