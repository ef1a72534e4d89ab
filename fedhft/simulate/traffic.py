"""Independent byte accounting: a plain MQTT subscriber on the task's whole topic tree."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt

from fedhft.protocol import ProtocolError, decode_ack, decode_update
from fedhft.protocol.mqtt import make_client, parse_broker_url
from fedhft.protocol.topics import PREFIX


def connect_observer(
    broker: str,
    client_id: str,
    topics: list[tuple[str, int]],
    on_message: Callable[..., None],
    on_subscribe: Callable[..., None] | None = None,
) -> mqtt.Client:
    """A plain MQTT v5 client of the simulation's own (traffic counter, evaluator, chaos): subscribed to
    ``topics`` again after every reconnect (a broker restart), its network loop in a thread."""
    addr = parse_broker_url(broker)
    c = make_client(client_id)
    c.on_message = on_message
    if on_subscribe is not None:
        c.on_subscribe = on_subscribe
    c.on_connect = lambda cl, *_a: cl.subscribe(topics)
    c.reconnect_delay_set(0.2, 2.0)
    c.connect(addr.host, addr.port)
    c.loop_start()
    return c


@dataclass
class TrafficCounter:
    """Counts messages and payload bytes per topic kind (update, model, hello, ack) as the broker delivers them."""

    broker: str
    task: str
    bytes_by_kind: Counter = field(default_factory=Counter)
    messages_by_kind: Counter = field(default_factory=Counter)
    updates: list[dict] = field(default_factory=list)  # header of every update seen (duplicates included)
    acked: set[tuple[str, int]] = field(default_factory=set)  # (client, seq) the server acknowledged as stored
    _client: mqtt.Client | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _ready: threading.Event = field(default_factory=threading.Event)

    def start(self, timeout: float = 10.0) -> TrafficCounter:
        self._client = connect_observer(
            self.broker,
            f"fedhft-traffic-{self.task}",
            [(f"{PREFIX}/{self.task}/#", 1)],
            self._on_message,
            on_subscribe=lambda *_a, **_k: self._ready.set(),
        )
        if not self._ready.wait(timeout):
            raise TimeoutError("traffic counter could not subscribe")
        return self

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        parts = msg.topic.split("/")
        kind = parts[3] if len(parts) > 3 else "other"
        if kind == "model" and len(parts) > 4:
            kind = f"model/{parts[4]}"  # model/client (what a device downloads) or model/cluster
        with self._lock:
            self.bytes_by_kind[kind] += len(msg.payload)
            self.messages_by_kind[kind] += 1
        if kind == "ack":
            try:
                a = decode_ack(bytes(msg.payload))
            except ProtocolError:
                return
            if a.status in ("accepted", "duplicate"):
                with self._lock:
                    self.acked.add((a.client_id, a.seq))
        if kind == "update":
            try:
                u = decode_update(bytes(msg.payload))
            except ProtocolError:
                return
            with self._lock:
                self.updates.append(
                    {
                        "client": u.client_id,
                        "seq": u.seq,
                        "base_version": u.base_version,
                        "bytes": len(msg.payload),
                        "profile": u.profile,
                        "loss": u.loss,
                        **{k: float(v) for k, v in u.metrics.items()},
                    }
                )

    def snapshot(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {"bytes": dict(self.bytes_by_kind), "messages": dict(self.messages_by_kind)}

    def stop(self) -> None:
        if self._client is not None:
            self._client.loop_stop()
            self._client.disconnect()
            self._client = None
