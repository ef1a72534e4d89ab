"""A PostgreSQL-backed server rides through a lost database connection (state_pg.py): on a real PostgreSQL whose
backends are terminated (as a restart or failover does) and whose database refuses connections for a while."""

from __future__ import annotations

import logging
import re
import threading
import time
from pathlib import Path

import psycopg
import pytest

from fedhft.broker_server.state_dir import StateLost
from fedhft.broker_server.state_pg import PgStateStore, reconnect_delay
from fedhft.broker_server.state_schema import StagedUpdate
from tests.support.postgres import allow_connections, terminate_backends
from tests.support.server import SHA, db_rows, wait_until

TASK = "reconnect"
WAITING = "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'fedhft-aggregator %'"


def staged(seq: int) -> StagedUpdate:
    return StagedUpdate("a", seq, 0, 10, 0.5, time.time(), 1.0, f"payload {seq}".encode(), {})


def outage(url: str, application_like: str, seconds: float) -> threading.Thread:
    """The database goes away for ``seconds``: new connections refused, these backends ended; then it is back."""
    allow_connections(url, False)
    assert terminate_backends(url, application_like) >= 1
    back = threading.Timer(seconds, allow_connections, (url, True))
    back.start()
    return back


def test_reconnect_backoff_is_bounded() -> None:
    assert [reconnect_delay(i) for i in range(6)] == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0]


def test_a_store_reconnects_after_an_outage_takes_its_lock_again_and_listens_again(
    postgres_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = PgStateStore(postgres_url, TASK, "f" * 64, tmp_path / "keys", role="aggregator", reconnect_timeout=20)
    try:
        store.listen_clients()
        store.upsert_client("a", "p", SHA, {"layers": []})
        assert store.changed_clients(1) == {"a"}
        (first,) = store.commit_updates([staged(1)])
        back = outage(postgres_url, "fedhft-aggregator %", 2.5)
        with caplog.at_level(logging.INFO, logger="fedhft.server"):
            t0 = time.monotonic()
            (second,) = store.commit_updates([staged(2)])  # waits for the database, then stores
            waited = time.monotonic() - t0
        back.join()
        assert 2.5 <= waited < 10 and second.id > first.id
        lines = [r.getMessage() for r in caplog.records]
        assert re.fullmatch(
            r"lost connection to PostgreSQL 127\.0\.0\.1:\d+: terminating connection due to administrator command; "
            r"reconnecting in 1 s",
            lines[0],
        ), lines
        assert lines[-1].startswith("reconnected to PostgreSQL 127.0.0.1:") and len(lines) == 2, lines  # one per change
        assert store.holds_lock()
        assert store.changed_clients(0.1) == {"a"}  # notifications of the outage are lost: every client counts
        with psycopg.connect(postgres_url, autocommit=True) as other:  # LISTEN was issued again
            other.execute("SELECT pg_notify('fedhft_clients', 'b')")
        assert store.changed_clients(5) == {"b"}
    finally:
        store.close()
    assert db_rows(postgres_url, "SELECT seq FROM updates ORDER BY seq") == [(1,), (2,)]  # each once


def test_a_transaction_lost_before_its_commit_runs_again_and_a_committed_one_is_found(
    postgres_url: str, tmp_path: Path
) -> None:
    store = PgStateStore(postgres_url, TASK, "f" * 64, None, role="ingest", reconnect_timeout=20)
    runs: list[int] = []

    def work(db: psycopg.Connection) -> int:
        runs.append(1)
        db.execute("INSERT INTO meta (key, value) VALUES ('k', %s)", (str(len(runs)),))
        if len(runs) == 1:  # the connection dies mid-transaction: nothing of it committed
            db.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        return len(runs)

    try:
        assert store._run("test", work) == 2 and store.meta()["k"] == "2"
        db = store._conn
        with db.transaction():
            (xid,) = db.execute("SELECT pg_current_xact_id()::text").fetchone()  # type: ignore[misc]
            db.execute("INSERT INTO meta (key, value) VALUES ('committed', 'yes')")
        with pytest.raises(psycopg.errors.AdminShutdown), db.transaction():
            (aborted,) = db.execute("SELECT pg_current_xact_id()::text").fetchone()  # type: ignore[misc]
            db.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        store._reconnect(RuntimeError("test"), "test")
        assert store._committed(xid, "test") and not store._committed(aborted, "test")
    finally:
        store.close()


def test_a_store_whose_lock_a_standby_took_meanwhile_steps_down(postgres_url: str, tmp_path: Path) -> None:
    leader = PgStateStore(postgres_url, TASK, "f" * 64, tmp_path / "keys", role="aggregator", reconnect_timeout=20)
    standby: list[PgStateStore] = []
    stop = threading.Event()
    waiting = threading.Thread(
        target=lambda: standby.append(
            PgStateStore(postgres_url, TASK, "f" * 64, tmp_path / "standby-keys", stop, "aggregator")
        )
    )
    try:
        waiting.start()
        assert wait_until(lambda: len(db_rows(postgres_url, WAITING)) == 2, 10)
        with psycopg.connect(postgres_url, autocommit=True) as other:  # the standby rides through a lost connection
            other.execute("SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE pid = ANY(%s)",
                          ([pid for (pid,) in db_rows(postgres_url, WAITING) if pid != leader._pid],))  # fmt: skip
        time.sleep(0.5)
        assert wait_until(lambda: len(db_rows(postgres_url, WAITING)) == 2, 10) and waiting.is_alive()
        with psycopg.connect(postgres_url, autocommit=True) as other:
            other.execute("SELECT pg_terminate_backend(%s, 5000)", (leader._pid,))  # the leader's session ends
        waiting.join(10)
        assert standby and standby[0].holds_lock()  # within STANDBY_POLL; the leader comes back after 1 s
        with pytest.raises(
            StateLost, match=r"another server \(fedhft-aggregator PID \d+ .*\) took the database's lock"
        ):
            leader.latest_version_number()
    finally:
        stop.set()
        waiting.join(10)
        leader.close()
        for s in standby:
            s.close()


def test_a_store_gives_up_after_its_reconnect_timeout_in_one_line(postgres_url: str, tmp_path: Path) -> None:
    store = PgStateStore(postgres_url, TASK, "f" * 64, None, role="ingest", reconnect_timeout=3)
    try:
        allow_connections(postgres_url, False)
        terminate_backends(postgres_url, "fedhft-ingest %")
        t0 = time.monotonic()
        with pytest.raises(StateLost) as exc:
            store.commit_updates([staged(1)])
        assert 3 <= time.monotonic() - t0 < 8
        assert "\n" not in str(exc.value)
        assert re.search(
            r"lost the connection to PostgreSQL 127\.0\.0\.1:\d+ while trying to store updates and could "
            r"not reconnect within 3 s \(.*not currently accepting connections\); stopping",
            str(exc.value),
        )
    finally:
        store.close()
        allow_connections(postgres_url, True)
