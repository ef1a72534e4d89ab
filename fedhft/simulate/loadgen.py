"""A fleet-sized load generator: N device identities on one loopback broker, a few network loops, real updates.

Every device is its own MQTT connection (client id = device id) and registers with a running ``fedhft server
run`` as a device does: it subscribes to its ack topic and its model topic, sends its hello, and counts as
registered when its model arrives (the server publishes one per new device); then it drops the model topic.
The devices are spread over ``loops`` threads, each one ``selectors`` loop driving its devices' paho clients
(paho's external-loop API: no thread or socket pair per client). Each loop then sends its share of ``rate``
updates/s for ``duration`` seconds, round-robin over its devices, and waits up to ``drain`` seconds for the
acks.

Updates: a few sets of random tensors of exactly the profile's planned shapes (load_plan.py), checked and
encoded once; each message gets its own header (client id, a seq above any earlier run's, the newest version
seen in acks as base_version) around the same encoded tensors. Loopback brokers only: this is a test tool.
"""

from __future__ import annotations

import ipaddress
import selectors
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt

from fedhft.errors import FedHFTError
from fedhft.protocol import (
    HelloMessage,
    ProtocolError,
    UpdateMessage,
    ack_topic,
    decode_ack,
    encode_hello,
    hello_topic,
    model_topic,
    update_topic,
)
from fedhft.protocol.body import pack_body
from fedhft.protocol.encodings import canonical_tensors, encode_tensors
from fedhft.protocol.envelope import KIND_UPDATE, worth_deflating, wrap
from fedhft.protocol.fields import UPDATE_FIELDS, fields_of
from fedhft.protocol.mqtt import make_client
from fedhft.protocol.tensor_names import UPDATE_SUFFIXES
from fedhft.protocol.tensor_rules import check_update_tensors
from fedhft.simulate.fleet import peak_rss_mb
from fedhft.simulate.load_plan import LoadSpec, random_update_tensors

MANIFEST_SHA = "10ad" * 16  # what load devices say they run (the server only checks updates against hellos)
TEMPLATES = 4  # distinct tensor sets, encoded once each
# Devices a loop has connecting or registering at once: the server takes hellos in order with updates, so a
# backlog of thousands of hellos would hold every update behind it (and a full listen backlog drops SYNs: the
# blocking connect() then waits out a 1-3 s retransmit and its loop stalls).
REGISTERING_PER_LOOP = 16
REGISTER_GIVE_UP_S = 60.0  # a device whose model has not come by then frees its slot (it stays unregistered)
MISC_EVERY_S = 2.0  # keepalive bookkeeping (paho loop_misc) per loop


class LoadError(FedHFTError):
    """A load run that cannot start (bad broker address, nothing registered)."""


@dataclass(frozen=True)
class LoadConfig:
    devices: int
    rate: float  # updates/s over the whole fleet
    duration: float  # seconds of sending
    host: str = "127.0.0.1"
    port: int = 1883
    task: str = "load"
    loops: int = 4
    prefix: str = "load-"
    encoding: str = "fp16"
    register_timeout: float = 120.0
    drain: float = 30.0
    seed: int = 0


def check_loopback(host: str) -> str:
    """``host`` when it is a loopback address (or localhost); LoadError otherwise."""
    try:
        addr = ipaddress.ip_address(socket.gethostbyname(host) if host == "localhost" else host)
    except (ValueError, OSError) as exc:
        raise LoadError(
            f"broker host {host!r} is not a loopback address (127.0.0.1): loadgen is loopback only"
        ) from exc
    if not addr.is_loopback:
        raise LoadError(f"broker host {host!r} is not a loopback address (127.0.0.1): loadgen is loopback only")
    return host


# ------------------------------------------------------------------------------------------ payloads


