"""The models a device takes, and the server key it takes them from.

A model is taken when it verifies against the trusted server key, names this task and this device (or its
cluster), is newer than the current one and fits the device's adapter; it is saved before it is used. The
server's retained key chain is followed from the trusted key (``--server-key``, or one adopted earlier:
trust.py); after a rotation only the newest key's models are taken. A model's ``meta["cluster"]`` moves the
device to that cluster's model topic.
"""

from __future__ import annotations

import logging

import numpy as np

from fedhft.edge_runtime.client_config import ClientSummary
from fedhft.edge_runtime.full_update import AnySpec, model_params
from fedhft.edge_runtime.masking import AdapterMismatch
from fedhft.edge_runtime.mqtt_link import MqttLink
from fedhft.edge_runtime.state import EdgeState, StateStore
from fedhft.edge_runtime.trust import ServerTrust
from fedhft.logs import event
from fedhft.protocol import (
    ModelMessage,
    ProtocolError,
    client_model_topic,
    cluster_model_topic,
    decode_model,
    key_id,
)

log = logging.getLogger("fedhft.edge_runtime.client")  # the edge client's log, whichever part of it speaks


class ModelReceiver:
    """Holds the current model; takes key chains and models as they arrive."""

    def __init__(
        self,
        task: str,
        client_id: str,
        spec: AnySpec,
        trust: ServerTrust,
        store: StateStore,
        state: EdgeState,
        summary: ClientSummary,
    ) -> None:
        self.task = task
        self.client_id = client_id
        self.spec = spec
        self.trust = trust
        self.store = store
        self.state = state
        self.summary = summary
        self.model: ModelMessage | None = None
        self.link: MqttLink | None = None
        self.subscribed_cluster: int | None = None

    def own_target(self) -> str:
        return f"client/{self.client_id}"

    def topics(self) -> list[str]:
        topics = [client_model_topic(self.task, self.client_id)]
        if self.state.cluster is not None:
            topics.append(cluster_model_topic(self.task, self.state.cluster))
        return topics

    def params(self, msg: ModelMessage) -> dict[str, np.ndarray]:
        """The trainer's parameters for ``msg``; AdapterMismatch when it does not fit this device."""
        return model_params(self.spec, msg.tensors)

    def restore_saved(self) -> None:
        """Take the model saved by the last run again, if it still verifies and fits."""
        saved = self.store.load_model()
        if saved is None:
            return
        try:
            msg = decode_model(saved, verify_key=self.trust.key, expected_task=self.task)
            self.params(msg)
            self.model = msg
            self.state.model_version, self.state.model_target = msg.version, msg.target
        except (ProtocolError, AdapterMismatch) as e:
            event(log, "the saved model does not verify; waiting for a new one", logging.WARNING, error=str(e))
            self.state.model_version = self.state.model_target = None

    # ---- key rotation -----------------------------------------------------------------------------------
    def on_key_chain(self, payload: bytes) -> None:
        """Follow the server's key chain from the trusted key; models of the old key are refused afterwards."""
        old = key_id(self.trust.key)
        try:
            adopted = self.trust.consider(payload, self.task)
        except (ProtocolError, OSError) as e:  # OSError: the adopted key could not be stored, so not adopted
            self.summary.refused_key_chains.append(f"{type(e).__name__}: {e}")
            event(log, "refused a key chain", logging.WARNING, reason=str(e))
            return
        if adopted is None:
            return
        self.summary.adopted_keys.append(adopted.key_id)
        event(log, "adopted a rotated server key", logging.WARNING, old=old, new=adopted.key_id, index=adopted.index)
        if self.link is not None:  # the retained models again, in case one signed by the new key came first
            self.link.subscribe(self.topics())

    # ---- models -----------------------------------------------------------------------------------------
    def _refuse(self, target: str, reason: str) -> None:
        self.summary.refused_models.append(reason)
        event(log, "refused a model", logging.WARNING, target=target, reason=reason)

    def on_model(self, target: str, payload: bytes) -> None:
        cluster_target = None if self.state.cluster is None else f"cluster/{self.state.cluster}"
        if target not in (self.own_target(), cluster_target):
            return  # a retained model of a cluster we just left
        try:
            msg = decode_model(payload, verify_key=self.trust.key, expected_task=self.task, expected_target=target)
        except ProtocolError as e:
            self._refuse(target, f"{type(e).__name__}: {e}")
            return
        current = self.state.model_version
        if current is not None and msg.version <= current:
            if msg.version < current:
                self._refuse(target, f"StaleModel: version {msg.version} is older than the current {current}")
            return
        try:
            self.params(msg)
        except AdapterMismatch as e:
            self._refuse(target, f"AdapterMismatch: {e}")
            return
        self.store.save_model(payload)
        self.model = msg
        self.state.model_version, self.state.model_target = msg.version, target
        cluster = msg.meta.get("cluster")
        if isinstance(cluster, int) and cluster >= 0:
            self.state.cluster = cluster
        self.store.save(self.state)
        self.summary.model_version = msg.version
        event(log, "accepted a model", version=msg.version, target=target, cluster=self.state.cluster)
        self._follow_cluster()

    def _follow_cluster(self) -> None:
        if self.link is None or self.state.cluster == self.subscribed_cluster:
            return
        if self.subscribed_cluster is not None:
            self.link.unsubscribe([cluster_model_topic(self.task, self.subscribed_cluster)])
        if self.state.cluster is not None:
            self.link.subscribe([cluster_model_topic(self.task, self.state.cluster)])
        self.subscribed_cluster = self.state.cluster
