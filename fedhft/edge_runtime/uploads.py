"""Updates on their way to the server: from the outbox (on disk) over MQTT until the server acks them.

An update is published at QoS 1 with its seq; it is published again, same seq and bytes, when the server has
not acked it ``ack_timeout`` seconds after the broker took it, when the broker lost the device's session, and
after a restart. It leaves the outbox only when an ack (accepted / duplicate / rejected) names its seq; the
server dedupes by (client, seq).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from fedhft.edge_runtime.mqtt_link import Delivered, MqttLink
from fedhft.edge_runtime.outbox import Outbox
from fedhft.logs import event
from fedhft.protocol import AckMessage, ProtocolError, decode_ack, update_topic

log = logging.getLogger("fedhft.edge_runtime.client")  # the edge client's log, whichever part of it speaks


@dataclass
class _InFlight:
    payload: bytes
    delivered_at: float | None = None  # broker PUBACK time; the ack timeout runs from here


class Uploads:
    """Publishes the outbox's updates and takes the server's acks for them."""

    def __init__(self, outbox: Outbox, task: str, client_id: str, ack_timeout: float) -> None:
        self.outbox = outbox
        self.task = task
        self.client_id = client_id
        self.ack_timeout = ack_timeout
        self.link: MqttLink | None = None
        self._inflight: dict[int, _InFlight] = {}

    def put(self, seq: int, payload: bytes) -> None:
        """Queue a new update durably (before anything else knows about its seq); the outbox may drop the
        oldest ones when it is full."""
        for dropped in self.outbox.put(seq, payload):
            self._inflight.pop(dropped, None)

    def publish(self, seq: int, payload: bytes) -> None:
        assert self.link is not None
        self._inflight[seq] = _InFlight(payload)
        self.link.publish(update_topic(self.task, self.client_id), payload, qos=1, token=("update", seq))

    def publish_queued(self) -> None:
        """Every queued update again: same seq, same bytes."""
        for seq, payload in self.outbox.items():
            self.publish(seq, payload)

    def on_delivered(self, ev: Delivered) -> None:
        kind, seq = ev.token if isinstance(ev.token, tuple) else (None, None)
        if kind != "update" or seq not in self._inflight:
            return
        if not ev.ok:
            event(log, "the broker refused an update; will retry", logging.WARNING, seq=seq, reason=ev.reason)
        self._inflight[seq].delivered_at = time.monotonic()

    def check_ack_timeouts(self) -> None:
        now = time.monotonic()
        for seq, item in list(self._inflight.items()):
            if item.delivered_at is not None and now - item.delivered_at > self.ack_timeout:
                event(log, "no ack for an update; publishing it again", logging.WARNING, seq=seq)
                self.publish(seq, item.payload)

    def on_ack(self, payload: bytes) -> AckMessage | None:
        """The ack that took an update out of the outbox; None when it names none (or cannot be read)."""
        try:
            ack = decode_ack(payload, expected_task=self.task, expected_client_id=self.client_id)
        except ProtocolError as e:
            event(log, "ignoring a malformed ack", logging.WARNING, error=str(e))
            return None
        if ack.seq not in self.outbox:
            event(log, "ack for an update not in the outbox", logging.DEBUG, seq=ack.seq, status=ack.status)
            return None
        level = logging.WARNING if ack.status == "rejected" else logging.INFO
        event(log, f"update {ack.status}", level, seq=ack.seq, reason=ack.reason, server_version=ack.version)
        self.outbox.remove(ack.seq)
        self._inflight.pop(ack.seq, None)
        return ack
