"""Inbound messages, in arrival order: hellos register clients; updates are checked, validated, stored, acked.

An update's expensive, order-free part (decode against the sender's plan, clip) runs in the decode pool as
soon as it arrives (:meth:`Ingest.prepare`). The verdicts are given in arrival order (addressing, registration,
seq and replays, then the decode result); the accepted ones of a batch share one durable group commit, and
only then does each update get its ack message and its MQTT PUBACK. A replayed seq that was already stored
gets a "duplicate" ack and is never aggregated twice.

In an ingest process (``--role ingest``, roles.py) the same code runs without aggregating: ``sync`` reads the
registry entries and the version from the database before each batch and hello, stored updates are left there
for the aggregator (``on_stored``), and there is no publisher (the aggregator publishes a new client's model).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from fedhft.broker_server import sim_time
from fedhft.broker_server.federation import Federation, PendingUpdate
from fedhft.broker_server.metrics import Metrics, refresh_gauges
from fedhft.broker_server.publisher import Outbound, Publisher
from fedhft.broker_server.state_backend import StateBackend
from fedhft.broker_server.state_dir import StateError, StorageFull
from fedhft.broker_server.state_schema import ClientRegistration, StagedUpdate
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
)
from fedhft.logs import event
from fedhft.protocol import (
    HEAD_BIAS,
    HEAD_WEIGHT,
    AckMessage,
    HelloMessage,
    ProtocolError,
    UpdateMessage,
    ack_topic,
    decode_hello,
    encode_ack,
    parse_topic,
)

log = logging.getLogger("fedhft.server")

HELLO_MAX_BYTES = 256 * 1024


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


class Ingest:
    """Takes the task's hellos and updates into the registry, the store and the federation; acks updates."""

    def __init__(
        self,
        task: str,
        spec: GlobalSpec,
        store: StateBackend,
        federation: Federation,
        registry: dict[str, ClientInfo],
        metrics: Metrics,
        out: Outbound,
        publisher: Publisher | None,
        *,
        clip_norm: float | None,
        max_staleness: int,
    ) -> None:
        self.task = task
        self.spec = spec
        self.store = store
        self.federation = federation
        self.registry = registry
        self.metrics = metrics
        self.out = out
        self.publisher = publisher
        self.clip_norm = clip_norm
        self.max_staleness = max_staleness
        # Where a stored update goes: the federation's buffer; on a simulated fleet's clock (virtual_pacing.py) it
        # is held until its virtual time comes, and registrations and refused updates are reported there.
        self.on_stored: Callable[[PendingUpdate], None] = federation.add_pending
        self.on_registered: Callable[[str], None] | None = None
        self.on_refused: Callable[[str, int], None] | None = None
        # An ingest process (roles.py): brings the registry entries of these clients and the version up to date.
        self.sync: Callable[[Sequence[str]], None] | None = None

    def handle_batch(self, batch: Sequence[Inbound]) -> None:
        """Process messages in arrival order; consecutive updates share one durable commit, consecutive hellos
        another."""
        run: list[Inbound] = []
        run_kind = ""
        for msg in batch:
            try:
                task, kind, _ = parse_topic(msg.topic)
            except ProtocolError:
                task, kind = "", ""
            kind = kind if task == self.task and kind in ("update", "hello") else ""
            if run and kind != run_kind:
                self._handle_run(run_kind, run)
                run = []
            if kind:
                run.append(msg)
                run_kind = kind
            else:
                self.out.ack(msg.mid, msg.qos)
        if run:
            self._handle_run(run_kind, run)

    def _handle_run(self, kind: str, run: Sequence[Inbound]) -> None:
        if kind == "update":
            self._handle_updates(run)
            return
        self._handle_hellos(run)
        for msg in run:
            self.out.ack(msg.mid, msg.qos)

    def _decode_hello(self, msg: Inbound) -> tuple[HelloMessage, ClientPlan] | None:
        """The hello and its checked plan; None (counted, one line naming the client) for a bad one."""
        _, _, topic_client = parse_topic(msg.topic)
        try:
            hello = decode_hello(msg.payload, HELLO_MAX_BYTES, expected_task=self.task)
            if hello.client_id != topic_client:
                raise PlanRejected(f"hello names client {hello.client_id!r} on the topic of {topic_client!r}")
            return hello, ClientPlan.from_plan(hello.plan, self.spec)
        except (ProtocolError, PlanRejected) as exc:
            self.metrics.inc("fedhft_hellos_total", {"status": "rejected", "reason": type(exc).__name__})
            event(log, "hello rejected", logging.WARNING, client=topic_client, error=exc)
            return None

    def _handle_hellos(self, run: Sequence[Inbound]) -> None:
        """Register consecutive hellos: the changed registrations in ONE transaction, committed before any of
        them is registered in memory or sent its model (a client's last hello in the run wins)."""
        hellos = [h for h in map(self._decode_hello, run) if h is not None]
        if not hellos:
            return
        if self.sync is not None:
            self.sync(sorted({hello.client_id for hello, _ in hellos}))
        latest = {hello.client_id: (hello, plan) for hello, plan in hellos}
        changed = {
            cid: (hello, plan)
            for cid, (hello, plan) in latest.items()
            if (known := self.registry.get(cid)) is None
            or (known.plan, known.manifest_sha256, known.profile) != (plan, hello.manifest_sha256, hello.profile)
        }
        if changed:
            try:
                self.store.upsert_clients(
                    [ClientRegistration(cid, h.profile, h.manifest_sha256, h.plan) for cid, (h, _) in changed.items()]
                )
            except StateError as exc:  # the changed registrations are not taken; unchanged ones stand
                failed = [hello.client_id for hello, _ in hellos if hello.client_id in changed]
                self.metrics.inc("fedhft_hellos_total", {"status": "error", "reason": "storage"}, len(failed))
                event(log, "could not store hellos", logging.ERROR, count=len(changed), error=exc)
                hellos = [(hello, plan) for hello, plan in hellos if hello.client_id not in changed]
                changed = {}
            for cid, (hello, plan) in changed.items():
                known = self.registry.get(cid)
                last_seq = known.last_seq if known else -1
                self.registry[cid] = ClientInfo(plan, hello.profile, hello.manifest_sha256, last_seq)
                self.federation.register(cid, plan)
        for hello, plan in hellos:
            self.metrics.inc("fedhft_hellos_total", {"status": "accepted", "reason": ""})
            event(log, "client registered", client=hello.client_id, profile=hello.profile, modules=len(plan.ranks))
        refresh_gauges(self.metrics, self.federation)
        if changed and self.publisher is not None:  # their models of the current version, at their ranks (version
            # 0: ΔW = 0, LoRA-initialized A), encoded and signed per client (the target is in the signed payload)
            self.publisher.publish([self.federation.client_model(cid) for cid in changed])
        if self.on_registered is not None:
            for hello, _ in hellos:
                self.on_registered(hello.client_id)

    def prepare(self, msg: Inbound) -> Prepared:
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
                        prep.tensors, prep.scale = clip_update(update.tensors, self.clip_norm)
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
            check_version(prep.update.base_version, self.federation.version, self.max_staleness)
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
            virtual_time=sim_time.sent_at(update),
        )
        return Verdict("accepted", "", "", topic_client, seq, staged, clipped=prep.scale < 1.0)

    def _handle_updates(self, run: Sequence[Inbound]) -> None:
        if self.sync is not None:
            self.sync(sorted({parse_topic(m.topic)[2] for m in run}))
        batch_seq: dict[str, int] = {}
        batch_keys: set[tuple[str, int]] = set()
        verdicts: list[Verdict] = []
        for msg in run:
            prep = msg.prepared.result() if msg.prepared is not None else self.prepare(msg)
            msg.prepared = None
            if prep.header is not None and self.registry.get(prep.topic_client) is not prep.info:
                prep = self.prepare(msg)  # decoded before a hello that changed this client's registration
            v = self._judge(msg, prep, batch_seq, batch_keys)
            if v.status == "accepted" and v.client_id is not None and v.seq is not None:
                batch_seq[v.client_id] = v.seq
                batch_keys.add((v.client_id, v.seq))
            verdicts.append(v)
        accepted = [v for v in verdicts if v.staged is not None]
        staged = [v.staged for v in accepted if v.staged is not None]
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
                for v, s, row in zip(accepted, staged, stored, strict=True):
                    self.registry[s.client_id].last_seq = max(self.registry[s.client_id].last_seq, s.seq)
                    if row.id == 0:  # another ingest process stored this (client, seq) first
                        v.status, v.reason, v.detail = "duplicate", REPLAY, f"seq {s.seq} was already accepted"
                        continue
                    self.on_stored(
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
                self.out.ack(msg.mid, msg.qos)
                continue
            self._count(v)
            if v.status == "rejected" and self.on_refused is not None and v.client_id is not None and v.seq is not None:
                self.on_refused(v.client_id, v.seq)
            if v.client_id is not None and v.seq is not None:
                reason = v.reason if not v.detail else f"{v.reason}: {v.detail}"
                self.send_ack(v.client_id, v.seq, v.status, reason[:1000])
            self.out.ack(msg.mid, msg.qos)
        refresh_gauges(self.metrics, self.federation)

    def _count(self, v: Verdict) -> None:
        self.metrics.inc("fedhft_updates_total", {"status": v.status, "reason": v.reason})
        if v.clipped:
            self.metrics.inc("fedhft_updates_clipped_total", {"bound": "clip_norm"})
        level = logging.INFO if v.status != "rejected" else logging.WARNING
        event(log, f"update {v.status}", level, client=v.client_id, seq=v.seq, reason=v.reason, detail=v.detail)

    def send_ack(self, client_id: str, seq: int, status: str, reason: str) -> None:
        """The server's ack message for one update (QoS 1): the device drops it from its outbox."""
        ack = AckMessage(self.task, client_id, seq, status, reason, self.federation.version)
        self.out.publish(ack_topic(self.task, client_id), encode_ack(ack))
