"""Fuzzing: whatever bytes come in, decoders return a message or raise a ProtocolError, nothing else.

Reproducible (derandomize=True) and bounded: the examples below total 3,900 cases.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save as st_save

from fedhft.protocol import (
    AckMessage,
    HelloMessage,
    ModelMessage,
    ProtocolError,
    UpdateMessage,
    decode_ack,
    decode_hello,
    decode_model,
    decode_update,
    encode_ack,
    encode_hello,
    encode_model,
    encode_update,
    generate_keypair,
)
from fedhft.protocol.encodings import ENCODINGS, encode_tensors
from fedhft.protocol.envelope import DEFAULT_MAX_BYTES, KIND_ACK, KIND_HELLO, KIND_MODEL, KIND_UPDATE, unwrap
from fedhft.protocol.fields import ACK_FIELDS, HELLO_FIELDS, MODEL_FIELDS, UPDATE_FIELDS
from fedhft.protocol.tensor_names import scale_name


def fuzz(n: int) -> settings:
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


PRIVATE, PUBLIC = generate_keypair()
SHA = "0f" * 32
SHAPES = {"m.A": (2, 6), "m.B_rows": (None, 2), "m.rows": (None,), "head.weight": (2, 6), "head.bias": (2,)}


def _update_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "m.A": rng.normal(0, 0.02, (2, 6)).astype(np.float32),
        "m.B_rows": rng.normal(0, 0.02, (3, 2)).astype(np.float32),
        "m.rows": np.array([0, 2, 5], np.int32),
        "head.weight": rng.normal(0, 0.02, (2, 6)).astype(np.float32),
        "head.bias": np.zeros(2, np.float32),
    }


def _model_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "m.A": rng.normal(0, 0.02, (2, 6)).astype(np.float32),
        "m.B": rng.normal(0, 0.02, (6, 2)).astype(np.float32),
        "head.weight": rng.normal(0, 0.02, (2, 6)).astype(np.float32),
        "head.bias": np.zeros(2, np.float32),
    }


UPDATE = UpdateMessage("t", "c1", 1, 2, 8, 0.5, {"acc": 0.5}, "p", SHA, 1.0, _update_tensors())
MODEL = ModelMessage("t", 4, "cluster/0", 2.0, "", {"round": 4}, _model_tensors())
HELLO = HelloMessage("t", "c1", "p", SHA, {"rank": 2, "mods": ["m"]}, 3.0)
ACK = AckMessage("t", "c1", 1, "accepted", "", 4)

SEEDS: list[tuple[int, bytes]] = [
    *((KIND_UPDATE, encode_update(UPDATE, e)) for e in ("fp32", "fp16", "int8")),
    *((KIND_MODEL, encode_model(MODEL, PRIVATE, e)) for e in ("fp32", "int8")),
    (KIND_HELLO, encode_hello(HELLO)),
    (KIND_ACK, encode_ack(ACK)),
]
RAW_SEEDS = [(kind, unwrap(payload, kind, DEFAULT_MAX_BYTES).raw) for kind, payload in SEEDS]

DECODERS: list[Callable[[bytes], Any]] = [
    decode_update,
    lambda p: decode_update(p, expected_shapes=SHAPES, out_features={"m": 6}),
    decode_model,
    lambda p: decode_model(p, verify_key=PUBLIC, expected_task="t", min_version=1),
    decode_hello,
    decode_ack,
]


def decode_all(payload: bytes) -> int:
    """Run every decoder; ProtocolError is fine, anything else fails the test. Returns how many decoded."""
    decoded = 0
    for decode in DECODERS:
        try:
            decode(payload)
            decoded += 1
        except ProtocolError as exc:
            assert str(exc), f"{type(exc).__name__} without a message"
    return decoded


def envelope(kind: int, raw: bytes, flags: int = 1) -> bytes:
    body = zlib.compress(raw) if flags & 1 else raw
    return struct.pack("<4sBBBBII", b"FHFT", 1, kind, flags, 0, len(body), len(raw)) + body


def test_seeds_decode() -> None:
    assert [decode_all(p) for _, p in SEEDS] == [2, 2, 2, 2, 2, 1, 1]


# ----------------------------------------------------------------------------------- (a) random bytes


@fuzz(400)
@given(st.binary(max_size=600))
def test_random_bytes(data: bytes) -> None:
    decode_all(data)


@fuzz(400)
@given(
    kind=st.integers(0, 6),
    version=st.sampled_from([0, 1, 1, 1, 2, 255]),
    flags=st.integers(0, 7),
    body=st.binary(max_size=400),
    lengths=st.one_of(st.none(), st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))),
)
def test_random_bodies_in_plausible_envelopes(
    kind: int, version: int, flags: int, body: bytes, lengths: tuple[int, int] | None
) -> None:
    body_len, raw_len = lengths if lengths is not None else (len(body), len(body))
    decode_all(struct.pack("<4sBBBBII", b"FHFT", version, kind, flags, 0, body_len, raw_len) + body)


# ------------------------------------------------------------------------- (b) mutated valid messages

MUTATION = st.tuples(
    st.sampled_from(["flip", "set", "delete", "insert", "truncate", "extend"]),
    st.integers(0, 2**20),
    st.integers(0, 255),
)


def mutate(data: bytes, mutations: list[tuple[str, int, int]]) -> bytes:
    out = bytearray(data)
    for op, pos, value in mutations:
        if op in ("flip", "set", "delete") and not out:
            continue
        at = pos % len(out) if out else 0
        if op == "flip":
            out[at] ^= 1 << (value % 8)
        elif op == "set":
            out[at] = value
        elif op == "delete":
            del out[at]
        elif op == "insert":
            out.insert(pos % (len(out) + 1), value)
        elif op == "truncate":
            del out[pos % (len(out) + 1) :]
        else:
            out.extend(bytes([value]) * (1 + pos % 64))
    return bytes(out)


@fuzz(800)
@given(seed=st.sampled_from(SEEDS), mutations=st.lists(MUTATION, min_size=1, max_size=4))
def test_mutated_payloads(seed: tuple[int, bytes], mutations: list[tuple[str, int, int]]) -> None:
    decode_all(mutate(seed[1], mutations))


@fuzz(800)
@given(
    seed=st.sampled_from(RAW_SEEDS),
    mutations=st.lists(MUTATION, min_size=1, max_size=4),
    compressed=st.booleans(),
)
def test_mutated_bodies_rewrapped(
    seed: tuple[int, bytes], mutations: list[tuple[str, int, int]], compressed: bool
) -> None:
    """Mutate the decompressed body, then wrap it in a correct envelope: reaches the inner parsers."""
    kind, raw = seed
    decode_all(envelope(kind, mutate(raw, mutations), flags=1 if compressed else 0))


# ---------------------------------------------------- (c) valid envelopes around garbage bodies/headers

JSON_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
JSON_VALUE = st.recursive(
    JSON_LEAF,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
NAMES = [
    "m.A",
    "m.B_rows",
    "m.rows",
    "m.B",
    "head.weight",
    "head.bias",
    "m.A#scale",
    "head.bias#scale",
    "x",
    "a b",
]
ST_DTYPES = ["F32", "F16", "I8", "U8", "U16", "I32", "F64", "I64", "BOOL", "BF16", "x"]


@st.composite
def safetensors_header(draw: st.DrawFn) -> bytes:
    """A safetensors blob whose JSON header is partly valid, partly garbage."""
    header: dict[str, Any] = {}
    offset = 0
    for name in draw(st.lists(st.sampled_from(NAMES), max_size=4, unique=True)):
        shape = draw(st.lists(st.integers(0, 4), max_size=3) | JSON_VALUE)
        size = draw(st.integers(0, 64))
        offsets = draw(st.just([offset, offset + size]) | JSON_VALUE)
        header[name] = {"dtype": draw(st.sampled_from(ST_DTYPES)), "shape": shape, "data_offsets": offsets}
        if draw(st.booleans()):
            header[name][draw(st.text(max_size=5))] = draw(JSON_VALUE)
        offset += size
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=8), JSON_VALUE | st.text(), max_size=3))
    text = json.dumps(header).encode()
    declared = draw(st.just(len(text)) | st.integers(0, 2**64 - 1))
    return struct.pack("<Q", declared) + text + draw(st.binary(max_size=offset + 8))


@fuzz(400)
@given(kind=st.sampled_from([KIND_UPDATE, KIND_MODEL]), raw=safetensors_header())
def test_garbage_safetensors_headers(kind: int, raw: bytes) -> None:
    decode_all(envelope(kind, raw))


DTYPES = [np.float32, np.float16, np.int8, np.uint8, np.uint16, np.int32, np.float64, np.int64]
SPECIALS = [0.0, 1.0, -1.0, np.nan, np.inf, -np.inf, 65504.0, 1e38, -(2.0**31), 2.0**31, 255.0, 70_000.0]


@st.composite
def tensor(draw: st.DrawFn) -> np.ndarray:
    shape = tuple(draw(st.lists(st.integers(0, 4), min_size=0, max_size=3)))
    dtype = draw(st.sampled_from(DTYPES))
    values = draw(st.lists(st.sampled_from(SPECIALS) | st.floats(-300, 300), min_size=1, max_size=4))
    size = int(np.prod(shape)) if shape else 1
    flat = np.resize(np.array(values, dtype=np.float64), size)
    with np.errstate(invalid="ignore", over="ignore"):
        return flat.astype(dtype).reshape(shape)


def rarely(draw: st.DrawFn) -> bool:
    """True one time in twenty (hypothesis favours small integers, so not ``integers(0, 19) == 0``)."""
    return draw(st.sampled_from(range(20))) == 13


UPDATE_HEADER = {name: getattr(UPDATE, name) for name in UPDATE_FIELDS}
MODEL_HEADER = {name: getattr(MODEL, name) for name in MODEL_FIELDS} | {"key_id": "0" * 16}


@st.composite
def header_dict(draw: st.DrawFn, valid: dict[str, Any]) -> Any:
    """Mostly a valid header with up to two fields replaced, dropped or added; rarely any JSON."""
    if rarely(draw):
        return draw(JSON_VALUE)
    header = dict(valid)
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2]))):
        op, name = draw(st.sampled_from(["set", "drop", "add"])), draw(st.sampled_from(sorted(valid)))
        if op == "set":
            header[name] = draw(JSON_VALUE)
        elif op == "drop":
            header.pop(name, None)
        else:
            header[draw(st.text(max_size=6))] = draw(JSON_VALUE)
    return header


INDEX_DTYPES = [np.uint8, np.uint16, np.int32, np.int64, np.int8, np.float32]


@st.composite
def rows_tensor(draw: st.DrawFn) -> np.ndarray:
    values = draw(st.lists(st.integers(-3, 70_000) | st.integers(0, 8), max_size=5))
    with np.errstate(over="ignore"):
        return np.array(values, dtype=np.int64).astype(draw(st.sampled_from(INDEX_DTYPES)))


def refill(arr: np.ndarray, values: list[float]) -> np.ndarray:
    """``arr``'s shape and dtype, filled with ``values`` (cast as numpy casts them)."""
    with np.errstate(invalid="ignore", over="ignore"):
        return np.resize(np.array(values, np.float64), arr.shape).astype(arr.dtype)


