"""The SQLite side of the server's state dir: its tables, the meta row checked on open, the rows read back.

``meta`` holds the schema version, the task and the global adapter's fingerprint (a state dir serves one
task and one manifest) plus the federation's counters; a schema change bumps SCHEMA_VERSION.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedhft.broker_server.state_dir import StateError
from fedhft.broker_server.state_files import head_from_blob

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS clients (
    client_id TEXT PRIMARY KEY,
    profile TEXT NOT NULL,
    manifest_sha256 TEXT NOT NULL,
    plan_json TEXT NOT NULL,
    last_seq INTEGER NOT NULL DEFAULT -1,
    membership_json TEXT,
    head BLOB,
    registered_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS updates (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    client_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    base_version INTEGER NOT NULL,
    num_samples INTEGER NOT NULL,
    loss REAL NOT NULL,
    received_at REAL NOT NULL,
    tensor_file TEXT,
    status TEXT NOT NULL CHECK (status IN ('pending', 'aggregated', 'rejected')),  -- rejected: dropped at a flush
    reason TEXT NOT NULL DEFAULT '',
    clip_scale REAL NOT NULL DEFAULT 1.0,
    aggregated_version INTEGER,
    UNIQUE (client_id, seq)
);
CREATE INDEX IF NOT EXISTS updates_by_status ON updates (status);
CREATE TABLE IF NOT EXISTS versions (
    version INTEGER PRIMARY KEY,
    created_at REAL NOT NULL,
    state_dir TEXT NOT NULL,
    state_files TEXT NOT NULL,
    num_updates INTEGER NOT NULL,
    clusters INTEGER NOT NULL
);
"""


@dataclass
class StagedUpdate:
    """An accepted update about to be stored: the payload as received, and its decoded (clipped) tensors.

    The payload is what is stored; ``clip_scale`` says how its ΔW is scaled when it is decoded again.
    """

    client_id: str
    seq: int
    base_version: int
    num_samples: int
    loss: float
    received_at: float
    clip_scale: float
    payload: bytes
    tensors: dict[str, np.ndarray]
    virtual_time: float = 0.0  # from the update's metrics; recovered from the payload after a restart


@dataclass(frozen=True)
class ClientRegistration:
    """What a hello stores of a client: its profile, manifest and plan."""

    client_id: str
    profile: str
    manifest_sha256: str
    plan: Mapping[str, Any]


@dataclass
class ClientRow:
    """A registered client as stored."""

    client_id: str
    profile: str
    manifest_sha256: str
    plan: dict[str, Any]
    last_seq: int
    membership: list[float] | None
    head: dict[str, np.ndarray] | None


CLIENTS_QUERY = "SELECT client_id, profile, manifest_sha256, plan_json, last_seq, membership_json, head FROM clients"


def client_params(clients: Sequence[ClientRegistration], now: float) -> list[tuple[Any, ...]]:
    """The INSERT parameters of clients (client_id, profile, manifest_sha256, plan_json, registered_at, updated_at)."""
    return [(c.client_id, c.profile, c.manifest_sha256, json.dumps(c.plan, sort_keys=True), now, now) for c in clients]


def client_from_row(r: Sequence[Any]) -> ClientRow:
    """A ``CLIENTS_QUERY`` row (either backend) as a :class:`ClientRow`."""
    return ClientRow(
        client_id=r[0],
        profile=r[1],
        manifest_sha256=r[2],
        plan=json.loads(r[3]),
        last_seq=int(r[4]),
        membership=json.loads(r[5]) if r[5] else None,
        head=head_from_blob(r[6]),
    )


def memberships_from_json(text: str | bytes) -> dict[str, list[float]] | None:
    """A version's stored memberships (client -> weights), or None when the JSON is not that shape."""
    try:
        return {str(k): [float(x) for x in v] for k, v in json.loads(text).items()}
    except (ValueError, TypeError, AttributeError):
        return None


@dataclass
class StoredUpdate:
    """An update row with its tensor file (status pending unless said otherwise)."""

    id: int
    client_id: str
    seq: int
    base_version: int
    num_samples: int
    loss: float
    received_at: float
    tensor_file: str | None
    clip_scale: float


@dataclass
class VersionRecord:
    """One committed model version."""

    version: int
    created_at: float
    state_dir: str
    state_files: list[str]
    num_updates: int
    clusters: int


def open_database(path: Path) -> sqlite3.Connection:
    """Connect in autocommit mode (transactions are explicit), WAL, synchronous=FULL; create missing tables."""
    db = sqlite3.connect(path, isolation_level=None, timeout=30.0)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(SCHEMA)
    return db


def first_meta(task: str, fingerprint: str) -> list[tuple[str, str]]:
    """The meta rows of a new state dir."""
    return [
        ("schema_version", str(SCHEMA_VERSION)),
        ("task", task),
        ("spec_fingerprint", fingerprint),
        ("created_at", repr(time.time())),
        ("aggregations", "0"),
        ("last_cluster_round", "-1"),
    ]


def check_meta(meta: Mapping[str, str], where: str, task: str, fingerprint: str, schema: int | None) -> None:
    """StateError unless the state (``where``, e.g. "state dir DIR") has schema ``schema`` (None: not kept in
    meta) and was made for this task and global adapter."""
    if schema is not None and meta.get("schema_version") != str(schema):
        raise StateError(f"{where}: schema {meta.get('schema_version')!r}, expected {schema}")
    if meta.get("task") != task:
        raise StateError(f"{where} belongs to task {meta.get('task')!r}, not {task!r}")
    if meta.get("spec_fingerprint") != fingerprint:
        raise StateError(f"{where} was created for another global adapter (manifest); use a fresh --state")
