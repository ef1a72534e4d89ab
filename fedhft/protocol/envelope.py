"""The envelope every fedhft message travels in: framing, zlib body and the optional Ed25519 signature.

Layout (all integers little-endian)::

    offset  size  field
    0       4     magic b"FHFT"
    4       1     format version (1)
    5       1     message kind: 1 update, 2 model, 3 hello, 4 ack, 5 key chain, 6 promise, 7 schedule
    6       1     flags: bit 0 body is zlib-compressed, bit 1 signed
    7       1     reserved, 0
    8       4     body length N (bytes on the wire)
    12      4     decompressed body length
    16      N     body
    16+N    64    Ed25519 signature over bytes [0, 16+N), present iff the signed flag is set

:func:`wrap` deflates a body only when that saves at least MIN_ZLIB_SAVING of it (tensor bodies of random-looking
fp16/fp32 values save ~10%, and inflating them is a third of the server's decode time); decoders accept both.
:func:`unwrap` checks the payload size, then inflates at most ``max_bytes`` (a zip bomb raises
MessageTooLarge); :func:`body_prefix` reads only the start of a body, trusting nothing.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedhft.protocol.errors import (
    BadSignature,
    MalformedMessage,
    MessageTooLarge,
    ProtocolError,
    UnsupportedVersion,
    WrongMessageKind,
)
from fedhft.protocol.signing import SIGNATURE_LEN, sign, verify

MAGIC = b"FHFT"
FORMAT_VERSION = 1
KIND_UPDATE, KIND_MODEL, KIND_HELLO, KIND_ACK = 1, 2, 3, 4
KIND_KEY = 5  # the server's key chain (fedhft.protocol.keychain)
KIND_PROMISE, KIND_SCHEDULE = 6, 7  # virtual time of a simulated fleet (fedhft.protocol.virtual_time)
KIND_NAMES = {
    KIND_UPDATE: "update",
    KIND_MODEL: "model",
    KIND_HELLO: "hello",
    KIND_ACK: "ack",
    KIND_KEY: "key",
    KIND_PROMISE: "promise",
    KIND_SCHEDULE: "schedule",
}
FLAG_ZLIB = 0x01
FLAG_SIGNED = 0x02
ENVELOPE = struct.Struct("<4sBBBBII")
ENVELOPE_LEN = ENVELOPE.size  # 16
DEFAULT_MAX_BYTES = 128 * 2**20  # an fp32 full fine-tuning model of MiniLM (22.6 M params) is ~90 MB
U32_MAX = 2**32 - 1
PEEK_CHUNK = 16384
MIN_ZLIB_SAVING = 0.15  # below this share of the body saved, the body is sent stored (bit 0 clear)


@dataclass(frozen=True)
class Envelope:
    kind: int
    flags: int
    raw: bytes  # decompressed body


def as_bytes(payload: object, max_bytes: int) -> bytes:
    """``payload`` as bytes, after checking its type and size (before any copy)."""
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
        raise ProtocolError(f"max_bytes must be a positive int, got {max_bytes!r}")
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise MalformedMessage(f"payload must be bytes, got {type(payload).__name__}")
    size = payload.nbytes if isinstance(payload, memoryview) else len(payload)
    if size > max_bytes:
        raise MessageTooLarge(f"payload is {size} bytes, over the limit of {max_bytes}")
    try:
        return bytes(payload)
    except (TypeError, ValueError, BufferError) as exc:
        raise MalformedMessage(f"payload is not a readable byte buffer ({exc})") from exc


def worth_deflating(raw: bytes, deflated: bytes) -> bool:
    """Whether ``deflated`` saves at least MIN_ZLIB_SAVING of ``raw``."""
    return len(deflated) <= (1.0 - MIN_ZLIB_SAVING) * len(raw)


def wrap(kind: int, raw: bytes, signing_key: Ed25519PrivateKey | None = None, *, deflate: bool | None = None) -> bytes:
    """The envelope of body ``raw``, signed with ``signing_key`` when one is given.

    The body is zlib-compressed when that saves at least MIN_ZLIB_SAVING (``deflate=None``), always (True)
    or never (False: a caller that already knows, e.g. from an earlier message of the same tensors)."""
    if len(raw) > U32_MAX:
        raise MessageTooLarge(f"{KIND_NAMES[kind]} body of {len(raw)} bytes does not fit the envelope")
    body = raw
    if deflate is not False:
        deflated = zlib.compress(raw, 6)
        if deflate or worth_deflating(raw, deflated):
            body = deflated
    if len(body) > U32_MAX:
        raise MessageTooLarge(f"{KIND_NAMES[kind]} body of {len(raw)} bytes does not fit the envelope")
    flags = (FLAG_ZLIB if body is not raw else 0) | (FLAG_SIGNED if signing_key is not None else 0)
    envelope = ENVELOPE.pack(MAGIC, FORMAT_VERSION, kind, flags, 0, len(body), len(raw)) + body
    if signing_key is not None:
        envelope += sign(envelope, signing_key)
    return envelope


def unwrap(payload: bytes, kind: int, max_bytes: int) -> Envelope:
    """Check the envelope of a ``kind`` message and inflate its body (at most ``max_bytes``)."""
    what = KIND_NAMES[kind]
    if len(payload) < ENVELOPE_LEN:
        raise MalformedMessage(f"{what} message is {len(payload)} bytes, shorter than the {ENVELOPE_LEN}-byte envelope")
    magic, version, got_kind, flags, reserved, body_len, raw_len = ENVELOPE.unpack_from(payload)
    if magic != MAGIC:
        raise MalformedMessage(f"bad magic: expected {MAGIC!r}, got {magic!r}")
    if version != FORMAT_VERSION:
        raise UnsupportedVersion(f"envelope format version {version}, this code speaks {FORMAT_VERSION}")
    if got_kind != kind:
        got = KIND_NAMES.get(got_kind, f"unknown kind {got_kind}")
        raise WrongMessageKind(f"expected a {what} message, got {got} (kind byte {got_kind})")
    if flags & ~(FLAG_ZLIB | FLAG_SIGNED) or reserved:
        raise MalformedMessage(f"unknown envelope flags 0x{flags:02x} / reserved byte {reserved}")
    expected_len = ENVELOPE_LEN + body_len + (SIGNATURE_LEN if flags & FLAG_SIGNED else 0)
    if len(payload) != expected_len:
        raise MalformedMessage(f"envelope says {expected_len} bytes, payload is {len(payload)}")
    body = payload[ENVELOPE_LEN : ENVELOPE_LEN + body_len]
    raw = inflate(body, raw_len, max_bytes) if flags & FLAG_ZLIB else body
    if len(raw) != raw_len:
        raise MalformedMessage(f"body is {len(raw)} bytes, the envelope says {raw_len}")
    return Envelope(got_kind, flags, raw)


def inflate(body: bytes, declared: int, max_bytes: int) -> bytes:
    """Decompress ``body``, producing at most ``declared`` + 1 <= ``max_bytes`` + 1 bytes (zip-bomb safe)."""
    if declared > max_bytes:
        raise MessageTooLarge(f"decompressed body would be {declared} bytes, over the limit of {max_bytes}")
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(body, declared + 1)
    except zlib.error as exc:
        raise MalformedMessage(f"body is not valid zlib data ({exc})") from exc
    if len(raw) > declared:
        raise MessageTooLarge(f"body inflates past its declared {declared} bytes (limit {max_bytes})")
    if not inflater.eof:
        raise MalformedMessage("zlib body is truncated")
    if inflater.unused_data:
        raise MalformedMessage(f"{len(inflater.unused_data)} stray bytes after the zlib body")
    return raw


def verify_signed(data: bytes, verify_key: Ed25519PublicKey, what: str) -> None:
    """BadSignature unless ``data`` ends with ``verify_key``'s signature of everything before it."""
    if not isinstance(verify_key, Ed25519PublicKey):
        raise BadSignature(f"verify_key must be an Ed25519PublicKey, got {type(verify_key).__name__}")
    if len(data) < ENVELOPE_LEN + SIGNATURE_LEN:
        raise BadSignature(f"{what} message of {len(data)} bytes is too short to carry a signature")
    if data[:4] == MAGIC and not data[6] & FLAG_SIGNED:
        raise BadSignature(f"{what} message is not signed")
    verify(data[:-SIGNATURE_LEN], data[-SIGNATURE_LEN:], verify_key)


