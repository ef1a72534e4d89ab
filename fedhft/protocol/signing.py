"""Ed25519 keys that sign model messages (server -> clients).

File formats:

* private key: PKCS#8 PEM, unencrypted, file mode 0600 (written atomically: temp file, fsync, rename);
* public key: the raw 32-byte Ed25519 public key as 64 lowercase hex characters and a newline, easy to
  paste into a device config.

``key_id`` is the first 16 hex characters of SHA-256 over the raw public key; a model message carries
the id of the key that signed it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedhft.atomic import write_atomic
from fedhft.protocol.errors import BadSignature, KeyFileError

SIGNATURE_LEN = 64
KEY_ID_LEN = 16


def generate_keypair() -> tuple[Ed25519PrivateKey, Ed25519PublicKey]:
    """A fresh Ed25519 key pair."""
    private = Ed25519PrivateKey.generate()
    return private, private.public_key()


def public_key_bytes(key: Ed25519PublicKey | Ed25519PrivateKey) -> bytes:
    """The raw 32-byte public key (of a private key: its public half)."""
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """Short hex fingerprint of a public key (or of a private key's public half)."""
    return hashlib.sha256(public_key_bytes(key)).hexdigest()[:KEY_ID_LEN]


def public_key_to_hex(key: Ed25519PublicKey) -> str:
    """The raw public key as 64 lowercase hex characters."""
    return public_key_bytes(key).hex()


def public_key_from_hex(text: str, source: str = "public key") -> Ed25519PublicKey:
    """Parse 64 hex characters into a public key; KeyFileError naming ``source`` otherwise."""
    text = text.strip()
    if len(text) != 64:
        raise KeyFileError(f"{source}: expected 64 hex characters of an Ed25519 public key, got {len(text)}")
    try:
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(text))
    except ValueError as exc:
        raise KeyFileError(f"{source}: not a hex Ed25519 public key ({exc})") from exc


def sign(data: bytes, key: Ed25519PrivateKey) -> bytes:
    """The 64-byte Ed25519 signature of ``data``."""
    return key.sign(bytes(data))


def verify(data: bytes, signature: bytes, key: Ed25519PublicKey) -> None:
    """Return when ``signature`` is ``key``'s signature of ``data``; raise BadSignature otherwise."""
    try:
        key.verify(bytes(signature), bytes(data))
    except InvalidSignature as exc:
        raise BadSignature(f"signature does not verify with key {key_id(key)}") from exc


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write a key file atomically (fedhft.atomic), as one KeyFileError naming the file on failure."""
    try:
        write_atomic(path, data, mode)
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot write key file ({exc.strerror or exc})") from exc


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read {what} ({exc.strerror or exc})") from exc


def save_private_key(path: str | os.PathLike[str], key: Ed25519PrivateKey) -> Path:
    """Write ``key`` as unencrypted PKCS#8 PEM with mode 0600, atomically; return the path."""
    path = Path(path)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    _write_atomic(path, pem, 0o600)
    return path


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Read a PKCS#8 PEM Ed25519 private key; KeyFileError naming the file otherwise."""
    path = Path(path)
    data = _read(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not an unencrypted PEM private key ({exc})") from exc
    except Exception as exc:  # cryptography raises its own types for unsupported algorithms
        raise KeyFileError(f"{path}: cannot parse private key ({type(exc).__name__}: {exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: expected an Ed25519 private key, got {type(key).__name__}")
    return key


def save_public_key(path: str | os.PathLike[str], key: Ed25519PublicKey) -> Path:
    """Write ``key`` as 64 hex characters and a newline (mode 0644), atomically; return the path."""
    path = Path(path)
    _write_atomic(path, (public_key_to_hex(key) + "\n").encode("ascii"), 0o644)
    return path


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """Read a public key written by save_public_key; KeyFileError naming the file otherwise."""
    path = Path(path)
    data = _read(path, "public key")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as exc:
        raise KeyFileError(f"{path}: public key file is not ASCII hex") from exc
    return public_key_from_hex(text, source=str(path))
