"""What the server sends out: signed, retained models and the key chain, over the broker connection.

Models are encoded and signed in the decode pool (zlib and signing release the GIL) and published in order,
every client's model before the clusters' (clients take the first model of a version).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedhft.broker_server.federation import Federation
from fedhft.broker_server.metrics import Metrics, refresh_gauges
from fedhft.broker_server.models import ModelFactors
from fedhft.protocol import (
    KeyChainMessage,
    KeyLink,
    ModelMessage,
    encode_key_chain,
    encode_model,
    key_topic,
    model_topic,
)


class Outbound:
    """The broker connection messages leave by; until it is set (and offline, in tests) nothing is sent."""

    def __init__(self) -> None:
        self.client: mqtt.Client | None = None

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> mqtt.MQTTMessageInfo | None:
        """Publish at QoS 1; None when not connected."""
        if self.client is None:
            return None
        return self.client.publish(topic, payload, qos=1, retain=retain)

    def ack(self, mid: int, qos: int) -> None:
        """The MQTT PUBACK of an inbound message (the client runs with manual_ack)."""
        if self.client is not None and qos > 0:
            self.client.ack(mid, qos)


class Publisher:
    """Publishes the federation's models and the server's key chain, retained."""

    def __init__(
        self,
        task: str,
        key: Ed25519PrivateKey,
        key_chain: tuple[KeyLink, ...],
        federation: Federation,
        metrics: Metrics,
        out: Outbound,
        model_encoding: str,
        pool: ThreadPoolExecutor | None,
    ) -> None:
        self.task = task
        self.key = key
        self.key_chain = key_chain
        self.federation = federation
        self.metrics = metrics
        self.out = out
        self.model_encoding = model_encoding
        self.pool = pool
        self.last_publish: mqtt.MQTTMessageInfo | None = None  # the last model's: shutdown waits for it

    def publish_key_chain(self) -> None:
        """The key chain, retained: devices that missed rotations follow it from the key they trust."""
        payload = encode_key_chain(KeyChainMessage(self.task, time.time(), self.key_chain), self.key)
        self.out.publish(key_topic(self.task), payload, retain=True)

    def publish_models(self) -> None:
        """Every client's model first (clients take the first model of a version), then the clusters'."""
        t0 = time.perf_counter()
        self.publish(self.federation.client_models())
        self.publish(self.federation.cluster_models())
        self.metrics.observe("fedhft_publish_seconds", time.perf_counter() - t0)
        refresh_gauges(self.metrics, self.federation)

    def publish(self, models: Sequence[ModelFactors]) -> None:
        """Encode and sign (in the pool: zlib and signing release the GIL), publish retained, in order."""
        version = self.federation.version

        def encode(m: ModelFactors) -> bytes:
            msg = ModelMessage(self.task, version, m.target, time.time(), "", dict(m.meta), m.tensors)
            return encode_model(msg, self.key, self.model_encoding)

        payloads = self.pool.map(encode, models) if self.pool is not None and len(models) > 1 else map(encode, models)
        for m, payload in zip(models, payloads, strict=True):
            info = self.out.publish(model_topic(self.task, m.target), payload, retain=True)
            if info is not None:
                self.last_publish = info
