"""The device's MQTT connection: one network thread owns the paho client; everything else talks to it by queues.

* MQTT v5, ``clean_start=False`` and a session expiry, so the broker keeps subscriptions and QoS 1
  messages across short disconnects; paho resends unacknowledged QoS 1 publishes after a reconnect.
* Reconnects with exponential backoff and jitter (``backoff_delay``), never faster than its base; each failed
  attempt or lost connection is a LinkDown (reason, delay). A broker that refuses the credentials
  (``AUTH_REFUSALS``) ends the link with LinkRefused: retrying cannot help.
* Callbacks only put events (LinkUp, LinkDown, LinkRefused, Incoming, Delivered) on the caller's queue; the caller's
  publish/subscribe requests go through a command queue, so paho is only ever touched by its own thread.
"""

from __future__ import annotations

import logging
import queue
import random
import ssl
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt

from fedhft.logs import event
from fedhft.protocol.mqtt import AUTH_REFUSALS, make_client, parse_broker_url, session_properties

log = logging.getLogger(__name__)
DEFAULT_SESSION_EXPIRY = 7 * 24 * 3600


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Seconds to wait before reconnect attempt ``attempt`` (0, 1, ...): "equal jitter" exponential backoff,
    uniform in [d/2, d] with d = min(cap, base · 2**attempt)."""
    d = min(cap, base * 2 ** min(attempt, 30))
    return d / 2 + rng.uniform(0.0, d / 2)


def os_reason(e: BaseException) -> str:
    """An OS or TLS error as a short reason: "Connection refused", not "[Errno 111] Connection refused"."""
    if isinstance(e, ssl.SSLError):
        return getattr(e, "verify_message", None) or e.reason or str(e)
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


# ---- events the link puts on the caller's queue ----------------------------------------------------------
@dataclass(frozen=True)
class LinkUp:
    session_present: bool


@dataclass(frozen=True)
class LinkDown:
    """A connect attempt failed (``was_up`` False) or the connection was lost; the next try is in ``retry_in`` s."""

    reason: str
    retry_in: float = 0.0
    was_up: bool = False


@dataclass(frozen=True)
class LinkRefused:
    """The broker refused the credentials (bad user name or password, not authorized); the link has stopped."""

    reason: str


@dataclass(frozen=True)
class Incoming:
    topic: str
    payload: bytes
    retain: bool


@dataclass(frozen=True)
class Delivered:
    """The broker acknowledged (PUBACK) the QoS 1 publish made with ``token``; ``ok`` False: it refused it."""

    token: object
    ok: bool
    reason: str


LinkEvent = LinkUp | LinkDown | LinkRefused | Incoming | Delivered


class MqttLink:
    """A reconnecting MQTT v5 client whose network thread is the only user of paho."""

    def __init__(
        self,
        url: str,
        client_id: str,
        events: queue.Queue[Any],
        *,
        username: str | None = None,
        password: str | None = None,
        tls_ca: str | None = None,
        keepalive: int = 30,
        session_expiry: int = DEFAULT_SESSION_EXPIRY,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        rng: random.Random | None = None,
    ) -> None:
        self.address = parse_broker_url(url)
        self.events = events
        self.keepalive = keepalive
        self.session_expiry = session_expiry
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.rng = rng or random.Random()
        self.connected = threading.Event()
        self._commands: queue.Queue[tuple[str, tuple[Any, ...]]] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tokens: dict[int, object] = {}
        self._attempt = 0
        self._up = False  # a CONNACK accepted the current connection
        self._why: str | None = None  # what the broker said when it closed or refused the last connection
        c = make_client(client_id, username=username, password=password, tls=self.address.tls, tls_ca=tls_ca)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        self._client = c

    # ---- caller side (any thread) --------------------------------------------------------------------
    def start(self) -> MqttLink:
        self._thread = threading.Thread(target=self._run, name="fedhft-mqtt", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly (sending DISCONNECT when connected) and end the network thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, token: object = None) -> None:
        """Queue a publish; with QoS 1 a Delivered(token) event follows the broker's PUBACK."""
        self._commands.put(("publish", (topic, bytes(payload), qos, retain, token)))

    def subscribe(self, topics: Sequence[str], qos: int = 1) -> None:
        self._commands.put(("subscribe", (tuple(topics), qos)))

    def unsubscribe(self, topics: Sequence[str]) -> None:
        self._commands.put(("unsubscribe", (tuple(topics),)))

    # ---- network thread --------------------------------------------------------------------------------
    def _run(self) -> None:
        socket_open = False
        first = True
        while not self._stop.is_set():
            try:
                if not socket_open:
                    socket_open = self._open(first)
                    first = False
                    if not socket_open:
                        continue
                if self.connected.is_set():
                    self._drain_commands()
                rc = self._client.loop(timeout=0.05)
                if rc != mqtt.MQTT_ERR_SUCCESS:
                    socket_open = False
                    self._lost(mqtt.error_string(rc))
            except Exception as e:  # never let the network thread die: log, back off, retry
                event(log, "mqtt network error", logging.WARNING, error=f"{type(e).__name__}: {e}")
                socket_open = False
                self._lost(str(e))
        self._shutdown(socket_open)

    def _open(self, first: bool) -> bool:
        a = self.address
        try:
            if first:
                props = session_properties(self.session_expiry)
                self._client.connect(a.host, a.port, self.keepalive, clean_start=False, properties=props)
            else:
                self._client.reconnect()
            return True
        except (OSError, ssl.SSLError) as e:
            self._lost(os_reason(e))
            return False

    def _lost(self, reason: str) -> None:
        """After a failed connect or a dropped connection: report it, then wait the backoff delay."""
        if self._stop.is_set():
            return
        reason, self._why = (self._why or reason).rstrip("."), None  # paho's "The connection was lost."
        was_up, self._up = self._up, False
        self.connected.clear()
        delay = backoff_delay(self._attempt, self.backoff_base, self.backoff_cap, self.rng)
        self._attempt += 1
        self.events.put(LinkDown(reason, delay, was_up))
        event(log, "mqtt reconnect scheduled", logging.DEBUG, reason=reason, delay_s=round(delay, 2))
        self._stop.wait(delay)

    def _drain_commands(self) -> None:
        while True:
            try:
                op, args = self._commands.get_nowait()
            except queue.Empty:
                return
            if op == "publish":
                topic, payload, qos, retain, token = args
                info = self._client.publish(topic, payload, qos=qos, retain=retain)
                if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
                    event(log, "mqtt publish queue full", logging.WARNING, topic=topic)
                elif qos > 0:
                    self._tokens[info.mid] = token
            elif op == "subscribe":
                topics, qos = args
                if topics:
                    self._client.subscribe([(t, qos) for t in topics])
            elif op == "unsubscribe":
                (topics,) = args
                if topics:
                    self._client.unsubscribe(list(topics))

    def _shutdown(self, socket_open: bool) -> None:
        if socket_open and self.connected.is_set():
            try:
                self._client.disconnect()
                for _ in range(20):
                    if self._client.loop(timeout=0.05) != mqtt.MQTT_ERR_SUCCESS:
                        break
            except Exception as e:  # best effort: we are leaving anyway
                event(log, "mqtt disconnect failed", logging.DEBUG, error=str(e))
        self.connected.clear()

    # ---- paho callbacks (network thread; thin: they only queue events) -----------------------------
    def _on_connect(self, _c: mqtt.Client, _u: object, flags: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            event(log, "mqtt connection refused by the broker", logging.DEBUG, reason=str(reason))
            self._why = f"refused by the broker ({reason})"
            if reason.value in AUTH_REFUSALS:
                self.events.put(LinkRefused(str(reason)))
                self._stop.set()
            return
        self._attempt = 0
        self._up = True
        self.connected.set()
        self.events.put(LinkUp(bool(flags.session_present)))

    def _on_disconnect(self, _c: mqtt.Client, _u: object, flags: Any, reason: Any, _p: Any) -> None:
        """Only notes the broker's reason: the failed loop() that follows reports it (LinkDown) with its delay."""
        self.connected.clear()
        if self._why is None and getattr(flags, "is_disconnect_packet_from_server", False):
            self._why = f"disconnected by the broker ({reason})"

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        self.events.put(Incoming(msg.topic, bytes(msg.payload), bool(msg.retain)))

    def _on_publish(self, _c: mqtt.Client, _u: object, mid: int, reason: Any, _p: Any) -> None:
        if mid in self._tokens:
            token = self._tokens.pop(mid)
            failed = bool(getattr(reason, "is_failure", False))
            self.events.put(Delivered(token, not failed, str(reason)))