class UpdateFactory:
    """Update payloads of one plan: tensors checked and encoded once, a fresh header per message."""

    def __init__(self, load: LoadSpec, task: str, encoding: str, seed: int, templates: int = TEMPLATES) -> None:
        rng = np.random.default_rng(seed)
        self.task, self.profile = task, load.profile
        self.encoded: list[tuple[dict[str, np.ndarray], dict[str, str]]] = []
        for _ in range(templates):
            tensors = canonical_tensors(
                random_update_tensors(rng, load.spec, load.client_plan), UPDATE_SUFFIXES, has_indices=True
            )
            check_update_tensors(tensors)
            self.encoded.append(encode_tensors(tensors, encoding))
        raw = pack_body(self._header("probe", 0, 0, 0.0), *self.encoded[0])
        self.deflate = worth_deflating(raw, wrap(KIND_UPDATE, raw, deflate=True)[16:])  # as encoders decide

    def _header(self, client_id: str, seq: int, base_version: int, created_at: float) -> dict[str, Any]:
        msg = UpdateMessage(
            self.task, client_id, seq, base_version, 32, 0.5, {}, self.profile, MANIFEST_SHA, created_at, {}
        )
        return fields_of(msg, UPDATE_FIELDS, "update header")

    def payload(self, client_id: str, seq: int, base_version: int) -> bytes:
        stored, encodings = self.encoded[seq % len(self.encoded)]
        body = pack_body(self._header(client_id, seq, base_version, time.time()), stored, encodings)
        return wrap(KIND_UPDATE, body, deflate=self.deflate)


# ------------------------------------------------------------------------------------------ tally