@st.composite
def perturbed_tensors(draw: st.DrawFn, kind: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A valid message's stored tensors and encodings, then up to three perturbations."""
    base = UPDATE.tensors if kind == KIND_UPDATE else MODEL.tensors
    stored, encodings = encode_tensors(base, draw(st.sampled_from(ENCODINGS)))
    stored_names = sorted(stored)
    for _ in range(draw(st.sampled_from([0, 1, 1, 2, 3]))):
        op = draw(st.sampled_from(["values", "values", "replace", "drop", "add", "encoding", "rows", "rows"]))
        name = draw(st.sampled_from(stored_names + NAMES))
        if op == "values" and name in stored:
            stored[name] = refill(stored[name], draw(st.lists(st.sampled_from(SPECIALS), min_size=1, max_size=3)))
        elif op == "replace":
            stored[name] = draw(tensor())
        elif op == "drop":
            stored.pop(name, None)
            if draw(st.booleans()):
                encodings.pop(name, None)
        elif op == "add":
            stored[name] = draw(tensor())
            encodings[name] = draw(st.sampled_from(["fp32", "fp16", "int8", "index"]))
        elif op == "encoding":
            encodings[name] = draw(st.sampled_from(["fp32", "fp16", "int8", "index", "bogus"]) | JSON_VALUE)
        else:
            rows = draw(rows_tensor())
            stored["m.rows"], stored["m.B_rows"] = rows, np.ones((len(rows), 2), np.float32)
            encodings["m.B_rows"] = "fp32"
            stored.pop(scale_name("m.B_rows"), None)
    return stored, encodings


@st.composite
def fedhft_body(draw: st.DrawFn, kind: int) -> bytes:
    """A real safetensors blob: perturbed tensors and a mostly valid fedhft metadata header."""
    stored, encodings = draw(perturbed_tensors(kind))
    valid_header = UPDATE_HEADER if kind == KIND_UPDATE else MODEL_HEADER
    info: Any = {"header": draw(header_dict(valid_header)), "tensors": encodings}
    if rarely(draw):
        info = draw(JSON_VALUE)
    metadata = {"fedhft": json.dumps(info)}
    if rarely(draw):
        metadata[draw(st.text(max_size=5))] = draw(st.text(max_size=5))
    return bytes(st_save({k: np.ascontiguousarray(v) for k, v in stored.items()}, metadata=metadata))


@fuzz(700)
@given(data=st.data(), kind=st.sampled_from([KIND_UPDATE, KIND_MODEL]))
def test_garbage_fedhft_metadata_and_tensors(data: st.DataObject, kind: int) -> None:
    decode_all(envelope(kind, data.draw(fedhft_body(kind))))


HELLO_HEADER = {name: getattr(HELLO, name) for name in HELLO_FIELDS}
ACK_HEADER = {name: getattr(ACK, name) for name in ACK_FIELDS}


@fuzz(400)
@given(data=st.data(), kind=st.sampled_from([KIND_HELLO, KIND_ACK]))
def test_garbage_json_bodies(data: st.DataObject, kind: int) -> None:
    valid = HELLO_HEADER if kind == KIND_HELLO else ACK_HEADER
    decode_all(envelope(kind, json.dumps(data.draw(header_dict(valid))).encode()))
