"""Round trips and validation rules of the fedhft.protocol message codecs."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
import tracemalloc
import zlib
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save as st_save

from fedhft.protocol import (
    AckMessage,
    BadIndices,
    EncodingError,
    HeaderError,
    HelloMessage,
    MalformedMessage,
    MessageTooLarge,
    MissingTensor,
    ModelMessage,
    NonFiniteTensor,
    ProtocolError,
    ShapeMismatch,
    StaleModel,
    UnknownTensor,
    UnsupportedVersion,
    UpdateMessage,
    WrongMessageKind,
    WrongRecipient,
    WrongTask,
    decode_ack,
    decode_hello,
    decode_model,
    decode_update,
    encode_ack,
    encode_hello,
    encode_model,
    encode_update,
    generate_keypair,
    quantization_error,
)
from fedhft.protocol.encodings import ENCODINGS, encode_index
from fedhft.protocol.envelope import DEFAULT_MAX_BYTES, KIND_UPDATE, MIN_ZLIB_SAVING, unwrap, worth_deflating, wrap
from fedhft.protocol.fields import UPDATE_FIELDS
from fedhft.protocol.tensor_names import a_name, b_name, b_rows_name, is_rows_name, rows_name

SHA = "ab" * 32
MODULES = ("layers.0.query", "layers.0.value", "layers.1.query", "layers.1.value")
R, IN, OUT, K, LABELS = 8, 384, 384, 192, 5


def make_tensors(rng: np.random.Generator, k: int = K) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for m in MODULES:
        tensors[a_name(m)] = rng.normal(0, 0.02, (R, IN)).astype(np.float32)
        tensors[b_rows_name(m)] = rng.normal(0, 0.02, (k, R)).astype(np.float32)
        tensors[rows_name(m)] = np.sort(rng.choice(OUT, k, replace=False)).astype(np.int32)
    tensors["head.weight"] = rng.normal(0, 0.02, (LABELS, IN)).astype(np.float32)
    tensors["head.bias"] = rng.normal(0, 0.02, (LABELS,)).astype(np.float32)
    return tensors


def make_update(**overrides: Any) -> UpdateMessage:
    fields: dict[str, Any] = dict(
        task="sst2",
        client_id="rpi-07",
        seq=3,
        base_version=12,
        num_samples=64,
        loss=0.4321,
        metrics={"acc": 0.875, "step_s": 1.5},
        profile="rpi4_4gb",
        manifest_sha256=SHA,
        created_at=1_700_000_000.25,
        tensors=make_tensors(np.random.default_rng(0)),
    )
    fields.update(overrides)
    return UpdateMessage(**fields)


def make_model_tensors(rng: np.random.Generator, rank: int = 16) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for m in MODULES[:2]:
        tensors[a_name(m)] = rng.normal(0, 0.02, (rank, IN)).astype(np.float32)
        tensors[b_name(m)] = rng.normal(0, 0.02, (OUT, rank)).astype(np.float32)
    tensors["head.weight"] = rng.normal(0, 0.02, (LABELS, IN)).astype(np.float32)
    tensors["head.bias"] = np.zeros(LABELS, np.float32)
    return tensors


def make_model(**overrides: Any) -> ModelMessage:
    fields: dict[str, Any] = dict(
        task="sst2",
        version=7,
        target="cluster/0",
        created_at=1_700_000_100.0,
        key_id="",
        meta={"round": 7, "lr": 0.001, "note": "fedavg"},
        tensors=make_model_tensors(np.random.default_rng(1)),
    )
    fields.update(overrides)
    return ModelMessage(**fields)


def update_header(msg: UpdateMessage) -> dict[str, Any]:
    return {name: getattr(msg, name) for name in UPDATE_FIELDS}


def forge(
    kind: int,
    header: dict[str, Any],
    stored: dict[str, np.ndarray],
    encodings: dict[str, str],
    signing_key: Any = None,
) -> bytes:
    """A payload built without the encoder's validation (json.dumps lets NaN through)."""
    meta = json.dumps({"header": header, "tensors": encodings})
    return wrap(kind, bytes(st_save(stored, metadata={"fedhft": meta})), signing_key)


