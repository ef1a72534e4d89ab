"""The server process: an MQTT v5 shell (paho) around the validator, the state store and the coordinator.

Threads: paho's network thread queues inbound messages (a bounded queue, so a slow server pushes back on
the broker) and hands each update to a small decode pool at once (decode against the sender's plan, clip:
zlib and numpy release the GIL). The main thread does everything that has an order: verdicts in arrival
order (seq, replays), one durable group commit per batch of updates, then one QoS 1 ack message per
update and only then the MQTT PUBACK (paho sends it when we call ``ack``: ``manual_ack=True``);
aggregation when the FedBuff rule says so; the durable version commit; signed, retained models (encoded
in the pool). The metrics endpoint runs in its own thread.

The broker session is persistent (clean_start=False, session expiry), so updates that reached the broker
while the server was down, or before their PUBACK, are delivered again after a restart; a replayed seq
that was already stored gets a "duplicate" ack and is never aggregated twice.
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.subscribeoptions import SubscribeOptions

from fedhft.broker_server.federation import Federation, FederationConfig, PendingUpdate, virtual_time_of
from fedhft.broker_server.key_rotation import load_chain
from fedhft.broker_server.metrics import Metrics, MetricsServer
from fedhft.broker_server.models import ModelFactors
from fedhft.broker_server.state_store import StagedUpdate, StateError, StateStore, StorageFull
from fedhft.broker_server.validation import (
    MALFORMED,
    MANIFEST_MISMATCH,
    MISADDRESSED,
    REPLAY,
    UNKNOWN_CLIENT,
    ClientPlan,
    GlobalSpec,
    PlanRejected,
    UpdateHeader,
    UpdateRejected,
    check_version,
    clip_update,
    decode_checked,
    peek_update_header,
    scale_update,
    to_client_update,
)
from fedhft.errors import FedHFTError
from fedhft.logs import event
from fedhft.protocol import (
    HEAD_BIAS,
    HEAD_WEIGHT,
    AckMessage,
    KeyChainMessage,
    ModelMessage,
    ProtocolError,
    UpdateMessage,
    ack_topic,
    decode_hello,
    decode_update,
    encode_ack,
    encode_key_chain,
    encode_model,
    hello_filter,
    key_id,
    key_topic,
    model_topic,
    parse_topic,
    shared_subscription,
    update_filter,
    validate_id,
)
from fedhft.protocol.manifest import load_manifest
from fedhft.protocol.mqtt import make_client, parse_broker_url, session_properties

log = logging.getLogger("fedhft.server")

HELLO_MAX_BYTES = 256 * 1024
RESTORE_MAX_BYTES = 1 << 30  # stored payloads passed their client's size limit when they arrived
QUEUE_SIZE = 128  # inbound messages held (each may carry its decoded tensors)
STORAGE_RETRY_SECONDS = 5.0
AUTH_FAILURES = (134, 135)  # MQTT v5: bad user name or password, not authorized


def limit_blas_threads(n: int = 1) -> bool:
    """Cap the OpenBLAS threads of this process unless OPENBLAS_NUM_THREADS is set; True when capped.

    The server's matrices are small (a few hundred rows): multi-threaded BLAS only adds contention, which
    made a 1536 x 26 QR 25x slower on a busy 2-core host.
    """
    if os.environ.get("OPENBLAS_NUM_THREADS"):
        return False
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    paths = sorted(
        {ln.split()[-1] for ln in maps.splitlines() if "openblas" in ln.lower() and ln.split()[-1][:1] == "/"}
    )
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for symbol in ("openblas_set_num_threads", "scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_"):
            setter = getattr(lib, symbol, None)
            if setter is not None:
                setter(ctypes.c_int(n))
                return True
    return False


class ServiceError(FedHFTError):
    """The server cannot start or keep running (bad broker URL, refused credentials, ...)."""


@dataclass(frozen=True)
class ServerConfig:
    """Everything `fedhft server run` takes."""

    broker: str
    task: str
    state_dir: Path
    manifest: Path
    federation: FederationConfig = field(default_factory=FederationConfig)
    clip_norm: float | None = None
    group: str = "fedhft-server"
    client_id: str | None = None
    username: str | None = None
    password: str | None = None
    tls_ca: Path | None = None
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    keep_versions: int = 2
    model_encoding: str = "fp32"
    session_expiry: int = 3600
    max_batch: int = 64
    decode_threads: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))


@dataclass
class ClientInfo:
    """The registry's view of one client."""

    plan: ClientPlan
    profile: str
    manifest_sha256: str
    last_seq: int = -1


