"""The server's ``--state DIR``: the names of what lives in it, the lock that keeps it to one server, its errors;
and how a ``--state`` naming a PostgreSQL database instead is told apart and named in messages.

Shared by the state stores (state_store.py, state_pg.py) and the signing key and its chain (key_rotation.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from pathlib import Path

from fedhft.errors import FedHFTError

DB_NAME = "state.sqlite3"
LOCK_NAME = "lock"
KEY_NAME = "server_key.pem"
PUB_NAME = "server_key.pub"
UPDATES_DIR = "updates"
STATES_DIR = "states"
TENSOR_SUFFIX = ".safetensors"
MEMBERSHIPS_FILE = "memberships.json"  # per version folder: the memberships its models were built with
POSTGRES_SCHEMES = ("postgresql://", "postgres://")  # a --state starting so is a database (state_pg.py)


class StateError(FedHFTError):
    """The state directory cannot be used (locked, corrupt, another task's, unwritable)."""


class StateLocked(StateError):
    """Another server holds the state directory's lock."""


class StorageFull(StateError):
    """The disk is full: nothing was stored (and nothing is acknowledged)."""


class StandbyStopped(FedHFTError):
    """A standby server was told to stop while it still waited for the state's lock."""


class StateLost(FedHFTError):
    """The server lost its hold on the state: its database connection could not be brought back within
    ``--db-reconnect-timeout``, or another server took the lock (or committed a version) meanwhile. It must stop.

    Not a StateError, which the server survives (it retries); a restart rebuilds the server from what committed."""


class SteppedDown(StateLost):
    """Another server took the lock, or committed a version, while this one was reconnecting: a server started
    with ``--standby`` waits for the lock again instead of stopping."""


def lock_state_dir(directory: Path) -> int:
    """flock ``directory/lock`` and write our PID into it; StateLocked naming the holder's PID otherwise."""
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise StateLocked(
            f"state dir {directory} is in use by another fedhft server (PID {holder}); stop it or "
            "choose another --state"
        ) from exc
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    os.fsync(fd)
    return fd


def unlock_state_dir(fd: int) -> None:
    """Release a lock taken by :func:`lock_state_dir`."""
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def is_postgres(spec: str | os.PathLike[str]) -> bool:
    """Whether ``--state`` names a PostgreSQL database rather than a directory."""
    return str(spec).startswith(POSTGRES_SCHEMES)


def redact(url: str) -> str:
    """``url`` without its password, for messages."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


def state_label(spec: str | os.PathLike[str]) -> str:
    """How messages name a ``--state``: "state dir DIR" or "state postgresql://user:***@host/db"."""
    return f"state {redact(str(spec))}" if is_postgres(spec) else f"state dir {spec}"