def forge_update(header: dict[str, Any] | None = None, **tensors: np.ndarray) -> bytes:
    """An update of the given header (default: make_update's) and fp32/index tensors, unvalidated."""
    header = header if header is not None else update_header(make_update())
    tensors = {k.replace("__", "."): v for k, v in tensors.items()}
    encodings = {k: ("index" if v.dtype.kind in "iu" else "fp32") for k, v in tensors.items()}
    return forge(KIND_UPDATE, header, tensors, encodings)


def small_module(rows: list[int] | np.ndarray, a_rank: int = 2, b_rank: int = 2) -> dict[str, np.ndarray]:
    rows = np.asarray(rows, dtype=np.int32)
    return {
        "m__A": np.ones((a_rank, 3), np.float32),
        "m__B_rows": np.ones((len(rows), b_rank), np.float32),
        "m__rows": rows,
    }


def envelope(kind: int, raw: bytes, *, version: int = 1, flags: int = 1, declared: int | None = None) -> bytes:
    body = zlib.compress(raw) if flags & 1 else raw
    raw_len = len(raw) if declared is None else declared
    return struct.pack("<4sBBBBII", b"FHFT", version, kind, flags, 0, len(body), raw_len) + body


# ------------------------------------------------------------------------------------------ round trips


def test_update_fp32_round_trip_is_exact() -> None:
    msg = make_update()
    back = decode_update(encode_update(msg, "fp32"))
    for field in UPDATE_FIELDS:
        assert getattr(back, field) == getattr(msg, field), field
    assert set(back.tensors) == set(msg.tensors)
    for name, arr in msg.tensors.items():
        assert back.tensors[name].dtype == arr.dtype, name
        np.testing.assert_array_equal(back.tensors[name], arr)


def test_update_fp16_round_trip_within_half_precision() -> None:
    msg = make_update()
    back = decode_update(encode_update(msg, "fp16"))
    for name, arr in msg.tensors.items():
        got = back.tensors[name]
        if is_rows_name(name):
            np.testing.assert_array_equal(got, arr)
            assert got.dtype == np.int32
            continue
        assert got.dtype == np.float32
        # round to nearest fp16: relative error 2**-11 for normals, absolute 2**-25 for subnormals
        bound = np.maximum(np.abs(arr) * 2.0**-11, 2.0**-25)
        assert (np.abs(got - arr) <= bound).all(), name


def test_update_int8_round_trip_within_half_a_step_per_row() -> None:
    msg = make_update()
    back = decode_update(encode_update(msg, "int8"))
    for name, arr in msg.tensors.items():
        got = back.tensors[name]
        if is_rows_name(name):
            np.testing.assert_array_equal(got, arr)
            continue
        rows = arr.reshape(arr.shape[0], -1) if arr.ndim == 2 else arr.reshape(1, -1)
        step = np.abs(rows).max(axis=1) / 127.0
        err = np.abs(got.reshape(rows.shape) - rows)
        assert (err <= step[:, None] * 0.5 * (1 + 1e-5) + 1e-12).all(), name


@pytest.mark.parametrize("encoding", ["fp32", "fp16", "int8"])
def test_encodings_shrink_in_order_and_keep_header(encoding: str) -> None:
    msg = make_update()
    payload = encode_update(msg, encoding)
    back = decode_update(payload)
    assert back.metrics == msg.metrics and back.loss == msg.loss and back.created_at == msg.created_at
    sizes = {e: len(encode_update(msg, e)) for e in ("fp32", "fp16", "int8")}
    assert sizes["int8"] < sizes["fp16"] < sizes["fp32"]


def test_update_with_zero_rows_and_no_head_round_trips() -> None:
    tensors = make_tensors(np.random.default_rng(2), k=0)
    del tensors["head.weight"], tensors["head.bias"]
    for encoding in ("fp32", "fp16", "int8"):
        back = decode_update(encode_update(make_update(tensors=tensors), encoding))
        assert back.tensors["layers.0.query.B_rows"].shape == (0, R)
        assert back.tensors["layers.0.query.rows"].dtype == np.int32


