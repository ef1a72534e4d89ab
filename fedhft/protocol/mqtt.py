"""MQTT plumbing that the edge, the server and the simulator share: the broker URL and the paho client.

``parse_broker_url`` reads ``mqtt://HOST[:PORT]`` (1883) and ``mqtts://HOST[:PORT]`` (8883, TLS); ``make_client``
builds a paho client (callback API 2, MQTT v5) with credentials and TLS; ``session_properties`` asks the broker
to keep a ``clean_start=False`` session for a while. Imports paho: ``fedhft.protocol`` does not import this module.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fedhft.errors import FedHFTError

AUTH_REFUSALS = (134, 135)  # MQTT v5 CONNACK: bad user name or password, not authorized (retrying cannot help)
SCHEMES = {"mqtt": (1883, False), "tcp": (1883, False), "mqtts": (8883, True), "ssl": (8883, True)}


class LinkError(FedHFTError):
    """A broker address or TLS setting that cannot be used."""


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool


def parse_broker_url(url: str, error: type[Exception] = LinkError, *, scheme_optional: bool = False) -> BrokerAddress:
    """``mqtt://HOST[:PORT]`` (1883) or ``mqtts://HOST[:PORT]`` (8883, TLS); ``tcp://`` and ``ssl://`` alike.

    With ``scheme_optional``, a URL without ``scheme://`` is read as ``mqtt://``. Raises ``error`` otherwise."""
    parts = urlsplit(url if not scheme_optional or "://" in url else f"mqtt://{url}")
    if parts.scheme not in SCHEMES or not parts.hostname:
        raise error(f"broker URL {url!r} is not mqtt://HOST:PORT or mqtts://HOST:PORT")
    default_port, tls = SCHEMES[parts.scheme]
    try:
        port = parts.port or default_port
    except ValueError as e:
        raise error(f"broker URL {url!r} has a bad port") from e
    return BrokerAddress(parts.hostname, port, tls)


def make_client(
    client_id: str = "",
    *,
    username: str | None = None,
    password: str | None = None,
    tls: bool = False,
    tls_ca: str | os.PathLike[str] | None = None,
    manual_ack: bool = False,
    reconnect_on_failure: bool = True,
    error: type[Exception] = LinkError,
) -> mqtt.Client:
    """A paho MQTT v5 client (callback API 2), not yet connected.

    ``username`` (when not None) and ``password`` authenticate it; with ``tls`` or ``tls_ca`` it speaks TLS and
    verifies the broker's certificate against ``tls_ca`` (else the system's CAs). A CA file that cannot be
    used raises ``error``."""
    c = mqtt.Client(
        callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
        manual_ack=manual_ack,
        reconnect_on_failure=reconnect_on_failure,
    )
    if username is not None:
        c.username_pw_set(username, password)
    if tls or tls_ca:
        ca = os.fspath(tls_ca) if tls_ca else None
        try:
            c.tls_set(ca_certs=ca, cert_reqs=ssl.CERT_REQUIRED)
        except (OSError, ssl.SSLError, ValueError) as e:
            raise error(f"cannot set up TLS with CA file {ca!r}: {e}") from e
    return c


def session_properties(expiry_seconds: int) -> Properties:
    """CONNECT properties that keep a ``clean_start=False`` session this long after a disconnect."""
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = expiry_seconds
    return props
