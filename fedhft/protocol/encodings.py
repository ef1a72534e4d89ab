"""How tensors are stored in a message body: the float encodings and the row-index encoding.

``fp32``; ``fp16`` (values beyond the fp16 range are an encode error); ``int8`` (symmetric, one fp32 scale
per row = max|row| / 127, stored as tensor ``<name>#scale``; a 1-D tensor is one row); ``index`` (row
indices stored as uint8/uint16/int32, the narrowest that fits, restored to int32).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedhft.protocol.errors import (
    BadIndices,
    EncodingError,
    HeaderError,
    MalformedMessage,
    NonFiniteTensor,
    ShapeMismatch,
    UnknownTensor,
)
from fedhft.protocol.tensor_names import is_rows_name, scale_name
from fedhft.protocol.tensor_rules import group_modules

ENCODINGS = ("fp32", "fp16", "int8")
INDEX = "index"


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


def encode_float(name: str, arr: np.ndarray, encoding: str) -> dict[str, np.ndarray]:
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
        return {name: q, scale_name(name): scale}
    raise EncodingError(f"unknown encoding {encoding!r}; expected one of {ENCODINGS}")


def encode_index(arr: np.ndarray) -> np.ndarray:
    """int32 row indices in the narrowest of uint8 / uint16 / int32 that holds them."""
    peak = int(arr.max()) if arr.size else 0
    for dtype in (np.uint8, np.uint16):
        if peak <= np.iinfo(dtype).max:
            return arr.astype(dtype)
    return arr.astype(np.int32)


def decode_float(name: str, encoding: str, stored: Mapping[str, np.ndarray]) -> np.ndarray:
    """Float32 tensor ``name`` from its stored tensors under ``encoding``."""
    data = stored[name]
    want = {"fp32": np.float32, "fp16": np.float16, "int8": np.int8}[encoding]
    if data.dtype != want:
        raise ShapeMismatch(f"tensor {name!r} ({encoding}): expected dtype {np.dtype(want)}, got {data.dtype}")
    if encoding != "int8":
        return data.astype(np.float32)
    scale = stored[scale_name(name)]
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


def decode_index(name: str, data: np.ndarray) -> np.ndarray:
    if data.dtype not in (np.uint8, np.uint16, np.int32):
        raise BadIndices(f"tensor {name!r}: indices must be stored as uint8/uint16/int32, got {data.dtype}")
    return data.astype(np.int32)


def quantization_error(arr: np.ndarray, encoding: str) -> float:
    """Max absolute error of ``arr`` (as float32) after an ``encoding`` round trip; 0.0 for fp32."""
    values = np.asarray(arr, dtype=np.float32)
    if values.size == 0:
        return 0.0
    stored = encode_float("x", values, encoding)
    back = decode_float("x", encoding, stored)
    return float(np.abs(back.astype(np.float64) - values.astype(np.float64)).max())


def _is_index(name: str, has_indices: bool) -> bool:
    return has_indices and is_rows_name(name)


def canonical_tensors(
    tensors: Mapping[str, Any], suffixes: tuple[str, ...], has_indices: bool
) -> dict[str, np.ndarray]:
    """Float tensors as float32, index tensors (``<m>.rows`` when ``has_indices``) as int32 checked to fit."""
    if not isinstance(tensors, Mapping):
        raise HeaderError(f"tensors must be a mapping, got {type(tensors).__name__}")
    group_modules(list(tensors), suffixes)
    out: dict[str, np.ndarray] = {}
    for name, arr in tensors.items():
        if not isinstance(name, str):
            raise UnknownTensor(f"tensor names must be strings, got {type(name).__name__}")
        if not isinstance(arr, np.ndarray):
            raise ShapeMismatch(f"tensor {str(name)[:80]!r}: expected a numpy array, got {type(arr).__name__}")
        if _is_index(name, has_indices):
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


def encode_tensors(tensors: Mapping[str, np.ndarray], encoding: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(stored tensors, name -> encoding) of canonical tensors: int32 ones as ``index``, floats as ``encoding``."""
    if encoding not in ENCODINGS:
        raise EncodingError(f"unknown encoding {encoding!r}; expected one of {ENCODINGS}")
    stored: dict[str, np.ndarray] = {}
    encodings: dict[str, str] = {}
    for name in sorted(tensors):
        arr = tensors[name]
        if arr.dtype == np.int32:
            stored[name], encodings[name] = encode_index(arr), INDEX
        else:
            stored.update(encode_float(name, arr, encoding))
            encodings[name] = encoding
    return stored, encodings


def check_encodings_fit(encodings: Mapping[str, str], has_indices: bool) -> None:
    """MalformedMessage unless exactly the index tensors (``<m>.rows`` when ``has_indices``) use ``index``."""
    for name, enc in encodings.items():
        if (enc == INDEX) != _is_index(name, has_indices):
            raise MalformedMessage(f"tensor {name[:80]!r}: encoding {enc!r} does not fit its name")


def _stored_names(encodings: Mapping[str, str]) -> set[str]:
    names = set(encodings)
    names.update(scale_name(name) for name, enc in encodings.items() if enc == "int8")
    return names


def decode_tensors(stored: Mapping[str, np.ndarray], encodings: Mapping[str, str]) -> dict[str, np.ndarray]:
    """The message tensors (float32, int32 indices) from the stored tensors and their encodings."""
    expected = _stored_names(encodings)
    if set(stored) != expected:
        extra = sorted(set(stored) - expected)[:5]
        lacking = sorted(expected - set(stored))[:5]
        raise MalformedMessage(f"stored tensors do not match the encodings: extra {extra}, missing {lacking}")
    tensors: dict[str, np.ndarray] = {}
    for name, enc in encodings.items():
        tensors[name] = decode_index(name, stored[name]) if enc == INDEX else decode_float(name, enc, stored)
    return tensors
