"""Accuracy and macro-F1 of the published models: the global model on the held-out test set, each client's own
model on its split, and each cluster's model on its members' splits.

The evaluator package is exported with every module any device adapts, at ``clusters`` x the federation's max rank
R, so that the global model of a clustered run loads exactly: the cluster models (rank-R factors each, ΔW_c = B_c A_c)
are mixed by the clients' mean membership p̄ as ΔW = Σ_c p̄_c B_c A_c = [p̄_1 B_1 … p̄_K B_K]·[A_1; …; A_K] (rank K·R),
and their heads as Σ_c p̄_c head_c: the same global model the server defines. A personalized client model (rank r ≤ R)
loads zero-padded; modules the client does not adapt are ΔW = 0.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from fedhft.device_profiles.planner import LayerPlan, LoraPlan
from fedhft.edge_runtime.full_update import params_from_model
from fedhft.edge_runtime.local_train import evaluate
from fedhft.edge_runtime.masking import AdapterSpec, model_to_params
from fedhft.edge_runtime.ort_backend import OrtTrainer
from fedhft.edge_runtime.tokenize import TextEncoder
from fedhft.logs import event
from fedhft.protocol import ModelMessage, ProtocolError, decode_model
from fedhft.protocol.tensor_names import HEAD_NAMES, a_name, b_name, module_names
from fedhft.protocol.topics import PREFIX
from fedhft.simulate.metrics import confusion, macro_f1_of
from fedhft.simulate.traffic import connect_observer

log = logging.getLogger("fedhft.simulate")


def evaluator_plan(plans: list[LoraPlan], clusters: int = 1) -> LoraPlan:
    """Every (layer, module kind) any plan adapts, each at ``clusters`` x the federation's global maximum rank."""
    base = plans[0]
    targets: dict[int, set[str]] = {}
    for p in plans:
        for lp in p.layers:
            targets.setdefault(lp.layer, set()).update(lp.targets)
    order = {k: i for i, k in enumerate(("query", "key", "value", "attn_out", "ffn_in", "ffn_out"))}
    rank = max(p.max_rank for p in plans) * max(1, clusters)
    layers = tuple(
        LayerPlan(layer, rank, tuple(sorted(kinds, key=order.__getitem__))) for layer, kinds in sorted(targets.items())
    )
    return LoraPlan(
        profile="evaluator",
        runtime="ort",
        num_layers=base.num_layers,
        layers=layers,
        max_rank=rank,
        mask_ratio=1.0,
        lora_alpha=base.lora_alpha,
        batch_size=base.batch_size,
        seq_len=base.seq_len,
        int8_base=base.int8_base,
        memory_budget_mb=0.0,
        estimate=base.estimate,
    )


def mix_cluster_models(models: Mapping[int, Mapping[str, np.ndarray]], weights: np.ndarray) -> dict[str, np.ndarray]:
    """Wire tensors of Σ_c w_c ΔW_c (factors concatenated along the rank, exact) and Σ_c w_c head_c."""
    ks = sorted(models)
    w = np.asarray(weights, dtype=np.float64)[ks]
    w = w / w.sum() if w.sum() > 0 else np.full(len(ks), 1.0 / len(ks))
    modules = sorted({m for k in ks for m in module_names(models[k])})
    out: dict[str, np.ndarray] = {}
    for m in modules:
        present = [(wc, models[k]) for wc, k in zip(w, ks, strict=True) if a_name(m) in models[k]]
        out[a_name(m)] = np.concatenate([t[a_name(m)] for _, t in present], axis=0).astype(np.float32)
        out[b_name(m)] = np.concatenate([wc * t[b_name(m)] for wc, t in present], axis=1).astype(np.float32)
    for h in HEAD_NAMES:
        present = [(wc, models[k][h]) for wc, k in zip(w, ks, strict=True) if h in models[k]]
        if present:
            total = sum(wc for wc, _ in present)
            out[h] = (sum(wc * t for wc, t in present) / total).astype(np.float32)
    return out


def membership_of(meta: Mapping[str, object], clusters: int) -> np.ndarray | None:
    """The membership vector a client model's meta carries (``"0.9,0.1"``), or None."""
    text = meta.get("membership") if isinstance(meta, Mapping) else None
    if not isinstance(text, str):
        return None
    try:
        p = np.array([float(x) for x in text.split(",")])
    except ValueError:
        return None
    return p if p.shape == (clusters,) and np.isfinite(p).all() else None


@dataclass
class EvalPoint:
    version: int
    clusters: int
    accuracy: float
    loss: float
    virtual_time: float
    wall_time: float
    macro_f1: float = 0.0