def test_row_indices_stored_narrow_restored_int32() -> None:
    for peak, stored in ((200, np.uint8), (60_000, np.uint16), (70_000, np.int32)):
        assert encode_index(np.array([0, peak], np.int32)).dtype == stored
        big = make_update(tensors={**small_tensors([1, peak])})
        back = decode_update(encode_update(big, "fp32"))
        assert back.tensors["m.rows"].dtype == np.int32
        assert back.tensors["m.rows"].tolist() == [1, peak]


def small_tensors(rows: list[int]) -> dict[str, np.ndarray]:
    return {k.replace("__", "."): v for k, v in small_module(rows).items()}


def test_expected_shapes_accept_none_dimensions() -> None:
    msg = make_update()
    shapes = {name: arr.shape for name, arr in msg.tensors.items()}
    for m in MODULES:
        shapes[b_rows_name(m)] = (None, R)
        shapes[rows_name(m)] = (None,)
    out = dict.fromkeys(MODULES, OUT)
    back = decode_update(encode_update(msg), expected_shapes=shapes, out_features=out)
    assert set(back.tensors) == set(shapes)


@pytest.mark.parametrize("encoding", ["fp32", "fp16", "int8"])
def test_model_round_trip(encoding: str) -> None:
    private, public = generate_keypair()
    msg = make_model()
    back = decode_model(encode_model(msg, private, encoding), verify_key=public, expected_task="sst2")
    assert (back.task, back.version, back.target, back.created_at) == ("sst2", 7, "cluster/0", msg.created_at)
    assert back.meta == msg.meta and len(back.key_id) == 16
    for name, arr in msg.tensors.items():
        err = float(np.abs(back.tensors[name] - arr).max())
        assert err <= {"fp32": 0.0, "fp16": 1e-4, "int8": np.abs(arr).max() / 254 * 1.0001}[encoding], name


def test_hello_and_ack_round_trip() -> None:
    hello = HelloMessage("sst2", "rpi-07", "rpi4_4gb", SHA, {"rank": 4, "modules": ["q", "v"], "x": None}, 1.5)
    assert decode_hello(encode_hello(hello), expected_task="sst2") == hello
    for status in ("accepted", "rejected", "duplicate"):
        ack = AckMessage("sst2", "rpi-07", 9, status, "stale base" if status == "rejected" else "", 12)
        assert decode_ack(encode_ack(ack), expected_client_id="rpi-07") == ack


def test_quantization_error_matches_encodings() -> None:
    x = np.random.default_rng(3).normal(0, 0.02, (64, 384)).astype(np.float32)
    assert quantization_error(x, "fp32") == 0.0
    assert 0 < quantization_error(x, "fp16") <= float(np.abs(x).max()) * 2**-11
    assert 0 < quantization_error(x, "int8") <= float(np.abs(x).max()) / 254 * 1.0001
    assert quantization_error(np.zeros((0, 3)), "int8") == 0.0
    with pytest.raises(EncodingError, match="bf16"):
        quantization_error(x, "bf16")


# ------------------------------------------------------------------------------------ encode-side rules


def test_fp16_overflow_is_an_encode_error_naming_the_tensor() -> None:
    tensors = make_tensors(np.random.default_rng(0))
    tensors["head.bias"][2] = 70_000.0
    msg = make_update(tensors=tensors)
    with pytest.raises(EncodingError, match="head.bias.*fp16"):
        encode_update(msg, "fp16")
    assert decode_update(encode_update(msg, "int8")).tensors["head.bias"][2] == pytest.approx(70_000.0)


