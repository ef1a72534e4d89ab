"""A PostgreSQL-backed server rides through a lost database connection (state_pg.py): on a real PostgreSQL whose
backends are terminated (as a restart or failover does) and whose database refuses connections for a while."""

from __future__ import annotations

import logging
import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from fedhft.broker_server.state_dir import StateLost
from fedhft.broker_server.state_pg import PgStateStore, reconnect_delay
from fedhft.broker_server.state_schema import StagedUpdate
from fedhft.broker_server.validation import ClientPlan, GlobalSpec
from fedhft.protocol import decode_model, encode_update
from fedhft.protocol.manifest import load_manifest
from tests.support.pg_cut import CommitCut
from tests.support.postgres import allow_connections, terminate_backends
from tests.support.server import SHA, Hub, ServerProcess, db_rows, update_message, update_tensors, wait_until

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


# ---- servers (subprocesses on a real Mosquitto) ------------------------------------------------------------------
@pytest.fixture
def fleet(mosquitto, tiny_export: Path, tmp_path: Path, postgres_url: str):  # noqa: ANN001, ANN201
    """(hub, spec, plan, start(*args) -> ServerProcess) on one PostgreSQL database."""
    manifest = load_manifest(tiny_export)
    hub = Hub(mosquitto.port, TASK)
    servers: list[ServerProcess] = []

    def start(*extra: str, wait_ready: bool = True) -> ServerProcess:
        keys = () if "ingest" in extra or "--key-dir" in extra else ("--key-dir", str(tmp_path / "keys"))
        proc = ServerProcess(mosquitto.url, TASK, postgres_url, tiny_export, *keys, *extra, log_dir=tmp_path)
        servers.append(proc)
        return proc.start(wait_ready=wait_ready)

    try:
        spec = GlobalSpec.from_manifest(manifest)
        yield hub, spec, ClientPlan.from_plan(dict(manifest.plan), spec), dict(manifest.plan), start
    finally:
        for s in servers:
            s.stop()
        hub.close()


def stream(hub: Hub, spec: GlobalSpec, plan: ClientPlan, clients: list[str], rounds: int, mid_stream) -> set:  # noqa: ANN001
    """Send ``rounds`` rounds of updates (one per client each, not waiting for acks); ``mid_stream()`` after half."""
    rng = np.random.default_rng(3)
    sent = set()
    for seq in range(1, rounds + 1):
        for cid in clients:
            payload = encode_update(update_message(TASK, cid, seq, update_tensors(rng, spec, plan)))
            hub.client.publish(f"fedhft/v1/{TASK}/update/{cid}", payload, qos=1)
            sent.add((cid, seq))
        if seq == rounds // 2:
            mid_stream()
        time.sleep(0.2)
    return sent


def check_stored_once(url: str, sent: set) -> list[tuple[int, int]]:
    """Every sent update stored once, aggregated at most once; versions 1..N each counting its updates."""
    rows = {
        (c, s): (st, v)
        for c, s, st, v in db_rows(url, "SELECT client_id, seq, status, aggregated_version FROM updates")
    }
    assert set(rows) == sent
    versions = db_rows(url, "SELECT version, num_updates FROM versions ORDER BY version")
    assert [v for v, _ in versions] == list(range(1, len(versions) + 1))
    aggregated = [v for st, v in rows.values() if st == "aggregated"]
    assert {v: aggregated.count(v) for v in set(aggregated)} == dict(versions)  # none in two versions
    assert len(aggregated) + sum(st == "pending" for st, _ in rows.values()) == len(sent)  # none lost
    return versions


