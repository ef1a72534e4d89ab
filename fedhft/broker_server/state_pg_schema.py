"""The PostgreSQL side of the server's state: its tables as numbered migrations, applied by the server.

``schema_migrations`` records each migration applied (one transaction per migration, the row inserted in it),
so a database is brought forward from whatever version it is at; one newer than this code knows is refused.
Add a schema change as the next entry of MIGRATIONS; never edit an applied one.

Tables mirror the SQLite ones (state_schema.py), with the files of a state directory as rows: an update's
payload as received (``updates.payload``, bytea, cleared once the update is aggregated or rejected), a
version's cluster states (``version_states``, pruned to the newest versions kept) and memberships, and the
public halves of the server's key chain (``server_keys``; the private key stays a local file).
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

from fedhft.broker_server.state_dir import StateError


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    sql: str


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "initial tables: meta, clients, updates (payload bytea), versions, version_states, server_keys",
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE clients (
            client_id TEXT PRIMARY KEY,
            profile TEXT NOT NULL,
            manifest_sha256 TEXT NOT NULL,
            plan_json TEXT NOT NULL,
            last_seq BIGINT NOT NULL DEFAULT -1,
            membership_json TEXT,
            head BYTEA,
            registered_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL
        );
        CREATE TABLE updates (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            client_id TEXT NOT NULL,
            seq BIGINT NOT NULL,
            base_version BIGINT NOT NULL,
            num_samples BIGINT NOT NULL,
            loss DOUBLE PRECISION NOT NULL,
            received_at DOUBLE PRECISION NOT NULL,
            payload BYTEA,
            status TEXT NOT NULL CHECK (status IN ('pending', 'aggregated', 'rejected')),
            reason TEXT NOT NULL DEFAULT '',
            clip_scale DOUBLE PRECISION NOT NULL DEFAULT 1.0,
            aggregated_version BIGINT,
            UNIQUE (client_id, seq)
        );
        ALTER TABLE updates ALTER COLUMN payload SET STORAGE EXTERNAL;  -- deflated already: no pglz attempt
        CREATE INDEX updates_pending ON updates (id) WHERE status = 'pending';
        CREATE TABLE versions (
            version BIGINT PRIMARY KEY,
            created_at DOUBLE PRECISION NOT NULL,
            state_dir TEXT NOT NULL,
            state_files TEXT NOT NULL,
            num_updates BIGINT NOT NULL,
            clusters INTEGER NOT NULL,
            memberships_json TEXT
        );
        CREATE TABLE version_states (
            version BIGINT NOT NULL REFERENCES versions (version),
            cluster INTEGER NOT NULL,
            state BYTEA NOT NULL,
            PRIMARY KEY (version, cluster)
        );
        ALTER TABLE version_states ALTER COLUMN state SET STORAGE EXTERNAL;  -- float64 noise compresses little
        CREATE TABLE server_keys (
            idx INTEGER PRIMARY KEY,
            key_id TEXT NOT NULL,
            public_key TEXT NOT NULL,
            link_json TEXT NOT NULL
        );
        """,
    ),
)

LATEST = MIGRATIONS[-1].version


def migrate(conn: psycopg.Connection, where: str) -> list[int]:
    """Apply the migrations ``conn``'s database lacks (call holding the server's lock); the versions applied."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
        "applied_at TIMESTAMPTZ NOT NULL DEFAULT now(), description TEXT NOT NULL)"
    )
    applied = {int(r[0]) for r in conn.execute("SELECT version FROM schema_migrations").fetchall()}
    newer = sorted(v for v in applied if v > LATEST)
    if newer:
        raise StateError(f"{where}: schema version {newer[-1]} is newer than this fedhft ({LATEST}); upgrade fedhft")
    done = []
    for m in MIGRATIONS:
        if m.version in applied:
            continue
        with conn.transaction():
            conn.execute(m.sql)  # type: ignore[arg-type]  # our own constant DDL
            conn.execute(
                "INSERT INTO schema_migrations (version, description) VALUES (%s, %s)", (m.version, m.description)
            )
        done.append(m.version)
    return done
