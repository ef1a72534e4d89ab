"""Bytes <-> messages. Torch-free: numpy, safetensors.numpy, zlib, json, struct and cryptography only.

Envelope (all integers little-endian)::

    offset  size  field
    0       4     magic b"FHFT"
    4       1     format version (1)
    5       1     message kind: 1 update, 2 model, 3 hello, 4 ack, 5 key chain
    6       1     flags: bit 0 body is zlib-compressed (always set by the encoders), bit 1 signed
    7       1     reserved, 0
    8       4     body length N (bytes on the wire)
    12      4     decompressed body length
    16      N     body
    16+N    64    Ed25519 signature over bytes [0, 16+N), present iff the signed flag is set

Update and model bodies are safetensors blobs (``safetensors.numpy``) whose ``__metadata__`` holds one
key, ``"fedhft"``: a JSON object ``{"header": {...message fields...}, "tensors": {name: encoding}}``.
Encodings: ``fp32``; ``fp16`` (values beyond the fp16 range are an encode error); ``int8`` (symmetric,
one fp32 scale per row = max|row| / 127, stored as tensor ``<name>#scale``; a 1-D tensor is one row);
``index`` (row indices stored as uint8/uint16/int32, the narrowest that fits, restored to int32).
Hello and ack bodies are one JSON object of the message fields.

Decoders check the payload size, then inflate at most ``max_bytes`` (a zip bomb raises MessageTooLarge),
parse the safetensors header themselves before handing it to safetensors, and validate every header
field and tensor rule; any failure raises a :class:`ProtocolError` subclass, never anything else.

Model messages are signed with Ed25519 over the envelope. ``decode_model`` with a ``verify_key`` checks
the signature before parsing anything and raises BadSignature when it is missing, invalid or made by
another key; edge runtimes always pass the key. Without a key the signature is not checked: that mode
is for outside tooling that only inspects messages.
"""

from __future__ import annotations

import json
import math
import re
import struct
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from fedhft.protocol.errors import (
    BadIndices,
    BadSignature,
    EncodingError,
    HeaderError,
    MalformedMessage,
    MessageTooLarge,
    MissingTensor,
    NonFiniteTensor,
    ProtocolError,
    ShapeMismatch,
    StaleModel,
    UnknownTensor,
    UnsupportedVersion,
    WrongMessageKind,
    WrongRecipient,
    WrongTask,
)
from fedhft.protocol.messages import (
    ACK_STATUSES,
    DELTA_SUFFIX,
    HEAD_BIAS,
    HEAD_WEIGHT,
    MODEL_SUFFIXES,
    UPDATE_SUFFIXES,
    AckMessage,
    HelloMessage,
    ModelMessage,
    UpdateMessage,
)
from fedhft.protocol.signing import SIGNATURE_LEN, key_id, sign, verify
from fedhft.protocol.topics import id_problem, validate_target

MAGIC = b"FHFT"
FORMAT_VERSION = 1
KIND_UPDATE, KIND_MODEL, KIND_HELLO, KIND_ACK = 1, 2, 3, 4
KIND_KEY = 5  # the server's key chain (fedhft.protocol.keychain)
KIND_NAMES = {KIND_UPDATE: "update", KIND_MODEL: "model", KIND_HELLO: "hello", KIND_ACK: "ack", KIND_KEY: "key"}
FLAG_ZLIB = 0x01
FLAG_SIGNED = 0x02
ENVELOPE = struct.Struct("<4sBBBBII")
ENVELOPE_LEN = ENVELOPE.size  # 16
DEFAULT_MAX_BYTES = 128 * 2**20  # an fp32 full fine-tuning model of MiniLM (22.6 M params) is ~90 MB
ENCODINGS = ("fp32", "fp16", "int8")
INDEX = "index"
META_KEY = "fedhft"
SCALE_SUFFIX = "#scale"
MAX_TENSOR_NAME = 256
MAX_TEXT = 4096
MAX_ENTRIES = 1024
_U32 = 2**32 - 1
_I64 = 2**63

Shapes = Mapping[str, tuple[int | None, ...]]

# ---------------------------------------------------------------------------------------------- envelope


@dataclass(frozen=True)
class _Envelope:
    kind: int
    flags: int
    raw: bytes  # decompressed body


def _as_bytes(payload: object, max_bytes: int) -> bytes:
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


def _wrap(kind: int, raw: bytes, signing_key: Ed25519PrivateKey | None = None) -> bytes:
    body = zlib.compress(raw, 6)
    if len(raw) > _U32 or len(body) > _U32:
        raise MessageTooLarge(f"{KIND_NAMES[kind]} body of {len(raw)} bytes does not fit the envelope")
    flags = FLAG_ZLIB | (FLAG_SIGNED if signing_key is not None else 0)
    envelope = ENVELOPE.pack(MAGIC, FORMAT_VERSION, kind, flags, 0, len(body), len(raw)) + body
    if signing_key is not None:
        envelope += sign(envelope, signing_key)
    return envelope