def test_a_server_rides_through_a_database_outage_mid_stream(fleet, postgres_url: str) -> None:  # noqa: ANN001
    hub, spec, plan, plan_dict_, start = fleet
    server = start("--buffer-size", "4", "--window-seconds", "60", "--max-staleness", "1000")
    clients = [f"dev{i}" for i in range(4)]
    for cid in clients:
        hub.hello(cid, plan_dict_)
    assert wait_until(lambda: all(hub.latest_model(f"client/{c}") for c in clients), 15), server.log_text()[-2000:]
    at_outage: list[int] = []

    def restart_database() -> None:
        at_outage.append(max([v for (v,) in db_rows(postgres_url, "SELECT version FROM versions")], default=0))
        outage(postgres_url, "fedhft-server %", 3.0).join()

    sent = stream(hub, spec, plan, clients, 8, restart_database)
    assert wait_until(lambda: all(hub.ack_status(*k) == "accepted" for k in sent), 30), server.log_text()[-3000:]
    assert wait_until(lambda: server.metric("fedhft_pending_updates") == 0.0, 20), server.log_text()[-3000:]
    log = server.log_text()
    assert "lost connection to PostgreSQL 127.0.0.1:" in log and "reconnected to PostgreSQL" in log, log[-3000:]
    assert server.stop() == 0
    versions = check_stored_once(postgres_url, sent)
    assert len(versions) > at_outage[0] and sum(n for _, n in versions) == len(sent)  # versions continued, all in
    for topic, got in hub.models.items():
        seen = [decode_model(p).version for p in got]
        assert seen == sorted(seen), topic


@pytest.mark.parametrize("leader_standby", [False, True], ids=["leader", "leader-standby"])
def test_an_aggregator_whose_lock_a_standby_took_steps_down(
    fleet, postgres_url: str, tmp_path: Path, leader_standby: bool
) -> None:  # noqa: ANN001
    """Without --standby the stepped-down leader stops (exit 1, one line); with it, it waits for the lock again
    and takes over when the server that took it goes."""
    hub, spec, plan, plan_dict_, start = fleet
    extra = ("--role", "aggregator", "--buffer-size", "4", "--window-seconds", "60", "--max-staleness", "1000")
    leader = start(*extra, *(("--standby",) if leader_standby else ()))
    shutil.copytree(tmp_path / "keys", tmp_path / "standby-keys")  # the same key, on the standby's machine
    standby = start(*extra, "--standby", "--key-dir", str(tmp_path / "standby-keys"), wait_ready=False)
    ingest = [start("--role", "ingest"), start("--role", "ingest")]
    assert wait_until(lambda: "standby: waiting" in standby.log_text(), 20), standby.log_text()[-2000:]
    clients = [f"dev{i}" for i in range(4)]
    for cid in clients:
        hub.hello(cid, plan_dict_)
    assert wait_until(lambda: all(hub.latest_model(f"client/{c}") for c in clients), 15), leader.log_text()[-2000:]

    at_cut: list[int] = []

    def cut_leader_and_ingest() -> None:  # the leader's session ends (its lock with it), and the ingest processes'
        assert leader.proc is not None and standby.proc is not None
        at_cut.append(max([v for (v,) in db_rows(postgres_url, "SELECT version FROM versions")], default=0))
        allow_connections(postgres_url, False)  # the outage lasts until the standby holds the lock, however loaded
        try:
            terminate_backends(postgres_url, f"fedhft-aggregator PID {leader.proc.pid} %")
            terminate_backends(postgres_url, "fedhft-ingest %")
            assert wait_until(lambda: "took over" in standby.log_text(), 30), standby.log_text()[-2000:]
        finally:
            allow_connections(postgres_url, True)

    sent = stream(hub, spec, plan, clients, 8, cut_leader_and_ingest)
    assert wait_until(lambda: all(hub.ack_status(*k) == "accepted" for k in sent), 30), ingest[0].log_text()[-3000:]
    assert leader.proc is not None
    step_down = (r".*another server \(fedhft-aggregator PID \d+ .*\) took the database's lock while this one was "
                 r"reconnecting; stepping down")  # fmt: skip
    if leader_standby:
        waiting = "; waiting for the lock again (--standby)"
        assert wait_until(lambda: waiting in leader.log_text(), 20), leader.log_text()[-3000:]
        line = next(x for x in leader.log_text().splitlines() if waiting in x)
        assert re.fullmatch("fedhft server: " + step_down + re.escape(waiting), line), line
        assert leader.proc.poll() is None  # it waits, never publishing beside the new leader
    else:
        assert wait_until(lambda: leader.proc.poll() is not None, 20), leader.log_text()[-3000:]
        assert leader.proc.returncode == 1  # stepped down, never published beside the standby
        last = leader.log_text().strip().splitlines()[-1]
        assert re.fullmatch("error: " + step_down, last), last
    assert wait_until(lambda: standby.metric("fedhft_ready") == 1.0, 20), standby.log_text()[-3000:]
    assert wait_until(lambda: standby.metric("fedhft_pending_updates") == 0.0, 20), standby.log_text()[-3000:]
    for p in (standby, *ingest):
        assert p.stop() == 0
    if leader_standby:  # the new leader went: the old one takes the lock back
        assert wait_until(lambda: leader.log_text().count("took over") >= 1, 30), leader.log_text()[-3000:]
        assert wait_until(lambda: leader.metric("fedhft_ready") == 1.0, 20), leader.log_text()[-3000:]
        assert leader.stop() == 0
    assert all("reconnected to PostgreSQL" in p.log_text() for p in ingest)
    versions = check_stored_once(postgres_url, sent)
    assert len(versions) > at_cut[0] and sum(n for _, n in versions) == len(sent)  # the standby aggregated the rest
    for topic, got in hub.models.items():
        seen = [decode_model(p).version for p in got]
        assert seen == sorted(seen), topic  # one publisher at a time: versions never go back


