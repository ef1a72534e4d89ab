"""The server's key chain: how a device follows signing-key rotations, also ones it was offline for.

A chain is a list of links. Link 0 holds the server's first public key; link ``i > 0`` holds a new public key
and the previous key's Ed25519 signature over::

    b"fedhft-key-link-v1\\x00" || index (u32 LE) || previous public key (32 B) || new public key (32 B)
        || created_at (f64 LE)

The server publishes its whole chain, retained, on ``fedhft/v1/<task>/key`` as a *key message*: the
envelope (kind 5, signed) around the JSON body ``{"task", "created_at", "links": [{"index", "public_key",
"created_at", "signature"}, ...]}`` (keys and signatures as lowercase hex), signed by the newest key.

A device that trusts key K accepts a chain when every link verifies with the key before it, K is one of its
keys and the envelope verifies with the newest key; it then trusts the newest key alone, so models signed by
K are refused from then on. A chain without K (another server's, or one older than K) is refused.
Limit: whoever holds a superseded private key can fork the chain from that key for devices still trusting it;
devices that adopted a later key refuse such a fork.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedhft.protocol.envelope import FLAG_SIGNED, KIND_KEY, as_bytes, unwrap, wrap
from fedhft.protocol.errors import BadSignature, EncodingError, HeaderError
from fedhft.protocol.fields import (
    check_recipient,
    ident,
    int_at_least,
    json_dumps,
    json_object,
    matching,
    parse_fields,
    timestamp,
)
from fedhft.protocol.signing import SIGNATURE_LEN, key_id, public_key_bytes, public_key_from_hex, sign, verify

LINK_CONTEXT = b"fedhft-key-link-v1\x00"
MAX_LINKS = 1024
KEY_MAX_BYTES = 1 << 20  # 1024 links are ~300 KB of JSON

_HEX64 = matching(re.compile(r"[0-9a-f]{64}"), "64 lowercase hex characters")
_SIG_RE = re.compile(r"(?:[0-9a-f]{128})?")


@dataclass(frozen=True)
class KeyLink:
    """One key of the chain; ``signature`` (hex) is the previous key's, empty for link 0."""

    index: int
    public_key: str  # 64 lowercase hex characters (raw Ed25519 public key)
    created_at: float
    signature: str = ""

    @property
    def key(self) -> Ed25519PublicKey:
        return public_key_from_hex(self.public_key, f"key chain link {self.index}")

    @property
    def key_id(self) -> str:
        return key_id(self.key)


@dataclass(frozen=True)
class KeyChainMessage:
    """Server -> clients (retained on the key topic): the whole chain, signed by its newest key."""

    task: str
    created_at: float
    links: tuple[KeyLink, ...]


def _signature(value: object, field: str) -> str:
    if not isinstance(value, str) or not _SIG_RE.fullmatch(value):
        shown = value[:80] if isinstance(value, str) else type(value).__name__
        raise HeaderError(f"{field} must be empty or 128 lowercase hex characters, got {shown!r}")
    return value


LINK_FIELDS = {"index": int_at_least(0), "public_key": _HEX64, "created_at": timestamp, "signature": _signature}


def _links(value: object, field: str) -> tuple[KeyLink, ...]:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_LINKS:
        shown = len(value) if isinstance(value, list) else type(value).__name__
        raise HeaderError(f"{field} must be a list of 1-{MAX_LINKS} links, got {shown}")
    links = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise HeaderError(f"{field}[{i}] must be an object, got {type(item).__name__}")
        links.append(KeyLink(**parse_fields(item, LINK_FIELDS, f"{field}[{i}]")))
    return tuple(links)


KEY_FIELDS = {"task": ident, "created_at": timestamp, "links": _links}


def link_statement(index: int, previous: Ed25519PublicKey, new: Ed25519PublicKey, created_at: float) -> bytes:
    """The bytes the previous key signs to hand over to ``new`` at position ``index``."""
    return (
        LINK_CONTEXT
        + struct.pack("<I", index)
        + public_key_bytes(previous)
        + public_key_bytes(new)
        + struct.pack("<d", created_at)
    )


def genesis_link(key: Ed25519PublicKey | Ed25519PrivateKey, created_at: float) -> KeyLink:
    """Link 0: the server's first key, signed by nobody."""
    return KeyLink(0, public_key_bytes(key).hex(), float(created_at))


