"""The server process: an MQTT v5 shell (paho) around ingest, coordinator and publisher; it wires them up.

Threads: paho's network thread queues inbound messages (a bounded queue, so a slow server pushes back on
the broker) and hands each update to a small decode pool at once (ingest.py: decode against the sender's
plan, clip; zlib and numpy release the GIL). The main thread does everything that has an order: verdicts,
the durable group commit and the acks (ingest.py), then the MQTT PUBACK (paho sends it when we call ``ack``:
``manual_ack=True``); a flush when the FedBuff rule says so and its durable version commit (coordinator.py);
signed, retained models, encoded in the pool (publisher.py). The metrics endpoint runs in its own thread.
The flush rule (flush_rules.py) is FedBuff's (``--mode async``) or synchronous rounds (``--mode sync``), on the
wall clock, or with ``--virtual-time`` on a simulated fleet's clock (virtual_pacing.py: promises in, schedules
out, updates processed in virtual-time order).

The broker session is persistent (clean_start=False, session expiry), so updates that reached the broker
while the server was down, or before their PUBACK, are delivered again after a restart; a replayed seq
that was already stored gets a "duplicate" ack and is never aggregated twice.

``--role ingest`` and ``--role aggregator`` split this process in two over a PostgreSQL state (roles.py): ingest
processes run the ingest half (no coordinator, no publisher, no key), the aggregator the rest (no subscriptions;
its inputs come from the database).
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.subscribeoptions import SubscribeOptions

from fedhft.broker_server.coordinator import POLL_SECONDS, Coordinator
from fedhft.broker_server.federation import FederationConfig
from fedhft.broker_server.flush_rules import FlushRule
from fedhft.broker_server.ingest import Inbound, Ingest
from fedhft.broker_server.metrics import Metrics, MetricsServer, refresh_gauges
from fedhft.broker_server.publisher import Outbound, Publisher
from fedhft.broker_server.restore import restore
from fedhft.broker_server.roles import AggregatorFeed, IngestView, leave_to_aggregator, role_problem
from fedhft.broker_server.state_backend import open_state
from fedhft.broker_server.state_dir import state_label
from fedhft.broker_server.validation import GlobalSpec
from fedhft.broker_server.virtual_pacing import VirtualPacing
from fedhft.errors import FedHFTError
from fedhft.logs import event
from fedhft.protocol import (
    ProtocolError,
    hello_filter,
    key_id,
    parse_topic,
    shared_subscription,
    update_filter,
    validate_id,
)
from fedhft.protocol.manifest import load_manifest
from fedhft.protocol.mqtt import AUTH_REFUSALS, make_client, parse_broker_url, session_properties
from fedhft.protocol.topics import PROMISE, promise_filter

log = logging.getLogger("fedhft.server")

QUEUE_SIZE = 128  # inbound messages held (each may carry its decoded tensors)


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


def _kind(topic: str) -> str:
    try:
        return parse_topic(topic)[1]
    except ProtocolError:
        return ""


class ServiceError(FedHFTError):
    """The server cannot start or keep running (bad broker URL, refused credentials, ...)."""


@dataclass(frozen=True)
class ServerConfig:
    """Everything `fedhft server run` takes."""

    broker: str
    task: str
    state_dir: Path | str  # a state directory, or a postgresql:// URL (state_backend.py)
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
    mode: str = "async"  # async (FedBuff) | sync (rounds): flush_rules.py
    round_deadline: float | None = None  # sync: seconds (virtual ones with virtual_time) a round waits at most
    virtual_time: bool = False  # order updates by a simulated fleet's promised times (`fedhft simulate`)
    rounds_per_version: int = 0  # virtual time, async: a device's updates from one version (0: no cap)
    updates_per_flush: int = 0  # virtual time, async: a device's updates in one buffer (0: no cap)
    virtual_timeout: float = 300.0  # wall seconds of fleet-wide silence before owing devices are dropped
    virtual_fleet: int = 0  # process nothing before this many devices said hello
    key_dir: Path | None = None  # the signing key's directory, with a postgresql:// state
    standby: bool = False  # postgresql:// only: wait for the running server's lock, then take over
    role: str = "all"  # all | ingest | aggregator (postgresql:// only): roles.py
    db_reconnect_timeout: float = 60.0  # postgresql:// only: seconds a lost connection is retried (state_pg.py)

    def flush_rule(self) -> FlushRule:
        """The flush rule; ``--window-seconds`` counts virtual seconds with ``virtual_time``."""
        fed = self.federation
        return FlushRule(
            self.mode,
            fed.buffer_size,
            fed.window_seconds,
            self.round_deadline,
            self.rounds_per_version,
            self.updates_per_flush,
        )


class Server:
    """One server process for one task; construct, then :meth:`run` until ``stop`` is set."""

    def __init__(self, config: ServerConfig, stop: threading.Event | None = None) -> None:
        """Open the state (a standby waits here for the lock until ``stop`` is set), restore, wire up."""
        self.config = config
        limit_blas_threads(1)
        self.task = validate_id(config.task, "task", ServiceError)
        validate_id(config.group, "share group", ServiceError)
        self.address = parse_broker_url(config.broker, ServiceError, scheme_optional=True)
        problem = role_problem(config.role, config.state_dir, standby=config.standby, virtual_time=config.virtual_time)
        if problem:
            raise ServiceError(problem)
        self.role = config.role
        rule = config.flush_rule()
        self.spec = GlobalSpec.from_manifest(load_manifest(config.manifest))
        self.metrics = Metrics()
        standby = (stop or threading.Event()) if config.standby else None
        fingerprint, ingest_only = self.spec.fingerprint(), self.role == "ingest"
        self.store = open_state(
            config.state_dir, self.task, fingerprint, config.key_dir, standby, self.role, config.db_reconnect_timeout
        )
        self.view: IngestView | None = None
        pg: Any = self.store  # the roles' PostgreSQL store (role_problem refused any other state for them)
        try:
            self._check_aggregator()
            if ingest_only:
                self.view = IngestView(pg, self.spec, config.federation)
                self.federation, self.registry = self.view.federation, self.view.registry
            else:
                self.key = self.store.signing_key()
                self.key_chain = self.store.key_chain(self.key)
                if self.role == "aggregator":
                    pg.listen_clients()  # before restoring: no registration falls in between
                self.federation, self.registry = restore(self.store, self.spec, config.federation)
        except BaseException:
            self.store.close()
            raise
        self.inbox: queue.Queue[Inbound] = queue.Queue(maxsize=QUEUE_SIZE)
        self._update_prefix = update_filter(self.task)[:-1]
        self.out = Outbound()
        self.metrics_server: MetricsServer | None = None
        self._ready = threading.Event()
        self._fatal: str | None = None
        self._initial_published = False
        self._pool = (
            ThreadPoolExecutor(config.decode_threads, thread_name_prefix="fedhft-decode")
            if config.decode_threads > 1
            else None
        )
        self.publisher = (
            None
            if ingest_only
            else Publisher(
                self.task,
                self.key,
                self.key_chain,
                self.federation,
                self.metrics,
                self.out,
                config.model_encoding,
                self._pool,
            )
        )
        self.ingest = Ingest(
            self.task,
            self.spec,
            self.store,
            self.federation,
            self.registry,
            self.metrics,
            self.out,
            self.publisher,
            clip_norm=config.clip_norm,
            max_staleness=config.federation.max_staleness,
        )
        self.coordinator: Coordinator | None = None
        self.feed: AggregatorFeed | None = None
        if self.view is not None:
            self.ingest.sync, self.ingest.on_stored = self.view.sync, leave_to_aggregator
        else:
            assert self.publisher is not None
            self.coordinator = Coordinator(
                self.federation,
                self.store,
                self.metrics,
                self.publisher,
                aggregator=config.federation.aggregator,
                keep_versions=max(config.keep_versions, self.federation.history.depth),  # a restart rebuilds them
                rule=rule,
            )
        if self.role == "aggregator":
            assert self.publisher is not None
            self.feed = AggregatorFeed(pg, self.spec, self.federation, self.registry, self.publisher, self.metrics)
        self.pacing: VirtualPacing | None = None
        if config.virtual_time and self.coordinator is not None:
            self.pacing = VirtualPacing(
                self.task,
                self.federation,
                self.coordinator,
                self.store,
                self.metrics,
                self.out,
                rule,
                config.virtual_timeout,
                config.virtual_fleet,
            )
            self.ingest.on_registered = self.pacing.registered
            self.ingest.on_stored = self.pacing.hold
            self.ingest.on_refused = self.pacing.refused
            self.pacing.resume(list(self.registry))  # a restarted server reschedules the devices it knows
        refresh_gauges(self.metrics, self.federation)

    # ---- startup ------------------------------------------------------------------------------------------
    def _check_aggregator(self) -> None:
        """A state dir's versions continue only under the aggregator that made them."""
        stored_aggregator, aggregator = self.store.meta().get("aggregator", "fedhft"), self.config.federation.aggregator
        if self.store.latest_version() and stored_aggregator != aggregator:
            raise ServiceError(
                f"{state_label(self.config.state_dir)} holds --aggregator {stored_aggregator} state, not {aggregator}; "
                "pass the same --aggregator or use a fresh --state"
            )

    def _client_id(self) -> tuple[str, int]:
        """The MQTT client id and session expiry: an ingest process without ``--client-id`` takes a fresh id
        whose session (and share of the subscription) ends with its connection; the devices send again what it
        did not acknowledge."""
        cfg = self.config
        if cfg.client_id:
            return cfg.client_id, cfg.session_expiry
        if self.role == "ingest":
            return f"fedhft-ingest-{self.task}-{cfg.group}-{socket.gethostname()}-{os.getpid()}", 0
        name = "aggregator" if self.role == "aggregator" else "server"
        return f"fedhft-{name}-{self.task}-{cfg.group}", cfg.session_expiry

    def _connect(self) -> None:
        cfg = self.config
        client_id, session_expiry = self._client_id()
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
        props = session_properties(session_expiry)
        self.out.client = client
        client.connect_async(self.address.host, self.address.port, keepalive=30, clean_start=False, properties=props)
        client.loop_start()

    # ---- paho callbacks (network thread) -------------------------------------------------------------------
    def _on_connect(
        self, client: mqtt.Client, _userdata: object, flags: object, reason: object, _props: object
    ) -> None:
        code = getattr(reason, "value", 0)
        if getattr(reason, "is_failure", False):
            event(log, "broker refused the connection", logging.ERROR, reason=str(reason))
            if code in AUTH_REFUSALS:
                self._fatal = f"the broker refused the server's credentials ({reason})"
            return
        event(log, "connected to the broker", session_present=getattr(flags, "session_present", None))
        if self.role == "aggregator":  # publishes only: its inputs come from the database
            self._ready.set()
            self.metrics.set("fedhft_ready", 1)
            return
        opts = SubscribeOptions(qos=1)
        # one share name per filter: rumqttd (iotcore) keys shared subscriptions by name alone
        group = self.config.group
        filters = [
            (shared_subscription(f"{group}.update", update_filter(self.task)), opts),
            (shared_subscription(f"{group}.hello", hello_filter(self.task)), opts),
        ]
        if self.pacing is not None:
            filters.append((shared_subscription(f"{group}.promise", promise_filter(self.task)), opts))
        client.subscribe(filters)

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
            inbound.prepared = self._pool.submit(self.ingest.prepare, inbound)
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
            role=self.role,
            key_id=key_id(self.key) if self.publisher is not None else None,
            version=self.federation.version,
        )
        try:
            while not stop.is_set():
                if self._fatal:
                    raise ServiceError(self._fatal)
                if self._ready.is_set() and not self._initial_published and self.publisher is not None:
                    self._initial_published = True
                    self.publisher.publish_key_chain()  # before the models: a device adopts the key, then takes them
                    self.publisher.publish_models()  # idempotent: covers a crash between commit and publish
                self._step(time.time())
        finally:
            self.shutdown()

    def _step(self, now: float) -> None:
        if self.coordinator is None:  # an ingest process
            batch = self._drain(POLL_SECONDS)
            if batch:
                self.handle_batch(batch)
            else:
                self.store.ping()
            return
        if self.feed is not None:  # the aggregator: its inputs come from the database
            self.feed.wait(self.coordinator.wait_seconds(now))
            self.feed.sync()
            self.coordinator.flush_if_due(time.time())
            return
        # on virtual time nothing is due on the wall clock: wait for messages (and look at timeouts) each poll
        batch = self._drain(POLL_SECONDS if self.pacing is not None else self.coordinator.wait_seconds(now))
        if batch:
            self.handle_batch(batch)
        else:
            self.store.ping()
        if self.pacing is None:
            self.coordinator.flush_if_due(time.time())
        elif not batch:
            self.pacing.advance(time.time())  # a device that went silent is dropped on the wall clock

    def handle_batch(self, batch: Sequence[Inbound]) -> None:
        """Process drained messages in arrival order (ingest.py); also how tests drive a server offline.
        With virtual time, promises go to the virtual clock, which then processes what it can."""
        if self.pacing is None:
            self.ingest.handle_batch(batch)
            return
        promises = [m for m in batch if _kind(m.topic) == PROMISE]
        self.ingest.handle_batch([m for m in batch if _kind(m.topic) != PROMISE])
        self.pacing.handle_promises(promises)
        self.pacing.advance(time.time())

    def aggregate_and_publish(self) -> bool:
        """One flush now (coordinator.py); False when it could not be committed."""
        assert self.coordinator is not None, "an ingest process does not aggregate"
        return self.coordinator.aggregate_and_publish()

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
        if self.out.client is not None:
            if self.publisher is not None and self.publisher.last_publish is not None:
                try:
                    self.publisher.last_publish.wait_for_publish(timeout=5)
                except (RuntimeError, ValueError):
                    pass
            self.out.client.disconnect()
            self.out.client.loop_stop()
            self.out.client = None
        if self.metrics_server is not None:
            self.metrics_server.stop()
            self.metrics_server = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
            if self.publisher is not None:
                self.publisher.pool = None
        self.store.close()