def test_a_server_whose_database_never_comes_back_stops_in_one_line(fleet, postgres_url: str) -> None:  # noqa: ANN001
    _hub, _spec, _plan, _plan_dict, start = fleet
    server = start("--db-reconnect-timeout", "3")
    allow_connections(postgres_url, False)
    try:
        terminate_backends(postgres_url, "fedhft-server %")
        assert server.proc is not None
        t0 = time.monotonic()
        assert server.proc.wait(30) == 1
        assert 3 <= time.monotonic() - t0 < 15
    finally:
        allow_connections(postgres_url, True)
    lines = server.log_text().strip().splitlines()
    lost = next(ln for ln in lines if "lost conn" in ln)
    assert re.search(
        r"lost connection to PostgreSQL 127\.0\.0\.1:\d+: terminating connection due to administrator command; "
        r"reconnecting in 1 s",
        lost,
    ), lost
    assert re.fullmatch(
        r"error: state postgresql://\S+: lost the connection to PostgreSQL 127\.0\.0\.1:\d+ while trying to .* and "
        r"could not reconnect within 3 s \(.*not currently accepting connections\); stopping "
        r"\(--db-reconnect-timeout\)",
        lines[-1],
    ), lines[-1]


def test_an_update_whose_commit_reply_was_lost_is_found_committed_and_stored_once(postgres_url: str) -> None:
    """The connection dies after the server got COMMIT, before its reply came (a network cut): the store cannot
    know whether the batch committed until it reconnects and looks its transaction up."""
    params = conninfo_to_dict(postgres_url)
    cut = CommitCut(str(params.get("host", "127.0.0.1")), int(params.get("port", 5432)))
    url = f"postgresql://{params['user']}@127.0.0.1:{cut.port}/{params['dbname']}?sslmode=disable&gssencmode=disable"
    store = PgStateStore(url, TASK, "f" * 64, None, role="ingest", reconnect_timeout=20)
    try:
        store.upsert_client("a", "p", SHA, {"layers": []})
        cut.arm()
        (stored,) = store.commit_updates([staged(1)])
        assert cut.cut.is_set()  # the reply was lost, the old backend still ran (the store ended it)
        assert stored.id > 0  # stored by this batch, so acknowledged as accepted (not "duplicate", not unacked)
        assert db_rows(postgres_url, "SELECT id, seq FROM updates") == [(stored.id, 1)]
        (again,) = store.commit_updates([staged(1)])  # the device's resend: a duplicate, stored once
        assert again.id == 0 and len(db_rows(postgres_url, "SELECT id FROM updates")) == 1
        assert (
            len(db_rows(postgres_url, "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'fedhft-%'")) == 1
        )
    finally:
        store.close()
        cut.close()
