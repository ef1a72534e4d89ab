"""`fedhft edge run`: the device's federated loop over MQTT, crash-safe.

Register (hello) -> wait for a signed model -> load it -> train the local steps -> build the masked update ->
put it in the outbox (on disk) -> publish it (QoS 1) -> wait for the server's ack -> repeat on the newest model
held: a device that finishes keeps training instead of idling until a newer version comes (FedBuff), at most
--max-rounds-per-version rounds per version, and never while an earlier update still waits for its ack.
Under `fedhft simulate --virtual-time` a round starts only when the server's schedule says so, and the device
promises when its update lands before training (virtual_rounds.py).

Crash safety. An update gets its seq when it is created, and is written to the outbox together with that
seq *before* it is published; state.json then records next_seq. A restart (after kill -9 or a power cut)
reconciles next_seq and trained_version with the outbox, republishes every queued update with its
original seq and bytes, and trains the last good model again if its update had not been created yet.
An update leaves the outbox only when an ack (accepted / duplicate / rejected) names its seq.

The parts: models and the server key come in through model_receiver.py (key rotation: the retained key chain
is read first, ``fedhft/v1/<task>/key``), updates go out and acks come back through uploads.py, and the
round's clock is the wall clock, a scaled simulated one (clock.py) or the virtual clock (virtual_rounds.py).

Threads: the MQTT link's network thread only queues events; everything else (verification, training,
state, publishing) happens here, in the thread that calls ``EdgeClient.run`` -- or, for `fedhft edge host`,
the thread that drives many clients through the loop's steps (open / pump / promise_due / train_due / close).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedhft.edge_runtime.battery import BatteryGate, BatteryReader, read_battery_percent
from fedhft.edge_runtime.client_config import ClientConfig, ClientError, ClientSummary
from fedhft.edge_runtime.clock import round_clock
from fedhft.edge_runtime.data import check_num_labels, load_labelled_file
from fedhft.edge_runtime.full_update import bind_initial, spec_for, update_tensors
from fedhft.edge_runtime.local_train import evaluate, open_trainer, train_local
from fedhft.edge_runtime.masking import AdapterMismatch
from fedhft.edge_runtime.model_receiver import ModelReceiver
from fedhft.edge_runtime.mqtt_link import Delivered, Incoming, LinkDown, LinkRefused, LinkUp, MqttLink
from fedhft.edge_runtime.outbox import Outbox
from fedhft.edge_runtime.sim_clock import DeviceTimes
from fedhft.edge_runtime.state import EdgeState, StateStore, restart_seq
from fedhft.edge_runtime.tokenize import TextEncoder
from fedhft.edge_runtime.trainer import BackendError, Trainer
from fedhft.edge_runtime.trust import ServerTrust
from fedhft.edge_runtime.uploads import Uploads
from fedhft.edge_runtime.virtual_rounds import VirtualRound, VirtualRounds
from fedhft.errors import FedHFTError
from fedhft.logs import event
from fedhft.protocol import (
    ENCODINGS,
    HelloMessage,
    ModelMessage,
    ProtocolError,
    UpdateMessage,
    ack_topic,
    decode_update,
    encode_hello,
    encode_update,
    hello_topic,
    key_topic,
    load_public_key,
    parse_topic,
    validate_id,
)
from fedhft.protocol.manifest import MANIFEST_NAME, load_manifest, sha256_file
from fedhft.protocol.mqtt import parse_broker_url
from fedhft.protocol.virtual_time import ScheduleMessage

log = logging.getLogger(__name__)


class EdgeClient:
    """One device in one task: owns the trainer, the state directory and the MQTT link."""

    def __init__(
        self,
        cfg: ClientConfig,
        *,
        battery: BatteryReader | None = read_battery_percent,
        trainer: Trainer | None = None,
        status: Callable[[str], None] | None = None,
    ) -> None:
        """``status`` gets one line per connection state change (`fedhft edge run` prints it); default: logged."""
        validate_id(cfg.task, "task")
        validate_id(cfg.client_id, "client_id")
        parse_broker_url(cfg.broker)
        if cfg.encoding not in ENCODINGS:
            raise ClientError(f"--encoding must be one of {ENCODINGS}, got {cfg.encoding!r}")
        if cfg.local_steps < 1 or cfg.rounds < 0:
            raise ClientError(f"--local-steps must be >= 1 and --rounds >= 0 (got {cfg.local_steps}, {cfg.rounds})")
        if cfg.virtual_time and cfg.sim_time_scale > 0:
            raise ClientError("--virtual-time and --sim-time-scale exclude each other: pick one simulated clock")
        if cfg.max_rounds_per_version < 0:
            raise ClientError(f"--max-rounds-per-version must be >= 0, got {cfg.max_rounds_per_version}")
        self.cfg = cfg
        self.battery = BatteryGate(battery, cfg.battery_min_percent, cfg.battery_check_seconds)
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
        self.clock = round_clock(self.manifest, cfg.sim_time_scale)
        self.texts, self.labels, names = load_labelled_file(
            cfg.data, cfg.text_column, cfg.label_column, cfg.label_names
        )
        check_num_labels(self.labels, names, self.manifest.num_labels, str(cfg.data))
        provisioned_key = load_public_key(cfg.server_key)
        self.batch_size = cfg.batch_size or int(self.manifest.plan.get("batch_size", 8))
        self.encoder = TextEncoder.for_manifest(self.manifest, cfg.artifacts)
        self.store = StateStore(cfg.state_dir)
        self.summary = ClientSummary()
        try:
            trust = ServerTrust(self.store.dir, provisioned_key)  # a key adopted after a rotation, if any
            self.state = (
                self._reset() if cfg.reset_state else self.store.load(cfg.task, cfg.client_id, self.manifest_sha256)
            )
            if self.state.cluster is None:
                self.state.cluster = cfg.cluster
            self.outbox = Outbox(self.store.outbox_dir, cfg.outbox_limit)
            self.trainer = trainer or open_trainer(
                cfg.backend, cfg.artifacts, self.manifest, cfg.learning_rate, cfg.trainer_timeout
            )
            self.spec = bind_initial(self.spec, self.trainer)  # full fine-tuning: the exported weights, pre-checkpoint
            self.models = ModelReceiver(cfg.task, cfg.client_id, self.spec, trust, self.store, self.state, self.summary)
            self.uploads = Uploads(self.outbox, cfg.task, cfg.client_id, cfg.ack_timeout)
            self.virtual = self._virtual_rounds() if cfg.virtual_time else None
            self._recover()
        except BaseException:
            self.store.close()
            raise
        self.events: queue.Queue[Any] = queue.Queue()
        self.summary.model_version = self.state.model_version
        self._link: MqttLink | None = None
        self._stop = threading.Event()
        self._status = status or (lambda line: event(log, line))
        self._last_status: tuple[str, str] | None = None
        self._failed_version: int | None = None  # a model that produced no valid update: not trained again
        self._promised: tuple[ModelMessage, ScheduleMessage, VirtualRound] | None = None  # promised, not trained

    def _virtual_rounds(self) -> VirtualRounds:
        cfg = self.cfg
        return VirtualRounds(
            cfg.task,
            cfg.client_id,
            self.spec,
            DeviceTimes.from_manifest(self.manifest),
            self.state,
            until_version=cfg.until_version,
            until_time=cfg.until_time,
        )

    @property
    def server_key(self) -> Ed25519PublicKey:
        """The server key models are verified with now (the provisioned one, or one adopted since)."""
        return self.models.trust.key

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
        self.models.restore_saved()
        for seq, payload in list(self.outbox.items()):
            self.state.next_seq = max(self.state.next_seq, seq + 1)  # even if unreadable: it may have been sent
            try:
                upd = decode_update(payload, expected_task=self.cfg.task, expected_client_id=self.cfg.client_id)
            except ProtocolError as e:
                event(log, "dropping an unreadable queued update", logging.WARNING, seq=seq, error=str(e))
                self.outbox.remove(seq)
                continue
            if self.state.trained_version is None or upd.base_version > self.state.trained_version:
                self.state.trained_version, self.state.version_rounds = upd.base_version, 1
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

    # ---- main loop ------------------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None, timeout: float | None = None) -> ClientSummary:
        """Run until ``stop`` is set, ``timeout`` seconds pass, or --rounds are trained and acknowledged."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self.open(stop)
        try:
            while not self.finished():
                if deadline is not None and time.monotonic() > deadline:
                    break
                self.pump(wait=0.1)
                self.train_due()
        finally:
            self.close()
        return self.summary

    # The loop's steps, also driven one pass at a time by a host of many devices (host.py).
    def open(self, stop: threading.Event | None = None) -> None:
        """Connect to the broker and publish what an earlier run left unacknowledged; ``stop`` ends the run."""
        self._stop = stop or self._stop
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
        self.models.link = self.uploads.link = self._link
        if self.virtual is not None:
            self.virtual.link = self._link
        self._link_ups = 0
        self.uploads.publish_queued()  # a previous run's unacknowledged updates: same seq, same bytes

    def finished(self) -> bool:
        """Stopped, or --rounds (the virtual run's end) reached with nothing left to acknowledge."""
        return self._stop.is_set() or self._done()

    def pump(self, wait: float = 0.0) -> None:
        """Handle the events that came (waiting up to ``wait`` s for the first) and re-send what timed out."""
        try:
            self._handle(self.events.get(timeout=wait) if wait > 0 else self.events.get_nowait())
        except queue.Empty:
            pass
        self._drain_events()
        self.uploads.check_ack_timeouts()

    def due_round(self) -> tuple[ModelMessage, ScheduleMessage | None] | None:
        """The round to train now: (model, its virtual-time schedule or None), or None when none is due."""
        if self._promised is not None:
            return self._promised[0], self._promised[1]
        model = self.models.model
        if model is None or self._rounds_reached() or not self.battery.ok():
            return None
        if self.virtual is not None:
            schedule = self.virtual.ready(model)
            return None if schedule is None else (model, schedule)
        return (model, None) if self._wants_round() else None

    def promise_due(self) -> bool:
        """Virtual time: promise the due round's landing time now, before it is trained (a host promises every
        due round of its devices before it trains any, so the server's clock never waits on its queue)."""
        due = self.due_round()
        if due is None or due[1] is None:
            return False
        self._promise(*due)
        return True

    def train_due(self) -> bool:
        """Train the due round, if any; True when one was trained (or tried)."""
        due = self.due_round()
        if due is None:
            return False
        self._train_round(*due)
        return True

    def close(self) -> None:
        """Disconnect and save the state (the client is done after this)."""
        if self._link is not None:
            self._link.stop()
        self.store.save(self.state)
        self.store.close()

    def _rounds_reached(self) -> bool:
        return bool(self.cfg.rounds) and self.summary.rounds_trained >= self.cfg.rounds

    def _done(self) -> bool:
        finished = self._rounds_reached() or (self.virtual is not None and self.virtual.left)
        return finished and not len(self.outbox)

    def _wants_round(self) -> bool:
        """Wall clock: a newer model to train, or (FedBuff) another round on the newest one held, once the last
        update is acknowledged (so a slow link never piles them up) and within --max-rounds-per-version."""
        st = self.state
        if st.needs_training():
            return True
        cap = self.cfg.max_rounds_per_version
        return (
            st.model_version is not None
            and st.trained_version == st.model_version
            and st.model_version != self._failed_version
            and (cap == 0 or st.version_rounds < cap)
            and not len(self.outbox)
        )

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
            self._on_link_down(ev)
        elif isinstance(ev, LinkRefused):
            raise ClientError(
                f"the broker at {self._broker_address()} refused the connection ({ev.reason}): "
                "check --username and --password (or --password-file)"
            )
        elif isinstance(ev, Delivered):
            self.uploads.on_delivered(ev)
            if self.virtual is not None:
                self.virtual.on_delivered(ev)

    def _broker_address(self) -> str:
        a = parse_broker_url(self.cfg.broker)
        return f"{a.host}:{a.port}"

    def _say(self, kind: str, reason: str, line: str) -> None:
        """Report a connection state change once (the same failure again is not a change)."""
        if self._last_status != (kind, reason):
            self._last_status = (kind, reason)
            self._status(line)

    def _on_link_down(self, ev: LinkDown) -> None:
        where = self._broker_address()
        delay = f"retrying in {ev.retry_in:.0f} s" if ev.retry_in >= 1 else f"retrying in {ev.retry_in:.1f} s"
        if ev.was_up:
            self._say("lost", ev.reason, f"lost the connection to {where}: {ev.reason}, {delay}")
        else:
            self._say("unreachable", ev.reason, f"cannot reach {where}: {ev.reason}, {delay}")

    def _on_link_up(self, ev: LinkUp) -> None:
        assert self._link is not None
        self._say("up", "", f"connected to {self._broker_address()}")
        event(log, "connected to the broker", logging.DEBUG, session_present=ev.session_present)
        self._link.subscribe([key_topic(self.cfg.task)])  # first: the retained chain comes before the models
        schedules = self.virtual.topics() if self.virtual is not None else []
        self._link.subscribe([ack_topic(self.cfg.task, self.cfg.client_id), *self.models.topics(), *schedules])
        self.models.subscribed_cluster = self.state.cluster
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
            self.uploads.publish_queued()  # send it again; the server dedupes by (client, seq)
        self._link_ups += 1

    def _on_message(self, ev: Incoming) -> None:
        if ev.topic == key_topic(self.cfg.task):
            self.models.on_key_chain(ev.payload)
            return
        try:
            task, kind, rest = parse_topic(ev.topic)
        except ProtocolError:
            return
        if task != self.cfg.task:
            return
        if kind == "ack" and rest == self.cfg.client_id:
            ack = self.uploads.on_ack(ev.payload)
            if ack is not None:
                self.summary.acked[ack.seq] = ack.status
        elif kind == "model":
            self.models.on_model(rest, ev.payload)
        elif kind == "schedule" and rest == self.cfg.client_id and self.virtual is not None:
            self.virtual.on_schedule(ev.payload)
            if self.virtual.finished:
                self.store.save(self.state)  # a restart then exits at once instead of waiting for a schedule

    # ---- training ---------------------------------------------------------------------------------------
    def _taken(self, schedule: ScheduleMessage | None) -> None:
        """The round of ``schedule`` is over: never run it again."""
        if schedule is not None:
            assert self.virtual is not None
            self.virtual.taken(schedule)
            self._promised = None

    def _promise(self, model: ModelMessage, schedule: ScheduleMessage) -> VirtualRound:
        """The virtual round of ``schedule`` on ``model``, its landing time promised once (before training)."""
        if self._promised is not None and self._promised[1] == schedule:
            return self._promised[2]
        assert self.virtual is not None and self._link is not None
        vround = self.virtual.begin(schedule, model, self.cfg.local_steps)
        self._link.publish(*self.virtual.promise(vround, self.state.next_seq, model.version), qos=1)
        self._promised = (model, schedule, vround)
        return vround

    def _train_round(self, model: ModelMessage, schedule: ScheduleMessage | None = None) -> None:
        """One round on ``model``; under virtual time the one ``schedule`` names, promised before training."""
        cfg, version = self.cfg, model.version
        again = self.state.version_rounds if self.state.trained_version == version else 0  # rounds on it so far
        extra: dict[str, float] = {} if schedule is None else self._promise(model, schedule).metrics()
        self.trainer.set_parameters(self.models.params(model))
        start = self.trainer.get_parameters()
        t_round = time.monotonic()
        if len(self.eval_texts):
            before = evaluate(self.trainer, self.encoder, self.eval_texts, self.eval_labels, self.batch_size)
            extra |= {"eval_accuracy": before.accuracy, "eval_loss": before.loss}
        event(log, "training started", version=version, steps=cfg.local_steps, seq=self.state.next_seq)
        report = train_local(
            self.trainer,
            self.encoder,
            self.texts,
            self.labels,
            steps=cfg.local_steps,
            batch_size=self.batch_size,
            seed=cfg.seed * 1_000_003 + version + 7919 * again,
            max_seconds=None if schedule is not None else cfg.max_train_seconds,  # virtual time: every step
            should_stop=self._stop.is_set,
        )
        if self._stop.is_set():
            event(log, "training interrupted; the next start trains this model again", version=version)
            return
        params = self.trainer.get_parameters()
        seq = self.state.next_seq
        try:
            tensors = update_tensors(self.spec, params, start)
            # virtual time: no host timing in the update, created on the virtual clock (the same bytes every run)
            wall = {"train_seconds": report.seconds} if schedule is None else {}
            created_at = time.time() if schedule is None else extra["virtual_time"]
            if schedule is None:
                extra |= self.clock.round(model, report.steps, tensors, t_round)
            msg = UpdateMessage(
                task=cfg.task,
                client_id=cfg.client_id,
                seq=seq,
                base_version=version,
                num_samples=max(1, report.samples),
                loss=report.loss,
                metrics={"train_accuracy": report.accuracy, "steps": report.steps, **wall, **extra},
                profile=self.manifest.profile_name,
                manifest_sha256=self.manifest_sha256,
                created_at=created_at,
                tensors=tensors,
            )
            payload = encode_update(msg, cfg.encoding)
        except (ProtocolError, AdapterMismatch, BackendError) as e:
            event(log, "local training produced no valid update; skipping this model", logging.ERROR, error=str(e))
            self.state.trained_version, self._failed_version = version, version
            self._taken(schedule)
            self.store.save(self.state)
            return
        self.uploads.put(seq, payload)  # durable before anything else knows about seq
        self.state.next_seq = seq + 1
        self.state.trained_version, self.state.version_rounds = version, again + 1
        self._taken(schedule)
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
        self.uploads.publish(seq, payload)
