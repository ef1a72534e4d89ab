"""Update and model bodies: a safetensors blob whose ``__metadata__`` holds the message header.

The metadata has one key, ``"fedhft"``: a JSON object ``{"header": {...message fields...}, "tensors":
{name: encoding}}``. :func:`parse_safetensors` checks the safetensors header itself (entries, offsets, no
gaps) before handing the blob to safetensors; :func:`peek_header` reads a body's header cheaply.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from fedhft.protocol.encodings import ENCODINGS, INDEX
from fedhft.protocol.envelope import body_prefix
from fedhft.protocol.errors import MalformedMessage
from fedhft.protocol.fields import I64_LIMIT, json_dumps, json_object
from fedhft.protocol.tensor_names import is_wire_name

META_KEY = "fedhft"
ST_METADATA = "__metadata__"
ST_LENGTH = struct.Struct("<Q")  # the safetensors header length that starts the blob
PEEK_LIMIT = 1 << 20  # at most this much of a body is inflated to read its header
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
    if type(value) is not list or len(value) > max_len:
        return False
    for v in value:  # a plain loop: this runs for every entry of every message
        if type(v) is not int or not 0 <= v < I64_LIMIT:  # type(), not isinstance: no bool (or int subclass)
            return False
    return True


def parse_safetensors(raw: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Validate a safetensors blob, then load it; return (metadata, tensors)."""
    if len(raw) < ST_LENGTH.size:
        raise MalformedMessage(f"safetensors body is {len(raw)} bytes, too short for its header length")
    (header_len,) = ST_LENGTH.unpack_from(raw)
    if header_len > len(raw) - ST_LENGTH.size:
        raise MalformedMessage(f"safetensors header length {header_len} exceeds the {len(raw) - 8} bytes left")
    header = json_object(raw[ST_LENGTH.size : ST_LENGTH.size + header_len], "safetensors header")
    metadata = header.pop(ST_METADATA, None)
    if not isinstance(metadata, dict):
        raise MalformedMessage("safetensors header lacks its __metadata__ object")
    data_len = len(raw) - ST_LENGTH.size - header_len
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


def parse_meta(metadata: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Split ``__metadata__`` into (header fields, tensor encodings)."""
    if set(metadata) != {META_KEY} or not isinstance(metadata[META_KEY], str):
        raise MalformedMessage(f"safetensors metadata must hold exactly the string key {META_KEY!r}")
    info = json_object(metadata[META_KEY], "fedhft metadata")
    if set(info) != {"header", "tensors"}:
        raise MalformedMessage(f"fedhft metadata must have exactly header and tensors, got {sorted(info)[:5]}")
    header, encodings = info["header"], info["tensors"]
    if not isinstance(header, dict) or not isinstance(encodings, dict):
        raise MalformedMessage("fedhft metadata header and tensors must be objects")
    for name, enc in encodings.items():
        if enc not in (*ENCODINGS, INDEX):
            raise MalformedMessage(f"tensor {name[:80]!r}: unknown encoding {str(enc)[:20]!r}")
    return header, encodings


def pack_body(header: dict[str, Any], stored: dict[str, np.ndarray], encodings: dict[str, str]) -> bytes:
    """The safetensors body of header fields and stored tensors."""
    meta = json_dumps({"header": header, "tensors": encodings}, "header")
    return bytes(st_save(stored, metadata={META_KEY: meta}))


@dataclass(frozen=True)
class PeekedHeader:
    """What the start of a body says, unchecked: its tensor names and (when readable) its header fields."""

    tensor_names: tuple[str, ...]  # wire names: an int8 tensor's scales are left out
    fields: dict[str, Any] | None  # None when the fedhft metadata is not a JSON object with a "header" object


def _header_in(prefix: bytes) -> bool:
    size = ST_LENGTH.size
    return len(prefix) >= size and len(prefix) >= size + ST_LENGTH.unpack_from(prefix)[0]


def peek_header(payload: bytes, kind: int) -> PeekedHeader | None:
    """Tensor names and header fields of a ``kind`` envelope (update or model), or None when unreadable.

    Inflates at most PEEK_LIMIT bytes of the body, so it is cheap even for an oversized payload. Nothing
    here is trusted: the full decode checks everything again.
    """
    prefix = body_prefix(payload, kind, PEEK_LIMIT + ST_LENGTH.size, _header_in)
    try:
        if prefix is None:
            return None
        (header_len,) = ST_LENGTH.unpack_from(prefix)
        if header_len > PEEK_LIMIT:
            return None
        doc = json.loads(prefix[ST_LENGTH.size : ST_LENGTH.size + header_len])
    except (ValueError, TypeError, struct.error, RecursionError):
        return None
    if not isinstance(doc, dict):
        return None
    names = tuple(n for n in doc if n != ST_METADATA and is_wire_name(n))
    try:
        fields = json.loads(doc[ST_METADATA][META_KEY])["header"]
    except (ValueError, KeyError, TypeError, IndexError, RecursionError):
        fields = None
    return PeekedHeader(tensor_names=names, fields=fields if isinstance(fields, dict) else None)
