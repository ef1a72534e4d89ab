"""The server's signing key and its key chain in the state dir; `fedhft server rotate-key`.

Files (next to the rest of the server state, see state_dir.py and state_store.py)::

    server_key.pem        the current Ed25519 private key (0600)
    server_key.pub        its public key (64 hex characters): what new devices are provisioned with
    server_keys.json      the chain: every key the server had, each link signed by the key before it
    server_key.next.pem   only during a rotation: the new key, before it replaces server_key.pem

Rotation is crash-safe: the new key is written first (next.pem), then the chain that names it (atomic
replace: this is the commit), then next.pem is renamed over server_key.pem. Whoever next loads the key
finishes an interrupted rotation (chain names next.pem's key) or drops it (the chain does not). Rotation
takes the state dir's lock, so it needs the server stopped; a running server makes it fail naming its PID.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedhft.atomic import fsync_dir, write_atomic
from fedhft.broker_server.state_dir import (
    KEY_NAME,
    PUB_NAME,
    StateError,
    lock_state_dir,
    unlock_state_dir,
)
from fedhft.protocol import (
    KeyLink,
    ProtocolError,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    public_key_to_hex,
    save_private_key,
    save_public_key,
)
from fedhft.protocol.keychain import extend_chain, genesis_link, verify_links

CHAIN_NAME = "server_keys.json"
NEXT_KEY_NAME = "server_key.next.pem"
CHAIN_FORMAT = 1


class KeyRotationError(StateError):
    """The key files of a state dir are missing, inconsistent or cannot be written."""


@dataclass(frozen=True)
class Rotation:
    """What one rotation did."""

    old_key_id: str
    new_key_id: str
    index: int  # the new key's position in the chain
    chain: Path
    public_key: Path


def _save_chain(directory: Path, links: tuple[KeyLink, ...]) -> None:
    obj = {"format": CHAIN_FORMAT, "links": [asdict(link) for link in links]}
    write_atomic(directory / CHAIN_NAME, (json.dumps(obj, indent=1) + "\n").encode(), 0o644)


def read_chain(directory: Path) -> tuple[KeyLink, ...] | None:
    """The verified chain of ``directory`` (None when it has none yet)."""
    path = directory / CHAIN_NAME
    if not path.exists():
        return None
    try:
        obj = json.loads(path.read_text())
        if obj.get("format") != CHAIN_FORMAT:
            raise ValueError(f"format {obj.get('format')!r}, expected {CHAIN_FORMAT}")
        links = tuple(KeyLink(**item) for item in obj["links"])
        verify_links(links)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ProtocolError) as exc:
        raise KeyRotationError(f"{path}: not a valid key chain ({exc})") from exc
    return links


def _finish_interrupted(directory: Path) -> None:
    """Complete a rotation whose chain was committed, or drop one that was not."""
    nxt = directory / NEXT_KEY_NAME
    if not nxt.exists():
        return
    chain = read_chain(directory)
    try:
        new = load_private_key(nxt)
    except ProtocolError:
        nxt.unlink(missing_ok=True)  # never committed: the chain cannot name a key we could not write whole
        return
    if chain is not None and chain[-1].public_key == public_key_to_hex(new.public_key()):
        os.replace(nxt, directory / KEY_NAME)
        fsync_dir(directory)
    else:
        nxt.unlink(missing_ok=True)


def load_server_key(directory: Path) -> Ed25519PrivateKey:
    """The signing key of ``directory`` (generated on first use), with server_key.pub kept in step.

    Call with the state dir's lock held (the server's StateStore holds it)."""
    _finish_interrupted(directory)
    key_path, pub_path = directory / KEY_NAME, directory / PUB_NAME
    if key_path.exists():
        key = load_private_key(key_path)
    else:
        key, _ = generate_keypair()
        save_private_key(key_path, key)
    public = key.public_key()
    if not pub_path.exists() or public_key_to_hex(load_public_key(pub_path)) != public_key_to_hex(public):
        save_public_key(pub_path, public)
    return key


def load_chain(directory: Path, key: Ed25519PrivateKey) -> tuple[KeyLink, ...]:
    """The chain ending with ``key`` (a one-link chain is created on first use); KeyRotationError when the
    chain on disk ends with another key."""
    chain = read_chain(directory)
    if chain is None:
        chain = (genesis_link(key, time.time()),)
        _save_chain(directory, chain)
    if chain[-1].public_key != public_key_to_hex(key.public_key()):
        raise KeyRotationError(
            f"{directory / CHAIN_NAME} ends with key {chain[-1].key_id}, but {directory / KEY_NAME} is "
            f"{key_id(key)}; restore the matching server_key.pem"
        )
    return chain


def init_server_state(directory: Path) -> tuple[Path, str, bool]:
    """`fedhft server init`: create ``directory`` with the signing key, server_key.pub and the key chain, so
    devices can be provisioned before the server first starts. Keeps a key that is already there.

    Returns (server_key.pub, the key's id, whether a new key was made); the state dir's lock is held meanwhile."""
    directory = Path(directory)
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise KeyRotationError(f"state dir {directory}: cannot create it ({exc.strerror or exc})") from exc
    fd = lock_state_dir(directory)
    try:
        new = not (directory / KEY_NAME).exists()
        key = load_server_key(directory)
        load_chain(directory, key)
    finally:
        unlock_state_dir(fd)
    return directory / PUB_NAME, key_id(key), new


def rotate_server_key(directory: Path) -> Rotation:
    """Replace the signing key by a new one that the old key signs into the chain (server must be stopped)."""
    directory = Path(directory)
    if not (directory / KEY_NAME).exists():
        raise KeyRotationError(
            f"{directory} holds no server key ({KEY_NAME}); create it with `fedhft server init --state {directory}`"
        )
    fd = lock_state_dir(directory)
    try:
        old = load_server_key(directory)
        chain = load_chain(directory, old)
        new, new_public = generate_keypair()
        save_private_key(directory / NEXT_KEY_NAME, new)
        longer = extend_chain(chain, old, new_public, time.time())
        try:
            _save_chain(directory, longer)  # the commit point
        except OSError as exc:
            (directory / NEXT_KEY_NAME).unlink(missing_ok=True)
            raise KeyRotationError(f"{directory / CHAIN_NAME}: cannot write ({exc.strerror or exc})") from exc
        _finish_interrupted(directory)
        save_public_key(directory / PUB_NAME, new_public)
    finally:
        unlock_state_dir(fd)
    return Rotation(key_id(old), key_id(new), len(longer) - 1, directory / CHAIN_NAME, directory / PUB_NAME)
