"""MQTT topic tree of fedhft.

Topics (``<task>`` and ``<client_id>`` are ids: 1-128 characters of ``[A-Za-z0-9._-]``)::

    fedhft/v1/<task>/hello/<client_id>          client -> server  registration (HelloMessage)
    fedhft/v1/<task>/update/<client_id>         client -> server  trained adapter rows (UpdateMessage)
    fedhft/v1/<task>/ack/<client_id>            server -> client  verdict on one update (AckMessage)
    fedhft/v1/<task>/model/cluster/<k>          server -> clients the model of cluster k (ModelMessage)
    fedhft/v1/<task>/model/client/<client_id>   server -> client  a model for one client (ModelMessage)
    fedhft/v1/<task>/key                        server -> clients the server's key chain, retained (keychain.py)
    fedhft/v1/<task>/promise/<client_id>        client -> server  simulated fleets: when an update will land
    fedhft/v1/<task>/schedule/<client_id>       server -> client  simulated fleets: when and from what to train

The server subscribes to ``fedhft/v1/<task>/update/+`` and ``fedhft/v1/<task>/hello/+``, usually as an
MQTT 5 shared subscription ``$share/<group>/<filter>`` so several server workers split the load.
"""

from __future__ import annotations

import re

from fedhft.protocol.errors import ProtocolError, TopicError

PREFIX = "fedhft/v1"
HELLO = "hello"
UPDATE = "update"
ACK = "ack"
MODEL = "model"
KEY = "key"  # not a parse_topic kind: the key topic has no id level
PROMISE = "promise"  # virtual time (fedhft.protocol.virtual_time)
SCHEDULE = "schedule"
KINDS = (HELLO, UPDATE, ACK, MODEL, PROMISE, SCHEDULE)
MAX_ID_LEN = 128
MAX_CLUSTERS = 10**9

_ID_RE = re.compile(r"[A-Za-z0-9._-]+")
_CLUSTER_RE = re.compile(r"0|[1-9][0-9]{0,8}")


def id_problem(value: object) -> str | None:
    """Say why ``value`` is not a valid task/client id, or None when it is one."""
    if not isinstance(value, str):
        return f"must be a string, got {type(value).__name__}"
    if not value:
        return "must not be empty"
    if len(value) > MAX_ID_LEN:
        return f"must be at most {MAX_ID_LEN} characters, got {len(value)}"
    if not _ID_RE.fullmatch(value):
        return f"must use only [A-Za-z0-9._-], got {value!r}"
    return None


def validate_id(value: object, what: str, error: type[ProtocolError] = TopicError) -> str:
    """Return ``value`` when it is a valid id, else raise ``error`` naming ``what``."""
    problem = id_problem(value)
    if problem is not None:
        raise error(f"{what} {problem}")
    assert isinstance(value, str)
    return value


