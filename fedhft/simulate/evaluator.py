"""Global accuracy of every published cluster model, measured on the held-out global test set.

The evaluator package is exported with every module any device adapts, at the global maximum rank, so a
cluster model (rank-R factors) loads into it exactly.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import paho.mqtt.client as mqtt

from fedhft.device_profiles.planner import LayerPlan, LoraPlan
from fedhft.edge_runtime.local_train import evaluate
from fedhft.edge_runtime.masking import AdapterSpec, model_to_params
from fedhft.edge_runtime.mqtt_link import parse_broker_url
from fedhft.edge_runtime.ort_backend import OrtTrainer
from fedhft.edge_runtime.tokenize import TextEncoder
from fedhft.logs import event
from fedhft.protocol import ProtocolError, decode_model
from fedhft.protocol.topics import PREFIX

log = logging.getLogger("fedhft.simulate")


def evaluator_plan(plans: list[LoraPlan]) -> LoraPlan:
    """Every (layer, module kind) any plan adapts, each at the federation's global maximum rank."""
    base = plans[0]
    targets: dict[int, set[str]] = {}
    for p in plans:
        for lp in p.layers:
            targets.setdefault(lp.layer, set()).update(lp.targets)
    order = {k: i for i, k in enumerate(("query", "key", "value", "attn_out", "ffn_in", "ffn_out"))}
    layers = tuple(
        LayerPlan(layer, base.max_rank, tuple(sorted(kinds, key=order.__getitem__)))
        for layer, kinds in sorted(targets.items())
    )
    return LoraPlan(
        profile="evaluator",
        runtime="ort",
        num_layers=base.num_layers,
        layers=layers,
        max_rank=base.max_rank,
        mask_ratio=1.0,
        lora_alpha=base.lora_alpha,
        batch_size=base.batch_size,
        seq_len=base.seq_len,
        int8_base=base.int8_base,
        memory_budget_mb=0.0,
        estimate=base.estimate,
    )


@dataclass
class EvalPoint:
    version: int
    cluster: int
    accuracy: float
    loss: float
    virtual_time: float
    wall_time: float


@dataclass
class Evaluator:
    """Subscribes to the cluster models of `task` and evaluates each new version on (texts, labels)."""

    broker: str
    task: str
    profile_dir: str
    texts: list[str]
    labels: np.ndarray
    points: list[EvalPoint] = field(default_factory=list)
    _q: queue.Queue = field(default_factory=queue.Queue)
    _stop: threading.Event = field(default_factory=threading.Event)
    _seen: dict[int, int] = field(default_factory=dict)
    _t0: float = field(default_factory=time.monotonic)

    def start(self) -> Evaluator:
        self.trainer = OrtTrainer(self.profile_dir)
        self.spec = AdapterSpec.from_manifest(self.trainer.manifest)
        self.encoder = TextEncoder.for_manifest(self.trainer.manifest, self.profile_dir)
        addr = parse_broker_url(self.broker)
        c = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"fedhft-evaluator-{self.task}",
            protocol=mqtt.MQTTv5,
        )
        c.on_message = lambda _c, _u, msg: self._q.put((msg.topic, bytes(msg.payload)))
        c.connect(addr.host, addr.port)
        c.loop_start()
        c.subscribe(f"{PREFIX}/{self.task}/model/cluster/+", qos=1)
        self._client = c
        self._thread = threading.Thread(target=self._loop, name="evaluator", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                topic, payload = self._q.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                msg = decode_model(payload, expected_task=self.task)
            except ProtocolError as e:
                event(log, "evaluator skipped a model", logging.WARNING, topic=topic, error=str(e))
                continue
            cluster = int(topic.rsplit("/", 1)[-1])
            if self._seen.get(cluster, -1) >= msg.version:
                continue
            self._seen[cluster] = msg.version
            self.trainer.set_parameters(model_to_params(self.spec, msg.tensors))
            r = evaluate(self.trainer, self.encoder, self.texts, self.labels)
            vt = float(msg.meta.get("virtual_time", 0.0)) if isinstance(msg.meta, dict) else 0.0
            self.points.append(EvalPoint(msg.version, cluster, r.accuracy, r.loss, vt, time.monotonic() - self._t0))
            event(log, "evaluated", version=msg.version, cluster=cluster, accuracy=round(r.accuracy, 4))

    def latest_accuracy(self) -> float | None:
        return self.points[-1].accuracy if self.points else None

    def drain(self, timeout: float = 30.0) -> None:
        """Wait until every queued model has been evaluated."""
        deadline = time.monotonic() + timeout
        while not self._q.empty() and time.monotonic() < deadline:
            time.sleep(0.1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self._client.loop_stop()
        self._client.disconnect()