def _unwrap(payload: bytes, kind: int, max_bytes: int) -> _Envelope:
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
    raw = _inflate(body, raw_len, max_bytes) if flags & FLAG_ZLIB else body
    if len(raw) != raw_len:
        raise MalformedMessage(f"body is {len(raw)} bytes, the envelope says {raw_len}")
    return _Envelope(got_kind, flags, raw)


def _inflate(body: bytes, declared: int, max_bytes: int) -> bytes:
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


# ------------------------------------------------------------------------------------------------- JSON


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite JSON constant {name}")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} overflows a float")
    return value


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key[:80]!r}")
        out[key] = value
    return out


def _json_loads(data: bytes | str, what: str) -> Any:
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        return json.loads(
            text, parse_constant=_reject_constant, parse_float=_finite_float, object_pairs_hook=_unique_pairs
        )
    except (ValueError, RecursionError) as exc:
        raise MalformedMessage(f"{what} is not valid JSON ({str(exc)[:200]})") from exc


def _json_dumps(obj: Any, what: str) -> str:
    try:
        return json.dumps(obj, allow_nan=False, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as exc:
        raise HeaderError(f"{what} is not JSON-able ({str(exc)[:200]})") from exc


def _json_object(data: bytes | str, what: str) -> dict[str, Any]:
    obj = _json_loads(data, what)
    if not isinstance(obj, dict):
        raise MalformedMessage(f"{what} must be a JSON object, got {type(obj).__name__}")
    return obj


# ---------------------------------------------------------------------------------------- header fields

Validator = Callable[[object, str], Any]
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_KEY_ID_RE = re.compile(r"[0-9a-f]{16}")


def _ident(value: object, field: str) -> str:
    problem = id_problem(value)
    if problem is not None:
        raise HeaderError(f"{field} {problem}")
    assert isinstance(value, str)
    return value


def _int_at_least(minimum: int) -> Validator:
    def check(value: object, field: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise HeaderError(f"{field} must be an int, got {type(value).__name__}")
        if not minimum <= value < _I64:
            raise HeaderError(f"{field} must be in [{minimum}, 2**63), got {value}")
        return int(value)

    return check


def _finite(value: object, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise HeaderError(f"{field} must be a number, got {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError as exc:
        raise HeaderError(f"{field} is too large for a float") from exc
    if not math.isfinite(number):
        raise HeaderError(f"{field} must be finite, got {number}")
    return number


def _timestamp(value: object, field: str) -> float:
    number = _finite(value, field)
    if number < 0:
        raise HeaderError(f"{field} must be a unix time >= 0, got {number}")
    return number


def _text(value: object, field: str) -> str:
    if not isinstance(value, str):
        raise HeaderError(f"{field} must be a string, got {type(value).__name__}")
    if len(value) > MAX_TEXT:
        raise HeaderError(f"{field} must be at most {MAX_TEXT} characters, got {len(value)}")
    return value


def _matching(pattern: re.Pattern[str], description: str) -> Validator:
    def check(value: object, field: str) -> str:
        if not isinstance(value, str) or not pattern.fullmatch(value):
            shown = value[:80] if isinstance(value, str) else type(value).__name__
            raise HeaderError(f"{field} must be {description}, got {shown!r}")
        return value

    return check


def _entries(value: object, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise HeaderError(f"{field} must be an object, got {type(value).__name__}")
    if len(value) > MAX_ENTRIES:
        raise HeaderError(f"{field} must have at most {MAX_ENTRIES} entries, got {len(value)}")
    for key in value:
        if not isinstance(key, str) or not 0 < len(key) <= 128:
            raise HeaderError(f"{field} keys must be strings of 1-128 characters, got {str(key)[:80]!r}")
    return value


def _metrics(value: object, field: str) -> dict[str, float]:
    return {k: _finite(v, f"{field}[{k!r}]") for k, v in _entries(value, field).items()}


def _meta_value(value: object, field: str) -> float | int | str:
    if isinstance(value, str):
        return _text(value, field)
    if isinstance(value, int) and not isinstance(value, bool):
        if not -_I64 <= value < _I64:
            raise HeaderError(f"{field} must fit in 64 bits, got {value}")
        return value
    if isinstance(value, float):
        return _finite(value, field)
    raise HeaderError(f"{field} must be a float, int or str, got {type(value).__name__}")


def _meta(value: object, field: str) -> dict[str, float | int | str]:
    return {k: _meta_value(v, f"{field}[{k!r}]") for k, v in _entries(value, field).items()}


def _plan(value: object, field: str) -> dict[str, Any]:
    plan = _entries(value, field)
    _json_dumps(plan, field)
    return plan


def _status(value: object, field: str) -> str:
    if value not in ACK_STATUSES:
        shown = value[:80] if isinstance(value, str) else type(value).__name__
        raise HeaderError(f"{field} must be one of {ACK_STATUSES}, got {shown!r}")
    assert isinstance(value, str)
    return value


def _target(value: object, field: str) -> str:
    return validate_target(value, HeaderError)


_sha256 = _matching(_SHA256_RE, "64 lowercase hex characters")
_key_id = _matching(_KEY_ID_RE, "16 lowercase hex characters")

UPDATE_FIELDS: dict[str, Validator] = {
    "task": _ident,
    "client_id": _ident,
    "seq": _int_at_least(0),
    "base_version": _int_at_least(0),
    "num_samples": _int_at_least(1),
    "loss": _finite,
    "metrics": _metrics,
    "profile": _ident,
    "manifest_sha256": _sha256,
    "created_at": _timestamp,
}
MODEL_FIELDS: dict[str, Validator] = {
    "task": _ident,
    "version": _int_at_least(0),
    "target": _target,
    "created_at": _timestamp,
    "key_id": _key_id,
    "meta": _meta,
}
HELLO_FIELDS: dict[str, Validator] = {
    "task": _ident,
    "client_id": _ident,
    "profile": _ident,
    "manifest_sha256": _sha256,
    "plan": _plan,
    "created_at": _timestamp,
}
ACK_FIELDS: dict[str, Validator] = {
    "task": _ident,
    "client_id": _ident,
    "seq": _int_at_least(0),
    "status": _status,
    "reason": _text,
    "version": _int_at_least(0),
}


def _parse_fields(obj: Mapping[str, Any], spec: Mapping[str, Validator], what: str) -> dict[str, Any]:
    """Validate ``obj`` against ``spec``: exactly its fields, each valid; return canonical values."""
    unknown = sorted(str(k)[:80] for k in obj if k not in spec)
    if unknown:
        raise HeaderError(f"{what} has unknown fields {unknown[:5]}")
    missing = [k for k in spec if k not in obj]
    if missing:
        raise HeaderError(f"{what} lacks fields {missing}")
    return {name: check(obj[name], name) for name, check in spec.items()}


def _fields_of(msg: object, spec: Mapping[str, Validator], what: str) -> dict[str, Any]:
    return _parse_fields({name: getattr(msg, name) for name in spec}, spec, what)


def _check_recipient(header: Mapping[str, Any], expected: Mapping[str, str | None], what: str) -> None:
    for field, want in expected.items():
        if want is None or header[field] == want:
            continue
        error = WrongTask if field == "task" else WrongRecipient
        raise error(f"{what} {field} is {header[field]!r}, expected {want!r}")


# ------------------------------------------------------------------------------------- tensor encodings


def _row_view(arr: np.ndarray) -> np.ndarray:
    """``arr`` as a 2-D (rows, cols) view: rows along axis 0; a 0-D or 1-D tensor is one row."""
    if arr.ndim <= 1:
        return arr.reshape(1, arr.size)
    return arr.reshape(arr.shape[0], math.prod(arr.shape[1:]))


def _quantize_int8(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = _row_view(arr).astype(np.float64)
    amax = np.abs(rows).max(axis=1) if rows.shape[1] else np.zeros(rows.shape[0])
    scale = (amax / 127.0).astype(np.float32)
    divisor = np.where(scale > 0, scale, 1.0).astype(np.float64)
    q = np.clip(np.rint(rows / divisor[:, None]), -127, 127).astype(np.int8)
    return q.reshape(arr.shape), scale


def _encode_float(name: str, arr: np.ndarray, encoding: str) -> dict[str, np.ndarray]:
    """The stored tensors of float32 ``arr`` under ``encoding``."""
    if encoding == "fp32":
        return {name: np.ascontiguousarray(arr, dtype=np.float32)}
    if encoding == "fp16":
        with np.errstate(over="ignore"):
            half = arr.astype(np.float16)
        if not np.isfinite(half).all():
            peak = float(np.abs(arr).max())
            raise EncodingError(f"tensor {name!r}: max |x| = {peak:g} is beyond the fp16 range; use fp32 or int8")
        return {name: half}
    if encoding == "int8":
        q, scale = _quantize_int8(arr)
        return {name: q, name + SCALE_SUFFIX: scale}
    raise EncodingError(f"unknown encoding {encoding!r}; expected one of {ENCODINGS}")


def _encode_index(arr: np.ndarray) -> np.ndarray:
    peak = int(arr.max()) if arr.size else 0
    for dtype in (np.uint8, np.uint16):
        if peak <= np.iinfo(dtype).max:
            return arr.astype(dtype)
    return arr.astype(np.int32)


def _decode_float(name: str, encoding: str, stored: Mapping[str, np.ndarray]) -> np.ndarray:
    data = stored[name]
    want = {"fp32": np.float32, "fp16": np.float16, "int8": np.int8}[encoding]
    if data.dtype != want:
        raise ShapeMismatch(f"tensor {name!r} ({encoding}): expected dtype {np.dtype(want)}, got {data.dtype}")
    if encoding != "int8":
        return data.astype(np.float32)
    scale = stored[name + SCALE_SUFFIX]
    rows = _row_view(data)
    if scale.dtype != np.float32 or scale.shape != (rows.shape[0],):
        raise ShapeMismatch(
            f"tensor {name!r} (int8): expected float32 scales of shape ({rows.shape[0]},), "
            f"got {scale.dtype} {scale.shape}"
        )
    if not (np.isfinite(scale).all() and (scale >= 0).all()):
        raise NonFiniteTensor(f"tensor {name!r} (int8): scales must be finite and >= 0")
    with np.errstate(over="ignore", invalid="ignore"):
        out = rows.astype(np.float32) * scale[:, None]
    return out.reshape(data.shape)


def _decode_index(name: str, data: np.ndarray) -> np.ndarray:
    if data.dtype not in (np.uint8, np.uint16, np.int32):
        raise BadIndices(f"tensor {name!r}: indices must be stored as uint8/uint16/int32, got {data.dtype}")
    return data.astype(np.int32)


def quantization_error(arr: np.ndarray, encoding: str) -> float:
    """Max absolute error of ``arr`` (as float32) after an ``encoding`` round trip; 0.0 for fp32."""
    values = np.asarray(arr, dtype=np.float32)
    if values.size == 0:
        return 0.0
    stored = _encode_float("x", values, encoding)
    back = _decode_float("x", encoding, stored)
    return float(np.abs(back.astype(np.float64) - values.astype(np.float64)).max())


# -------------------------------------------------------------------------------------- safetensors body

_ST_DTYPES = {"F32": 4, "F16": 2, "I8": 1, "U8": 1, "U16": 2, "I32": 4}


def _entry_span(name: str, entry: object, data_len: int) -> tuple[int, int]:
    """Validate one safetensors header entry; return its (begin, end) data offsets."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise MalformedMessage(f"safetensors entry {name[:80]!r} must have exactly dtype, shape, data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
        raise MalformedMessage(f"safetensors entry {name[:80]!r}: unsupported dtype {str(dtype)[:20]!r}")
    if not _int_list(shape, 8) or not _int_list(offsets, 2) or len(offsets) != 2:
        raise MalformedMessage(f"safetensors entry {name[:80]!r}: bad shape or data_offsets")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise MalformedMessage(f"safetensors entry {name[:80]!r}: offsets {offsets} outside {data_len} data bytes")
    if end - begin != math.prod(shape) * _ST_DTYPES[dtype]:
        raise MalformedMessage(f"safetensors entry {name[:80]!r}: {end - begin} bytes do not hold {dtype} {shape}")
    return begin, end


def _int_list(value: object, max_len: int) -> bool:
    return (
        isinstance(value, list)
        and len(value) <= max_len
        and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < _I64 for v in value)
    )


def _parse_safetensors(raw: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Validate a safetensors blob, then load it; return (metadata, tensors)."""
    if len(raw) < 8:
        raise MalformedMessage(f"safetensors body is {len(raw)} bytes, too short for its header length")
    (header_len,) = struct.unpack_from("<Q", raw)
    if header_len > len(raw) - 8:
        raise MalformedMessage(f"safetensors header length {header_len} exceeds the {len(raw) - 8} bytes left")
    header = _json_object(raw[8 : 8 + header_len], "safetensors header")
    metadata = header.pop("__metadata__", None)
    if not isinstance(metadata, dict):
        raise MalformedMessage("safetensors header lacks its __metadata__ object")
    data_len = len(raw) - 8 - header_len
    spans = sorted(_entry_span(name, entry, data_len) for name, entry in header.items())
    position = 0
    for begin, end in spans:
        if begin != position:
            raise MalformedMessage(f"safetensors data has a gap or overlap at byte {begin}")
        position = end
    if position != data_len:
        raise MalformedMessage(f"safetensors data is {data_len} bytes, the tensors cover {position}")
    return metadata, _load_checked(raw, set(header))


def _load_checked(raw: bytes, names: set[str]) -> dict[str, np.ndarray]:
    try:
        tensors = st_load(raw)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: B036 - safetensors may raise a pyo3 PanicException (a BaseException)
        raise MalformedMessage(f"safetensors rejected the body ({type(exc).__name__}: {str(exc)[:200]})") from exc
    if set(tensors) != names:
        raise MalformedMessage("safetensors returned other tensors than its header lists")
    return tensors


def _parse_meta(metadata: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Split ``__metadata__`` into (header fields, tensor encodings)."""
    if set(metadata) != {META_KEY} or not isinstance(metadata[META_KEY], str):
        raise MalformedMessage(f"safetensors metadata must hold exactly the string key {META_KEY!r}")
    info = _json_object(metadata[META_KEY], "fedhft metadata")
    if set(info) != {"header", "tensors"}:
        raise MalformedMessage(f"fedhft metadata must have exactly header and tensors, got {sorted(info)[:5]}")
    header, encodings = info["header"], info["tensors"]
    if not isinstance(header, dict) or not isinstance(encodings, dict):
        raise MalformedMessage("fedhft metadata header and tensors must be objects")
    for name, enc in encodings.items():
        if enc not in (*ENCODINGS, INDEX):
            raise MalformedMessage(f"tensor {name[:80]!r}: unknown encoding {str(enc)[:20]!r}")
    return header, encodings


def _stored_names(encodings: Mapping[str, str]) -> set[str]:
    names = set(encodings)
    names.update(name + SCALE_SUFFIX for name, enc in encodings.items() if enc == "int8")
    return names


def _decode_tensors(stored: Mapping[str, np.ndarray], encodings: Mapping[str, str]) -> dict[str, np.ndarray]:
    expected = _stored_names(encodings)
    if set(stored) != expected:
        extra = sorted(set(stored) - expected)[:5]
        lacking = sorted(expected - set(stored))[:5]
        raise MalformedMessage(f"stored tensors do not match the encodings: extra {extra}, missing {lacking}")
    tensors: dict[str, np.ndarray] = {}
    for name, enc in encodings.items():
        tensors[name] = _decode_index(name, stored[name]) if enc == INDEX else _decode_float(name, enc, stored)
    return tensors


def _pack_body(header: dict[str, Any], stored: dict[str, np.ndarray], encodings: dict[str, str]) -> bytes:
    meta = _json_dumps({"header": header, "tensors": encodings}, "header")
    return bytes(st_save(stored, metadata={META_KEY: meta}))


# ------------------------------------------------------------------------------------------ tensor rules

_TENSOR_NAME_RE = re.compile(r"[A-Za-z0-9._-]+")


def _split_names(names: list[str], suffixes: tuple[str, ...]) -> dict[str, set[str]]:
    """Group tensor names by module; UnknownTensor / MissingTensor when they break the convention."""
    if not names:
        raise MissingTensor("message carries no tensors")
    modules: dict[str, set[str]] = {}
    dense = 0
    for name in names:
        if not isinstance(name, str) or not _TENSOR_NAME_RE.fullmatch(name) or len(name) > MAX_TENSOR_NAME:
            raise UnknownTensor(f"tensor name {str(name)[:80]!r} is not 1-{MAX_TENSOR_NAME} chars of [A-Za-z0-9._-]")
        if _is_dense(name):
            dense += 1
            continue
        if name in (HEAD_WEIGHT, HEAD_BIAS):
            continue
        suffix = next((s for s in suffixes if name.endswith(s) and len(name) > len(s)), None)
        if suffix is None:
            allowed = "|".join(suffixes)
            raise UnknownTensor(f"tensor {name!r} is neither <module>{{{allowed}}} nor head.weight/head.bias")
        modules.setdefault(name[: -len(suffix)], set()).add(suffix)
    for module, present in modules.items():
        lacking = [module + s for s in suffixes if s not in present]
        if lacking:
            raise MissingTensor(f"module {module!r} lacks tensors {lacking}")
    if (HEAD_WEIGHT in names) != (HEAD_BIAS in names):
        raise MissingTensor("head.weight and head.bias must come together")
    if dense and dense != len(names):
        raise UnknownTensor("a dense (full fine-tuning) message carries only <param>.delta tensors, no LoRA or head")
    return modules


def _is_dense(name: str) -> bool:
    return name.endswith(DELTA_SUFFIX) and len(name) > len(DELTA_SUFFIX)


def _check_dense(tensors: Mapping[str, np.ndarray]) -> None:
    """Every ``<param>.delta`` is at least 1-D with no empty dimension."""
    for name, arr in tensors.items():
        if _is_dense(name) and (arr.ndim < 1 or 0 in arr.shape):
            raise ShapeMismatch(f"tensor {name!r}: a parameter delta needs >= 1 dimension, each >= 1; got {arr.shape}")


def _ndim(tensors: Mapping[str, np.ndarray], name: str, ndim: int) -> tuple[int, ...]:
    shape = tensors[name].shape
    if len(shape) != ndim:
        raise ShapeMismatch(f"tensor {name!r}: expected {ndim}-D, got shape {shape}")
    return shape


def _check_head(tensors: Mapping[str, np.ndarray]) -> None:
    if HEAD_WEIGHT not in tensors:
        return
    labels, _ = _ndim(tensors, HEAD_WEIGHT, 2)
    (bias,) = _ndim(tensors, HEAD_BIAS, 1)
    if bias != labels:
        raise ShapeMismatch(f"tensor 'head.bias': expected ({labels},) to match head.weight, got ({bias},)")


def _check_rank(tensors: Mapping[str, np.ndarray], module: str, b_name: str) -> None:
    r, in_features = _ndim(tensors, module + ".A", 2)
    _, b_rank = _ndim(tensors, module + b_name, 2)
    if r < 1 or in_features < 1:
        raise ShapeMismatch(f"tensor {module + '.A'!r}: rank and in_features must be >= 1, got {(r, in_features)}")
    if b_rank != r:
        raise ShapeMismatch(f"tensor {module + b_name!r}: expected {r} columns (rows of {module}.A), got {b_rank}")


def _check_rows(tensors: Mapping[str, np.ndarray], module: str, out_features: Mapping[str, int] | None) -> None:
    name = module + ".rows"
    (k,) = _ndim(tensors, name, 1)
    rows = tensors[name]
    if rows.dtype != np.int32:
        raise BadIndices(f"tensor {name!r}: expected int32, got {rows.dtype}")
    if k != tensors[module + ".B_rows"].shape[0]:
        raise ShapeMismatch(f"tensor {name!r}: {k} indices for {tensors[module + '.B_rows'].shape[0]} rows of B_rows")
    if k and int(rows.min()) < 0:
        raise BadIndices(f"tensor {name!r}: indices must be >= 0, got {int(rows.min())}")
    if k > 1 and not bool((np.diff(rows.astype(np.int64)) > 0).all()):
        raise BadIndices(f"tensor {name!r}: indices must be sorted and unique")
    if out_features is None:
        return
    if module not in out_features:
        raise UnknownTensor(f"module {module!r} is not in out_features")
    if k and int(rows[-1]) >= out_features[module]:
        raise BadIndices(f"tensor {name!r}: index {int(rows[-1])} >= out_features {out_features[module]}")


def _check_finite(tensors: Mapping[str, np.ndarray]) -> None:
    for name, arr in tensors.items():
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = int(arr.size - np.isfinite(arr).sum())
            raise NonFiniteTensor(f"tensor {name!r}: {bad} NaN/inf values")


def _check_expected(tensors: Mapping[str, np.ndarray], expected: Shapes) -> None:
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise UnknownTensor(f"unexpected tensors {unknown[:5]}")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise MissingTensor(f"missing tensors {missing[:5]}")
    for name, want in expected.items():
        got = tensors[name].shape
        want = tuple(want)
        if len(got) != len(want) or any(w is not None and w != g for w, g in zip(want, got, strict=True)):
            raise ShapeMismatch(f"tensor {name!r}: expected shape {want}, got {got}")


def check_update_tensors(
    tensors: Mapping[str, np.ndarray],
    expected_shapes: Shapes | None = None,
    out_features: Mapping[str, int] | None = None,
) -> None:
    """Validate decoded update tensors (float32 + int32 rows); raise a TensorError subclass."""
    modules = _split_names(list(tensors), UPDATE_SUFFIXES)
    if expected_shapes is not None:
        _check_expected(tensors, expected_shapes)
    _check_head(tensors)
    _check_dense(tensors)
    for module in modules:
        _check_rank(tensors, module, ".B_rows")
        _check_rows(tensors, module, out_features)
    _check_finite(tensors)


def check_model_tensors(tensors: Mapping[str, np.ndarray], expected_shapes: Shapes | None = None) -> None:
    """Validate decoded model tensors (float32); raise a TensorError subclass."""
    modules = _split_names(list(tensors), MODEL_SUFFIXES)
    if expected_shapes is not None:
        _check_expected(tensors, expected_shapes)
    _check_head(tensors)
    _check_dense(tensors)
    for module in modules:
        _check_rank(tensors, module, ".B")
    _check_finite(tensors)


def _is_index(name: str, index_suffix: str | None) -> bool:
    return index_suffix is not None and name.endswith(index_suffix)


def _canonical_tensors(
    tensors: Mapping[str, Any], suffixes: tuple[str, ...], index_suffix: str | None
) -> dict[str, np.ndarray]:
    """Float tensors as float32, index tensors as int32 (checked to fit), for encoding."""
    if not isinstance(tensors, Mapping):
        raise HeaderError(f"tensors must be a mapping, got {type(tensors).__name__}")
    _split_names(list(tensors), suffixes)
    out: dict[str, np.ndarray] = {}
    for name, arr in tensors.items():
        if not isinstance(name, str):
            raise UnknownTensor(f"tensor names must be strings, got {type(name).__name__}")
        if not isinstance(arr, np.ndarray):
            raise ShapeMismatch(f"tensor {str(name)[:80]!r}: expected a numpy array, got {type(arr).__name__}")
        if _is_index(name, index_suffix):
            out[name] = _canonical_index(name, arr)
        elif arr.dtype.kind == "f":
            with np.errstate(over="ignore"):
                out[name] = np.ascontiguousarray(arr, dtype=np.float32)
        else:
            raise ShapeMismatch(f"tensor {name!r}: expected a float array, got {arr.dtype}")
    return out


def _canonical_index(name: str, arr: np.ndarray) -> np.ndarray:
    if arr.dtype.kind not in "iu":
        raise BadIndices(f"tensor {name!r}: expected an integer array, got {arr.dtype}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > np.iinfo(np.int32).max):
        raise BadIndices(f"tensor {name!r}: indices must be in [0, 2**31), got [{arr.min()}, {arr.max()}]")
    return np.ascontiguousarray(arr, dtype=np.int32)


def _encode_tensors(tensors: Mapping[str, np.ndarray], encoding: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    if encoding not in ENCODINGS:
        raise EncodingError(f"unknown encoding {encoding!r}; expected one of {ENCODINGS}")
    stored: dict[str, np.ndarray] = {}
    encodings: dict[str, str] = {}
    for name in sorted(tensors):
        arr = tensors[name]
        if arr.dtype == np.int32:
            stored[name], encodings[name] = _encode_index(arr), INDEX
        else:
            stored.update(_encode_float(name, arr, encoding))
            encodings[name] = encoding
    return stored, encodings


def _check_encodings_fit(encodings: Mapping[str, str], index_suffix: str | None) -> None:
    for name, enc in encodings.items():
        if (enc == INDEX) != _is_index(name, index_suffix):
            raise MalformedMessage(f"tensor {name[:80]!r}: encoding {enc!r} does not fit its name")


# ------------------------------------------------------------------------------------------------ update


def encode_update(msg: UpdateMessage, encoding: str = "fp16") -> bytes:
    """Validate ``msg`` and encode it; float tensors use ``encoding`` (fp32 | fp16 | int8)."""
    header = _fields_of(msg, UPDATE_FIELDS, "update header")
    tensors = _canonical_tensors(msg.tensors, UPDATE_SUFFIXES, ".rows")
    check_update_tensors(tensors)
    stored, encodings = _encode_tensors(tensors, encoding)
    return _wrap(KIND_UPDATE, _pack_body(header, stored, encodings))


def decode_update(
    payload: bytes,
    expected_shapes: Shapes | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    *,
    out_features: Mapping[str, int] | None = None,
    expected_task: str | None = None,
    expected_client_id: str | None = None,
) -> UpdateMessage:
    """Decode and validate an update; ProtocolError subclasses on any problem.

    ``expected_shapes``: tensor name -> shape (None = any size in that dimension); when given, the names
    must match exactly. ``out_features``: module -> out_features, bounds each ``<m>.rows``.
    ``expected_task`` / ``expected_client_id``: raise WrongTask / WrongRecipient on a mismatch (pass the
    ids of the topic the update came on).
    """
    data = _as_bytes(payload, max_bytes)
    envelope = _unwrap(data, KIND_UPDATE, max_bytes)
    metadata, stored = _parse_safetensors(envelope.raw)
    raw_header, encodings = _parse_meta(metadata)
    header = _parse_fields(raw_header, UPDATE_FIELDS, "update header")
    _check_recipient(header, {"task": expected_task, "client_id": expected_client_id}, "update")
    _check_encodings_fit(encodings, ".rows")
    tensors = _decode_tensors(stored, encodings)
    check_update_tensors(tensors, expected_shapes, out_features)
    return UpdateMessage(**header, tensors=tensors)


# ------------------------------------------------------------------------------------------------- model


def encode_model(msg: ModelMessage, signing_key: Ed25519PrivateKey, encoding: str = "fp32") -> bytes:
    """Validate ``msg``, encode it and sign it with ``signing_key``; an empty key_id is filled in."""
    if not isinstance(signing_key, Ed25519PrivateKey):
        raise EncodingError(f"signing_key must be an Ed25519PrivateKey, got {type(signing_key).__name__}")
    signer = key_id(signing_key)
    if msg.key_id not in ("", signer):
        raise EncodingError(f"model key_id {msg.key_id!r} is not the signing key's id {signer!r}")
    fields = {name: getattr(msg, name) for name in MODEL_FIELDS} | {"key_id": signer}
    header = _parse_fields(fields, MODEL_FIELDS, "model header")
    tensors = _canonical_tensors(msg.tensors, MODEL_SUFFIXES, None)
    check_model_tensors(tensors)
    stored, encodings = _encode_tensors(tensors, encoding)
    return _wrap(KIND_MODEL, _pack_body(header, stored, encodings), signing_key)


def _verify_envelope(data: bytes, verify_key: Ed25519PublicKey) -> None:
    """BadSignature unless ``data`` ends with ``verify_key``'s signature of everything before it."""
    if not isinstance(verify_key, Ed25519PublicKey):
        raise BadSignature(f"verify_key must be an Ed25519PublicKey, got {type(verify_key).__name__}")
    if len(data) < ENVELOPE_LEN + SIGNATURE_LEN:
        raise BadSignature(f"model message of {len(data)} bytes is too short to carry a signature")
    if data[:4] == MAGIC and not data[6] & FLAG_SIGNED:
        raise BadSignature("model message is not signed")
    verify(data[:-SIGNATURE_LEN], data[-SIGNATURE_LEN:], verify_key)


def decode_model(
    payload: bytes,
    verify_key: Ed25519PublicKey | None = None,
    expected_task: str | None = None,
    min_version: int | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    *,
    expected_target: str | None = None,
    expected_shapes: Shapes | None = None,
) -> ModelMessage:
    """Decode and validate a model message.

    With ``verify_key`` (edge runtimes always pass it) the signature is checked first: missing, invalid
    or another key's -> BadSignature. Without it the signature is NOT checked (inspection tooling only).
    ``expected_task`` -> WrongTask, ``expected_target`` -> WrongRecipient, ``version < min_version`` ->
    StaleModel.
    """
    data = _as_bytes(payload, max_bytes)
    if verify_key is not None:
        _verify_envelope(data, verify_key)
    envelope = _unwrap(data, KIND_MODEL, max_bytes)
    metadata, stored = _parse_safetensors(envelope.raw)
    raw_header, encodings = _parse_meta(metadata)
    header = _parse_fields(raw_header, MODEL_FIELDS, "model header")
    if verify_key is not None and header["key_id"] != key_id(verify_key):
        raise BadSignature(f"model names key_id {header['key_id']!r}, the verify key is {key_id(verify_key)!r}")
    _check_recipient(header, {"task": expected_task, "target": expected_target}, "model")
    if min_version is not None and header["version"] < min_version:
        raise StaleModel(f"model version {header['version']} is older than the minimum {min_version}")
    _check_encodings_fit(encodings, None)
    tensors = _decode_tensors(stored, encodings)
    check_model_tensors(tensors, expected_shapes)
    return ModelMessage(**header, tensors=tensors)


# ------------------------------------------------------------------------------------------- hello / ack


def _encode_json(kind: int, msg: object, spec: Mapping[str, Validator], what: str) -> bytes:
    header = _fields_of(msg, spec, what)
    return _wrap(kind, _json_dumps(header, what).encode("utf-8"))


def _decode_json(payload: bytes, kind: int, spec: Mapping[str, Validator], what: str, max_bytes: int) -> dict:
    data = _as_bytes(payload, max_bytes)
    envelope = _unwrap(data, kind, max_bytes)
    return _parse_fields(_json_object(envelope.raw, what), spec, what)


def encode_hello(msg: HelloMessage) -> bytes:
    """Validate and encode a hello."""
    return _encode_json(KIND_HELLO, msg, HELLO_FIELDS, "hello")


def decode_hello(
    payload: bytes, max_bytes: int = DEFAULT_MAX_BYTES, *, expected_task: str | None = None
) -> HelloMessage:
    """Decode and validate a hello; WrongTask when ``expected_task`` is given and differs."""
    header = _decode_json(payload, KIND_HELLO, HELLO_FIELDS, "hello", max_bytes)
    _check_recipient(header, {"task": expected_task}, "hello")
    return HelloMessage(**header)


def encode_ack(msg: AckMessage) -> bytes:
    """Validate and encode an ack."""
    return _encode_json(KIND_ACK, msg, ACK_FIELDS, "ack")


def decode_ack(
    payload: bytes,
    max_bytes: int = DEFAULT_MAX_BYTES,
    *,
    expected_task: str | None = None,
    expected_client_id: str | None = None,
) -> AckMessage:
    """Decode and validate an ack; WrongTask / WrongRecipient on a task / client_id mismatch."""
    header = _decode_json(payload, KIND_ACK, ACK_FIELDS, "ack", max_bytes)
    _check_recipient(header, {"task": expected_task, "client_id": expected_client_id}, "ack")
    return AckMessage(**header)
