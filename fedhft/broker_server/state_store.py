"""Crash-safe server state in ``--state DIR``: SQLite (WAL, synchronous=FULL) plus atomically written tensor files.

The directory's names, lock and errors are in state_dir.py, its tables in state_schema.py, its tensor files in
state_files.py; this is the store that keeps them in step.

Layout::

    DIR/lock                      fcntl.flock'ed by the running server; holds its PID
    DIR/state.sqlite3             tables meta, clients, updates, versions (+ -wal / -shm)
    DIR/server_key.pem            Ed25519 signing key (0600), generated on first start
    DIR/server_key.pub            its public key, 64 hex characters, for provisioning devices
    DIR/server_keys.json          the key chain: every key this server had, each signed by the one before
    DIR/updates/batch-<uuid>.safetensors  one group commit: tensor '<i>' = update i's payload as received (uint8)
    DIR/states/v<version>/cluster-<k>.safetensors   per-cluster ΔW ("dw/<module>") and head ("head/<key>"), float64
    DIR/states/v<version>/memberships.json         the clients' memberships that version's models were built with

An update is stored as the payload it arrived in (the wire encoding is half the size of decoded float32
and the exact record of what the client sent), as a uint8 tensor of a safetensors file (no pickle); the
row's ``clip_scale`` says how its ΔW was scaled, and a restart decodes it again with the protocol's
decoder. Row ``tensor_file`` is ``<batch file>#<i>``: one file, hence one fsync, per group commit.

Durability rules: a tensor file is written to a temp name, fsynced, renamed, and its folder fsynced
*before* the SQLite transaction that references it commits; an update is acknowledged only after that
commit. A version's state files are written the same way into ``states/v<version>`` before the transaction
that inserts the version row and marks its updates aggregated (one transaction: an update is never
aggregated twice). On open, anything no committed row needs is removed: temp files, tensor files of
uncommitted inserts or of already aggregated updates, state folders newer than the last committed version.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sqlite3
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors import safe_open

from fedhft.atomic import fsync_dir
from fedhft.broker_server.aggregation import ClusterState
from fedhft.broker_server.key_rotation import load_chain, load_server_key
from fedhft.broker_server.state_dir import (
    DB_NAME,
    MEMBERSHIPS_FILE,
    STATES_DIR,
    TENSOR_SUFFIX,
    UPDATES_DIR,
    StateError,
    StorageFull,
    lock_state_dir,
    unlock_state_dir,
)
from fedhft.broker_server.state_files import (
    head_to_blob,
    safetensors_bytes_chunks,
    split_ref,
    state_from_bytes,
    state_to_bytes,
    write_file_durably,
)
from fedhft.broker_server.state_schema import (
    CLIENTS_QUERY,
    SCHEMA_VERSION,
    ClientRegistration,
    ClientRow,
    StagedUpdate,
    StoredUpdate,
    VersionRecord,
    check_meta,
    client_from_row,
    client_params,
    first_meta,
    memberships_from_json,
    open_database,
)
from fedhft.protocol import KeyLink


def _is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(exc, sqlite3.Error) and "full" in str(exc).lower()


class StateStore:
    """The server's durable state; one instance per process holds ``DIR/lock`` until :meth:`close`."""

    def __init__(self, directory: str | os.PathLike[str], task: str, spec_fingerprint: str) -> None:
        self.dir = Path(directory)
        self.key_dir = self.dir
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / UPDATES_DIR).mkdir(exist_ok=True)
            (self.dir / STATES_DIR).mkdir(exist_ok=True)
        except OSError as exc:
            raise StateError(f"state dir {self.dir}: cannot create it ({exc.strerror or exc})") from exc
        self._lock_fd = self._acquire_lock()
        try:
            self.db = open_database(self.dir / DB_NAME)
            self._check_meta(task, spec_fingerprint)
            self.recover()
        except sqlite3.Error as exc:
            self._release_lock()
            raise StateError(f"state dir {self.dir}: database error ({exc})") from exc
        except BaseException:
            self._release_lock()
            raise

    # ---- lock ---------------------------------------------------------------------------------------
    def _acquire_lock(self) -> int:
        return lock_state_dir(self.dir)

    def _release_lock(self) -> None:
        if self._lock_fd >= 0:
            unlock_state_dir(self._lock_fd)
            self._lock_fd = -1

    def close(self) -> None:
        """Close the database and release the lock (idempotent)."""
        with contextlib.suppress(sqlite3.Error, AttributeError):
            self.db.close()
        self._release_lock()

    def ping(self) -> None:
        """Nothing to check: a file does not drop its connection."""

    # ---- meta ---------------------------------------------------------------------------------------
    def _check_meta(self, task: str, fingerprint: str) -> None:
        meta = self.meta()
        if not meta:
            with self.transaction():
                self.db.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", first_meta(task, fingerprint))
            return
        check_meta(meta, f"state dir {self.dir}", task, fingerprint, SCHEMA_VERSION)

    def meta(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT key, value FROM meta").fetchall())

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT; ROLLBACK on any exception (re-raised; disk full -> StorageFull)."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise self._storage_error(exc, "begin a transaction") from exc
        try:
            yield self.db
            self.db.execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("ROLLBACK")
            if isinstance(exc, (OSError, sqlite3.Error)):
                raise self._storage_error(exc, "commit") from exc
            raise

    def _storage_error(self, exc: BaseException, what: str) -> StateError:
        if _is_disk_full(exc):
            return StorageFull(f"state dir {self.dir}: disk full, could not {what} ({exc}); nothing was stored")
        return StateError(f"state dir {self.dir}: could not {what} ({exc})")

    # ---- signing key ----------------------------------------------------------------------------------
    def signing_key(self) -> Ed25519PrivateKey:
        """The server's Ed25519 key: loaded from DIR/server_key.pem, generated (with .pub) on first start
        (an interrupted `fedhft server rotate-key` is completed first; see key_rotation.py)."""
        return load_server_key(self.dir)

    def key_chain(self, key: Ed25519PrivateKey) -> tuple[KeyLink, ...]:
        """The key chain of DIR/server_keys.json ending with ``key`` (created on first start)."""
        return load_chain(self.dir, key)

    # ---- clients ----------------------------------------------------------------------------------------
    def load_clients(self) -> dict[str, ClientRow]:
        rows = self.db.execute(CLIENTS_QUERY).fetchall()
        return {r[0]: client_from_row(r) for r in rows}

    def upsert_client(self, client_id: str, profile: str, manifest_sha256: str, plan: Mapping[str, Any]) -> None:
        """Register a client or replace its profile/manifest/plan (its seq, membership and head stay)."""
        self.upsert_clients([ClientRegistration(client_id, profile, manifest_sha256, plan)])

    def upsert_clients(self, clients: Sequence[ClientRegistration]) -> None:
        """:meth:`upsert_client` for a batch of hellos in ONE transaction (one commit, one fsync)."""
        rows = client_params(clients, time.time())
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO clients (client_id, profile, manifest_sha256, plan_json, registered_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(client_id) DO UPDATE SET profile=excluded.profile, "
                "manifest_sha256=excluded.manifest_sha256, plan_json=excluded.plan_json, "
                "updated_at=excluded.updated_at",
                rows,
            )

    # ---- updates ----------------------------------------------------------------------------------------
    def update_status(self, client_id: str, seq: int) -> str | None:
        row = self.db.execute("SELECT status FROM updates WHERE client_id = ? AND seq = ?", (client_id, seq)).fetchone()
        return None if row is None else str(row[0])

    def commit_updates(
        self,
        accepted: Sequence[StagedUpdate],
        heads: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    ) -> list[StoredUpdate]:
        """Store a batch durably (group commit): ONE tensor file for the batch (fsynced, renamed, folder
        fsynced), then one transaction. Each row references ``<file>#<index>``.

        Raises StorageFull / StateError with nothing stored: a written file is removed again.
        """
        folder = self.dir / UPDATES_DIR
        name = f"batch-{uuid.uuid4().hex}{TENSOR_SUFFIX}"
        path = folder / name
        written = False
        try:
            if accepted:
                data = safetensors_bytes_chunks(
                    [update.payload for update in accepted], {"format": "fedhft-update-payloads-1"}
                )
                written = True
                write_file_durably(path, data)
            stored: list[StoredUpdate] = []
            with self.transaction() as db:
                for i, update in enumerate(accepted):
                    ref = f"{name}#{i}"
                    cur = db.execute(
                        "INSERT INTO updates (client_id, seq, base_version, num_samples, loss, received_at, "
                        "tensor_file, status, clip_scale) VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', ?)",
                        (
                            update.client_id,
                            update.seq,
                            update.base_version,
                            update.num_samples,
                            update.loss,
                            update.received_at,
                            ref,
                            update.clip_scale,
                        ),
                    )
                    db.execute(
                        "UPDATE clients SET last_seq = MAX(last_seq, ?) WHERE client_id = ?",
                        (update.seq, update.client_id),
                    )
                    stored.append(
                        StoredUpdate(
                            id=int(cur.lastrowid or 0),
                            client_id=update.client_id,
                            seq=update.seq,
                            base_version=update.base_version,
                            num_samples=update.num_samples,
                            loss=update.loss,
                            received_at=update.received_at,
                            tensor_file=ref,
                            clip_scale=update.clip_scale,
                        )
                    )
                for client_id, head in (heads or {}).items():
                    db.execute("UPDATE clients SET head = ? WHERE client_id = ?", (head_to_blob(head), client_id))
            return stored
        except BaseException as exc:
            if written:
                with contextlib.suppress(OSError):
                    path.unlink()
            if isinstance(exc, (OSError, sqlite3.Error)):
                raise self._storage_error(exc, "store updates") from exc
            raise

    def load_pending(self) -> list[StoredUpdate]:
        rows = self.db.execute(
            "SELECT id, client_id, seq, base_version, num_samples, loss, received_at, tensor_file, clip_scale "
            "FROM updates WHERE status = 'pending' ORDER BY id"
        ).fetchall()
        return [StoredUpdate(*r) for r in rows]

    def load_payload(self, update: StoredUpdate) -> bytes:
        """The stored payload of one update, read without loading the rest of its batch file."""
        if update.tensor_file is None:
            raise StateError(f"update {update.client_id}/{update.seq} has no tensor file")
        name, index = split_ref(update.tensor_file)
        path = self.dir / UPDATES_DIR / name
        try:
            with safe_open(str(path), framework="numpy") as fh:
                return fh.get_tensor(str(index)).tobytes()
        except (OSError, safetensors.SafetensorError) as exc:
            raise StateError(f"{path}: cannot read stored update ({exc})") from exc

    def mark_rejected(self, ids: Sequence[int], reason: str) -> None:
        """Move pending updates to rejected (e.g. too stale when their turn came) and drop their files."""
        if not ids:
            return
        files = self._files_of(ids)
        with self.transaction() as db:
            db.executemany(
                "UPDATE updates SET status = 'rejected', reason = ? WHERE id = ? AND status = 'pending'",
                [(reason, i) for i in ids],
            )
        self._remove_update_files(files)

    def _files_of(self, ids: Sequence[int]) -> set[str]:
        out = set()
        for i in ids:
            row = self.db.execute("SELECT tensor_file FROM updates WHERE id = ?", (i,)).fetchone()
            if row and row[0]:
                out.add(split_ref(str(row[0]))[0])
        return out

    def _pending_files(self) -> set[str]:
        rows = self.db.execute("SELECT tensor_file FROM updates WHERE status = 'pending'").fetchall()
        return {split_ref(str(r[0]))[0] for r in rows if r[0]}

    def _remove_update_files(self, names: set[str]) -> None:
        """Delete batch files no pending update references any more."""
        for name in names - self._pending_files():
            with contextlib.suppress(OSError):
                (self.dir / UPDATES_DIR / name).unlink()

    # ---- versions -----------------------------------------------------------------------------------------
    def latest_version(self) -> VersionRecord | None:
        row = self.db.execute(
            "SELECT version, created_at, state_dir, state_files, num_updates, clusters FROM versions "
            "ORDER BY version DESC LIMIT 1"
        ).fetchone()
        if row is None:
            return None
        return VersionRecord(row[0], row[1], row[2], json.loads(row[3]), row[4], row[5])

    def versions(self) -> list[VersionRecord]:
        rows = self.db.execute(
            "SELECT version, created_at, state_dir, state_files, num_updates, clusters FROM versions ORDER BY version"
        ).fetchall()
        return [VersionRecord(r[0], r[1], r[2], json.loads(r[3]), r[4], r[5]) for r in rows]

    def load_states(self, record: VersionRecord) -> list[ClusterState]:
        folder = self.dir / STATES_DIR / record.state_dir
        try:
            return [state_from_bytes((folder / name).read_bytes()) for name in record.state_files]
        except OSError as exc:
            raise StateError(f"{folder}: cannot read the state of version {record.version} ({exc})") from exc

    def load_memberships(self, record: VersionRecord) -> dict[str, list[float]] | None:
        """The memberships version ``record``'s models were built with; None when its folder has none (pruned,
        or written before they were kept)."""
        path = self.dir / STATES_DIR / record.state_dir / MEMBERSHIPS_FILE
        try:
            text = path.read_text()
        except OSError:
            return None
        return memberships_from_json(text)

    def commit_version(
        self,
        version: int,
        states: Sequence[ClusterState],
        aggregated_ids: Sequence[int],
        memberships: Mapping[str, Sequence[float]],
        meta: Mapping[str, str],
        dropped: Mapping[int, str] | None = None,
        keep_versions: int = 2,
    ) -> VersionRecord:
        """Write the new cluster states, then in ONE transaction: insert the version, mark its updates
        aggregated (and ``dropped`` ones rejected), store memberships and meta. Then prune old files."""
        latest = self.latest_version()
        if latest is not None and version <= latest.version:
            raise StateError(f"version {version} is not newer than the committed version {latest.version}")
        state_dir = f"v{version:08d}"
        root = self.dir / STATES_DIR
        final = root / state_dir
        tmp = root / f".{state_dir}.{uuid.uuid4().hex[:8]}.tmp"
        files = [f"cluster-{c}{TENSOR_SUFFIX}" for c in range(len(states))]
        try:
            tmp.mkdir()
            for name, state in zip(files, states, strict=True):
                write_file_durably(tmp / name, state_to_bytes(state), sync_dir=False)
            members = {cid: [float(x) for x in p] for cid, p in memberships.items()}
            write_file_durably(tmp / MEMBERSHIPS_FILE, json.dumps(members).encode(), sync_dir=False)
            fsync_dir(tmp)
            if final.exists():  # left by a crash before its commit: it was never a committed version
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(root)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise self._storage_error(exc, f"write the state of version {version}") from exc
        stale_files = self._files_of(list(aggregated_ids) + list(dropped or {}))
        record = VersionRecord(version, time.time(), state_dir, files, len(aggregated_ids), len(states))
        try:
            with self.transaction() as db:
                db.execute(
                    "INSERT INTO versions (version, created_at, state_dir, state_files, num_updates, clusters) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (version, record.created_at, state_dir, json.dumps(files), len(aggregated_ids), len(states)),
                )
                db.executemany(
                    "UPDATE updates SET status = 'aggregated', aggregated_version = ? WHERE id = ? "
                    "AND status = 'pending'",
                    [(version, i) for i in aggregated_ids],
                )
                db.executemany(
                    "UPDATE updates SET status = 'rejected', reason = ? WHERE id = ? AND status = 'pending'",
                    [(reason, i) for i, reason in (dropped or {}).items()],
                )
                db.executemany(
                    "UPDATE clients SET membership_json = ? WHERE client_id = ?",
                    [(json.dumps([float(x) for x in p]), cid) for cid, p in memberships.items()],
                )
                for key, value in meta.items():
                    db.execute(
                        "INSERT INTO meta (key, value) VALUES (?, ?) "
                        "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                        (key, value),
                    )
        except BaseException:
            shutil.rmtree(final, ignore_errors=True)
            raise
        self._remove_update_files(stale_files)
        self.prune_states(keep_versions)
        return record

    def prune_states(self, keep_versions: int) -> None:
        """Remove state folders of all but the newest ``keep_versions`` committed versions."""
        keep = {v.state_dir for v in self.versions()[-max(1, keep_versions) :]}
        for path in (self.dir / STATES_DIR).iterdir():
            if path.name.startswith("v") and path.name not in keep and self._committed_dir(path.name):
                shutil.rmtree(path, ignore_errors=True)

    def _committed_dir(self, name: str) -> bool:
        row = self.db.execute("SELECT 1 FROM versions WHERE state_dir = ?", (name,)).fetchone()
        return row is not None

    # ---- recovery ---------------------------------------------------------------------------------------------
    def recover(self) -> dict[str, int]:
        """Remove everything no committed row needs; return counts of what was removed."""
        removed = {"temp_files": 0, "orphan_updates": 0, "orphan_states": 0}
        needed = self._pending_files()
        for path in (self.dir / UPDATES_DIR).iterdir():
            if path.name.endswith(".tmp"):
                removed["temp_files"] += 1
                path.unlink(missing_ok=True)
            elif path.name not in needed:
                removed["orphan_updates"] += 1
                path.unlink(missing_ok=True)
        committed = {r[0] for r in self.db.execute("SELECT state_dir FROM versions").fetchall()}
        for path in (self.dir / STATES_DIR).iterdir():
            if path.name not in committed:
                removed["orphan_states" if path.name.startswith("v") else "temp_files"] += 1
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        for path in self.dir.glob(".*.tmp"):
            removed["temp_files"] += 1
            path.unlink(missing_ok=True)
        return removed