@dataclass
class Inbound:
    """One message from the broker; updates start decoding in the pool as soon as they arrive."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    received_at: float
    prepared: Future[Prepared] | None = None


@dataclass
class Prepared:
    """What the decode pool found out about one update message."""

    topic_client: str
    header: UpdateHeader | None
    info: ClientInfo | None = None  # the registration it was decoded against
    update: UpdateMessage | None = None
    error: UpdateRejected | None = None
    tensors: dict[str, np.ndarray] | None = None
    scale: float = 1.0


@dataclass
class Verdict:
    """The outcome of validating one update message."""

    status: str  # accepted | duplicate | rejected
    reason: str = ""
    detail: str = ""
    client_id: str | None = None  # whom to ack (None: cannot be acked)
    seq: int | None = None
    staged: StagedUpdate | None = None
    clipped: bool = False


class Server:
    """One server process for one task; construct, then :meth:`run` until ``stop`` is set."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        limit_blas_threads(1)
        self.task = validate_id(config.task, "task", ServiceError)
        validate_id(config.group, "share group", ServiceError)
        self.address = parse_broker_url(config.broker, ServiceError, scheme_optional=True)
        self.spec = GlobalSpec.from_manifest(load_manifest(config.manifest))
        self.metrics = Metrics()
        self.store = StateStore(config.state_dir, self.task, self.spec.fingerprint())  # lock before anything else
        try:
            self.key = self.store.signing_key()
            self.key_chain = load_chain(self.store.dir, self.key)
            self.registry: dict[str, ClientInfo] = {}
            self.federation = self._restore()
        except BaseException:
            self.store.close()
            raise
        self.inbox: queue.Queue[Inbound] = queue.Queue(maxsize=QUEUE_SIZE)
        self._update_prefix = update_filter(self.task)[:-1]
        self.client: mqtt.Client | None = None
        self.metrics_server: MetricsServer | None = None
        self._ready = threading.Event()
        self._fatal: str | None = None
        self._retry_at = 0.0
        self._initial_published = False
        self._last_publish: mqtt.MQTTMessageInfo | None = None
        self._pool = (
            ThreadPoolExecutor(config.decode_threads, thread_name_prefix="fedhft-decode")
            if config.decode_threads > 1
            else None
        )
        self._refresh_gauges()

    # ---- startup ------------------------------------------------------------------------------------------
    def _restore(self) -> Federation:
        """Rebuild registry and coordinator from the store (after its crash recovery)."""
        meta = self.store.meta()
        latest = self.store.latest_version()
        stored_aggregator, aggregator = meta.get("aggregator", "fedhft"), self.config.federation.aggregator
        if latest and stored_aggregator != aggregator:
            raise ServiceError(
                f"state dir {self.config.state_dir} holds --aggregator {stored_aggregator} state, not {aggregator}; "
                "pass the same --aggregator or use a fresh --state"
            )
        states = self.store.load_states(latest) if latest else None
        rows = self.store.load_clients()
        federation = Federation(
            self.spec,
            self.config.federation,
            version=latest.version if latest else 0,
            states=states,
            memberships={cid: r.membership for cid, r in rows.items() if r.membership},
            aggregations=int(meta.get("aggregations", "0")),
            last_cluster_round=int(meta.get("last_cluster_round", "-1")),
            virtual_time=float(meta.get("virtual_time", "0")),
        )
        for cid, row in rows.items():
            try:
                plan = ClientPlan.from_plan(row.plan, self.spec)
            except PlanRejected as exc:
                event(log, "dropping a stored client whose plan no longer fits", logging.WARNING, client=cid, error=exc)
                continue
            self.registry[cid] = ClientInfo(plan, row.profile, row.manifest_sha256, row.last_seq)
            federation.register(cid, plan)
            if row.head:
                federation.set_head(cid, row.head)
        lost = []
        for stored in self.store.load_pending():
            try:
                payload = self.store.load_payload(stored)
                decoded = decode_update(payload, max_bytes=RESTORE_MAX_BYTES)
                tensors = scale_update(decoded.tensors, stored.clip_scale)
                to_client_update(stored.client_id, stored.num_samples, stored.base_version, tensors, self.spec)
            except (StateError, FedHFTError, KeyError) as exc:
                event(log, "a stored update cannot be read", logging.ERROR, id=stored.id, error=exc)
                lost.append(stored.id)
                continue
            federation.add_pending(
                PendingUpdate(
                    stored.id,
                    stored.client_id,
                    stored.seq,
                    stored.base_version,
                    stored.num_samples,
                    stored.received_at,
                    tensors,
                    virtual_time_of(decoded.metrics),
                )
            )
        self.store.mark_rejected(lost, "lost")
        event(
            log,
            "state restored",
            version=federation.version,
            clients=len(self.registry),
            pending=len(federation.pending),
            clusters=federation.num_clusters,
        )
        return federation

    def _connect(self) -> None:
        cfg = self.config
        client_id = cfg.client_id or f"fedhft-server-{self.task}-{cfg.group}"
        client = make_client(
            client_id,
            username=cfg.username or None,
            password=cfg.password,
            tls=self.address.tls,
            tls_ca=cfg.tls_ca,
            manual_ack=True,
            error=ServiceError,
        )
        client.max_queued_messages_set(0)
        client.max_inflight_messages_set(64)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        props = session_properties(cfg.session_expiry)
        self.client = client
        client.connect_async(self.address.host, self.address.port, keepalive=30, clean_start=False, properties=props)
        client.loop_start()

    # ---- paho callbacks (network thread) -------------------------------------------------------------------
    def _on_connect(
        self, client: mqtt.Client, _userdata: object, flags: object, reason: object, _props: object
    ) -> None:
        code = getattr(reason, "value", 0)
        if getattr(reason, "is_failure", False):
            event(log, "broker refused the connection", logging.ERROR, reason=str(reason))
            if code in AUTH_FAILURES:
                self._fatal = f"the broker refused the server's credentials ({reason})"
            return
        event(log, "connected to the broker", session_present=getattr(flags, "session_present", None))
        opts = SubscribeOptions(qos=1)
        # one share name per filter: rumqttd (iotcore) keys shared subscriptions by name alone
        group = self.config.group
        client.subscribe(
            [
                (shared_subscription(f"{group}.update", update_filter(self.task)), opts),
                (shared_subscription(f"{group}.hello", hello_filter(self.task)), opts),
            ]
        )

    def _on_subscribe(self, _c: mqtt.Client, _u: object, _mid: int, codes: Sequence[object], _p: object) -> None:
        failed = [str(c) for c in codes if getattr(c, "is_failure", False)]
        if failed:
            self._fatal = f"the broker refused the server's subscriptions ({', '.join(failed)}); check the ACL"
            return
        self._ready.set()
        self.metrics.set("fedhft_ready", 1)
        event(log, "subscribed", group=self.config.group, task=self.task)

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        inbound = Inbound(msg.topic, bytes(msg.payload), msg.mid, msg.qos, time.time())
        if self._pool is not None and msg.topic.startswith(self._update_prefix):
            inbound.prepared = self._pool.submit(self._prepare, inbound)
        self.inbox.put(inbound)

    def _on_connect_fail(self, _c: mqtt.Client, _u: object) -> None:
        broker = f"{self.address.host}:{self.address.port}"
        event(log, "cannot reach the broker; retrying", logging.WARNING, broker=broker)

    def _on_disconnect(self, _c: mqtt.Client, _u: object, _flags: object, reason: object, _p: object) -> None:
        self.metrics.set("fedhft_ready", 0)
        self._ready.clear()
        event(log, "disconnected from the broker", logging.WARNING, reason=str(reason))

    # ---- main loop ------------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set (or a fatal broker error): the whole life of the process."""
        cfg = self.config
        if cfg.metrics_port is not None:
            self.metrics_server = MetricsServer(self.metrics, cfg.metrics_host, cfg.metrics_port).start()
        self._connect()
        event(
            log,
            "server started",
            task=self.task,
            broker=f"{self.address.host}:{self.address.port}",
            key_id=key_id(self.key),
            version=self.federation.version,
        )
        try:
            while not stop.is_set():
                if self._fatal:
                    raise ServiceError(self._fatal)
                if self._ready.is_set() and not self._initial_published:
                    self._initial_published = True
                    self._publish_key_chain()  # before the models: a device adopts the key, then takes them
                    self._publish_models()  # idempotent: covers a crash between commit and publish
                self._step(time.time())
        finally:
            self.shutdown()

    def _step(self, now: float) -> None:
        wait = self.federation.seconds_until_due(now)
        timeout = 0.25 if wait is None else min(0.25, max(wait, 0.0))
        if now < self._retry_at:
            timeout = 0.25
        batch = self._drain(timeout)
        if batch:
            self.handle_batch(batch)
        now = time.time()
        if self.federation.pending and now >= self._retry_at and self.federation.due(now):
            self.aggregate_and_publish()

    def _drain(self, timeout: float) -> list[Inbound]:
        try:
            first = self.inbox.get(timeout=timeout) if timeout > 0 else self.inbox.get_nowait()
        except queue.Empty:
            return []
        batch = [first]
        while len(batch) < self.config.max_batch:
            try:
                batch.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        return batch

    def shutdown(self) -> None:
        """Disconnect, stop threads, close the store (idempotent)."""
        if self.client is not None:
            if self._last_publish is not None:
                try:
                    self._last_publish.wait_for_publish(timeout=5)
                except (RuntimeError, ValueError):
                    pass
            self.client.disconnect()
            self.client.loop_stop()
            self.client = None
        if self.metrics_server is not None:
            self.metrics_server.stop()
            self.metrics_server = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self.store.close()

    # ---- inbound messages ------------------------------------------------------------------------------------
    def handle_batch(self, batch: Sequence[Inbound]) -> None:
        """Process messages in arrival order; consecutive updates share one durable commit."""
        run: list[Inbound] = []
        for msg in batch:
            try:
                task, kind, _ = parse_topic(msg.topic)
            except ProtocolError:
                task, kind = "", ""
            if task == self.task and kind == "update":
                run.append(msg)
                continue
            if run:
                self._handle_updates(run)
                run = []
            if task == self.task and kind == "hello":
                self._handle_hello(msg)
            self._mqtt_ack(msg)
        if run:
            self._handle_updates(run)

    def _mqtt_ack(self, msg: Inbound) -> None:
        if self.client is not None and msg.qos > 0:
            self.client.ack(msg.mid, msg.qos)

    def _handle_hello(self, msg: Inbound) -> None:
        _, _, topic_client = parse_topic(msg.topic)
        try:
            hello = decode_hello(msg.payload, HELLO_MAX_BYTES, expected_task=self.task)
            if hello.client_id != topic_client:
                raise PlanRejected(f"hello names client {hello.client_id!r} on the topic of {topic_client!r}")
            plan = ClientPlan.from_plan(hello.plan, self.spec)
        except (ProtocolError, PlanRejected) as exc:
            self.metrics.inc("fedhft_hellos_total", {"status": "rejected", "reason": type(exc).__name__})
            event(log, "hello rejected", logging.WARNING, client=topic_client, error=exc)
            return
        known = self.registry.get(hello.client_id)
        changed = known is None or (known.plan, known.manifest_sha256, known.profile) != (
            plan,
            hello.manifest_sha256,
            hello.profile,
        )
        if changed:
            try:
                self.store.upsert_client(hello.client_id, hello.profile, hello.manifest_sha256, hello.plan)
            except StateError as exc:
                self.metrics.inc("fedhft_hellos_total", {"status": "error", "reason": "storage"})
                event(log, "could not store a hello", logging.ERROR, client=hello.client_id, error=exc)
                return
            last_seq = known.last_seq if known else -1
            self.registry[hello.client_id] = ClientInfo(plan, hello.profile, hello.manifest_sha256, last_seq)
            self.federation.register(hello.client_id, plan)
        self.metrics.inc("fedhft_hellos_total", {"status": "accepted", "reason": ""})
        event(log, "client registered", client=hello.client_id, profile=hello.profile, modules=len(plan.ranks))
        self._refresh_gauges()
        if changed:  # its model of the current version, at its ranks (version 0: ΔW = 0, LoRA-initialized A)
            self._publish([self.federation.client_model(hello.client_id)])

    def _prepare(self, msg: Inbound) -> Prepared:
        """The expensive, order-free part of validating an update (runs in the decode pool): for a
        registered client, decode against its plan and clip; the header is only peeked at (without
        decoding tensors) when there is no decoded message to take it from."""
        _, _, topic_client = parse_topic(msg.topic)
        info = self.registry.get(topic_client)
        prep = Prepared(topic_client, None, info)
        if info is not None:
            try:
                update = decode_checked(msg.payload, self.spec, info.plan, self.task, topic_client)
            except UpdateRejected as exc:
                prep.error = exc
            except Exception as exc:  # a decoder bug must not stop the server: reject this one update
                event(log, "unexpected error decoding an update", logging.ERROR, client=topic_client, error=repr(exc))
                prep.error = UpdateRejected(MALFORMED, f"cannot decode ({type(exc).__name__})")
            else:
                prep.header = UpdateHeader(update.task, update.client_id, update.seq)
                if update.manifest_sha256 != info.manifest_sha256:
                    prep.error = UpdateRejected(MANIFEST_MISMATCH, "update names another manifest than its hello")
                else:
                    try:
                        self.federation.check_update(update.tensors)  # dense-only aggregators refuse masks
                        prep.update = update
                        prep.tensors, prep.scale = clip_update(update.tensors, self.config.clip_norm)
                    except UpdateRejected as exc:
                        prep.error = exc
                return prep
        prep.header = peek_update_header(msg.payload)
        return prep

    def _judge(
        self, msg: Inbound, prep: Prepared, batch_seq: dict[str, int], batch_keys: set[tuple[str, int]]
    ) -> Verdict:
        """The verdict, in arrival order: addressing, registration, seq (replays), then the decode result."""
        header, topic_client = prep.header, prep.topic_client
        if header is None:
            return Verdict("rejected", MALFORMED, "cannot read the update header", None, None)
        seq = header.seq
        if header.task != self.task or header.client_id != topic_client:
            detail = f"update of {header.task}/{header.client_id} on the topic of {topic_client}"
            return Verdict("rejected", MISADDRESSED, detail, topic_client, seq)
        info = self.registry.get(topic_client)
        if info is None:
            return Verdict("rejected", UNKNOWN_CLIENT, "no hello from this client", topic_client, seq)
        last = max(info.last_seq, batch_seq.get(topic_client, -1))
        # A seq at or below the last accepted one is a replay only if it was stored: an update that the broker
        # lost in flight (a restart) and the device sends again after later ones is still new work.
        if seq <= last and (
            (topic_client, seq) in batch_keys
            or self.store.update_status(topic_client, seq) in ("pending", "aggregated", "rejected")
        ):
            return Verdict("duplicate", REPLAY, f"seq {seq} was already accepted", topic_client, seq)
        try:
            if prep.error is not None:
                raise prep.error
            if prep.update is None or prep.tensors is None:
                raise UpdateRejected(MALFORMED, "update was not decoded")
            check_version(prep.update.base_version, self.federation.version, self.config.federation.max_staleness)
        except UpdateRejected as exc:
            return Verdict("rejected", exc.reason, exc.detail, topic_client, seq)
        update = prep.update
        staged = StagedUpdate(
            client_id=topic_client,
            seq=seq,
            base_version=update.base_version,
            num_samples=update.num_samples,
            loss=update.loss,
            received_at=msg.received_at,
            clip_scale=prep.scale,
            payload=msg.payload,
            tensors=prep.tensors,
            virtual_time=virtual_time_of(update.metrics),
        )
        return Verdict("accepted", "", "", topic_client, seq, staged, clipped=prep.scale < 1.0)

    def _handle_updates(self, run: Sequence[Inbound]) -> None:
        batch_seq: dict[str, int] = {}
        batch_keys: set[tuple[str, int]] = set()
        verdicts: list[Verdict] = []
        for msg in run:
            prep = msg.prepared.result() if msg.prepared is not None else self._prepare(msg)
            msg.prepared = None
            if prep.header is not None and self.registry.get(prep.topic_client) is not prep.info:
                prep = self._prepare(msg)  # decoded before a hello that changed this client's registration
            v = self._judge(msg, prep, batch_seq, batch_keys)
            if v.status == "accepted" and v.client_id is not None and v.seq is not None:
                batch_seq[v.client_id] = v.seq
                batch_keys.add((v.client_id, v.seq))
            verdicts.append(v)
        staged = [v.staged for v in verdicts if v.staged is not None]
        heads = {
            s.client_id: {k: s.tensors[k] for k in (HEAD_WEIGHT, HEAD_BIAS)}
            for s in staged
            if HEAD_WEIGHT in s.tensors and HEAD_BIAS in s.tensors
        }
        stored_ok = True
        if staged:
            try:
                stored = self.store.commit_updates(staged, heads)
            except StateError as exc:
                stored_ok = False
                level = "disk_full" if isinstance(exc, StorageFull) else "storage"
                self.metrics.inc("fedhft_updates_total", {"status": "error", "reason": level}, len(staged))
                event(log, "could not store updates; not acknowledged", logging.ERROR, count=len(staged), error=exc)
            else:
                for s, row in zip(staged, stored, strict=True):
                    self.registry[s.client_id].last_seq = max(self.registry[s.client_id].last_seq, s.seq)
                    self.federation.add_pending(
                        PendingUpdate(
                            row.id,
                            s.client_id,
                            s.seq,
                            s.base_version,
                            s.num_samples,
                            s.received_at,
                            s.tensors,
                            s.virtual_time,
                        )
                    )
        for msg, v in zip(run, verdicts, strict=True):
            if v.status == "accepted" and not stored_ok:
                self._mqtt_ack(msg)
                continue
            self._count(v)
            if v.client_id is not None and v.seq is not None:
                reason = v.reason if not v.detail else f"{v.reason}: {v.detail}"
                self._send_ack(v.client_id, v.seq, v.status, reason[:1000])
            self._mqtt_ack(msg)
        self._refresh_gauges()

    def _count(self, v: Verdict) -> None:
        self.metrics.inc("fedhft_updates_total", {"status": v.status, "reason": v.reason})
        if v.clipped:
            self.metrics.inc("fedhft_updates_clipped_total", {"bound": "clip_norm"})
        level = logging.INFO if v.status != "rejected" else logging.WARNING
        event(log, f"update {v.status}", level, client=v.client_id, seq=v.seq, reason=v.reason, detail=v.detail)

    def _send_ack(self, client_id: str, seq: int, status: str, reason: str) -> None:
        ack = AckMessage(self.task, client_id, seq, status, reason, self.federation.version)
        if self.client is not None:
            self.client.publish(ack_topic(self.task, client_id), encode_ack(ack), qos=1)

    # ---- aggregation and models ---------------------------------------------------------------------------
    def aggregate_and_publish(self) -> bool:
        """One FedBuff flush: aggregate, commit durably, then publish; False when it could not commit."""
        t0 = time.perf_counter()
        result = self.federation.aggregate()
        try:
            if not result.aggregated_ids:
                for reason in sorted(set(result.dropped.values())):
                    self.store.mark_rejected([i for i, r in result.dropped.items() if r == reason], reason)
            else:
                self.store.commit_version(
                    result.version,
                    result.states,
                    result.aggregated_ids,
                    {cid: list(map(float, p)) for cid, p in result.memberships.items()},
                    {
                        "aggregations": str(result.aggregations),
                        "last_cluster_round": str(result.last_cluster_round),
                        "virtual_time": repr(result.virtual_time),
                        "aggregator": self.config.federation.aggregator,
                    },
                    dropped=result.dropped,
                    keep_versions=self.config.keep_versions,
                )
        except StateError as exc:
            self._retry_at = time.time() + STORAGE_RETRY_SECONDS
            event(log, "could not commit an aggregation; will retry", logging.ERROR, error=exc)
            return False
        self.federation.apply(result)
        for reason in result.dropped.values():
            self.metrics.inc("fedhft_updates_total", {"status": "dropped", "reason": reason})
        if not result.aggregated_ids:
            self._refresh_gauges()
            return True
        self.metrics.observe("fedhft_aggregation_seconds", time.perf_counter() - t0)
        if result.clipped:
            self.metrics.inc("fedhft_updates_clipped_total", {"bound": "clip_multiple"}, result.clipped)
        event(
            log,
            "aggregated",
            version=result.version,
            updates=len(result.aggregated_ids),
            dropped=len(result.dropped),
            clipped=result.clipped,
            clusters=len(result.states),
            reclustered=result.reclustered,
            seconds=round(time.perf_counter() - t0, 4),
        )
        self._publish_models()
        return True

    def _publish_key_chain(self) -> None:
        """The key chain, retained: devices that missed rotations follow it from the key they trust."""
        payload = encode_key_chain(KeyChainMessage(self.task, time.time(), self.key_chain), self.key)
        if self.client is not None:
            self.client.publish(key_topic(self.task), payload, qos=1, retain=True)

    def _publish_models(self) -> None:
        """Every client's model first (clients take the first model of a version), then the clusters'."""
        t0 = time.perf_counter()
        self._publish(self.federation.client_models())
        self._publish(self.federation.cluster_models())
        self.metrics.observe("fedhft_publish_seconds", time.perf_counter() - t0)
        self._refresh_gauges()

    def _publish(self, models: Sequence[ModelFactors]) -> None:
        """Encode and sign (in the pool: zlib and signing release the GIL), publish retained, in order."""
        version = self.federation.version

        def encode(m: ModelFactors) -> bytes:
            msg = ModelMessage(self.task, version, m.target, time.time(), "", dict(m.meta), m.tensors)
            return encode_model(msg, self.key, self.config.model_encoding)

        payloads = self._pool.map(encode, models) if self._pool is not None and len(models) > 1 else map(encode, models)
        for m, payload in zip(models, payloads, strict=True):
            if self.client is not None:
                self._last_publish = self.client.publish(model_topic(self.task, m.target), payload, qos=1, retain=True)

    def _refresh_gauges(self) -> None:
        f = self.federation
        self.metrics.set("fedhft_model_version", f.version)
        self.metrics.set("fedhft_pending_updates", len(f.pending))
        self.metrics.set("fedhft_clusters", f.num_clusters)
        counts = f.clients_per_cluster()
        self.metrics.replace("fedhft_clients", {(("cluster", str(c)),): float(n) for c, n in enumerate(counts)})
        if f.version > 0:
            ratios = f.collapse_ratios()
            self.metrics.replace(
                "fedhft_rank_collapse_ratio", {(("cluster", str(c)),): r for c, r in enumerate(ratios)}
            )