def extend_chain(
    links: Sequence[KeyLink], current: Ed25519PrivateKey, new: Ed25519PublicKey, created_at: float
) -> tuple[KeyLink, ...]:
    """``links`` plus a link to ``new``, signed by ``current`` (which must hold the newest key of ``links``)."""
    if not links or links[-1].public_key != public_key_bytes(current).hex():
        raise EncodingError("the signing key is not the newest key of the chain")
    index = len(links)
    statement = link_statement(index, current.public_key(), new, float(created_at))
    link = KeyLink(index, public_key_bytes(new).hex(), float(created_at), sign(statement, current).hex())
    return (*links, link)


def verify_links(links: Sequence[KeyLink]) -> list[Ed25519PublicKey]:
    """The chain's keys in order, after checking indices, uniqueness and every link's signature."""
    if not links:
        raise HeaderError("key chain has no links")
    keys: list[Ed25519PublicKey] = []
    seen: set[str] = set()
    for i, link in enumerate(links):
        if link.index != i:
            raise HeaderError(f"key chain link {i} says index {link.index}")
        if link.public_key in seen:
            raise HeaderError(f"key chain link {i} repeats an earlier key")
        seen.add(link.public_key)
        key = link.key
        if i == 0:
            if link.signature:
                raise HeaderError("key chain link 0 must not carry a signature")
        else:
            if not link.signature:
                raise BadSignature(f"key chain link {i} is not signed")
            statement = link_statement(i, keys[-1], key, link.created_at)
            try:
                verify(statement, bytes.fromhex(link.signature), keys[-1])
            except BadSignature as exc:
                raise BadSignature(f"key chain link {i} is not signed by the key of link {i - 1}") from exc
        keys.append(key)
    return keys


def _body(msg: KeyChainMessage) -> dict[str, Any]:
    links = [
        {"index": lk.index, "public_key": lk.public_key, "created_at": lk.created_at, "signature": lk.signature}
        for lk in msg.links
    ]
    return {"task": msg.task, "created_at": msg.created_at, "links": links}


def encode_key_chain(msg: KeyChainMessage, signing_key: Ed25519PrivateKey) -> bytes:
    """Validate ``msg`` (every link) and encode it, signed by ``signing_key``: the chain's newest key."""
    if not isinstance(signing_key, Ed25519PrivateKey):
        raise EncodingError(f"signing_key must be an Ed25519PrivateKey, got {type(signing_key).__name__}")
    body = _body(msg)
    parsed = parse_fields(body, KEY_FIELDS, "key chain")
    verify_links(parsed["links"])
    if parsed["links"][-1].public_key != public_key_bytes(signing_key).hex():
        raise EncodingError("a key chain must be signed by its newest key")
    return wrap(KIND_KEY, json_dumps(body, "key chain").encode("utf-8"), signing_key)


def decode_key_chain(
    payload: bytes, *, expected_task: str | None = None, max_bytes: int = KEY_MAX_BYTES
) -> KeyChainMessage:
    """Decode a key message and verify it whole: links, then the envelope with the newest key.

    ProtocolError subclasses on any problem (BadSignature for a signature, WrongTask for another task).
    """
    data = as_bytes(payload, max_bytes)
    envelope = unwrap(data, KIND_KEY, max_bytes)
    if not envelope.flags & FLAG_SIGNED:
        raise BadSignature("key chain message is not signed")
    header = parse_fields(json_object(envelope.raw, "key chain"), KEY_FIELDS, "key chain")
    check_recipient(header, {"task": expected_task}, "key chain")
    keys = verify_links(header["links"])
    try:
        verify(data[:-SIGNATURE_LEN], data[-SIGNATURE_LEN:], keys[-1])
    except BadSignature as exc:
        raise BadSignature("key chain message is not signed by its newest key") from exc
    return KeyChainMessage(**header)


def follow_chain(msg: KeyChainMessage, trusted: Ed25519PublicKey) -> KeyLink:
    """The newest link of a decoded chain, provided ``trusted`` is one of its keys (BadSignature otherwise)."""
    mine = public_key_bytes(trusted).hex()
    if all(link.public_key != mine for link in msg.links):
        raise BadSignature(f"key chain does not contain the trusted key {key_id(trusted)}")
    return msg.links[-1]