@dataclass
class ClientSplit:
    texts: list[str]
    labels: np.ndarray


@dataclass(frozen=True)
class Score:
    """Accuracy and macro-F1 of one model on ``n`` test examples."""

    accuracy: float
    macro_f1: float
    n: int
    loss: float = 0.0


class _Recorder:
    """A trainer whose eval steps keep the predicted labels (``evaluate`` reports only accuracy and loss)."""

    def __init__(self, trainer: OrtTrainer) -> None:
        self.trainer = trainer
        self.predictions: list[np.ndarray] = []

    def eval_step(self, input_ids: np.ndarray, attention_mask: np.ndarray, labels: np.ndarray):  # noqa: ANN201
        res = self.trainer.eval_step(input_ids, attention_mask, labels)
        self.predictions.append(np.asarray(res.logits).argmax(axis=1))
        return res

    def __getattr__(self, name: str) -> object:
        return getattr(self.trainer, name)


@dataclass
class Evaluator:
    """Evaluates each new global model of `task` on (texts, labels) and, at the end, each client's own model."""

    broker: str
    task: str
    profile_dir: str
    texts: list[str]
    labels: np.ndarray
    client_splits: dict[str, ClientSplit] = field(default_factory=dict)
    points: list[EvalPoint] = field(default_factory=list)
    personalized: dict[str, Score] = field(default_factory=dict)
    cluster_scores: dict[int, Score] = field(default_factory=dict)  # each cluster's model on its members' splits
    _q: queue.Queue = field(default_factory=queue.Queue)
    _stop: threading.Event = field(default_factory=threading.Event)
    _clusters: dict[int, ModelMessage] = field(default_factory=dict)
    _by_version: dict[int, dict[int, ModelMessage]] = field(default_factory=dict)  # cluster models not yet scored
    _clients: dict[str, ModelMessage] = field(default_factory=dict)
    _evaluated: int = -1
    _busy: threading.Lock = field(default_factory=threading.Lock)
    _t0: float = field(default_factory=time.monotonic)

    def start(self) -> Evaluator:
        self.trainer = OrtTrainer(self.profile_dir)
        self.full = self.trainer.manifest.training == "full"  # fedavg-full: dense Δθ models, no adapters
        self.spec = None if self.full else AdapterSpec.from_manifest(self.trainer.manifest)
        self.encoder = TextEncoder.for_manifest(self.trainer.manifest, self.profile_dir)
        self._initial = self.trainer.get_parameters()
        self._client = connect_observer(
            self.broker,
            f"fedhft-evaluator-{self.task}",
            [(f"{PREFIX}/{self.task}/model/cluster/+", 1), (f"{PREFIX}/{self.task}/model/client/+", 1)],
            lambda _c, _u, msg: self._q.put((msg.topic, bytes(msg.payload))),
        )
        self._thread = threading.Thread(target=self._loop, name="evaluator", daemon=True)
        self._thread.start()
        return self

    # ---- receiving ---------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                topic, payload = self._q.get(timeout=0.2)
            except queue.Empty:
                continue
            with self._busy:
                self._receive(topic, payload)
                while True:  # take everything queued, then score every complete version in order
                    try:
                        self._receive(*self._q.get_nowait())
                    except queue.Empty:
                        break
                self._evaluate_global()

    def _receive(self, topic: str, payload: bytes) -> None:
        try:
            msg = decode_model(payload, expected_task=self.task)
        except ProtocolError as e:
            event(log, "evaluator skipped a model", logging.WARNING, topic=topic, error=str(e))
            return
        kind, _, key = topic.rpartition("/model/")[2].partition("/")
        if kind == "cluster":
            k = int(key)
            if k not in self._clusters or self._clusters[k].version <= msg.version:
                self._clusters[k] = msg
            if msg.version > self._evaluated:
                self._by_version.setdefault(msg.version, {})[k] = msg
        elif key not in self._clients or self._clients[key].version <= msg.version:
            self._clients[key] = msg

    # ---- evaluating --------------------------------------------------------------------------------------
    def _score(self, tensors: Mapping[str, np.ndarray], texts: list[str], labels: np.ndarray) -> Score:
        """Load a model's tensors and score it on (texts, labels)."""
        self.trainer.set_parameters(self._params(tensors))
        rec = _Recorder(self.trainer)
        r = evaluate(rec, self.encoder, texts, labels)  # type: ignore[arg-type]
        f1 = macro_f1_of(confusion(np.asarray(labels), np.concatenate(rec.predictions)))
        return Score(r.accuracy, f1, len(texts), r.loss)

    def _params(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Evaluator params of a model: its modules zero-padded to the evaluator's rank, absent ones ΔW = 0."""
        if self.full:
            return params_from_model(self.trainer.manifest, self._initial, tensors)
        assert self.spec is not None
        full = dict(tensors)
        for m in self.spec.modules:
            if a_name(m.name) not in full:
                full[a_name(m.name)] = np.zeros((1, m.in_features), np.float32)
                full[b_name(m.name)] = np.zeros((m.out_features, 1), np.float32)
        params = model_to_params(self.spec, full)
        for h in HEAD_NAMES:  # a model without a head (version 0) keeps the exported head
            params.setdefault(h, self._initial[h])
        return params

    def _version_models(self, version: int) -> tuple[dict[int, ModelMessage], np.ndarray, float] | None:
        """Version ``version``'s cluster models and mixing weights (the server's soft member counts of that
        version), or None while some of its clusters are missing; the curve never depends on arrival order."""
        got = self._by_version.get(version, {})
        if not got:
            return None
        meta = next(iter(got.values())).meta
        meta = meta if isinstance(meta, Mapping) else {}
        k = int(meta.get("clusters", 1))
        current = {c: m for c, m in got.items() if c < k}
        if len(current) < k:
            return None  # the other clusters of this version are still on their way
        soft = [m.meta.get("soft_members") if isinstance(m.meta, Mapping) else None for _, m in sorted(current.items())]
        if all(isinstance(s, (int, float)) for s in soft) and sum(soft) > 0:
            weights = np.asarray(soft, dtype=np.float64) / float(sum(soft))
        else:
            weights = np.full(k, 1.0 / k)
        return current, weights, float(meta.get("virtual_time", 0.0))

    def _evaluate_global(self) -> None:
        """Score every complete version newer than the last scored, oldest first (none is skipped under load;
        an incomplete version is passed over only once a newer one is complete)."""
        for version in sorted(v for v in self._by_version if v > self._evaluated):
            found = self._version_models(version)
            if found is None:
                continue
            current, weights, vt = found
            if self.full:
                tensors = dict(current[0].tensors)  # one global model (no clustering)
            else:
                tensors = mix_cluster_models({c: m.tensors for c, m in current.items()}, weights)
            s = self._score(tensors, self.texts, self.labels)
            self._evaluated = version
            k = len(current)
            self.points.append(EvalPoint(version, k, s.accuracy, s.loss, vt, time.monotonic() - self._t0, s.macro_f1))
            event(log, "evaluated", version=version, clusters=k, accuracy=round(s.accuracy, 4), f1=round(s.macro_f1, 4))
        for v in [v for v in self._by_version if v <= self._evaluated]:
            del self._by_version[v]

    def evaluate_clients(self) -> dict[str, Score]:
        """Each client's latest personalized model on its own test split, and each cluster's model of the newest
        version on its members' splits pooled (call after the run)."""
        with self._busy:
            for cid, split in self.client_splits.items():
                msg = self._clients.get(cid)
                if self.full and 0 in self._clusters:  # fedavg-full sends every client the global model
                    msg = self._clusters[0]
                if msg is None or not len(split.texts):
                    continue
                self.personalized[cid] = self._score(msg.tensors, split.texts, split.labels)
            self._evaluate_clusters()
        return dict(self.personalized)

    def _evaluate_clusters(self) -> None:
        if self.full or not self._clusters:
            return
        newest = max(m.version for m in self._clusters.values())
        of = self.client_clusters()
        for c, msg in sorted(self._clusters.items()):
            members = [cid for cid in self.client_splits if of.get(cid) == c and len(self.client_splits[cid].texts)]
            if msg.version != newest or not members:
                continue
            texts = [t for cid in members for t in self.client_splits[cid].texts]
            labels = np.concatenate([self.client_splits[cid].labels for cid in members])
            self.cluster_scores[c] = self._score(mix_cluster_models({c: msg.tensors}, np.ones(c + 1)), texts, labels)

    def client_clusters(self) -> dict[str, int]:
        """The cluster (largest membership) of each client's latest model."""
        return {
            cid: int(m.meta.get("cluster", 0)) if isinstance(m.meta, Mapping) else 0 for cid, m in self._clients.items()
        }

    def latest_accuracy(self) -> float | None:
        return self.points[-1].accuracy if self.points else None

    def drain(self, timeout: float = 60.0) -> None:
        """Wait until every queued model has been taken in and the newest global model evaluated."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._busy:
                if self._q.empty():
                    self._evaluate_global()
                    return
            time.sleep(0.1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        self._client.loop_stop()
        self._client.disconnect()