def body_prefix(payload: bytes, kind: int, limit: int, enough: Callable[[bytes], bool]) -> bytes | None:
    """The start of the body of a ``kind`` envelope (inflated chunk by chunk until ``enough`` says so), or None.

    At most ``limit`` bytes are produced; None when the payload is no ``kind`` envelope, its zlib data is
    broken, or ``limit`` bytes are not ``enough``. Nothing is verified: callers decode in full later.
    """
    try:
        if len(payload) < ENVELOPE_LEN or bytes(payload[:4]) != MAGIC or payload[5] != kind:
            return None
        _magic, _version, _kind, flags, _reserved, body_len, _raw_len = ENVELOPE.unpack_from(payload)
        body = memoryview(payload)[ENVELOPE_LEN : ENVELOPE_LEN + body_len]
        if not flags & FLAG_ZLIB:
            return bytes(body[:limit])
        inflater = zlib.decompressobj()
        out = b""
        for start in range(0, len(body), PEEK_CHUNK):  # inflate only as far as the caller needs
            out += inflater.decompress(body[start : start + PEEK_CHUNK], limit - len(out))
            if enough(out):
                return out
            if len(out) >= limit:
                return None
        return out
    except (ValueError, TypeError, IndexError, struct.error, zlib.error):
        return None
