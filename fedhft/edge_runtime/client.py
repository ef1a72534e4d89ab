"""`fedhft edge run`: the device's federated loop over MQTT, crash-safe.

Register (hello) -> wait for a signed model -> load it -> train the local steps -> build the masked update ->
put it in the outbox (on disk) -> publish it (QoS 1) -> wait for the server's ack -> repeat on a newer model.

Crash safety. An update gets its seq when it is created, and is written to the outbox together with that
seq *before* it is published; state.json then records next_seq. A restart (after kill -9 or a power cut)
reconciles next_seq and trained_version with the outbox, republishes every queued update with its
original seq and bytes, and trains the last good model again if its update had not been created yet.
An update leaves the outbox only when an ack (accepted / duplicate / rejected) names its seq.

Key rotation: the client reads the server's retained key chain first (``fedhft/v1/<task>/key``), follows it from
the key it trusts (``--server-key``, or one adopted earlier: trust.py) and from then on verifies models with the
newest key only.

Threads: the MQTT link's network thread only queues events; everything else (verification, training,
state, publishing) happens here, in the thread that calls ``EdgeClient.run``.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedhft.edge_runtime.data import check_num_labels, load_labelled_file
from fedhft.edge_runtime.full_update import bind_initial, model_params, spec_for, update_tensors
from fedhft.edge_runtime.local_train import TrainReport, evaluate, open_trainer, train_local
from fedhft.edge_runtime.masking import AdapterMismatch
from fedhft.edge_runtime.mqtt_link import Delivered, Incoming, LinkDown, LinkUp, MqttLink
from fedhft.edge_runtime.outbox import Outbox
from fedhft.edge_runtime.sim_clock import SimClock
from fedhft.edge_runtime.state import EdgeState, StateStore, restart_seq
from fedhft.edge_runtime.tokenize import TextEncoder
from fedhft.edge_runtime.trainer import BackendError, Trainer
from fedhft.edge_runtime.trust import ServerTrust
from fedhft.errors import FedHFTError
from fedhft.logs import event
from fedhft.protocol import (
    ENCODINGS,
    HelloMessage,
    ModelMessage,
    ProtocolError,
    UpdateMessage,
    ack_topic,
    client_model_topic,
    cluster_model_topic,
    decode_ack,
    decode_model,
    decode_update,
    encode_hello,
    encode_update,
    hello_topic,
    key_id,
    key_topic,
    load_public_key,
    parse_topic,
    update_topic,
    validate_id,
)
from fedhft.protocol.manifest import MANIFEST_NAME, load_manifest, sha256_file
from fedhft.protocol.mqtt import parse_broker_url

log = logging.getLogger(__name__)
BatteryReader = Callable[[], float | None]
POWER_SUPPLY = Path("/sys/class/power_supply")


class ClientError(FedHFTError):
    """The client cannot start with the given settings."""


@dataclass(frozen=True)
class ClientConfig:
    """Everything `fedhft edge run` is told (see its --help)."""

    artifacts: Path
    data: Path
    broker: str
    task: str
    client_id: str
    state_dir: Path
    server_key: Path
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    local_steps: int = 50
    rounds: int = 0  # 0 = forever
    max_train_seconds: float | None = None
    encoding: str = "fp16"
    outbox_limit: int = 16
    battery_min_percent: float | None = None
    battery_check_seconds: float = 60.0
    batch_size: int | None = None  # default: the plan's batch size
    learning_rate: float = 1e-3
    seed: int = 0
    text_column: str = "text"
    label_column: str = "label"
    label_names: tuple[str, ...] | None = None
    cluster: int | None = None  # initial cluster (else learnt from a model's meta["cluster"])
    backend: str = "ort"
    ack_timeout: float = 300.0  # republish an update the broker took but the server never acked
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    eval_data: Path | None = None  # local test split: the received model's accuracy goes into update metrics
    mask_ratio: float | None = None  # override the manifest's upload mask (baselines upload every row)
    sim_time_scale: float = 0.0  # simulation: sleep this x the profile's simulated round duration
    reset_state: bool = False  # start over: drop saved state, model, checkpoint and queued updates


@dataclass
class ClientSummary:
    """What one run did (returned by EdgeClient.run)."""

    rounds_trained: int = 0
    acked: dict[int, str] = field(default_factory=dict)  # seq -> ack status
    refused_models: list[str] = field(default_factory=list)  # reasons
    refused_key_chains: list[str] = field(default_factory=list)  # reasons
    adopted_keys: list[str] = field(default_factory=list)  # key ids taken from the server's key chain
    model_version: int | None = None
    last_report: TrainReport | None = None


def read_battery_percent(root: Path = POWER_SUPPLY) -> float | None:
    """Lowest capacity (%) of the Linux batteries under ``root``; None when there is no battery."""
    levels: list[float] = []
    if not root.is_dir():
        return None
    for supply in root.iterdir():
        try:
            if (supply / "type").read_text().strip() != "Battery":
                continue
            levels.append(float((supply / "capacity").read_text().strip()))
        except (OSError, ValueError):
            continue
    return min(levels) if levels else None


@dataclass
class _InFlight:
    payload: bytes
    delivered_at: float | None = None  # broker PUBACK time; the ack timeout runs from here


class EdgeClient:
    """One device in one task: owns the trainer, the state directory and the MQTT link."""

    def __init__(
        self,
        cfg: ClientConfig,
        *,
        battery: BatteryReader | None = read_battery_percent,
        trainer: Trainer | None = None,
    ) -> None:
        validate_id(cfg.task, "task")
        validate_id(cfg.client_id, "client_id")
        parse_broker_url(cfg.broker)
        if cfg.encoding not in ENCODINGS:
            raise ClientError(f"--encoding must be one of {ENCODINGS}, got {cfg.encoding!r}")
        if cfg.local_steps < 1 or cfg.rounds < 0:
            raise ClientError(f"--local-steps must be >= 1 and --rounds >= 0 (got {cfg.local_steps}, {cfg.rounds})")
        self.cfg = cfg
        self.battery = battery
        self.manifest = load_manifest(cfg.artifacts)
        self.manifest_sha256 = sha256_file(Path(cfg.artifacts) / MANIFEST_NAME)
        self.spec = spec_for(self.manifest)  # LoRA AdapterSpec, or FullSpec for a full fine-tuning package
        if cfg.mask_ratio is not None:
            if not 0 < cfg.mask_ratio <= 1:
                raise ClientError(f"--mask-ratio must be in (0, 1], got {cfg.mask_ratio}")
            self.spec = dataclasses.replace(self.spec, mask_ratio=cfg.mask_ratio)
        self.eval_texts: list[str] = []
        self.eval_labels = np.zeros(0, dtype=np.int64)
        if cfg.eval_data is not None:
            self.eval_texts, self.eval_labels, _ = load_labelled_file(
                cfg.eval_data, cfg.text_column, cfg.label_column, cfg.label_names
            )
        self.sim_clock = SimClock.from_manifest(self.manifest) if cfg.sim_time_scale > 0 else None
        self.texts, self.labels, names = load_labelled_file(
            cfg.data, cfg.text_column, cfg.label_column, cfg.label_names
        )
        check_num_labels(self.labels, names, self.manifest.num_labels, str(cfg.data))
        self.server_key = load_public_key(cfg.server_key)
        self.batch_size = cfg.batch_size or int(self.manifest.plan.get("batch_size", 8))
        self.encoder = TextEncoder.for_manifest(self.manifest, cfg.artifacts)
        self.store = StateStore(cfg.state_dir)
        try:
            self.trust = ServerTrust(self.store.dir, self.server_key)  # a key adopted after a rotation, if any
            self.server_key = self.trust.key
            self.state = (
                self._reset() if cfg.reset_state else self.store.load(cfg.task, cfg.client_id, self.manifest_sha256)
            )
            if self.state.cluster is None:
                self.state.cluster = cfg.cluster
            self.outbox = Outbox(self.store.outbox_dir, cfg.outbox_limit)
            self.trainer = trainer or open_trainer(
                cfg.backend, cfg.artifacts, self.manifest, learning_rate=cfg.learning_rate
            )
            self.spec = bind_initial(self.spec, self.trainer)  # full fine-tuning: the exported weights, pre-checkpoint
            self.model: ModelMessage | None = None
            self._recover()
        except BaseException:
            self.store.close()
            raise
        self.events: queue.Queue[Any] = queue.Queue()
        self.summary = ClientSummary(model_version=self.state.model_version)
        self._inflight: dict[int, _InFlight] = {}
        self._subscribed_cluster: int | None = None
        self._link: MqttLink | None = None
        self._battery_next_check = 0.0
        self._stop = threading.Event()

    # ---- topics -------------------------------------------------------------------------------------------
    def _own_target(self) -> str:
        return f"client/{self.cfg.client_id}"

    def _model_topics(self) -> list[str]:
        topics = [client_model_topic(self.cfg.task, self.cfg.client_id)]
        if self.state.cluster is not None:
            topics.append(cluster_model_topic(self.cfg.task, self.state.cluster))
        return topics

    # ---- start-up recovery ------------------------------------------------------------------------------
    def _recover(self) -> None:
        """Bring trainer, model and counters back to where the last run left them."""
        try:
            ckpt = self.store.trainer_checkpoint()
            if ckpt is not None:
                self.trainer.load_state(ckpt)
        except FedHFTError as e:
            event(
                log,
                "ignoring a corrupt trainer checkpoint; training restarts from the exported one",
                logging.WARNING,
                error=str(e),
            )
        saved = self.store.load_model()
        if saved is not None:
            try:
                msg = decode_model(saved, verify_key=self.server_key, expected_task=self.cfg.task)
                self._params_of(msg)
                self.model = msg
                self.state.model_version, self.state.model_target = msg.version, msg.target
            except (ProtocolError, AdapterMismatch) as e:
                event(log, "the saved model does not verify; waiting for a new one", logging.WARNING, error=str(e))
                self.state.model_version = self.state.model_target = None
        for seq, payload in list(self.outbox.items()):
            self.state.next_seq = max(self.state.next_seq, seq + 1)  # even if unreadable: it may have been sent
            try:
                upd = decode_update(payload, expected_task=self.cfg.task, expected_client_id=self.cfg.client_id)
            except ProtocolError as e:
                event(log, "dropping an unreadable queued update", logging.WARNING, seq=seq, error=str(e))
                self.outbox.remove(seq)
                continue
            if self.state.trained_version is None or upd.base_version > self.state.trained_version:
                self.state.trained_version = upd.base_version
        self.store.save(self.state)
        event(
            log,
            "state recovered",
            next_seq=self.state.next_seq,
            model_version=self.state.model_version,
            trained_version=self.state.trained_version,
            queued=self.outbox.seqs(),
        )

    def _reset(self) -> EdgeState:
        """--reset-state: a fresh state whose seqs start above any earlier one (so the server takes them)."""
        removed = self.store.reset()
        event(log, "state reset: starting over", logging.WARNING, removed=",".join(removed) or "nothing")
        return EdgeState(self.cfg.task, self.cfg.client_id, self.manifest_sha256, next_seq=restart_seq())

    def _params_of(self, msg: ModelMessage) -> dict[str, np.ndarray]:
        return model_params(self.spec, msg.tensors)

    # ---- main loop ------------------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None, timeout: float | None = None) -> ClientSummary:
        """Run until ``stop`` is set, ``timeout`` seconds pass, or --rounds are trained and acknowledged."""
        stop = stop or self._stop
        self._stop = stop
        deadline = None if timeout is None else time.monotonic() + timeout
        cfg = self.cfg
        self._link = MqttLink(
            cfg.broker,
            f"fedhft-{cfg.task}-{cfg.client_id}",
            self.events,
            username=cfg.username,
            password=cfg.password,
            tls_ca=cfg.tls_ca,
            backoff_base=cfg.backoff_base,
            backoff_cap=cfg.backoff_cap,
        ).start()
        self._link_ups = 0
        for seq, payload in self.outbox.items():  # a previous run's unacknowledged updates: same seq, same bytes
            self._publish_update(seq, payload)
        try:
            while not stop.is_set() and not self._done():
                if deadline is not None and time.monotonic() > deadline:
                    break
                try:
                    self._handle(self.events.get(timeout=0.1))
                except queue.Empty:
                    pass
                self._drain_events()
                self._check_ack_timeouts()
                if (
                    self.state.needs_training()
                    and self.model is not None
                    and not self._rounds_reached()
                    and self._battery_ok()
                ):
                    self._train_round(self.model)
        finally:
            self._link.stop()
            self.store.save(self.state)
            self.store.close()
        return self.summary

    def _rounds_reached(self) -> bool:
        return bool(self.cfg.rounds) and self.summary.rounds_trained >= self.cfg.rounds

    def _done(self) -> bool:
        return self._rounds_reached() and not len(self.outbox)

    def _drain_events(self) -> None:
        while True:
            try:
                self._handle(self.events.get_nowait())
            except queue.Empty:
                return

    def _handle(self, ev: object) -> None:
        if isinstance(ev, Incoming):
            self._on_message(ev)
        elif isinstance(ev, LinkUp):
            self._on_link_up(ev)
        elif isinstance(ev, LinkDown):
            event(log, "disconnected from the broker", logging.WARNING, reason=ev.reason)
        elif isinstance(ev, Delivered):
            self._on_delivered(ev)

    def _on_link_up(self, ev: LinkUp) -> None:
        assert self._link is not None
        event(log, "connected to the broker", session_present=ev.session_present)
        self._link.subscribe([key_topic(self.cfg.task)])  # first: the retained chain comes before the models
        self._link.subscribe([ack_topic(self.cfg.task, self.cfg.client_id), *self._model_topics()])
        self._subscribed_cluster = self.state.cluster
        hello = HelloMessage(
            self.cfg.task,
            self.cfg.client_id,
            self.manifest.profile_name,
            self.manifest_sha256,
            dict(self.manifest.plan, mask_ratio=self.spec.mask_ratio),
            time.time(),
        )
        self._link.publish(hello_topic(self.cfg.task, self.cfg.client_id), encode_hello(hello), retain=True)
        if self._link_ups and not ev.session_present:  # the broker lost our session and what was in flight
            for seq, payload in self.outbox.items():  # send it again; the server dedupes by (client, seq)
                self._publish_update(seq, payload)
        self._link_ups += 1

    def _on_message(self, ev: Incoming) -> None:
        if ev.topic == key_topic(self.cfg.task):
            self._on_key_chain(ev.payload)
            return
        try:
            task, kind, rest = parse_topic(ev.topic)
        except ProtocolError:
            return
        if task != self.cfg.task:
            return
        if kind == "ack" and rest == self.cfg.client_id:
            self._on_ack(ev.payload)
        elif kind == "model":
            self._on_model(rest, ev.payload)

    # ---- key rotation -----------------------------------------------------------------------------------
    def _on_key_chain(self, payload: bytes) -> None:
        """Follow the server's key chain from the trusted key; models of the old key are refused afterwards."""
        old = key_id(self.server_key)
        try:
            adopted = self.trust.consider(payload, self.cfg.task)
        except (ProtocolError, OSError) as e:  # OSError: the adopted key could not be stored, so not adopted
            self.summary.refused_key_chains.append(f"{type(e).__name__}: {e}")
            event(log, "refused a key chain", logging.WARNING, reason=str(e))
            return
        if adopted is None:
            return
        self.server_key = self.trust.key
        self.summary.adopted_keys.append(adopted.key_id)
        event(log, "adopted a rotated server key", logging.WARNING, old=old, new=adopted.key_id, index=adopted.index)
        if self._link is not None:  # the retained models again, in case one signed by the new key came first
            self._link.subscribe(self._model_topics())

    # ---- models -----------------------------------------------------------------------------------------
    def _refuse(self, target: str, reason: str) -> None:
        self.summary.refused_models.append(reason)
        event(log, "refused a model", logging.WARNING, target=target, reason=reason)

    def _on_model(self, target: str, payload: bytes) -> None:
        cluster_target = None if self.state.cluster is None else f"cluster/{self.state.cluster}"
        if target not in (self._own_target(), cluster_target):
            return  # a retained model of a cluster we just left
        try:
            msg = decode_model(payload, verify_key=self.server_key, expected_task=self.cfg.task, expected_target=target)
        except ProtocolError as e:
            self._refuse(target, f"{type(e).__name__}: {e}")
            return
        current = self.state.model_version
        if current is not None and msg.version <= current:
            if msg.version < current:
                self._refuse(target, f"StaleModel: version {msg.version} is older than the current {current}")
            return
        try:
            self._params_of(msg)
        except AdapterMismatch as e:
            self._refuse(target, f"AdapterMismatch: {e}")
            return
        self.store.save_model(payload)
        self.model = msg
        self.state.model_version, self.state.model_target = msg.version, target
        cluster = msg.meta.get("cluster")
        if isinstance(cluster, int) and cluster >= 0:
            self.state.cluster = cluster
        self.store.save(self.state)
        self.summary.model_version = msg.version
        event(log, "accepted a model", version=msg.version, target=target, cluster=self.state.cluster)
        self._follow_cluster()

    def _follow_cluster(self) -> None:
        if self._link is None or self.state.cluster == self._subscribed_cluster:
            return
        if self._subscribed_cluster is not None:
            self._link.unsubscribe([cluster_model_topic(self.cfg.task, self._subscribed_cluster)])
        if self.state.cluster is not None:
            self._link.subscribe([cluster_model_topic(self.cfg.task, self.state.cluster)])
        self._subscribed_cluster = self.state.cluster

    # ---- training ---------------------------------------------------------------------------------------
    def _battery_ok(self) -> bool:
        limit = self.cfg.battery_min_percent
        if limit is None or self.battery is None:
            return True
        now = time.monotonic()
        if now < self._battery_next_check:
            return False
        level = self.battery()
        if level is None or level >= limit:
            return True
        self._battery_next_check = now + self.cfg.battery_check_seconds
        event(log, "battery low: training postponed", logging.WARNING, battery=level, minimum=limit)
        return False

    def _train_round(self, model: ModelMessage) -> None:
        cfg, version = self.cfg, model.version
        self.trainer.set_parameters(self._params_of(model))
        start = self.trainer.get_parameters()
        t_round = time.monotonic()
        extra: dict[str, float] = {}
        if len(self.eval_texts):
            before = evaluate(self.trainer, self.encoder, self.eval_texts, self.eval_labels)
            extra |= {"eval_accuracy": before.accuracy, "eval_loss": before.loss}
        event(log, "training started", version=version, steps=cfg.local_steps, seq=self.state.next_seq)
        report = train_local(
            self.trainer,
            self.encoder,
            self.texts,
            self.labels,
            steps=cfg.local_steps,
            batch_size=self.batch_size,
            seed=cfg.seed * 1_000_003 + version,
            max_seconds=cfg.max_train_seconds,
            should_stop=self._stop.is_set,
        )
        if self._stop.is_set():
            event(log, "training interrupted; the next start trains this model again", version=version)
            return
        params = self.trainer.get_parameters()
        seq = self.state.next_seq
        try:
            tensors = update_tensors(self.spec, params, start)
            if self.sim_clock is not None:
                extra |= self.sim_clock.round(model, report.steps, tensors, self.cfg.sim_time_scale, t_round)
            msg = UpdateMessage(
                task=cfg.task,
                client_id=cfg.client_id,
                seq=seq,
                base_version=version,
                num_samples=max(1, report.samples),
                loss=report.loss,
                metrics={
                    "train_accuracy": report.accuracy,
                    "train_seconds": report.seconds,
                    "steps": report.steps,
                    **extra,
                },
                profile=self.manifest.profile_name,
                manifest_sha256=self.manifest_sha256,
                created_at=time.time(),
                tensors=tensors,
            )
            payload = encode_update(msg, cfg.encoding)
        except (ProtocolError, AdapterMismatch, BackendError) as e:
            event(log, "local training produced no valid update; skipping this model", logging.ERROR, error=str(e))
            self.state.trained_version = version
            self.store.save(self.state)
            return
        for dropped in self.outbox.put(seq, payload):  # durable before anything else knows about seq
            self._inflight.pop(dropped, None)
        self.state.next_seq = seq + 1
        self.state.trained_version = version
        self.state.rounds_created += 1
        self.store.save(self.state)
        self.store.save_trainer(self.trainer.save_state)
        self.summary.rounds_trained += 1
        self.summary.last_report = report
        event(
            log,
            "update queued",
            seq=seq,
            version=version,
            loss=round(report.loss, 4),
            accuracy=round(report.accuracy, 4),
            steps=report.steps,
            bytes=len(payload),
        )
        self._publish_update(seq, payload)

    # ---- updates and acks -------------------------------------------------------------------------------
    def _publish_update(self, seq: int, payload: bytes) -> None:
        assert self._link is not None
        self._inflight[seq] = _InFlight(payload)
        self._link.publish(update_topic(self.cfg.task, self.cfg.client_id), payload, qos=1, token=("update", seq))

    def _on_delivered(self, ev: Delivered) -> None:
        kind, seq = ev.token if isinstance(ev.token, tuple) else (None, None)
        if kind != "update" or seq not in self._inflight:
            return
        if not ev.ok:
            event(log, "the broker refused an update; will retry", logging.WARNING, seq=seq, reason=ev.reason)
        self._inflight[seq].delivered_at = time.monotonic()

    def _check_ack_timeouts(self) -> None:
        now = time.monotonic()
        for seq, item in list(self._inflight.items()):
            if item.delivered_at is not None and now - item.delivered_at > self.cfg.ack_timeout:
                event(log, "no ack for an update; publishing it again", logging.WARNING, seq=seq)
                self._publish_update(seq, item.payload)

    def _on_ack(self, payload: bytes) -> None:
        try:
            ack = decode_ack(payload, expected_task=self.cfg.task, expected_client_id=self.cfg.client_id)
        except ProtocolError as e:
            event(log, "ignoring a malformed ack", logging.WARNING, error=str(e))
            return
        if ack.seq not in self.outbox:
            event(log, "ack for an update not in the outbox", logging.DEBUG, seq=ack.seq, status=ack.status)
            return
        level = logging.WARNING if ack.status == "rejected" else logging.INFO
        event(log, f"update {ack.status}", level, seq=ack.seq, reason=ack.reason, server_version=ack.version)
        self.outbox.remove(ack.seq)
        self._inflight.pop(ack.seq, None)
        self.summary.acked[ack.seq] = ack.status
