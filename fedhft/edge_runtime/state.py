"""A device's durable state: what survives kill -9 and power cuts, in one directory.

Files in ``--state-dir``::

    state.json     identity (task, client id, manifest sha256), next_seq, model/trained versions, cluster
    model.bin      the last good model message, exactly as received (signed; re-verified on start)
    trainer.ckpt   the backend's checkpoint (parameters and optimizer state), saved after each round
    trainer.ckpt.sha256  its sha256, written after it: a checkpoint that does not match is corrupt
    outbox/        updates created but not yet acknowledged (see outbox.py)
    lock           held (flock) while a client runs, so two clients never share a state directory

Every file is replaced atomically: written to a temp file in the same folder, fsynced, os.replace'd, and
the folder fsynced, so a reader sees the old or the new file, never a torn one.

Corruption (a bad disk, a bit flip): state.json that does not parse stops the client with a message naming
it; ``fedhft edge run --reset-state`` (:meth:`StateStore.reset`) starts the device over. A checkpoint whose
sha256 does not match is reported and ignored (training restarts from the exported checkpoint and the
server's model); model.bin is signed and outbox entries are zlib-checksummed, so the client detects and
drops those itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

from fedhft.atomic import write_atomic, write_atomic_with
from fedhft.errors import FedHFTError
from fedhft.protocol.manifest import sha256_file

STATE_FILE = "state.json"
MODEL_FILE = "model.bin"
TRAINER_FILE = "trainer.ckpt"
TRAINER_SHA_FILE = "trainer.ckpt.sha256"
OUTBOX_DIR = "outbox"
LOCK_FILE = "lock"
STATE_VERSION = 1


class StateError(FedHFTError):
    """The state directory cannot be used (unwritable, locked, corrupt or another client's)."""


def restart_seq() -> int:
    """The first seq after a reset: the current Unix time in ms, above any seq counted up before it (the
    server only accepts seqs above the last it took from a client)."""
    return int(time.time() * 1000)


def remove_stale_temps(folder: Path) -> None:
    """Delete temp files a crash left behind (they were never renamed into place)."""
    for p in folder.glob(".*.tmp"):
        with contextlib.suppress(OSError):
            p.unlink()


@dataclass
class EdgeState:
    """The small, frequently rewritten part of the state (state.json)."""

    task: str
    client_id: str
    manifest_sha256: str
    next_seq: int = 0  # the seq the next created update gets
    model_version: int | None = None  # version of model.bin, the last good model
    model_target: str | None = None
    trained_version: int | None = None  # model version the newest created update was trained from
    cluster: int | None = None  # cluster the server put this client in (from a model's meta)
    rounds_created: int = 0
    version_rounds: int = 0  # updates created from trained_version (a device keeps training on its newest model)
    last_schedule: list[float] | None = None  # virtual time: [start_at, version] of the last schedule acted on
    state_version: int = STATE_VERSION
    updated_at: float = field(default_factory=time.time)

    def needs_training(self) -> bool:
        """True when the last good model has not been trained on yet."""
        return self.model_version is not None and (
            self.trained_version is None or self.trained_version < self.model_version
        )


class StateStore:
    """Reads and atomically writes the files of one state directory; holds its lock while open."""

    def __init__(self, folder: str | Path) -> None:
        self.dir = Path(folder)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / OUTBOX_DIR).mkdir(exist_ok=True)
            self._lock: IO[bytes] | None = open(self.dir / LOCK_FILE, "ab")  # noqa: SIM115 - held until close()
        except OSError as e:
            raise StateError(f"state directory {self.dir} is not usable: {e.strerror or e}") from e
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            self._lock.close()
            self._lock = None
            raise StateError(f"state directory {self.dir} is in use by another running client") from e
        remove_stale_temps(self.dir)

    @property
    def outbox_dir(self) -> Path:
        return self.dir / OUTBOX_DIR

    @property
    def trainer_path(self) -> Path:
        return self.dir / TRAINER_FILE

    def close(self) -> None:
        if self._lock is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock.fileno(), fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- state.json ---------------------------------------------------------------------------------
    def load(self, task: str, client_id: str, manifest_sha256: str) -> EdgeState:
        """The saved state (checked to belong to this task, client and manifest), or a fresh one."""
        path = self.dir / STATE_FILE
        if not path.exists():
            return EdgeState(task, client_id, manifest_sha256)
        try:
            data = json.loads(path.read_text())
            state = EdgeState(**data)
        except (OSError, ValueError, TypeError) as e:
            raise StateError(
                f"{path}: unreadable state, corrupt ({e}); start over with `fedhft edge run --reset-state`"
            ) from e
        mine = (task, client_id, manifest_sha256)
        theirs = (state.task, state.client_id, state.manifest_sha256)
        if mine != theirs:
            raise StateError(
                f"{path} belongs to task {state.task!r}, client {state.client_id!r}, manifest "
                f"{state.manifest_sha256[:12]}… not task {task!r}, client {client_id!r}, manifest "
                f"{manifest_sha256[:12]}…; use another --state-dir (or --reset-state after a re-export)"
            )
        return state

    def reset(self) -> list[str]:
        """Delete the saved state, model, checkpoint and queued updates (the lock and anything else stay);
        return the names removed. The caller starts from a fresh EdgeState with seqs at :func:`restart_seq`."""
        removed = []
        paths = [self.dir / n for n in (STATE_FILE, MODEL_FILE, TRAINER_FILE, TRAINER_SHA_FILE)]
        for path in [*paths, *sorted(self.outbox_dir.iterdir())]:
            if path.is_file():
                try:
                    path.unlink()
                except OSError as e:
                    raise StateError(f"{path}: cannot delete it to reset the state ({e.strerror or e})") from e
                removed.append(str(path.relative_to(self.dir)))
        return removed

    def save(self, state: EdgeState) -> None:
        state.updated_at = time.time()
        text = json.dumps(asdict(state), indent=1, sort_keys=True) + "\n"
        self._write(self.dir / STATE_FILE, text.encode("utf-8"))

    # ---- model.bin ----------------------------------------------------------------------------------
    def save_model(self, payload: bytes) -> None:
        self._write(self.dir / MODEL_FILE, bytes(payload))

    def load_model(self) -> bytes | None:
        path = self.dir / MODEL_FILE
        try:
            return path.read_bytes() if path.exists() else None
        except OSError as e:
            raise StateError(f"{path}: cannot read the saved model ({e.strerror or e})") from e

    # ---- trainer.ckpt --------------------------------------------------------------------------------
    def save_trainer(self, save_state: Callable[[Path], None]) -> None:
        """Write the backend checkpoint via ``save_state(path)`` (e.g. ``trainer.save_state``), atomically,
        then its sha256 (removed first, so a crash in between leaves a checkpoint without one, never a
        mismatch)."""
        sha_path = self.dir / TRAINER_SHA_FILE
        try:
            sha_path.unlink(missing_ok=True)
            write_atomic_with(self.trainer_path, save_state)
            write_atomic(sha_path, f"{sha256_file(self.trainer_path)}\n".encode())
        except OSError as e:
            raise StateError(f"{self.trainer_path}: cannot save the checkpoint ({e.strerror or e})") from e

    def trainer_checkpoint(self) -> Path | None:
        """The saved checkpoint, None when there is none; StateError when it does not match its sha256
        (corrupt). A checkpoint saved before sha256 files existed is taken as it is."""
        if not self.trainer_path.is_file():
            return None
        sha_path = self.dir / TRAINER_SHA_FILE
        try:
            want = sha_path.read_text().strip() if sha_path.is_file() else None
            got = sha256_file(self.trainer_path) if want is not None else None
        except OSError as e:
            raise StateError(f"{self.trainer_path}: cannot read the checkpoint ({e.strerror or e})") from e
        if want is not None and got != want:
            raise StateError(f"{self.trainer_path}: sha256 mismatch, the checkpoint is corrupt")
        return self.trainer_path

    def _write(self, path: Path, data: bytes) -> None:
        try:
            write_atomic(path, data)
        except OSError as e:
            raise StateError(f"{path}: cannot write ({e.strerror or e})") from e
