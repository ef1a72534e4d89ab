"""What the server needs of its durable state, and ``open_state`` choosing where it lives.

Two stores satisfy :class:`StateBackend`: the default SQLite state directory (state_store.py) and a PostgreSQL
database (state_pg.py, for ``--state postgresql://...``). Both acknowledge nothing before its transaction
committed, mark a version's updates aggregated in the transaction that inserts the version, and refuse a
second server on the same state. The signing key stays a local file in both (``key_dir``): the directory
itself, or ``--key-dir`` beside a database.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedhft.broker_server.aggregation import ClusterState
from fedhft.broker_server.state_dir import StateError, is_postgres
from fedhft.broker_server.state_schema import ClientRegistration, ClientRow, StagedUpdate, StoredUpdate, VersionRecord
from fedhft.protocol import KeyLink


@runtime_checkable
class StateBackend(Protocol):
    """The server's durable state: clients, updates, versions, the signing key."""

    key_dir: Path  # where server_key.pem / server_key.pub / server_keys.json live

    def close(self) -> None: ...

    def ping(self) -> None:
        """Called while idle: notice a lost database connection (and reconnect) before the next update needs it."""

    def meta(self) -> dict[str, str]: ...

    def signing_key(self) -> Ed25519PrivateKey: ...

    def key_chain(self, key: Ed25519PrivateKey) -> tuple[KeyLink, ...]: ...

    def load_clients(self) -> dict[str, ClientRow]: ...

    def upsert_client(self, client_id: str, profile: str, manifest_sha256: str, plan: Mapping[str, Any]) -> None: ...

    def upsert_clients(self, clients: Sequence[ClientRegistration]) -> None:
        """Register a batch of clients (or replace their profile/manifest/plan) in one transaction."""

    def update_status(self, client_id: str, seq: int) -> str | None: ...

    def commit_updates(
        self,
        accepted: Sequence[StagedUpdate],
        heads: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    ) -> list[StoredUpdate]: ...

    def load_pending(self) -> list[StoredUpdate]: ...

    def load_payload(self, update: StoredUpdate) -> bytes: ...

    def mark_rejected(self, ids: Sequence[int], reason: str) -> None: ...

    def latest_version(self) -> VersionRecord | None: ...

    def versions(self) -> list[VersionRecord]: ...

    def load_states(self, record: VersionRecord) -> list[ClusterState]: ...

    def load_memberships(self, record: VersionRecord) -> dict[str, list[float]] | None: ...

    def commit_version(
        self,
        version: int,
        states: Sequence[ClusterState],
        aggregated_ids: Sequence[int],
        memberships: Mapping[str, Sequence[float]],
        meta: Mapping[str, str],
        dropped: Mapping[int, str] | None = None,
        keep_versions: int = 2,
    ) -> VersionRecord: ...


def open_state(
    spec: str | os.PathLike[str],
    task: str,
    spec_fingerprint: str,
    key_dir: str | os.PathLike[str] | None = None,
    standby: threading.Event | None = None,
    role: str = "all",
    reconnect_timeout: float = 60.0,
) -> StateBackend:
    """The state named by ``--state``: a PostgreSQL database for ``postgresql://...`` (its signing key in
    ``key_dir``, required), else the SQLite state directory (which holds its own key; ``key_dir`` must be unset).
    ``standby`` (the server's stop event; PostgreSQL only) waits for another server's lock instead of refusing.
    ``role`` (roles.py; not "all": PostgreSQL only): "ingest" shares the database without lock or key.
    ``reconnect_timeout``: seconds a PostgreSQL store retries a lost connection before it gives up."""
    if is_postgres(spec):
        if key_dir is None and role != "ingest":
            raise StateError("--state postgresql://... needs --key-dir DIR: the signing key stays a local file")
        from fedhft.broker_server.state_pg import PgStateStore  # psycopg is loaded only for PostgreSQL

        keys = Path(key_dir) if role != "ingest" and key_dir else None
        return PgStateStore(str(spec), task, spec_fingerprint, keys, standby, role, reconnect_timeout)
    if role != "all":
        raise StateError(f"--role {role} needs --state postgresql://...: a SQLite state directory is single-process")
    if standby is not None:
        raise StateError("--standby needs --state postgresql://...: a state directory has no standby")
    if key_dir is not None and Path(key_dir) != Path(spec):
        raise StateError("--key-dir is for --state postgresql://...; a state directory keeps its key inside")
    from fedhft.broker_server.state_store import StateStore

    return StateStore(spec, task, spec_fingerprint)