def test_unknown_encoding_is_refused() -> None:
    with pytest.raises(EncodingError, match="bf16"):
        encode_update(make_update(), "bf16")


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("task", "", "task must not be empty"),
        ("task", "a/b", "task must use only"),
        ("task", "x" * 129, "task must be at most 128"),
        ("client_id", "dev+1", "client_id"),
        ("client_id", 7, "client_id must be a string"),
        ("seq", -1, "seq must be in"),
        ("seq", True, "seq must be an int"),
        ("base_version", 1.0, "base_version must be an int"),
        ("num_samples", 0, "num_samples must be in"),
        ("loss", float("nan"), "loss must be finite"),
        ("loss", "0.1", "loss must be a number"),
        ("metrics", {"acc": float("inf")}, "metrics\\['acc'\\] must be finite"),
        ("metrics", [1.0], "metrics must be an object"),
        ("profile", "rpi 4", "profile"),
        ("manifest_sha256", "AB" * 32, "manifest_sha256"),
        ("manifest_sha256", "ab" * 31, "manifest_sha256"),
        ("created_at", -5.0, "created_at must be a unix time"),
    ],
)
def test_bad_update_header_fields(field: str, value: Any, fragment: str) -> None:
    with pytest.raises(HeaderError, match=fragment):
        encode_update(make_update(**{field: value}))
    header = update_header(make_update()) | {field: value}
    if not _json_finite(value):
        with pytest.raises(MalformedMessage, match="JSON"):  # NaN/Infinity never parse
            decode_update(forge_update(header, **small_module([0])))
    else:
        with pytest.raises(HeaderError, match=fragment):
            decode_update(forge_update(header, **small_module([0])))