@dataclass
class Tally:
    """What every loop saw; one lock (callbacks of several loops write here)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    sent_at: dict[tuple[str, int], float] = field(default_factory=dict)  # unacked updates
    latencies: list[float] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    rejects: Counter = field(default_factory=Counter)  # "status: reason" of every ack but accepted
    sent: int = 0
    first_send: float | None = None
    last_ack: float | None = None
    version: int = 0  # newest server version seen in an ack
    registered: int = 0
    last_registered: float | None = None
    disconnects: int = 0
    undecodable_acks: int = 0

    def on_sent(self, key: tuple[str, int], now: float) -> None:
        with self.lock:
            self.sent_at[key] = now
            self.sent += 1
            if self.first_send is None:
                self.first_send = now

    def on_ack(self, client_id: str, seq: int, status: str, reason: str, version: int, now: float) -> None:
        with self.lock:
            sent = self.sent_at.pop((client_id, seq), None)
            if sent is None:
                return  # an ack of an earlier run's update, or a second ack
            self.latencies.append(now - sent)
            self.statuses[status] += 1
            if status != "accepted":
                self.rejects[f"{status}: {reason.split(':', 1)[0]}"] += 1
            self.last_ack = now
            self.version = max(self.version, version)

    def on_registered(self, now: float) -> None:
        with self.lock:
            self.registered += 1
            self.last_registered = now

    def outstanding(self) -> int:
        with self.lock:
            return len(self.sent_at)


# ------------------------------------------------------------------------------------------ devices and loops


@dataclass
class Device:
    client_id: str
    client: mqtt.Client | None = None
    connected: bool = False
    registered: bool = False
    seq: int = 0


class Loop(threading.Thread):
    """One selectors loop driving the paho clients of its devices: connect, register, send, drain."""

    def __init__(
        self,
        index: int,
        of: int,
        devices: Sequence[Device],
        cfg: LoadConfig,
        plan: dict[str, Any],
        factory: UpdateFactory,
        tally: Tally,
    ) -> None:
        super().__init__(name=f"loadgen-{index}", daemon=True)
        self.index, self.of, self.devices, self.cfg, self.plan = index, of, list(devices), cfg, plan
        self.factory, self.tally = factory, tally
        self.registering: dict[str, float] = {}  # client id -> when it started connecting; model not yet in
        self.ready: list[Device] = []  # registered devices, in registration order
        self.sel = selectors.DefaultSelector()
        self.send_window: tuple[float, float] | None = None  # (start, end) in time.monotonic(), set by the driver
        self.stop = threading.Event()
        self.error: BaseException | None = None

    # paho callbacks (all run in this thread: only this loop calls its clients' loop_* methods)

    def _on_socket_open(self, client: mqtt.Client, dev: Device, sock: socket.socket) -> None:
        self.sel.register(sock, selectors.EVENT_READ, dev)

    def _on_socket_close(self, client: mqtt.Client, dev: Device, sock: socket.socket) -> None:
        self.registering.pop(dev.client_id, None)
        try:
            self.sel.unregister(sock)
        except (KeyError, ValueError):
            pass

    def _on_register_write(self, client: mqtt.Client, dev: Device, sock: socket.socket) -> None:
        self.sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, dev)

    def _on_unregister_write(self, client: mqtt.Client, dev: Device, sock: socket.socket) -> None:
        try:
            self.sel.modify(sock, selectors.EVENT_READ, dev)
        except (KeyError, ValueError):
            pass  # closing

    def _on_connect(self, client: mqtt.Client, dev: Device, flags: Any, rc: Any, props: Any = None) -> None:
        if rc.is_failure:
            self.registering.pop(dev.client_id, None)
            return
        dev.connected = True
        topics = [
            (ack_topic(self.cfg.task, dev.client_id), 1),
            (model_topic(self.cfg.task, f"client/{dev.client_id}"), 1),
        ]
        client.subscribe(topics)

    def _on_subscribe(self, client: mqtt.Client, dev: Device, mid: int, codes: Any, props: Any = None) -> None:
        if dev.registered:
            return
        hello = HelloMessage(self.cfg.task, dev.client_id, self.factory.profile, MANIFEST_SHA, self.plan, time.time())
        client.publish(hello_topic(self.cfg.task, dev.client_id), encode_hello(hello), qos=1)

    def _on_message(self, client: mqtt.Client, dev: Device, msg: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        if "/model/" in msg.topic:
            if not dev.registered:
                dev.registered = True
                self.registering.pop(dev.client_id, None)
                self.ready.append(dev)
                client.unsubscribe(model_topic(self.cfg.task, f"client/{dev.client_id}"))
                self.tally.on_registered(now)
            return
        try:
            ack = decode_ack(msg.payload, expected_task=self.cfg.task)
        except ProtocolError:
            with self.tally.lock:
                self.tally.undecodable_acks += 1
            return
        self.tally.on_ack(ack.client_id, ack.seq, ack.status, ack.reason, ack.version, now)

    def _on_disconnect(self, client: mqtt.Client, dev: Device, flags: Any, rc: Any, props: Any = None) -> None:
        if dev.connected and not self.stop.is_set():
            with self.tally.lock:
                self.tally.disconnects += 1
        dev.connected = False

    def _client(self, dev: Device) -> mqtt.Client:
        c = make_client(dev.client_id, reconnect_on_failure=False)
        c.user_data_set(dev)
        c.max_inflight_messages_set(100)
        c.max_queued_messages_set(0)
        c.on_socket_open, c.on_socket_close = self._on_socket_open, self._on_socket_close
        c.on_socket_register_write, c.on_socket_unregister_write = self._on_register_write, self._on_unregister_write
        c.on_connect, c.on_subscribe, c.on_message = self._on_connect, self._on_subscribe, self._on_message
        c.on_disconnect = self._on_disconnect
        return c

    def _poll(self, timeout: float) -> None:
        for key, mask in self.sel.select(max(0.0, timeout)):
            c = key.data.client
            if mask & selectors.EVENT_READ:
                c.loop_read(100)
            if mask & selectors.EVENT_WRITE:
                c.loop_write()

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by the driver
            self.error = exc

    def _run(self) -> None:
        waiting = list(self.devices)
        seq0 = int(time.time() * 1000)  # above any earlier run's seqs: the server drops replays
        for dev in self.devices:
            dev.seq = seq0
        last_misc = time.monotonic()
        turn = 0
        next_send: float | None = None
        interval = self.of / self.cfg.rate  # this loop's share of the rate
        while not self.stop.is_set():
            now = time.monotonic()
            for cid in [c for c, t in self.registering.items() if now - t > REGISTER_GIVE_UP_S]:
                del self.registering[cid]
            while waiting and self.send_window is None and len(self.registering) < REGISTERING_PER_LOOP:
                dev = waiting.pop()
                dev.client = self._client(dev)
                self.registering[dev.client_id] = now
                dev.client.connect(self.cfg.host, self.cfg.port, keepalive=120)
            now = time.monotonic()
            timeout = 0.05
            window = self.send_window
            if window is not None and window[0] <= now < window[1]:
                if next_send is None:
                    next_send = window[0] + self.index * interval / self.of
                while self.ready and next_send <= now:
                    dev = self.ready[turn % len(self.ready)]
                    turn += 1
                    if dev.connected:
                        self._send(dev, now)
                    next_send += interval
                timeout = max(0.0, min(timeout, next_send - now))
            self._poll(timeout)
            if now - last_misc > MISC_EVERY_S:
                last_misc = now
                for d in self.devices:
                    if d.client is not None:
                        d.client.loop_misc()
        for d in self.devices:
            if d.client is not None and d.connected:
                d.client.disconnect()
                d.client.loop_write()
        self.sel.close()

    def _send(self, dev: Device, now: float) -> None:
        dev.seq += 1
        payload = self.factory.payload(dev.client_id, dev.seq, self.tally.version)
        assert dev.client is not None
        self.tally.on_sent((dev.client_id, dev.seq), now)
        dev.client.publish(update_topic(self.cfg.task, dev.client_id), payload, qos=1)


# ------------------------------------------------------------------------------------------ report


@dataclass
class LoadReport:
    devices: int
    loops: int
    profile: str
    payload_bytes: int
    target_rate: float
    duration_s: float
    registered: int
    register_s: float | None
    hellos_per_s: float | None
    sent: int
    sent_per_s: float
    acked: int
    accepted: int
    acked_per_s: float
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    latency_max_ms: float | None
    rejects: dict[str, int]
    lost: int
    disconnects: int
    server_pid: int | None
    server_rss_mb: float | None
    server_peak_rss_mb: float | None
    loadgen_cpu_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rss_mb(pid: int) -> float | None:
    """The resident memory (VmRSS, MiB) of a running process; None when it cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def find_server_pid(task: str) -> int | None:
    """The PID of the one ``fedhft ... server run ... --task TASK`` process on this machine, or None."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in args]
        if "server" in words and "run" in words and any("fedhft" in w for w in words):
            if (
                "--task" in words
                and words.index("--task") + 1 < len(words)
                and words[words.index("--task") + 1] == task
            ):
                found.append(int(entry.name))
    return found[0] if len(found) == 1 else None


def percentile_ms(values: Sequence[float], q: float) -> float | None:
    return round(1e3 * float(np.percentile(values, q)), 1) if len(values) else None


def run_load(
    cfg: LoadConfig,
    load: LoadSpec,
    server_pid: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> LoadReport:
    """Register ``cfg.devices`` devices, send ``cfg.rate`` updates/s for ``cfg.duration`` s, drain, report."""
    check_loopback(cfg.host)
    if cfg.devices < 1 or cfg.rate <= 0 or cfg.duration <= 0 or cfg.loops < 1:
        raise LoadError("devices, rate, duration and loops must be positive")
    say = progress or (lambda _line: None)
    cpu0 = time.process_time()
    factory = UpdateFactory(load, cfg.task, cfg.encoding, cfg.seed)
    payload_bytes = len(factory.payload("x" * len(cfg.prefix + str(cfg.devices)), 1, 0))
    tally = Tally()
    width = len(str(cfg.devices - 1))
    devices = [Device(f"{cfg.prefix}{i:0{width}d}") for i in range(cfg.devices)]
    n_loops = min(cfg.loops, cfg.devices)
    loops = [Loop(i, n_loops, devices[i::n_loops], cfg, load.plan, factory, tally) for i in range(n_loops)]
    t_reg = time.monotonic()
    for loop in loops:
        loop.start()
    try:
        deadline = t_reg + cfg.register_timeout
        last_said = 0.0
        while tally.registered < cfg.devices and time.monotonic() < deadline:
            _raise_loop_error(loops)
            time.sleep(0.05)
            if time.monotonic() - last_said > 5:
                last_said = time.monotonic()
                say(f"registered {tally.registered}/{cfg.devices}")
        registered = tally.registered
        register_s = (tally.last_registered - t_reg) if tally.last_registered is not None else None
        if registered == 0:
            raise LoadError(f"no device registered within {cfg.register_timeout:g} s (is `fedhft server run` up?)")
        say(
            f"registered {registered}/{cfg.devices} in {register_s:.1f} s; "
            f"sending {cfg.rate:g}/s for {cfg.duration:g} s"
        )
        start = time.monotonic() + 0.2
        for loop in loops:
            loop.send_window = (start, start + cfg.duration)
        while time.monotonic() < start + cfg.duration:
            _raise_loop_error(loops)
            time.sleep(0.05)
        drain_end = time.monotonic() + cfg.drain
        while tally.outstanding() and time.monotonic() < drain_end:
            _raise_loop_error(loops)
            time.sleep(0.05)
    finally:
        for loop in loops:
            loop.stop.set()
        for loop in loops:
            loop.join(timeout=30)
    _raise_loop_error(loops)
    with tally.lock:
        acked = sum(tally.statuses.values())
        span = (tally.last_ack - tally.first_send) if tally.last_ack and tally.first_send else None
        pid = server_pid if server_pid is not None else find_server_pid(cfg.task)
        return LoadReport(
            devices=cfg.devices,
            loops=len(loops),
            profile=load.profile,
            payload_bytes=payload_bytes,
            target_rate=cfg.rate,
            duration_s=cfg.duration,
            registered=registered,
            register_s=round(register_s, 2) if register_s is not None else None,
            hellos_per_s=round(registered / register_s, 1) if register_s else None,
            sent=tally.sent,
            sent_per_s=round(tally.sent / cfg.duration, 1),
            acked=acked,
            accepted=tally.statuses["accepted"],
            acked_per_s=round(acked / span, 1) if span else 0.0,
            latency_p50_ms=percentile_ms(tally.latencies, 50),
            latency_p99_ms=percentile_ms(tally.latencies, 99),
            latency_max_ms=percentile_ms(tally.latencies, 100),
            rejects=_rejects(tally),
            lost=len(tally.sent_at),
            disconnects=tally.disconnects,
            server_pid=pid,
            server_rss_mb=round(rss, 1) if pid is not None and (rss := rss_mb(pid)) is not None else None,
            server_peak_rss_mb=round(peak, 1) if pid is not None and (peak := peak_rss_mb(pid)) is not None else None,
            loadgen_cpu_s=round(time.process_time() - cpu0, 1),
        )


def _rejects(tally: Tally) -> dict[str, int]:
    """Acks other than accepted by ``status: reason``, and acks that did not decode."""
    out = dict(tally.rejects)
    if tally.undecodable_acks:
        out["undecodable ack"] = tally.undecodable_acks
    return out


def _raise_loop_error(loops: Sequence[Loop]) -> None:
    for loop in loops:
        if loop.error is not None:
            raise LoadError(f"{loop.name} failed: {type(loop.error).__name__}: {loop.error}") from loop.error


def format_report(r: LoadReport) -> str:
    """The report as aligned `name value` lines."""
    rows = [
        ("devices (registered)", f"{r.devices} ({r.registered}; {r.hellos_per_s} hellos/s)"),
        ("profile, payload", f"{r.profile}, {r.payload_bytes} bytes"),
        ("rate target / sent", f"{r.target_rate:g}/s / {r.sent_per_s}/s for {r.duration_s:g} s over {r.loops} loops"),
        ("acked/s", f"{r.acked_per_s} ({r.acked} acks, {r.accepted} accepted)"),
        ("ack latency p50/p99/max", f"{r.latency_p50_ms} / {r.latency_p99_ms} / {r.latency_max_ms} ms"),
        ("rejects", ", ".join(f"{k} x{v}" for k, v in sorted(r.rejects.items())) or "none"),
        ("lost (sent, never acked)", str(r.lost)),
        ("disconnects", str(r.disconnects)),
        ("server RSS (peak)", f"{r.server_rss_mb} MiB ({r.server_peak_rss_mb} MiB), pid {r.server_pid}"),
        ("loadgen CPU", f"{r.loadgen_cpu_s} s"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
