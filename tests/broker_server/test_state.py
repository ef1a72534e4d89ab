"""Server state on both backends (SQLite state dir, PostgreSQL): lock, group commit, crash recovery, disk full,
atomic versions."""

from __future__ import annotations

import errno
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fedhft.broker_server import state_store
from fedhft.broker_server.aggregation import ClusterState
from fedhft.broker_server.state_backend import StateBackend, open_state
from fedhft.broker_server.state_dir import StateError, StateLocked, StorageFull, is_postgres
from fedhft.broker_server.state_store import StagedUpdate, StateStore
from fedhft.broker_server.validation import ClientPlan
from fedhft.protocol import encode_update
from tests.support.server import plan_dict, small_spec, update_message, update_tensors

SPEC = small_spec()
PLAN = plan_dict([1], 2, ["query", "value"])


def staged(cid: str, seq: int, rng: np.random.Generator) -> StagedUpdate:
    tensors = update_tensors(rng, SPEC, ClientPlan.from_plan(PLAN, SPEC))
    payload = encode_update(update_message("task", cid, seq, tensors), "fp32")
    return StagedUpdate(cid, seq, 0, 10, 0.5, 1000.0 + seq, 1.0, payload, tensors)


def open_store(path: Path) -> StateStore:
    return StateStore(path, "task", SPEC.fingerprint())


def open_any(spec: str | Path, tmp_path: Path, task: str = "task", keys: str = "keys") -> StateBackend:
    """The store of ``spec`` on either backend (a database's signing key in ``tmp_path / keys``)."""
    store = open_state(spec, task, SPEC.fingerprint(), tmp_path / keys if is_postgres(spec) else None)
    assert isinstance(store, StateBackend)  # every method the server calls is there
    return store


def rows(store: StateBackend) -> list[tuple]:
    return [tuple(r) for r in store.db.execute("SELECT client_id, seq, status FROM updates ORDER BY id").fetchall()]  # type: ignore[attr-defined]


def test_second_open_refuses_naming_the_pid(state_spec: str | Path, tmp_path: Path) -> None:
    store = open_any(state_spec, tmp_path)
    try:
        with pytest.raises(StateLocked, match=f"in use by another fedhft server .*PID {os.getpid()}"):
            open_any(state_spec, tmp_path, keys="other-keys")  # a database's lock, not its key dir's, refuses
    finally:
        store.close()
    open_any(state_spec, tmp_path, keys="other-keys").close()  # released on close


def test_state_of_another_task_is_refused(state_spec: str | Path, tmp_path: Path) -> None:
    open_any(state_spec, tmp_path).close()
    with pytest.raises(StateError, match="belongs to task 'task'"):
        open_any(state_spec, tmp_path, task="other")