def _cluster(k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < MAX_CLUSTERS:
        raise TopicError(f"cluster index must be an int in [0, {MAX_CLUSTERS}), got {k!r}")
    return k


def hello_topic(task: str, client_id: str) -> str:
    """Topic a client publishes its HelloMessage on."""
    return _client_topic(task, HELLO, client_id)


def update_topic(task: str, client_id: str) -> str:
    """Topic a client publishes its UpdateMessages on."""
    return _client_topic(task, UPDATE, client_id)


def ack_topic(task: str, client_id: str) -> str:
    """Topic the server publishes AckMessages for one client on."""
    return _client_topic(task, ACK, client_id)


def cluster_model_topic(task: str, k: int) -> str:
    """Topic the server publishes the model of cluster ``k`` on."""
    return f"{PREFIX}/{validate_id(task, 'task')}/{MODEL}/cluster/{_cluster(k)}"


def client_model_topic(task: str, client_id: str) -> str:
    """Topic the server publishes a model meant for one client on."""
    return f"{PREFIX}/{validate_id(task, 'task')}/{MODEL}/client/{validate_id(client_id, 'client_id')}"


def key_topic(task: str) -> str:
    """Topic the server publishes its signed key chain on (retained); clients only read it."""
    return f"{PREFIX}/{validate_id(task, 'task')}/{KEY}"


def model_topic(task: str, target: str) -> str:
    """Topic of a model whose target is ``cluster/<k>`` or ``client/<client_id>``."""
    return f"{PREFIX}/{validate_id(task, 'task')}/{MODEL}/{validate_target(target)}"


def validate_target(target: object, error: type[ProtocolError] = TopicError) -> str:
    """Return ``target`` when it is ``cluster/<k>`` or ``client/<client_id>``, else raise ``error``."""
    if not isinstance(target, str):
        raise error(f"model target must be a string, got {type(target).__name__}")
    parts = target.split("/")
    if len(parts) == 2 and parts[0] == "cluster" and _CLUSTER_RE.fullmatch(parts[1]):
        return target
    if len(parts) == 2 and parts[0] == "client" and id_problem(parts[1]) is None:
        return target
    raise error(f"model target must be 'cluster/<k>' or 'client/<client_id>', got {target[:200]!r}")


def _client_topic(task: str, kind: str, client_id: str) -> str:
    return f"{PREFIX}/{validate_id(task, 'task')}/{kind}/{validate_id(client_id, 'client_id')}"


def promise_topic(task: str, client_id: str) -> str:
    """Topic a simulated client announces its next update's virtual arrival time on."""
    return _client_topic(task, PROMISE, client_id)


def schedule_topic(task: str, client_id: str) -> str:
    """Topic the server tells a simulated client when (virtual time) and from which version to train on."""
    return _client_topic(task, SCHEDULE, client_id)


def promise_filter(task: str) -> str:
    """Filter matching every client's promises of ``task``."""
    return f"{PREFIX}/{validate_id(task, 'task')}/{PROMISE}/+"


def update_filter(task: str) -> str:
    """Filter matching every client's updates of ``task``."""
    return f"{PREFIX}/{validate_id(task, 'task')}/{UPDATE}/+"


def hello_filter(task: str) -> str:
    """Filter matching every client's hello of ``task``."""
    return f"{PREFIX}/{validate_id(task, 'task')}/{HELLO}/+"


def server_filters(task: str) -> tuple[str, str]:
    """The filters the server subscribes to: updates and hellos of ``task``."""
    return (update_filter(task), hello_filter(task))


def client_filters(task: str, client_id: str, cluster: int | None = None) -> tuple[str, ...]:
    """The topics a client subscribes to: its acks, its own models and, if known, its cluster's models."""
    topics = (ack_topic(task, client_id), client_model_topic(task, client_id))
    if cluster is None:
        return topics
    return (*topics, cluster_model_topic(task, cluster))


def validate_filter(topic_filter: object) -> str:
    """Return ``topic_filter`` when it is a valid MQTT topic filter, else raise TopicError."""
    if not isinstance(topic_filter, str) or not topic_filter:
        raise TopicError(f"topic filter must be a non-empty string, got {topic_filter!r}")
    if topic_filter.startswith("$share/"):
        raise TopicError(f"topic filter is already a shared subscription: {topic_filter!r}")
    if "\x00" in topic_filter or len(topic_filter.encode("utf-8", "surrogatepass")) > 65535:
        raise TopicError("topic filter holds NUL or is over 65535 bytes")
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise TopicError(f"'#' must be the whole last level of a filter: {topic_filter!r}")
        if "+" in level and level != "+":
            raise TopicError(f"'+' must be a whole level of a filter: {topic_filter!r}")
    return topic_filter


def shared_subscription(group: str, topic_filter: str) -> str:
    """MQTT 5 shared subscription ``$share/<group>/<filter>``."""
    return f"$share/{validate_id(group, 'share group')}/{validate_filter(topic_filter)}"


def parse_topic(topic: object) -> tuple[str, str, str]:
    """Split a fedhft topic into ``(task, kind, rest)``.

    ``rest`` is the client id for hello/update/ack/promise/schedule and ``cluster/<k>`` or
    ``client/<client_id>`` for model.
    Anything else (other prefixes, wildcards, bad ids, extra levels) raises TopicError.
    """
    if not isinstance(topic, str):
        raise TopicError(f"topic must be a string, got {type(topic).__name__}")
    parts = topic.split("/")
    if len(parts) < 5 or parts[0] != "fedhft" or parts[1] != "v1":
        raise TopicError(f"not a fedhft/v1 topic: {topic[:200]!r}")
    task, kind, rest = validate_id(parts[2], "task in topic"), parts[3], parts[4:]
    if kind not in KINDS:
        raise TopicError(f"unknown message kind {kind[:50]!r} in topic {topic[:200]!r}")
    if kind == MODEL:
        return task, kind, validate_target("/".join(rest))
    if len(rest) != 1:
        raise TopicError(f"{kind} topic must end with exactly one client id: {topic[:200]!r}")
    return task, kind, validate_id(rest[0], "client_id in topic")