def _json_finite(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except ValueError:
        return False
    return True


def test_unknown_and_missing_header_fields() -> None:
    header = update_header(make_update())
    with pytest.raises(HeaderError, match="unknown fields \\['extra'\\]"):
        decode_update(forge_update(header | {"extra": 1}, **small_module([0])))
    del header["loss"]
    with pytest.raises(HeaderError, match="lacks fields \\['loss'\\]"):
        decode_update(forge_update(header, **small_module([0])))


# ------------------------------------------------------------------------------------ tensor rules


@pytest.mark.parametrize(
    ("tensors", "error", "fragment"),
    [
        ({"m__A": np.ones((2, 3), np.float32), "m__C": np.ones(2, np.float32)}, UnknownTensor, "'m.C'"),
        ({"m__A": np.ones((2, 3), np.float32), "m__rows": np.zeros(0, np.int32)}, MissingTensor, "m.B_rows"),
        ({"head__weight": np.ones((2, 3), np.float32)}, MissingTensor, "head.weight and head.bias"),
        (small_module([3, 1]), BadIndices, "'m.rows'.*sorted"),
        (small_module([1, 1]), BadIndices, "'m.rows'.*unique"),
        (small_module([-1, 2]), BadIndices, "'m.rows'"),
        (small_module([0, 1], b_rank=3), ShapeMismatch, "'m.B_rows'.*expected 2 columns"),
        ({**small_module([0, 1]), "m__rows": np.array([0, 1, 2], np.int32)}, ShapeMismatch, "'m.rows': 3"),
        ({**small_module([0]), "m__A": np.ones(3, np.float32)}, ShapeMismatch, "'m.A'.*2-D"),
        ({**small_module([0]), "m__rows": np.zeros((1, 1), np.int32)}, ShapeMismatch, "'m.rows'.*1-D"),
        ({**small_module([0]), "m__A": np.ones((0, 3), np.float32)}, ShapeMismatch, "'m.A'.*>= 1"),
        (
            {
                **small_module([0]),
                "head__weight": np.ones((2, 3), np.float32),
                "head__bias": np.ones(3, np.float32),
            },
            ShapeMismatch,
            "head.bias",
        ),
        (
            {**small_module([0]), "m__B_rows": np.full((1, 2), np.nan, np.float32)},
            NonFiniteTensor,
            "'m.B_rows'",
        ),
        ({**small_module([0]), "m__A": np.full((2, 3), np.inf, np.float32)}, NonFiniteTensor, "'m.A'"),
        ({"bad name__A": np.ones((2, 3), np.float32)}, UnknownTensor, "bad name"),
        ({}, MissingTensor, "no tensors"),
    ],
)
def test_tensor_rules_on_encode_and_decode(tensors: dict, error: type[ProtocolError], fragment: str) -> None:
    named = {k.replace("__", "."): v for k, v in tensors.items()}
    with pytest.raises(error, match=fragment):
        encode_update(make_update(tensors=named), "fp32")
    with pytest.raises(error, match=fragment):
        decode_update(forge_update(**tensors))


def test_rows_must_be_integers_on_encode() -> None:
    tensors = small_tensors([0, 1]) | {"m.rows": np.array([0.0, 1.0])}
    with pytest.raises(BadIndices, match="'m.rows'.*integer"):
        encode_update(make_update(tensors=tensors))
    with pytest.raises(BadIndices, match="'m.rows'"):
        encode_update(make_update(tensors=small_tensors([0]) | {"m.rows": np.array([2**31], np.int64)}))


def test_float_tensor_must_be_float() -> None:
    with pytest.raises(ShapeMismatch, match="'m.A'.*float"):
        encode_update(make_update(tensors=small_tensors([0]) | {"m.A": np.ones((2, 3), np.int32)}))
    with pytest.raises(ShapeMismatch, match="'m.A'.*numpy"):
        encode_update(make_update(tensors=small_tensors([0]) | {"m.A": [[1.0]]}))


def test_index_encoding_must_fit_the_name() -> None:
    tensors = small_module([0])
    payload = forge(
        KIND_UPDATE,
        update_header(make_update()),
        {k.replace("__", "."): v for k, v in tensors.items()},
        {"m.A": "index", "m.B_rows": "fp32", "m.rows": "index"},
    )
    with pytest.raises(MalformedMessage, match="'m.A'.*does not fit"):
        decode_update(payload)


def test_expected_shapes_rules() -> None:
    payload = encode_update(make_update(tensors=small_tensors([0, 2])))
    good = {"m.A": (2, 3), "m.B_rows": (None, 2), "m.rows": (None,)}
    decode_update(payload, expected_shapes=good)
    with pytest.raises(UnknownTensor, match="m.rows"):
        decode_update(payload, expected_shapes={"m.A": (2, 3), "m.B_rows": (None, 2)})
    with pytest.raises(MissingTensor, match="head.weight"):
        decode_update(payload, expected_shapes=good | {"head.weight": (5, 3), "head.bias": (5,)})
    with pytest.raises(ShapeMismatch, match="'m.A': expected shape \\(4, 3\\), got \\(2, 3\\)"):
        decode_update(payload, expected_shapes=good | {"m.A": (4, 3)})
    with pytest.raises(ShapeMismatch, match="'m.B_rows'"):
        decode_update(payload, expected_shapes=good | {"m.B_rows": (None, 2, 1)})


def test_out_features_bounds_rows() -> None:
    payload = encode_update(make_update(tensors=small_tensors([0, 5])))
    decode_update(payload, out_features={"m": 6})
    with pytest.raises(BadIndices, match="'m.rows': index 5 >= out_features 5"):
        decode_update(payload, out_features={"m": 5})
    with pytest.raises(UnknownTensor, match="'m'"):
        decode_update(payload, out_features={"other": 5})


def test_expected_task_and_client() -> None:
    payload = encode_update(make_update())
    with pytest.raises(WrongTask, match="task is 'sst2', expected 'mnli'"):
        decode_update(payload, expected_task="mnli")
    with pytest.raises(WrongRecipient, match="client_id is 'rpi-07'"):
        decode_update(payload, expected_client_id="rpi-08")


def test_forged_fp16_inf_and_int8_scales_are_caught() -> None:
    header = update_header(make_update())
    stored = {k.replace("__", "."): v for k, v in small_module([0]).items()}
    half = stored | {"m.A": np.full((2, 3), np.inf, np.float16)}
    encodings = {"m.A": "fp16", "m.B_rows": "fp32", "m.rows": "index"}
    with pytest.raises(NonFiniteTensor, match="'m.A'"):
        decode_update(forge(KIND_UPDATE, header, half, encodings))
    q = stored | {"m.A": np.ones((2, 3), np.int8), "m.A#scale": np.array([1.0, np.inf], np.float32)}
    encodings = {"m.A": "int8", "m.B_rows": "fp32", "m.rows": "index"}
    with pytest.raises(NonFiniteTensor, match="'m.A'.*scales"):
        decode_update(forge(KIND_UPDATE, header, q, encodings))
    bad_shape = q | {"m.A#scale": np.ones(3, np.float32)}
    with pytest.raises(ShapeMismatch, match="'m.A'.*scales"):
        decode_update(forge(KIND_UPDATE, header, bad_shape, encodings))
    with pytest.raises(MalformedMessage, match="missing \\['m.A#scale'\\]"):
        decode_update(forge(KIND_UPDATE, header, stored | {"m.A": q["m.A"]}, encodings))
    wrong_dtype = stored | {"m.A": np.ones((2, 3), np.float32)}
    with pytest.raises(ShapeMismatch, match="'m.A' \\(fp16\\): expected dtype float16"):
        decode_update(forge(KIND_UPDATE, header, wrong_dtype, {**encodings, "m.A": "fp16"}))


# ---------------------------------------------------------------------------------------- envelope rules


def test_envelope_errors() -> None:
    good = encode_update(make_update(tensors=small_tensors([0])))
    with pytest.raises(MalformedMessage, match="magic"):
        decode_update(b"XXXX" + good[4:])
    with pytest.raises(UnsupportedVersion, match="version 2"):
        decode_update(good[:4] + b"\x02" + good[5:])
    with pytest.raises(WrongMessageKind, match="expected a update message, got ack"):
        decode_update(encode_ack(AckMessage("t", "c", 0, "accepted", "", 0)))
    with pytest.raises(MalformedMessage, match="shorter than"):
        decode_update(good[:10])
    with pytest.raises(MalformedMessage, match="envelope says"):
        decode_update(good[:-1])
    with pytest.raises(MalformedMessage, match="envelope says"):
        decode_update(good + b"\x00")
    with pytest.raises(MalformedMessage, match="flags"):
        decode_update(good[:6] + b"\x81" + good[7:])
    with pytest.raises(MalformedMessage, match="payload must be bytes"):
        decode_update("not bytes")  # type: ignore[arg-type]
    assert decode_update(bytearray(good)).client_id == "rpi-07"
    assert decode_update(memoryview(good)).client_id == "rpi-07"


def test_bodies_are_deflated_only_when_zlib_saves_enough() -> None:
    noise = np.random.default_rng(0).standard_normal(4096).astype(np.float32).tobytes()  # saves < 15%
    text = b"fedhft " * 1000
    for raw, deflated in ((noise, False), (text, True)):
        payload = wrap(KIND_UPDATE, raw)
        assert bool(payload[6] & 1) == deflated
        assert (len(payload) - 16 == len(raw)) != deflated
        assert worth_deflating(raw, zlib.compress(raw, 6)) == deflated
        assert unwrap(payload, KIND_UPDATE, DEFAULT_MAX_BYTES).raw == raw
    assert wrap(KIND_UPDATE, noise, deflate=True)[6] & 1 and not wrap(KIND_UPDATE, text, deflate=False)[6] & 1
    assert unwrap(wrap(KIND_UPDATE, noise, deflate=True), KIND_UPDATE, DEFAULT_MAX_BYTES).raw == noise
    msg = make_update()
    for encoding in ENCODINGS:  # tensor bodies of random values: sent stored, decoded the same
        payload = encode_update(msg, encoding)
        assert not payload[6] & 1 and decode_update(payload).seq == msg.seq
    assert 0 < MIN_ZLIB_SAVING < 1


def test_body_errors() -> None:
    raw = bytes(st_save({"x": np.ones(1, np.float32)}, metadata={"fedhft": "{}"}))
    with pytest.raises(MalformedMessage, match="zlib"):
        decode_update(struct.pack("<4sBBBBII", b"FHFT", 1, 1, 1, 0, 4, 4) + b"abcd")
    with pytest.raises(MalformedMessage, match="truncated"):
        body = zlib.compress(raw)[:-6]
        decode_update(struct.pack("<4sBBBBII", b"FHFT", 1, 1, 1, 0, len(body), len(raw)) + body)
    with pytest.raises(MessageTooLarge, match=f"inflates past its declared {len(raw) - 1} bytes"):
        decode_update(envelope(1, raw, declared=len(raw) - 1))
    with pytest.raises(MalformedMessage, match=f"body is {len(raw)} bytes, the envelope says {len(raw) + 1}"):
        decode_update(envelope(1, raw, declared=len(raw) + 1))
    with pytest.raises(MalformedMessage, match="exactly header and tensors"):
        decode_update(envelope(1, raw))
    with pytest.raises(MalformedMessage, match="too short"):
        decode_update(envelope(1, b"abc"))
    with pytest.raises(MalformedMessage, match="header length"):
        decode_update(envelope(1, struct.pack("<Q", 10**6) + b"{}"))
    with pytest.raises(MalformedMessage, match="safetensors header is not valid JSON"):
        decode_update(envelope(1, struct.pack("<Q", 2) + b"{x"))
    with pytest.raises(MalformedMessage, match="__metadata__"):
        decode_update(envelope(1, struct.pack("<Q", 2) + b"{}"))
    uncompressed = envelope(1, encode_update_raw(), flags=0)
    assert decode_update(uncompressed).task == "sst2"


def encode_update_raw() -> bytes:
    payload = encode_update(make_update(tensors=small_tensors([0])))
    return unwrap(payload, KIND_UPDATE, DEFAULT_MAX_BYTES).raw


def test_safetensors_header_lies_are_caught() -> None:
    raw = encode_update_raw()
    (n,) = struct.unpack_from("<Q", raw)
    header = json.loads(raw[8 : 8 + n])
    first = next(k for k in header if k != "__metadata__")
    for patch, fragment in (
        ({"dtype": "F64"}, "unsupported dtype"),
        ({"shape": [10**9]}, "do not hold"),
        ({"data_offsets": [0, 10**9]}, "outside"),
        ({"shape": "x"}, "bad shape"),
        ({"extra": 1}, "exactly dtype"),
    ):
        forged = dict(header)
        forged[first] = {**header[first], **patch}
        text = json.dumps(forged).encode()
        with pytest.raises(MalformedMessage, match=fragment):
            decode_update(envelope(1, struct.pack("<Q", len(text)) + text + raw[8 + n :]))
    dup = raw[:8] + raw[8 : 8 + n].replace(b"{", b'{"__metadata__":{},', 1) + raw[8 + n :]
    dup = struct.pack("<Q", n + len(b'"__metadata__":{},')) + dup[8:]
    with pytest.raises(MalformedMessage, match="duplicate key"):
        decode_update(envelope(1, dup))


def test_max_bytes_limits_payload() -> None:
    payload = encode_update(make_update())
    with pytest.raises(MessageTooLarge, match=f"payload is {len(payload)} bytes"):
        decode_update(payload, max_bytes=len(payload) - 1)
    deflated = envelope(1, unwrap(payload, KIND_UPDATE, DEFAULT_MAX_BYTES).raw)
    with pytest.raises(MessageTooLarge, match="decompressed"):
        decode_update(deflated, max_bytes=len(deflated) + 1)  # the body inflates past it
    with pytest.raises(ProtocolError, match="max_bytes"):
        decode_update(payload, max_bytes=0)


@pytest.fixture(scope="module")
def bomb_body() -> bytes:
    """128 MiB of zeros, deflated to about 128 KiB."""
    deflater = zlib.compressobj(9)
    chunk = bytes(1 << 20)
    return b"".join(deflater.compress(chunk) for _ in range(128)) + deflater.flush()


@pytest.mark.parametrize("declared", [1 << 30, 100])
def test_zip_bomb_raises_message_too_large(bomb_body: bytes, declared: int) -> None:
    assert len(bomb_body) < 1 << 20
    bomb = struct.pack("<4sBBBBII", b"FHFT", 1, 1, 1, 0, len(bomb_body), declared) + bomb_body
    tracemalloc.start()
    try:
        with pytest.raises(MessageTooLarge):
            decode_update(bomb, max_bytes=4 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20  # inflation stopped near max_bytes, not at 128 MiB
    with pytest.raises(MessageTooLarge):
        decode_update(bomb)  # default limit 64 MiB


# ------------------------------------------------------------------------------------------ model rules


def test_model_rules() -> None:
    private, public = generate_keypair()
    payload = encode_model(make_model(version=7), private)
    with pytest.raises(StaleModel, match="version 7 is older than the minimum 8"):
        decode_model(payload, public, min_version=8)
    assert decode_model(payload, public, min_version=7).version == 7
    with pytest.raises(WrongTask, match="'sst2', expected 'mnli'"):
        decode_model(payload, public, expected_task="mnli")
    with pytest.raises(WrongRecipient, match="target is 'cluster/0', expected 'cluster/1'"):
        decode_model(payload, public, expected_target="cluster/1")
    with pytest.raises(HeaderError, match="target"):
        encode_model(make_model(target="cluster/x"), private)
    with pytest.raises(HeaderError, match="meta\\['flag'\\]"):
        encode_model(make_model(meta={"flag": True}), private)
    with pytest.raises(HeaderError, match="version"):
        encode_model(make_model(version=-1), private)
    with pytest.raises(EncodingError, match="key_id"):
        encode_model(make_model(key_id="0" * 16), private)
    with pytest.raises(EncodingError, match="signing_key"):
        encode_model(make_model(), None)  # type: ignore[arg-type]
    with pytest.raises(UnknownTensor, match="B_rows"):
        encode_model(make_model(tensors=make_tensors(np.random.default_rng(0))), private)
    bad = make_model_tensors(np.random.default_rng(0)) | {"layers.0.query.B": np.ones((OUT, 3), np.float32)}
    with pytest.raises(ShapeMismatch, match="'layers.0.query.B'"):
        encode_model(make_model(tensors=bad), private)
    with pytest.raises(ShapeMismatch, match="head.weight"):
        decode_model(payload, public, expected_shapes={"head.weight": (1, 1)} | _shapes(make_model()))


def _shapes(msg: ModelMessage) -> dict[str, tuple[int, ...]]:
    return {k: v.shape for k, v in msg.tensors.items() if k != "head.weight"} | {"head.weight": (1, 1)}


def test_hello_and_ack_rules() -> None:
    with pytest.raises(HeaderError, match="plan"):
        encode_hello(HelloMessage("t", "c", "p", SHA, {"x": float("nan")}, 1.0))
    with pytest.raises(HeaderError, match="plan"):
        encode_hello(HelloMessage("t", "c", "p", SHA, {"x": object()}, 1.0))
    with pytest.raises(HeaderError, match="status"):
        encode_ack(AckMessage("t", "c", 0, "maybe", "", 0))
    with pytest.raises(HeaderError, match="reason"):
        encode_ack(AckMessage("t", "c", 0, "rejected", "x" * 5000, 0))
    body = json.dumps({"task": "t", "client_id": "c", "seq": 0, "status": "ok", "reason": "", "version": 0})
    with pytest.raises(HeaderError, match="status"):
        decode_ack(envelope(4, body.encode()))
    with pytest.raises(MalformedMessage, match="JSON object"):
        decode_ack(envelope(4, b"[1]"))
    with pytest.raises(MalformedMessage, match="not valid JSON"):
        decode_hello(envelope(3, b"[" * 100_000))
    with pytest.raises(WrongTask):
        decode_hello(encode_hello(HelloMessage("t", "c", "p", SHA, {}, 1.0)), expected_task="u")
    with pytest.raises(WrongRecipient):
        decode_ack(encode_ack(AckMessage("t", "c", 0, "accepted", "", 0)), expected_client_id="d")


# ----------------------------------------------------------------------------------------- torch-free


def test_protocol_imports_with_torch_blocked() -> None:
    code = textwrap.dedent(
        """
        import sys
        BLOCKED = {"torch", "transformers", "optimum", "executorch"}

        class Blocker:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"blocked import of {name}")
                return None

        sys.meta_path.insert(0, Blocker())
        import fedhft.protocol as p
        import fedhft.protocol.message_codecs, fedhft.protocol.signing, fedhft.protocol.topics  # noqa
        import fedhft.protocol.program_spec  # noqa
        assert not BLOCKED & {m.split(".")[0] for m in sys.modules}, sorted(sys.modules)
        private, public = p.generate_keypair()
        print("ok", len(p.__all__))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")
