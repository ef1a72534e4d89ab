"""A minimal in-test federation server for edge-runtime tests: signs and publishes models (retained),
collects and decodes updates, and acks them (or stays silent while ``ack`` is False). For virtual time it
records promises and publishes schedules; ``arrivals`` lists (kind, client, seq) in the order they came."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import paho.mqtt.client as mqtt

from fedhft.edge_runtime.masking import AdapterSpec
from fedhft.protocol import (
    AckMessage,
    HelloMessage,
    ModelMessage,
    UpdateMessage,
    ack_topic,
    decode_hello,
    decode_update,
    encode_ack,
    encode_model,
    generate_keypair,
    model_topic,
    parse_topic,
    save_public_key,
    server_filters,
)
from fedhft.protocol.mqtt import make_client, session_properties
from fedhft.protocol.tensor_names import a_name, b_name
from fedhft.protocol.topics import promise_filter, schedule_topic
from fedhft.protocol.virtual_time import PromiseMessage, ScheduleMessage, decode_promise, encode_schedule
from tests.support.waiting import wait_until as poll_until


def random_model_tensors(spec: AdapterSpec, seed: int = 0, std: float = 0.02) -> dict[str, np.ndarray]:
    """Model-message tensors of rank max_rank for every module of ``spec`` (and its head)."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for m in spec.modules:
        out[a_name(m.name)] = rng.normal(0, std, (m.max_rank, m.in_features)).astype(np.float32)
        out[b_name(m.name)] = rng.normal(0, std, (m.out_features, m.max_rank)).astype(np.float32)
    for name, shape in spec.head_shapes.items():
        out[name] = rng.normal(0, std, shape).astype(np.float32)
    return out


@dataclass
class ServerStub:
    port: int
    task: str
    spec: AdapterSpec
    ack: bool = True
    updates: list[UpdateMessage] = field(default_factory=list)
    raw: dict[int, list[bytes]] = field(default_factory=dict)  # seq -> every payload received (any client)
    hellos: list[HelloMessage] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    promises: list[PromiseMessage] = field(default_factory=list)
    arrivals: list[tuple[str, str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.private_key, self.public_key = generate_keypair()
        self.lock = threading.Lock()
        self.retained: dict[str, bytes] = {}
        self.client = make_client(f"stub-server-{self.port}")
        self.client.reconnect_delay_set(min_delay=1, max_delay=1)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.connected = threading.Event()

    def start(self) -> ServerStub:
        self.client.connect("127.0.0.1", self.port, 30, clean_start=False, properties=session_properties(3600))
        self.client.loop_start()
        assert self.connected.wait(10), "stub could not connect"
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def save_key(self, path) -> None:  # noqa: ANN001
        save_public_key(path, self.public_key)

    # ---- MQTT -------------------------------------------------------------------------------------------
    def _on_connect(self, c: mqtt.Client, _u: object, _f: object, reason: object, _p: object) -> None:
        c.subscribe([(f, 1) for f in (*server_filters(self.task), promise_filter(self.task))])
        with self.lock:
            retained = dict(self.retained)
        for topic, payload in retained.items():  # a broker without persistence forgot them
            c.publish(topic, payload, qos=1, retain=True)
        self.connected.set()

    def _on_message(self, c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        try:
            _, kind, client_id = parse_topic(msg.topic)
            if kind == "hello":
                with self.lock:
                    self.hellos.append(decode_hello(msg.payload, expected_task=self.task))
                return
            if kind == "promise":
                promise = decode_promise(msg.payload, expected_task=self.task)
                with self.lock:
                    self.promises.append(promise)
                    self.arrivals.append(("promise", client_id, promise.seq))
                return
            upd = decode_update(
                msg.payload,
                expected_shapes=self.spec.update_shapes(),
                out_features=self.spec.out_features(),
                expected_task=self.task,
                expected_client_id=client_id,
            )
        except Exception as e:  # recorded for the test to assert on
            with self.lock:
                self.errors.append(f"{type(e).__name__}: {e}")
            return
        with self.lock:
            first = not any(u.client_id == client_id and u.seq == upd.seq for u in self.updates)
            self.raw.setdefault(upd.seq, []).append(bytes(msg.payload))
            if first:
                self.updates.append(upd)
                self.arrivals.append(("update", client_id, upd.seq))
            do_ack = self.ack
        if do_ack:
            status = "accepted" if first else "duplicate"
            ack = AckMessage(self.task, client_id, upd.seq, status, "", upd.base_version)
            c.publish(ack_topic(self.task, client_id), encode_ack(ack), qos=1)

    # ---- models -----------------------------------------------------------------------------------------
    def model_payload(
        self,
        version: int,
        target: str,
        tensors: Mapping[str, np.ndarray],
        *,
        task: str | None = None,
        meta: dict | None = None,
        key: object = None,
    ) -> bytes:
        msg = ModelMessage(task or self.task, version, target, time.time(), "", meta or {}, dict(tensors))
        return encode_model(msg, key or self.private_key)

    def publish_raw(self, target: str, payload: bytes, retain: bool = True) -> None:
        topic = model_topic(self.task, target)
        if retain:
            with self.lock:
                self.retained[topic] = payload
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def publish_model(self, version: int, target: str, tensors: Mapping[str, np.ndarray], **kw: object) -> bytes:
        payload = self.model_payload(version, target, tensors, **kw)  # type: ignore[arg-type]
        self.publish_raw(target, payload)
        return payload

    def publish_schedule(self, client_id: str, start_at: float, version: int) -> None:
        msg = ScheduleMessage(self.task, client_id, start_at, version, time.time())
        self.client.publish(schedule_topic(self.task, client_id), encode_schedule(msg), qos=1).wait_for_publish(10)

    def ack_all_pending(self) -> None:
        """Ack (duplicate) every seq received so far, e.g. after turning ``ack`` on."""
        with self.lock:
            items = [(u.client_id, u.seq, u.base_version) for u in self.updates]
        for client_id, seq, version in items:
            ack = AckMessage(self.task, client_id, seq, "accepted", "", version)
            self.client.publish(ack_topic(self.task, client_id), encode_ack(ack), qos=1)


def wait_until(pred: Callable[[], bool], timeout: float, what: str, poll: float = 0.05) -> None:
    """Poll ``pred`` until true, at most ``timeout`` seconds (bounded loop), else fail naming ``what``."""
    if not poll_until(pred, timeout, poll):
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")
