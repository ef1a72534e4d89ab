"""Server state in PostgreSQL (``--state postgresql://...``): the same guarantees as the SQLite state dir.

- An update is acknowledged only after the transaction storing it (row + payload bytea) committed, with
  ``synchronous_commit = on`` for this session (the commit waits for the WAL flush).
- A version's cluster states, the updates it aggregated (marked in the same transaction) and the memberships
  commit together: an update is never aggregated twice.
- One server per database: the store holds a session advisory lock (pg_try_advisory_lock) on its one
  connection; a second server is refused naming the holder, and a version commit checks, inside its
  transaction, that this connection still holds the lock.
- A lost connection (a database restart, a failover, a network cut) is ridden through (:meth:`PgStateStore._run`,
  the one reconnect policy): reconnect with backoff (:func:`reconnect_delay`) for up to ``reconnect_timeout``
  seconds, end the old backend if it still runs, take the lock again (stepping down, SteppedDown, when another
  server took it or committed a version meanwhile), LISTEN again; then a read is run again, and a transaction
  whose COMMIT may have happened is looked up by its transaction id (pg_xact_status): done when it committed,
  run again when it did not, StateError (nothing acknowledged; the device sends again) when that is unknown.
  Past the timeout the store raises StateLost and the server stops. An idle server calls :meth:`PgStateStore.ping`
  (a round trip at most every PING_SECONDS), so it notices a loss before an update needs the connection.
- The schema is created and migrated by the server (state_pg_schema.py, table ``schema_migrations``).

A standby (``--standby``) waits for the lock instead of being refused, then restores from what committed and
serves: a hot spare that takes over within about a second of the holder's death (its session, and so its lock,
ends when its connection does: at once for a killed process, after TCP keepalive for a lost machine).

Ingest processes (``--role ingest``, roles.py) open the store shared (``role="ingest"``): without the lock, any
number of them beside the one lock holder, the aggregator (a ``--role all`` server and ingest processes refuse
each other: it would not see the updates they store until its restart). They store clients and updates only;
two of them storing the same (client, seq) is settled by the UNIQUE key (the second gets id 0 back: a
duplicate), a registration is announced to the aggregator by NOTIFY on CLIENTS_CHANNEL, and migrations and the
first meta rows are written under SETUP_LOCK_KEY, so processes starting together on a fresh database do not race.

The signing key stays a local file in ``--key-dir`` (locked as a state dir is, so `fedhft server rotate-key
--state KEYDIR` refuses while the server runs); the public halves of its chain are kept in ``server_keys``.
One connection, used by the server's main thread only (as the SQLite store is).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedhft.broker_server.aggregation import ClusterState
from fedhft.broker_server.key_rotation import KeyRotationError, load_chain, load_server_key
from fedhft.broker_server.state_dir import (
    TENSOR_SUFFIX,
    StandbyStopped,
    StateError,
    StateLocked,
    StateLost,
    SteppedDown,
    StorageFull,
    lock_state_dir,
    state_label,
    unlock_state_dir,
)
from fedhft.broker_server.state_files import head_to_blob, state_from_bytes, state_to_bytes
from fedhft.broker_server.state_pg_schema import migrate
from fedhft.broker_server.state_schema import (
    CLIENTS_QUERY,
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
)
from fedhft.logs import event
from fedhft.protocol import KeyLink

log = logging.getLogger("fedhft.server")

STANDBY_POLL = 0.25  # seconds between a standby's tries for the lock
PING_SECONDS = 1.0  # an idle server looks at its connection this often (ping)
RECONNECT_TIMEOUT = 60.0  # seconds a lost connection is retried before the server stops (--db-reconnect-timeout)
T = TypeVar("T")
LOCK_KEY = 0x6665_6468_6674_0001  # "fedhft" + 1: the one-server-per-database advisory lock (per database)
SETUP_LOCK_KEY = LOCK_KEY + 1  # held while migrating and writing the first meta rows (any process)
CLIENTS_CHANNEL = "fedhft_clients"  # NOTIFY on registering or changing a client; the payload is its id
_LOCK_HI, _LOCK_LO = LOCK_KEY >> 32, LOCK_KEY & 0xFFFF_FFFF  # how pg_locks shows a bigint key
INGEST_EXIT_GRACE_S = 3.0  # seconds a closed ingest connection may still show in pg_stat_activity
_HELD = (
    "SELECT l.pid, a.application_name FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid "
    "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 AND l.classid::bigint = %s "
    "AND l.objid::bigint = %s AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)
_META_INSERT = "INSERT INTO meta (key, value) VALUES (%s, %s)"
_VERSION_COLUMNS = "version, created_at, state_dir, state_files, num_updates, clusters"
_REGISTRATIONS = (  # CLIENTS_QUERY's columns without the membership and head an ingest process does not use
    "SELECT client_id, profile, manifest_sha256, plan_json, last_seq, NULL, NULL FROM clients WHERE client_id = ANY(%s)"
)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def reconnect_delay(attempt: int) -> float:
    """Seconds before reconnect try ``attempt`` (0 first): 1, 2, 4, then 5 each. The first waits a second so a
    standby (polling every STANDBY_POLL) takes a freed lock before its old holder comes back."""
    return min(2.0**attempt, 5.0)


class PgStateStore:
    """The server's durable state in one PostgreSQL database; holds its advisory lock until :meth:`close`."""

    def __init__(
        self,
        url: str,
        task: str,
        spec_fingerprint: str,
        key_dir: Path | None,
        standby: threading.Event | None = None,
        role: str = "all",
        reconnect_timeout: float = RECONNECT_TIMEOUT,
    ) -> None:
        """Connect and take the lock: refused when another server holds it, or, with ``standby`` (the
        server's stop event), waited for until the holder is gone (StandbyStopped when ``standby`` is set first).
        Then the key dir's lock (a standby on the same machine shares the leader's key dir). ``role`` (roles.py)
        "ingest": neither lock, and no key. Once open, a lost connection is retried for ``reconnect_timeout``
        seconds (0: stop at once)."""
        self.url = url
        self.reconnect_timeout = reconnect_timeout
        self.address = "?"  # HOST:PORT of the database, once connected
        self._serving = self._locked = self._listening = self._missed = False  # _serving: reconnect when lost
        self._pinged = 0.0
        self._newest = self._committing = 0  # the newest version read or committed here; the one being committed
        self.where = state_label(url)
        exclusive = role != "ingest"
        if exclusive and key_dir is None:
            raise StateError("a PostgreSQL state's lock holder needs its key dir")
        self.role, self.exclusive = role, exclusive
        self.key_dir = Path(key_dir) if key_dir is not None else Path()
        self._key_lock = -1
        self.db: psycopg.Connection | None = None
        try:
            self.db = self._connect()
            if exclusive:
                self._acquire_lock() if standby is None else self._wait_for_lock(standby)
                self._locked = True
                try:
                    self.key_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                except OSError as exc:
                    raise StateError(f"key dir {self.key_dir}: cannot create it ({exc.strerror or exc})") from exc
                self._key_lock = lock_state_dir(self.key_dir)  # rotate-key on it refuses while we run
            self._check_roles()
            self.db.execute("SELECT pg_advisory_lock(%s)", (SETUP_LOCK_KEY,))
            try:
                migrate(self.db, self.where)
                self._check_meta(task, spec_fingerprint)
            finally:
                self.db.execute("SELECT pg_advisory_unlock(%s)", (SETUP_LOCK_KEY,))
            self._serving = True
        except psycopg.Error as exc:
            self.close()
            raise StateError(f"{self.where}: database error ({_first_line(exc)})") from exc
        except BaseException:
            self.close()
            raise

    # ---- connection and lock ----------------------------------------------------------------------------
    def _connect(self, timeout: int = 10) -> psycopg.Connection:
        name = "server" if self.role == "all" else self.role
        self._app = f"fedhft-{name} PID {os.getpid()} on {socket.gethostname()}"[:63]
        try:
            db = psycopg.connect(self.url, autocommit=True, application_name=self._app, connect_timeout=timeout)
        except psycopg.Error as exc:
            raise StateError(f"{self.where}: cannot connect ({_first_line(exc)})") from exc
        self.address, self._pid = f"{db.info.host}:{db.info.port}", db.info.backend_pid
        db.execute("SET synchronous_commit = on")  # a COMMIT returns after its WAL is flushed
        fsync = db.execute("SHOW fsync").fetchone()
        if fsync and fsync[0] != "on":
            event(log, "PostgreSQL runs with fsync off: committed updates may not survive a crash", logging.WARNING)
        return db

    def _try_lock(self) -> bool:
        assert self.db is not None
        row = self.db.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,)).fetchone()
        return bool(row and row[0])

    def _holder(self) -> str:
        assert self.db is not None
        holder = self.db.execute(_HELD, (_LOCK_HI, _LOCK_LO)).fetchone()
        name = (holder[1] or f"backend {holder[0]}") if holder else "unknown"
        return str(name).removeprefix("fedhft-server ")

    def _wait_for_lock(self, stop: threading.Event) -> None:
        """Standby: poll for the lock every STANDBY_POLL seconds until the holder's session ends; a lost
        connection is reconnected meanwhile (a database restart ends the standby's session too)."""
        t0 = time.monotonic()
        self._serving = True  # reconnects (_run)

        def poll() -> bool:
            return self._run("wait for the lock", lambda _db: self._try_lock(), transaction=False)

        if not poll():
            event(log, "standby: waiting for the server holding the database's lock", holder=self._holder())
            while not poll():
                if stop.wait(STANDBY_POLL):
                    raise StandbyStopped(f"{self.where}: the standby was stopped before it took over")
            event(log, "standby: took over the database's lock", waited_s=round(time.monotonic() - t0, 2))

    def _acquire_lock(self) -> None:
        if self._try_lock():
            return
        name = self._holder()
        raise StateLocked(
            f"{self.where} is in use by another fedhft server ({name}); stop it or choose another --state"
        )

    def _check_roles(self) -> None:
        """A ``--role all`` server and ingest processes refuse to share a database: the server would not see
        the updates the ingest processes store (until its restart)."""
        assert self.db is not None
        if self.role == "ingest":
            holder = self.db.execute(_HELD, (_LOCK_HI, _LOCK_LO)).fetchone()
            if holder and str(holder[1] or "").startswith("fedhft-server "):
                raise StateError(
                    f"{self.where} is served by a --role all server ({self._holder()}), which would not see the "
                    "updates an ingest process stores; run it as --role aggregator"
                )
        elif self.role == "all":
            query = (
                "SELECT application_name FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name LIKE 'fedhft-ingest %%' ORDER BY pid LIMIT 3"
            )
            rows = self.db.execute(query).fetchall()
            settle = time.monotonic() + INGEST_EXIT_GRACE_S
            while rows and time.monotonic() < settle:  # a just-closed connection's backend lingers a moment
                time.sleep(0.1)
                rows = self.db.execute(query).fetchall()
            if rows:
                names = ", ".join(str(r[0]).removeprefix("fedhft-") for r in rows)
                raise StateError(
                    f"{self.where} has ingest processes ({names}): a --role all server would not see the updates "
                    "they store; run --role aggregator beside them"
                )

    def holds_lock(self) -> bool:
        """Whether this connection still holds the server's advisory lock."""
        if self.db is None or self.db.closed:
            return False
        rows = self.db.execute(_HELD + " AND l.pid = pg_backend_pid()", (_LOCK_HI, _LOCK_LO)).fetchall()
        return bool(rows)

    def close(self) -> None:
        """Close the connection (which releases the advisory lock) and the key dir's lock (idempotent)."""
        if self.db is not None:
            with contextlib.suppress(psycopg.Error):
                self.db.close()
            self.db = None
        if self._key_lock >= 0:
            unlock_state_dir(self._key_lock)
            self._key_lock = -1

    def ping(self) -> None:
        """At most every PING_SECONDS: a round trip, so an idle server notices a lost connection (and reconnects,
        or steps down) before an update needs it."""
        now = time.monotonic()
        if now - self._pinged >= PING_SECONDS:
            self._pinged = now
            self._query("SELECT 1")

    @property
    def _conn(self) -> psycopg.Connection:
        if self.db is None:
            raise StateError(f"{self.where}: the store is closed")
        return self.db

    def _run(self, what: str, work: Callable[[psycopg.Connection], T], transaction: bool = True) -> T:
        """``work`` on the connection, in one transaction unless ``transaction`` is False. psycopg errors become
        StorageFull (disk full) or StateError, nothing committed; a lost connection is reconnected
        (:meth:`_reconnect`, StateLost when that fails), then a read or an uncommitted transaction runs again
        and a transaction that committed (its id looked up: :meth:`_committed`) returns what it returned."""
        while True:
            db, xid, done, result = self._conn, None, False, None
            try:
                if not transaction:
                    return work(db)
                with db.transaction():
                    xid = db.execute("SELECT pg_current_xact_id()::text").fetchone()
                    result, done = work(db), True
                return result  # type: ignore[return-value]
            except psycopg.errors.DiskFull as exc:  # an OperationalError too: first
                why = _first_line(exc)
                raise StorageFull(f"{self.where}: disk full, could not {what} ({why}); nothing was stored") from exc
            except psycopg.OperationalError as exc:
                if not (db.broken or db.closed) or not self._serving:
                    raise StateError(f"{self.where}: could not {what} ({_first_line(exc)})") from exc
                self._reconnect(exc, what)
                if done and xid is not None and self._committed(str(xid[0]), what):
                    return result  # type: ignore[return-value]
            except psycopg.Error as exc:
                raise StateError(f"{self.where}: could not {what} ({_first_line(exc)})") from exc

    def _reconnect(self, exc: BaseException, what: str) -> None:
        """Connect again, retrying with backoff for ``reconnect_timeout`` seconds, then :meth:`_resume`.
        StateLost when the time is up or the server must step down."""
        old_pid, reason, t0 = self._pid, _first_line(exc), time.monotonic()
        with contextlib.suppress(psycopg.Error):
            self._conn.close()
        self.db = None
        lost = f"{self.where}: lost the connection to PostgreSQL {self.address} while trying to {what}"
        if self.reconnect_timeout <= 0:
            raise StateLost(f"{lost} ({reason}); stopping (--db-reconnect-timeout 0)")
        delay = reconnect_delay(0)
        event(log, f"lost connection to PostgreSQL {self.address}: {reason}; reconnecting in {delay:g} s",
              logging.WARNING)  # fmt: skip
        for attempt in itertools.count(1):
            left = t0 + self.reconnect_timeout - time.monotonic()
            if left <= 0:
                raise StateLost(
                    f"{lost} and could not reconnect within {self.reconnect_timeout:g} s ({reason}); stopping "
                    "(--db-reconnect-timeout)"
                )
            time.sleep(min(delay, left))
            try:
                self.db = self._connect(timeout=max(2, int(left - min(delay, left))))
                self._resume(old_pid)
                break
            except (StateError, psycopg.Error) as err:
                reason, delay = _first_line(err.__cause__ or err), reconnect_delay(attempt)
                if self.db is not None:
                    with contextlib.suppress(psycopg.Error):
                        self.db.close()
                    self.db = None
        event(log, f"reconnected to PostgreSQL {self.address}", outage_s=round(time.monotonic() - t0, 2))

    def _resume(self, old_pid: int) -> None:
        """On a new connection: end the old one's backend if it still runs (a network cut: its transaction then
        ends, and its lock is freed), take the lock again, LISTEN again."""
        db = self._conn
        db.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE pid = %s AND application_name = %s",
            (old_pid, self._app),
        )
        if self._locked:
            if not self._try_lock():
                raise SteppedDown(
                    f"{self.where}: another server ({self._holder()}) took the database's lock while this one was "
                    "reconnecting; stepping down"
                )
            newest = self._newest_in(db)
            if newest > max(self._newest, self._committing):
                raise SteppedDown(
                    f"{self.where}: another server committed version {newest} while this one was reconnecting; "
                    "stepping down (a restart restores from it)"
                )
        if self._listening:
            db.execute(f"LISTEN {CLIENTS_CHANNEL}")
            self._missed = True  # notifications sent while disconnected are lost

    def _committed(self, xid: str, what: str) -> bool:
        """Whether the transaction ``xid`` of the lost connection committed; StateError when that is unknown."""
        try:
            status = self._conn.execute("SELECT pg_xact_status(%s::xid8)", (xid,)).fetchone()
        except psycopg.Error:
            status = None
        if status is None or status[0] not in ("committed", "aborted"):
            raise StateError(
                f"{self.where}: the connection was lost while trying to {what}, and whether it committed is "
                "unknown; nothing is acknowledged"
            )
        return bool(status[0] == "committed")

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._run("read", lambda db: db.execute(sql, params).fetchall(), transaction=False)  # type: ignore[arg-type]

    # ---- meta ---------------------------------------------------------------------------------------------
    def _check_meta(self, task: str, fingerprint: str) -> None:
        meta = self.meta()
        if not meta:
            rows = [r for r in first_meta(task, fingerprint) if r[0] != "schema_version"]  # schema_migrations has it
            self._run("initialise the state", lambda db: db.cursor().executemany(_META_INSERT, rows))
            return
        check_meta(meta, self.where, task, fingerprint, None)

    def meta(self) -> dict[str, str]:
        return {str(k): str(v) for k, v in self._query("SELECT key, value FROM meta")}

    # ---- signing key --------------------------------------------------------------------------------------
    def signing_key(self) -> Ed25519PrivateKey:
        """The Ed25519 key of ``--key-dir`` (generated there on first start, as in a state dir)."""
        if not self.exclusive:
            raise StateError(f"{self.where}: an ingest process's store has no signing key")
        return load_server_key(self.key_dir)

    def key_chain(self, key: Ed25519PrivateKey) -> tuple[KeyLink, ...]:
        """The key dir's chain ending with ``key``, its public links copied into ``server_keys``. Refused when
        the database was served with another chain (another --key-dir) or a longer one (an older key dir)."""
        chain = load_chain(self.key_dir, key)
        stored = self._query("SELECT idx, public_key FROM server_keys ORDER BY idx")
        for idx, public in stored:
            if idx >= len(chain) or chain[idx].public_key != public:
                raise KeyRotationError(
                    f"{self.where} was served with another server key chain than --key-dir {self.key_dir} holds "
                    f"(link {idx}); use the key dir it was served with"
                )
        new = [(link.index, link.key_id, link.public_key, json.dumps(asdict(link))) for link in chain[len(stored) :]]
        if new:
            sql = "INSERT INTO server_keys (idx, key_id, public_key, link_json) VALUES (%s, %s, %s, %s)"
            self._run("store the key chain", lambda db: db.cursor().executemany(sql, new))
        return chain

    # ---- clients --------------------------------------------------------------------------------------------
    def load_clients(self, ids: Sequence[str] | None = None) -> dict[str, ClientRow]:
        """Every client, or those of ``ids`` that are registered."""
        rows = (
            self._query(CLIENTS_QUERY)
            if ids is None
            else self._query(f"{CLIENTS_QUERY} WHERE client_id = ANY(%s)", (list(ids),))
        )
        return {r[0]: client_from_row(r) for r in rows}

    def registrations(self, ids: Sequence[str]) -> dict[str, ClientRow]:
        """The registered clients of ``ids`` without their memberships and heads (what validation needs)."""
        return {r[0]: client_from_row(r) for r in self._query(_REGISTRATIONS, (list(ids),))}

    def listen_clients(self) -> None:
        """Receive a notification (:meth:`changed_clients`) whenever a client is registered or changed."""
        self._run("listen for registrations", lambda db: db.execute(f"LISTEN {CLIENTS_CHANNEL}"))
        self._listening = True

    def changed_clients(self, timeout: float) -> set[str]:
        """The clients registered or changed since the last call (after :meth:`listen_clients`); waits up to
        ``timeout`` seconds for the first one. After a reconnect every client counts as changed (the
        notifications sent while disconnected are lost)."""

        def wait(db: psycopg.Connection) -> set[str]:
            first = {n.payload for n in db.notifies(timeout=timeout, stop_after=1)}
            return first | {n.payload for n in db.notifies(timeout=0)}

        changed = self._run("wait for notifications", wait, transaction=False)
        if self._missed:
            self._missed = False
            changed |= {str(r[0]) for r in self._query("SELECT client_id FROM clients")}
        return changed

    def upsert_client(self, client_id: str, profile: str, manifest_sha256: str, plan: Mapping[str, Any]) -> None:
        """Register a client or replace its profile/manifest/plan (its seq, membership and head stay)."""
        self.upsert_clients([ClientRegistration(client_id, profile, manifest_sha256, plan)])

    def upsert_clients(self, clients: Sequence[ClientRegistration]) -> None:
        """:meth:`upsert_client` for a batch of hellos in ONE transaction (one commit)."""
        rows = client_params(clients, time.time())

        def upsert(db: psycopg.Connection) -> None:
            with db.cursor() as cur:
                cur.executemany(
                    "INSERT INTO clients (client_id, profile, manifest_sha256, plan_json, registered_at, updated_at) "
                    "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (client_id) DO UPDATE SET profile = "
                    "excluded.profile, manifest_sha256 = excluded.manifest_sha256, plan_json = excluded.plan_json, "
                    "updated_at = excluded.updated_at",
                    rows,
                )
                cur.executemany(  # sent when this commits
                    "SELECT pg_notify(%s, %s)", [(CLIENTS_CHANNEL, c.client_id) for c in clients]
                )

        self._run("register clients", upsert)

    # ---- updates ----------------------------------------------------------------------------------------------
    def update_status(self, client_id: str, seq: int) -> str | None:
        rows = self._query("SELECT status FROM updates WHERE client_id = %s AND seq = %s", (client_id, seq))
        return str(rows[0][0]) if rows else None

    def commit_updates(
        self,
        accepted: Sequence[StagedUpdate],
        heads: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    ) -> list[StoredUpdate]:
        """Store a batch in ONE transaction (rows with their payloads, seqs, heads); returns once it committed.
        An update whose (client, seq) another ingest process stored first is left alone and comes back with id 0.

        Raises StorageFull / StateError with nothing stored."""
        params = [
            (u.client_id, u.seq, u.base_version, u.num_samples, u.loss, u.received_at, u.payload, u.clip_scale)
            for u in accepted
        ]

        def store(db: psycopg.Connection) -> list[int]:
            ids: list[int] = []
            with db.cursor() as cur:
                if params:
                    cur.executemany(
                        "INSERT INTO updates (client_id, seq, base_version, num_samples, loss, received_at, payload, "
                        "status, clip_scale) VALUES (%s, %s, %s, %s, %s, %s, %b, 'pending', %s) "
                        "ON CONFLICT (client_id, seq) DO NOTHING RETURNING id",
                        params,
                        returning=True,
                    )
                    while True:
                        row = cur.fetchone()
                        ids.append(int(row[0]) if row else 0)
                        if not cur.nextset():
                            break
                    cur.executemany(
                        "UPDATE clients SET last_seq = GREATEST(last_seq, %s) WHERE client_id = %s",
                        [(u.seq, u.client_id) for u in accepted],
                    )
                if heads:
                    cur.executemany(
                        "UPDATE clients SET head = %b WHERE client_id = %s",
                        [(head_to_blob(h), cid) for cid, h in heads.items()],
                    )
            return ids

        ids = self._run("store updates", store)
        return [
            StoredUpdate(
                i, u.client_id, u.seq, u.base_version, u.num_samples, u.loss, u.received_at, None, u.clip_scale
            )
            for i, u in zip(ids, accepted, strict=True)
        ]

    def load_pending(self) -> list[StoredUpdate]:
        rows = self._query(
            "SELECT id, client_id, seq, base_version, num_samples, loss, received_at, NULL, clip_scale "
            "FROM updates WHERE status = 'pending' ORDER BY id"
        )
        return [StoredUpdate(*r) for r in rows]

    def latest_version_number(self) -> int:
        """The newest committed version (0 before the first)."""
        newest = self._run("read", self._newest_in, transaction=False)
        self._newest = max(self._newest, newest)
        return newest

    @staticmethod
    def _newest_in(db: psycopg.Connection) -> int:
        row = db.execute("SELECT COALESCE(MAX(version), 0) FROM versions").fetchone()
        return int(row[0]) if row else 0

    def load_payload(self, update: StoredUpdate) -> bytes:
        """The stored payload of one pending update, exactly as received."""
        rows = self._query("SELECT payload FROM updates WHERE id = %s", (update.id,))
        if not rows or rows[0][0] is None:
            raise StateError(f"{self.where}: update {update.client_id}/{update.seq} has no stored payload")
        return bytes(rows[0][0])

    def mark_rejected(self, ids: Sequence[int], reason: str) -> None:
        """Move pending updates to rejected (e.g. too stale when their turn came) and drop their payloads."""
        if not ids:
            return
        sql = (
            "UPDATE updates SET status = 'rejected', reason = %s, payload = NULL "
            "WHERE id = ANY(%s) AND status = 'pending'"
        )
        self._run("reject updates", lambda db: db.execute(sql, (reason, list(ids))))

    # ---- versions ---------------------------------------------------------------------------------------------
    @staticmethod
    def _record(r: Sequence[Any]) -> VersionRecord:
        return VersionRecord(int(r[0]), float(r[1]), str(r[2]), json.loads(r[3]), int(r[4]), int(r[5]))

    def latest_version(self) -> VersionRecord | None:
        rows = self._query(f"SELECT {_VERSION_COLUMNS} FROM versions ORDER BY version DESC LIMIT 1")
        if rows:
            self._newest = max(self._newest, int(rows[0][0]))
        return self._record(rows[0]) if rows else None

    def versions(self) -> list[VersionRecord]:
        return [self._record(r) for r in self._query(f"SELECT {_VERSION_COLUMNS} FROM versions ORDER BY version")]

    def load_states(self, record: VersionRecord) -> list[ClusterState]:
        rows = self._query("SELECT state FROM version_states WHERE version = %s ORDER BY cluster", (record.version,))
        if len(rows) != record.clusters:
            raise StateError(f"{self.where}: the state of version {record.version} is no longer kept")
        return [state_from_bytes(bytes(r[0])) for r in rows]

    def load_memberships(self, record: VersionRecord) -> dict[str, list[float]] | None:
        """The memberships version ``record``'s models were built with; None once pruned."""
        rows = self._query("SELECT memberships_json FROM versions WHERE version = %s", (record.version,))
        if not rows or rows[0][0] is None:
            return None
        return memberships_from_json(rows[0][0])

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
        """In ONE transaction, after checking the lock is still ours: insert the version with its states and
        memberships, mark its updates aggregated (``dropped`` ones rejected), store memberships and meta. Then
        prune the states of old versions."""
        latest = self.latest_version()
        if latest is not None and version <= latest.version:
            raise StateError(f"version {version} is not newer than the committed version {latest.version}")
        files = [f"cluster-{c}{TENSOR_SUFFIX}" for c in range(len(states))]
        record = VersionRecord(version, time.time(), f"v{version:08d}", files, len(aggregated_ids), len(states))
        members = {cid: [float(x) for x in p] for cid, p in memberships.items()}
        blobs = [state_to_bytes(s) for s in states]

        def insert(db: psycopg.Connection) -> None:
            if not self.holds_lock():
                raise StateLost(f"{self.where}: this server no longer holds the database's lock; not committing")
            newest = self._newest_in(db)
            if newest >= version:  # we hold the lock: another server made it while this one was reconnecting
                raise SteppedDown(f"{self.where}: another server committed version {newest}; stepping down")
            cur = db.cursor()
            cur.execute(
                f"INSERT INTO versions ({_VERSION_COLUMNS}, memberships_json) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (version, record.created_at, record.state_dir, json.dumps(files), record.num_updates, len(states),
                 json.dumps(members)),
            )  # fmt: skip
            cur.executemany(
                "INSERT INTO version_states (version, cluster, state) VALUES (%s, %s, %b)",
                [(version, c, blob) for c, blob in enumerate(blobs)],
            )
            cur.execute(
                "UPDATE updates SET status = 'aggregated', aggregated_version = %s, payload = NULL "
                "WHERE id = ANY(%s) AND status = 'pending'",
                (version, list(aggregated_ids)),
            )
            if dropped:
                cur.executemany(
                    "UPDATE updates SET status = 'rejected', reason = %s, payload = NULL "
                    "WHERE id = %s AND status = 'pending'",
                    [(reason, i) for i, reason in dropped.items()],
                )
            if members:
                cur.executemany(
                    "UPDATE clients SET membership_json = %s WHERE client_id = %s",
                    [(json.dumps(p), cid) for cid, p in members.items()],
                )
            if meta:
                cur.executemany(
                    "INSERT INTO meta (key, value) VALUES (%s, %s) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    list(meta.items()),
                )

        self._committing = version  # a commit lost with the connection may have made it (_resume)
        try:
            self._run(f"commit version {version}", insert)
        finally:
            self._committing = 0
        self._newest = max(self._newest, version)
        self.prune_states(keep_versions)
        return record

    def prune_states(self, keep_versions: int) -> None:
        """Drop the states and memberships of all but the newest ``keep_versions`` versions (rows stay)."""
        oldest_kept = "(SELECT version FROM versions ORDER BY version DESC OFFSET %s LIMIT 1)"
        keep = max(1, keep_versions) - 1

        def prune(db: psycopg.Connection) -> None:
            db.execute(f"DELETE FROM version_states WHERE version < {oldest_kept}", (keep,))
            db.execute(
                f"UPDATE versions SET memberships_json = NULL WHERE version < {oldest_kept} "
                "AND memberships_json IS NOT NULL",
                (keep,),
            )

        self._run("prune old versions", prune)
