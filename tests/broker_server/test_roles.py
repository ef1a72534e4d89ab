"""`fedhft server run --role ingest|aggregator` on a real Mosquitto and PostgreSQL: many ingest processes, one
aggregator, a standby aggregator taking over from a killed one; SQLite refuses the roles."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fedhft.broker_server.aggregation import ClusterState, aggregate_buffer
from fedhft.broker_server.roles import role_problem
from fedhft.broker_server.state_dir import StateError
from fedhft.broker_server.state_pg import PgStateStore
from fedhft.broker_server.state_schema import StagedUpdate
from fedhft.broker_server.validation import ClientPlan, GlobalSpec, to_client_update
from fedhft.protocol import decode_model, load_public_key
from fedhft.protocol.manifest import load_manifest
from fedhft.protocol.tensor_names import a_name, b_name
from tests.support import ROOT
from tests.support.server import (
    SHA,
    Hub,
    ServerProcess,
    db_rows,
    update_message,
    update_payloads,
    update_tensors,
    version_of,
    wait_until,
)

TASK = "roles"


@pytest.fixture
def roles(mosquitto, tiny_export: Path, tmp_path: Path, postgres_url: str):  # noqa: ANN001, ANN201
    """(hub, spec, manifest plan, start(role, *args) -> ServerProcess) on one PostgreSQL database."""
    manifest = load_manifest(tiny_export)
    hub = Hub(mosquitto.port, TASK)
    servers: list[ServerProcess] = []

    def start(role: str, *extra: str, wait_ready: bool = True) -> ServerProcess:
        keys = () if role == "ingest" else ("--key-dir", str(tmp_path / "keys"))
        args = ("--role", role, *keys, *extra)
        proc = ServerProcess(mosquitto.url, TASK, postgres_url, tiny_export, *args, log_dir=tmp_path)
        servers.append(proc)
        return proc.start(wait_ready=wait_ready)

    try:
        yield hub, GlobalSpec.from_manifest(manifest), dict(manifest.plan), start
    finally:
        for s in servers:
            s.stop()
        hub.close()


def accepted_by(server: ServerProcess) -> float:
    return server.metric('fedhft_updates_total{reason="",status="accepted"}') or 0.0


def test_two_ingest_processes_and_an_aggregator_aggregate_every_update_exactly_once(
    roles,
    tmp_path: Path,
    postgres_url: str,  # noqa: ANN001
) -> None:
    hub, spec, tiny_plan, start = roles
    clients, seqs = [f"dev{i}" for i in range(4)], (1, 2, 3)
    n = len(clients) * len(seqs)
    aggregator = start("aggregator", "--buffer-size", str(n), "--window-seconds", "60")
    ingest = [start("ingest"), start("ingest")]
    for cid in clients:  # each hello reaches one ingest process; the aggregator publishes the model
        hub.hello(cid, tiny_plan)
    assert wait_until(lambda: all(version_of(hub, f"client/{c}") == 0 for c in clients), 15), aggregator.log_text()
    plan = ClientPlan.from_plan(tiny_plan, spec)
    rng = np.random.default_rng(0)
    sent = {(cid, seq): update_tensors(rng, spec, plan) for seq in seqs for cid in clients}
    for (cid, seq), tensors in sent.items():
        hub.update(update_message(TASK, cid, seq, tensors))
    assert wait_until(lambda: all(hub.ack_status(*k) == "accepted" for k in sent), 20), ingest[0].log_text()[-3000:]
    shares = [accepted_by(p) for p in ingest]
    assert sum(shares) == n and min(shares) > 0, shares  # both took a share of the subscription
    assert wait_until(lambda: version_of(hub, "cluster/0") == 1, 20), aggregator.log_text()[-3000:]
    assert wait_until(lambda: all(version_of(hub, f"client/{c}") == 1 for c in clients), 10)
    key = load_public_key(tmp_path / "keys" / "server_key.pub")
    updates = [to_client_update(cid, 10, 0, t, spec) for (cid, _), t in sent.items()]
    (expected,) = aggregate_buffer([ClusterState({}, {})], updates, 0, 0.5)
    model = decode_model(hub.latest_model("client/dev0"), verify_key=key, expected_target="client/dev0")
    for name, r in plan.ranks.items():  # the mean of all n updates, each counted once
        u, s, vt = np.linalg.svd(expected.modules[name])
        got = model.tensors[b_name(name)].astype(np.float64) @ model.tensors[a_name(name)]
        np.testing.assert_allclose(got, (u[:, :r] * s[:r]) @ vt[:r], atol=1e-4)
    for p in (aggregator, *ingest):
        assert p.stop() == 0
    rows = db_rows(postgres_url, "SELECT client_id, seq, status, aggregated_version FROM updates")
    assert sorted(rows) == sorted((c, s, "aggregated", 1) for c, s in sent)  # each stored once, aggregated once
    assert db_rows(postgres_url, "SELECT version, num_updates FROM versions") == [(1, n)]


def test_a_standby_aggregator_takes_over_from_a_killed_one_losing_and_doubling_nothing(
    roles,
    postgres_url: str,  # noqa: ANN001
) -> None:
    hub, spec, tiny_plan, start = roles
    extra = ("--buffer-size", "4", "--window-seconds", "60", "--max-staleness", "1000")
    leader = start("aggregator", *extra)
    standby = start("aggregator", "--standby", *extra, wait_ready=False)
    ingest = [start("ingest"), start("ingest")]
    assert wait_until(lambda: "standby: waiting" in standby.log_text(), 20), standby.log_text()[-2000:]
    plan = ClientPlan.from_plan(tiny_plan, spec)
    clients = [f"dev{i}" for i in range(6)]
    for cid in clients:
        hub.hello(cid, tiny_plan)
    assert wait_until(lambda: all(version_of(hub, f"client/{c}") == 0 for c in clients), 15)
    payloads = update_payloads(TASK, spec, plan, clients, 10, seed=5)
    topic = f"fedhft/v1/{TASK}/update/"
    version_at_kill, killed, ready_at = 0, 0.0, []

    def watch_standby() -> None:  # the takeover time, apart from how long the remaining rounds take to send
        wait_until(lambda: standby.metric("fedhft_ready") == 1.0, 60)
        ready_at.append(time.monotonic())

    watcher = threading.Thread(target=watch_standby, daemon=True)
    for seq in range(1, 11):  # a stream of rounds, one update per device each; the leader dies in the middle
        for cid in clients:
            hub.client.publish(topic + cid, payloads[(cid, seq)], qos=1)
        assert wait_until(lambda s=seq: all(hub.ack_status(c, s) == "accepted" for c in clients), 15)
        if seq == 4:
            assert wait_until(lambda: (leader.metric("fedhft_model_version") or 0) >= 2, 15), leader.log_text()[-3000:]
            leader.kill9()  # updates of round 4 just stored: likely mid-flush
            killed = time.monotonic()
            watcher.start()
            version_at_kill = max(v for (v,) in db_rows(postgres_url, "SELECT version FROM versions"))
    watcher.join(60)
    assert standby.metric("fedhft_ready") == 1.0, standby.log_text()[-3000:]
    takeover_s = ready_at[0] - killed
    assert all(hub.ack_status(*k) == "accepted" for k in payloads)  # the ingest processes never stopped
    assert wait_until(lambda: standby.metric("fedhft_pending_updates") in (0.0, 1.0, 2.0, 3.0), 20)  # < M wait
    assert wait_until(lambda: (version_of(hub, "cluster/0") or 0) > version_at_kill, 10)  # the standby published
    for p in (standby, *ingest):
        assert p.stop() == 0
    print(f"standby aggregating {takeover_s:.2f} s after the leader's kill -9 (version {version_at_kill} then)")
    assert takeover_s < 10
    rows = {
        (c, s): (st, v)
        for c, s, st, v in db_rows(postgres_url, "SELECT client_id, seq, status, aggregated_version FROM updates")
    }
    assert set(rows) == set(payloads)  # every acknowledged update stored, each once
    versions = db_rows(postgres_url, "SELECT version, num_updates FROM versions ORDER BY version")
    assert [v for v, _ in versions] == list(range(1, len(versions) + 1)) and len(versions) > version_at_kill
    aggregated = [v for st, v in rows.values() if st == "aggregated"]
    assert len(aggregated) == sum(k for _, k in versions)  # none counted in two versions
    assert {v: aggregated.count(v) for v in set(aggregated)} == dict(versions)
    assert len(aggregated) + sum(st == "pending" for st, _ in rows.values()) == len(payloads)  # 0 lost
    for topic_name, got in hub.models.items():
        seen = [decode_model(p).version for p in got]
        assert seen == sorted(seen), topic_name


def test_two_ingest_stores_racing_for_one_update_store_it_once(postgres_url: str, tmp_path: Path) -> None:
    first = PgStateStore(postgres_url, TASK, "f" * 64, None, role="ingest")
    second = PgStateStore(postgres_url, TASK, "f" * 64, None, role="ingest")
    try:
        first.upsert_client("a", "p", SHA, {"layers": []})
        staged = StagedUpdate("a", 1, 0, 10, 0.5, time.time(), 1.0, b"payload", {})
        (one,) = first.commit_updates([staged])
        two, other = second.commit_updates([staged, StagedUpdate("a", 2, 0, 10, 0.5, time.time(), 1.0, b"p2", {})])
        assert one.id > 0 and two.id == 0 and other.id > one.id  # the second process gets a duplicate back
        assert second.registrations(["a", "ghost"])["a"].last_seq == 2 and "ghost" not in second.registrations(["a"])
    finally:
        first.close()
        second.close()
    assert db_rows(postgres_url, "SELECT client_id, seq, payload FROM updates ORDER BY seq") == [
        ("a", 1, b"payload"),
        ("a", 2, b"p2"),
    ]


@pytest.mark.parametrize("role", ["ingest", "aggregator"])
def test_roles_refuse_a_sqlite_state_in_one_line_with_exit_2(tmp_path: Path, tiny_export: Path, role: str) -> None:
    args = [
        sys.executable, "-m", "fedhft.cli", "server", "run", "--broker", "mqtt://127.0.0.1:1", "--task", TASK,
        "--state", str(tmp_path / "state"), "--manifest", str(tiny_export), "--role", role,
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env, check=False)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        f"error: --role {role} needs --state postgresql://...: a SQLite state directory is single-process"
    ], out.stderr
    assert not (tmp_path / "state").exists()  # refused before anything was created


def test_an_ingest_process_takes_no_standby(tmp_path: Path, tiny_export: Path) -> None:
    args = [
        sys.executable, "-m", "fedhft.cli", "server", "run", "--broker", "mqtt://127.0.0.1:1", "--task", TASK,
        "--state", "postgresql://nobody@127.0.0.1:1/none", "--manifest", str(tiny_export), "--role", "ingest",
        "--standby",
    ]  # fmt: skip
    out = subprocess.run(
        args, capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)), check=False
    )
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "error: --standby is for --role aggregator: run more ingest processes instead"
    ], out.stderr


def test_a_single_server_and_ingest_processes_refuse_each_other(postgres_url: str, tmp_path: Path) -> None:
    """A --role all server would not see what ingest processes store: the second to come is refused, in one line."""
    ingest = PgStateStore(postgres_url, TASK, "f" * 64, None, role="ingest")
    try:
        with pytest.raises(StateError, match=r"has ingest processes \(ingest PID \d+ on .*run --role aggregator"):
            PgStateStore(postgres_url, TASK, "f" * 64, tmp_path / "keys", role="all")
        aggregator = PgStateStore(postgres_url, TASK, "f" * 64, tmp_path / "keys", role="aggregator")
        aggregator.close()
    finally:
        ingest.close()
    single = PgStateStore(postgres_url, TASK, "f" * 64, tmp_path / "keys", role="all")
    try:
        with pytest.raises(StateError, match=r"served by a --role all server \(PID \d+ on .*--role aggregator") as exc:
            PgStateStore(postgres_url, TASK, "f" * 64, None, role="ingest")
        assert "\n" not in str(exc.value)
    finally:
        single.close()


def test_which_options_each_role_takes() -> None:
    pg = "postgresql://u@127.0.0.1:5432/db"
    assert role_problem("all", "dir", standby=False, virtual_time=True) is None  # the single process, unchanged
    assert role_problem("aggregator", pg, standby=True, virtual_time=False) is None
    assert role_problem("ingest", pg, standby=False, virtual_time=False) is None
    assert "single-process" in (role_problem("aggregator", "dir", standby=False, virtual_time=False) or "")
    assert "--role all" in (role_problem("aggregator", pg, standby=False, virtual_time=True) or "")
    assert "--role must be one of all, ingest, aggregator" in (
        role_problem("x", pg, standby=False, virtual_time=False) or ""
    )