def test_payloads_seqs_heads_and_pending_survive_a_reopen(state_spec: str | Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    store = open_any(state_spec, tmp_path)
    store.upsert_client("a", "p", "ab" * 32, PLAN)
    batch = [staged("a", 1, rng), staged("a", 2, rng)]
    stored = store.commit_updates(batch, {"a": {"head.weight": np.ones((3, 12)), "head.bias": np.zeros(3)}})
    store.close()  # as after kill -9: only what committed is there
    store = open_any(state_spec, tmp_path)
    try:
        assert [s.seq for s in store.load_pending()] == [1, 2]
        for s, b in zip(store.load_pending(), batch, strict=True):
            assert store.load_payload(s) == b.payload  # stored exactly as received
        assert [s.id for s in store.load_pending()] == [s.id for s in stored]
        assert store.load_clients()["a"].last_seq == 2
        assert store.load_clients()["a"].head["head.weight"].shape == (3, 12)
        assert store.update_status("a", 2) == "pending" and store.update_status("a", 3) is None
    finally:
        store.close()


def test_a_failing_batch_stores_nothing(state_spec: str | Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    store = open_any(state_spec, tmp_path)
    try:
        store.upsert_client("a", "p", "ab" * 32, PLAN)
        store.commit_updates([staged("a", 1, rng)])
        # SQLite: seq 1 again breaks UNIQUE(client, seq). PostgreSQL leaves a stored (client, seq) alone (another
        # ingest process stored it: test_roles.py), so a NUL in a text column breaks that batch instead.
        bad = staged("a", 1, rng) if not is_postgres(state_spec) else replace(staged("a", 3, rng), client_id="a\x00")
        with pytest.raises(StateError, match="could not"):
            store.commit_updates([staged("a", 2, rng), bad])
        assert rows(store) == [("a", 1, "pending")]
        assert store.load_clients()["a"].last_seq == 1
        if not is_postgres(state_spec):
            assert len(list((Path(state_spec) / "updates").iterdir())) == 1  # the failed batch's file is gone
        store.commit_updates([staged("a", 2, rng)])
        assert rows(store) == [("a", 1, "pending"), ("a", 2, "pending")]
    finally:
        store.close()


def test_versions_aggregate_each_update_once_and_keep_the_newest_states(state_spec: str | Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    store = open_any(state_spec, tmp_path)
    store.upsert_client("a", "p", "ab" * 32, PLAN)
    s1, s2 = store.commit_updates([staged("a", 1, rng), staged("a", 2, rng)])
    state = ClusterState(modules={"layers.1.query": rng.standard_normal((12, 12))}, head={"head.bias": np.ones(3)})
    members = {"a": [0.5, 0.5]}
    record = store.commit_version(1, [state, state], [s1.id], members, {"aggregations": "1"}, {s2.id: "stale"})
    assert record.version == 1 and rows(store) == [("a", 1, "aggregated"), ("a", 2, "rejected")]
    store.commit_version(2, [state], [s1.id], {}, {"aggregations": "2"})  # s1 again: not counted twice
    with pytest.raises(StateError, match="not newer"):
        store.commit_version(2, [state], [], {}, {})
    store.close()
    store = open_any(state_spec, tmp_path)
    try:
        assert [(v.version, v.num_updates) for v in store.versions()] == [(1, 1), (2, 1)]
        assert store.db.execute("SELECT COUNT(*) FROM updates WHERE status = 'aggregated'").fetchone()[0] == 1  # type: ignore[attr-defined]
        assert store.meta()["aggregations"] == "2" and store.load_pending() == []
        assert store.load_memberships(store.versions()[0]) == {"a": [0.5, 0.5]}
        (loaded,) = store.load_states(store.latest_version())
        np.testing.assert_array_equal(loaded.modules["layers.1.query"], state.modules["layers.1.query"])
        for v in (3, 4):
            store.commit_version(v, [state], [], {}, {}, keep_versions=2)
        with pytest.raises(StateError):
            store.load_states(store.versions()[0])  # pruned
        assert store.load_memberships(store.versions()[0]) is None
        assert len(store.load_states(store.versions()[-2])) == 1
    finally:
        store.close()


def test_postgres_commits_synchronously_migrates_once_and_versions_check_the_lock(
    postgres_url: str, tmp_path: Path
) -> None:
    import psycopg

    from fedhft.broker_server.state_dir import StateLost
    from fedhft.broker_server.state_pg import LOCK_KEY

    store = open_any(postgres_url, tmp_path)
    try:
        assert store.db.execute("SHOW synchronous_commit").fetchone()[0] == "on"  # type: ignore[attr-defined]
        store.close()
        store = open_any(postgres_url, tmp_path)  # a reopen applies nothing again
        migrations = store.db.execute("SELECT version FROM schema_migrations").fetchall()  # type: ignore[attr-defined]
        assert [m[0] for m in migrations] == [1]
        rng = np.random.default_rng(7)
        store.upsert_client("a", "p", "ab" * 32, PLAN)
        (s1,) = store.commit_updates([staged("a", 1, rng)])
        store.db.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))  # type: ignore[attr-defined]  # as if lost
        with pytest.raises(StateLost, match="no longer holds the database's lock"):
            store.commit_version(1, [ClusterState({}, {})], [s1.id], {}, {})
        assert store.latest_version() is None and rows(store) == [("a", 1, "pending")]
        pid = store.db.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[attr-defined]
        with psycopg.connect(postgres_url, autocommit=True) as other:
            other.execute("SELECT pg_terminate_backend(%s)", (pid,))  # the connection dies (a restart, a network cut)
        (s2,) = store.commit_updates([staged("a", 2, rng)])  # reconnected (test_pg_reconnect.py), lock taken again
        assert s2.id > s1.id and store.holds_lock()  # type: ignore[attr-defined]
    finally:
        store.close()


def test_wal_and_full_sync(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    try:
        assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        store.close()


def test_group_commit_stores_tensors_and_recovery_removes_orphans(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    store = open_store(tmp_path)
    store.upsert_client("a", "p", "ab" * 32, PLAN)
    batch = [staged("a", 1, rng), staged("a", 2, rng)]
    stored = store.commit_updates(batch, {"a": {"head.weight": np.ones((3, 12)), "head.bias": np.zeros(3)}})
    assert [s.seq for s in stored] == [1, 2]
    for s, b in zip(stored, batch, strict=True):
        assert store.load_payload(s) == b.payload  # stored exactly as received
    assert store.load_clients()["a"].last_seq == 2
    assert store.load_clients()["a"].head["head.weight"].shape == (3, 12)
    store.close()
    # what a kill -9 can leave behind: a file of an uncommitted insert, temp files, an uncommitted state dir
    (tmp_path / "updates" / "deadbeef.safetensors").write_bytes(b"x")
    (tmp_path / "updates" / ".x.safetensors.1234.tmp").write_bytes(b"x")
    (tmp_path / "states" / "v00000007").mkdir()
    store = open_store(tmp_path)
    try:
        batch_files = {s.tensor_file.split("#")[0] for s in stored}
        assert len(batch_files) == 1  # one file (one fsync) per group commit
        assert {p.name for p in (tmp_path / "updates").iterdir()} == batch_files
        assert not (tmp_path / "states" / "v00000007").exists()
        assert [p.seq for p in store.load_pending()] == [1, 2]
    finally:
        store.close()


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_disk_full_stores_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    rng = np.random.default_rng(1)
    store = open_store(tmp_path)
    store.upsert_client("a", "p", "ab" * 32, PLAN)
    calls = {"n": 0}
    real = getattr(os, where)

    def failing(*args: object) -> object:
        calls["n"] += 1
        if calls["n"] == 1:  # the batch file hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args)

    monkeypatch.setattr(state_store.os, where, failing)
    with pytest.raises(StorageFull, match="disk full"):
        store.commit_updates([staged("a", 1, rng), staged("a", 2, rng)])
    monkeypatch.setattr(state_store.os, where, real)
    try:
        assert rows(store) == []
        assert list((tmp_path / "updates").iterdir()) == []
        assert store.load_clients()["a"].last_seq == -1
        store.commit_updates([staged("a", 1, rng)])  # space is back: the retry works
        assert rows(store) == [("a", 1, "pending")]
    finally:
        store.close()


def test_version_commit_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(2)
    store = open_store(tmp_path)
    store.upsert_client("a", "p", "ab" * 32, PLAN)
    (s1,) = store.commit_updates([staged("a", 1, rng)])
    state = ClusterState(modules={"layers.1.query": rng.standard_normal((12, 12))}, head={"head.bias": np.ones(3)})

    def failing_tx():  # noqa: ANN202
        raise StorageFull("disk full (simulated)")

    real_tx = store.transaction
    monkeypatch.setattr(store, "transaction", failing_tx)
    with pytest.raises(StorageFull):
        store.commit_version(1, [state], [s1.id], {"a": [1.0]}, {"aggregations": "1"})
    monkeypatch.setattr(store, "transaction", real_tx)
    assert store.latest_version() is None and rows(store) == [("a", 1, "pending")]
    assert list((tmp_path / "states").iterdir()) == []
    record = store.commit_version(1, [state], [s1.id], {"a": [1.0]}, {"aggregations": "1"})
    assert record.version == 1 and rows(store) == [("a", 1, "aggregated")]
    assert list((tmp_path / "updates").iterdir()) == []  # aggregated tensors are no longer needed
    (loaded,) = store.load_states(record)
    np.testing.assert_array_equal(loaded.modules["layers.1.query"], state.modules["layers.1.query"])
    with pytest.raises(StateError, match="not newer"):
        store.commit_version(1, [state], [], {}, {})
    for v in (2, 3, 4):
        store.commit_version(v, [state], [], {}, {}, keep_versions=2)
    assert sorted(p.name for p in (tmp_path / "states").iterdir()) == ["v00000003", "v00000004"]
    store.close()


def test_server_modules_import_without_torch() -> None:
    from tests.support.torchfree import run_torchfree

    code = (
        "import json, sys\n"
        "import fedhft.broker_server.service, fedhft.cli.server, fedhft.broker_server.broker.embedded\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'optimum', 'executorch')]\n"
        "print(json.dumps({'heavy': heavy}))\n"
    )
    assert run_torchfree(code, timeout=120) == {"heavy": []}


def test_a_postgres_standby_waits_for_the_lock_and_takes_over_when_the_holder_goes(
    postgres_url: str, tmp_path: Path
) -> None:
    import threading

    from fedhft.broker_server.state_dir import StandbyStopped

    leader = open_any(postgres_url, tmp_path)
    stop = threading.Event()
    stop.set()
    with pytest.raises(StandbyStopped):  # told to stop while still waiting
        open_state(postgres_url, "task", SPEC.fingerprint(), tmp_path / "keys", standby=stop)
    got: list[StateBackend] = []
    standby = threading.Thread(
        target=lambda: got.append(
            open_state(postgres_url, "task", SPEC.fingerprint(), tmp_path / "keys", standby=threading.Event())
        )
    )
    standby.start()
    standby.join(1.0)
    assert standby.is_alive() and not got  # waiting, on the same key dir as the leader
    leader.upsert_client("a", "p", "ab" * 32, PLAN)
    leader.close()  # the holder's session ends (as when its process is killed)
    standby.join(30)  # polls every 0.25 s; a generous bound for a loaded 2-core host
    assert got and got[0].load_clients().keys() == {"a"}
    got[0].close()
    with pytest.raises(StateError, match="--standby needs --state postgresql"):
        open_state(tmp_path / "dir", "task", SPEC.fingerprint(), standby=threading.Event())
