"""Ed25519 key files and model-message signatures."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from safetensors.numpy import save as st_save

from fedhft.protocol import (
    BadSignature,
    KeyFileError,
    ModelMessage,
    decode_model,
    encode_model,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    public_key_from_hex,
    public_key_to_hex,
    save_private_key,
    save_public_key,
)
from fedhft.protocol.envelope import FLAG_SIGNED, KIND_MODEL, wrap
from fedhft.protocol.fields import MODEL_FIELDS


def small_model(version: int = 3) -> ModelMessage:
    rng = np.random.default_rng(5)
    tensors = {
        "layers.0.query.A": rng.normal(0, 0.02, (4, 16)).astype(np.float32),
        "layers.0.query.B": rng.normal(0, 0.02, (16, 4)).astype(np.float32),
        "head.weight": rng.normal(0, 0.02, (2, 16)).astype(np.float32),
        "head.bias": np.zeros(2, np.float32),
    }
    return ModelMessage("sst2", version, "client/rpi-07", 1_700_000_000.0, "", {"round": version}, tensors)


@pytest.fixture(scope="module")
def keys() -> tuple:
    return generate_keypair()


@pytest.fixture(scope="module")
def signed(keys: tuple) -> bytes:
    return encode_model(small_model(), keys[0])


# ------------------------------------------------------------------------------------------- key files


def test_key_id_is_short_stable_hex(keys: tuple) -> None:
    private, public = keys
    assert key_id(public) == key_id(private)
    assert len(key_id(public)) == 16 and int(key_id(public), 16) >= 0
    assert key_id(generate_keypair()[1]) != key_id(public)


def test_private_key_round_trip_mode_0600_atomic(tmp_path: Path, keys: tuple) -> None:
    private, public = keys
    path = save_private_key(tmp_path / "server.key", private)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["server.key"]  # no temp file left
    loaded = load_private_key(path)
    assert key_id(loaded) == key_id(public)
    save_private_key(path, generate_keypair()[0])  # overwrite in place
    assert key_id(load_private_key(path)) != key_id(public)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_public_key_round_trip_hex(tmp_path: Path, keys: tuple) -> None:
    _, public = keys
    path = save_public_key(tmp_path / "server.pub", public)
    text = path.read_text()
    assert text == public_key_to_hex(public) + "\n" and len(text.strip()) == 64
    assert key_id(load_public_key(path)) == key_id(public)
    assert key_id(public_key_from_hex(text)) == key_id(public)


def test_key_file_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.key"
    with pytest.raises(KeyFileError, match="nope.key.*cannot read"):
        load_private_key(missing)
    with pytest.raises(KeyFileError, match="nope.key"):
        load_public_key(missing)
    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(b"\xff\x00 not a key")
    with pytest.raises(KeyFileError, match="garbage.key"):
        load_private_key(garbage)
    with pytest.raises(KeyFileError, match="garbage.key"):
        load_public_key(garbage)
    ec_key = tmp_path / "ec.key"
    ec_key.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(KeyFileError, match="ec.key.*Ed25519"):
        load_private_key(ec_key)
    short = tmp_path / "short.pub"
    short.write_text("abcd\n")
    with pytest.raises(KeyFileError, match="short.pub.*64 hex"):
        load_public_key(short)
    nonhex = tmp_path / "nonhex.pub"
    nonhex.write_text("zz" * 32)
    with pytest.raises(KeyFileError, match="nonhex.pub"):
        load_public_key(nonhex)
    with pytest.raises(KeyFileError, match="no_such_dir"):
        save_private_key(tmp_path / "no_such_dir" / "k.key", generate_keypair()[0])


# ------------------------------------------------------------------------------------------ signatures


def test_signed_model_verifies(signed: bytes, keys: tuple) -> None:
    msg = decode_model(signed, verify_key=keys[1])
    assert msg.key_id == key_id(keys[1]) and msg.version == 3
    assert signed[6] & FLAG_SIGNED


def test_every_single_byte_tamper_is_bad_signature(signed: bytes, keys: tuple) -> None:
    for i in range(len(signed)):
        for flip in (0x01, 0x80):
            tampered = bytearray(signed)
            tampered[i] ^= flip
            with pytest.raises(BadSignature):
                decode_model(bytes(tampered), verify_key=keys[1])


def test_truncated_or_extended_is_bad_signature(signed: bytes, keys: tuple) -> None:
    for cut in (1, 63, 64, 65, len(signed) - 10, len(signed)):
        with pytest.raises(BadSignature):
            decode_model(signed[: len(signed) - cut], verify_key=keys[1])
    with pytest.raises(BadSignature):
        decode_model(signed + b"\x00", verify_key=keys[1])


def test_wrong_key_is_bad_signature(signed: bytes) -> None:
    _, other = generate_keypair()
    with pytest.raises(BadSignature, match=key_id(other)):
        decode_model(signed, verify_key=other)


def test_unsigned_model_is_bad_signature_with_a_key(signed: bytes, keys: tuple) -> None:
    body_len = int.from_bytes(signed[8:12], "little")
    unsigned = signed[:6] + bytes([signed[6] & ~FLAG_SIGNED]) + signed[7 : 16 + body_len]
    with pytest.raises(BadSignature, match="not signed"):
        decode_model(unsigned, verify_key=keys[1])
    assert decode_model(unsigned).version == 3  # inspection without a key does not check


def test_without_key_signature_is_not_checked(signed: bytes) -> None:
    tampered = signed[:-1] + bytes([signed[-1] ^ 1])
    assert decode_model(tampered).version == 3


def test_key_id_in_header_must_match_verify_key(keys: tuple) -> None:
    private, public = keys
    _, other = generate_keypair()
    msg = small_model()
    header = {name: getattr(msg, name) for name in MODEL_FIELDS} | {"key_id": key_id(other)}
    meta = json.dumps({"header": header, "tensors": dict.fromkeys(msg.tensors, "fp32")})
    payload = wrap(KIND_MODEL, bytes(st_save(msg.tensors, metadata={"fedhft": meta})), private)
    with pytest.raises(BadSignature, match="key_id"):
        decode_model(payload, verify_key=public)


def test_verify_key_must_be_a_public_key(signed: bytes, keys: tuple) -> None:
    with pytest.raises(BadSignature, match="Ed25519PublicKey"):
        decode_model(signed, verify_key=keys[0])  # type: ignore[arg-type]
