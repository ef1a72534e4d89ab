"""The server as a subprocess on a real Mosquitto: models, lock, kill -9 recovery, rejects, clustering."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedhft.broker_server.aggregation import ClusterState, aggregate_buffer
from fedhft.broker_server.clustering import adjusted_rand_index
from fedhft.broker_server.state_dir import is_postgres
from fedhft.broker_server.validation import ClientPlan, GlobalSpec, to_client_update
from fedhft.protocol import BadSignature, decode_model, generate_keypair, load_public_key
from fedhft.protocol.manifest import load_manifest
from fedhft.protocol.tensor_names import a_name, b_name, b_rows_name, rows_name
from tests.support import ROOT
from tests.support.server import (
    Hub,
    ServerProcess,
    db_rows,
    encode_unchecked,
    plan_dict,
    update_message,
    update_payloads,
    update_tensors,
    version_of,
    wait_until,
)

TASK = "svc"


@pytest.fixture
def env(mosquitto, tiny_export: Path, tmp_path: Path, request: pytest.FixtureRequest):  # noqa: ANN001, ANN201
    """(hub, spec, manifest plan, start(*args) -> ServerProcess); stops every server and the hub.

    Servers keep their state in ``tmp_path / "state"``, or, for a test that takes ``state_spec``, on each
    backend in turn (a PostgreSQL state's signing key in ``tmp_path / "state"``, where the tests look for it)."""
    spec_state = request.getfixturevalue("state_spec") if "state_spec" in request.fixturenames else None
    manifest = load_manifest(tiny_export)
    spec = GlobalSpec.from_manifest(manifest)
    hub = Hub(mosquitto.port, TASK)
    servers: list[ServerProcess] = []

    def start(*extra: str, state: Path | None = None, wait_ready: bool = True) -> ServerProcess:
        where = state or spec_state or tmp_path / "state"
        if is_postgres(where):
            extra = (*extra, "--key-dir", str(tmp_path / "state"))
        proc = ServerProcess(mosquitto.url, TASK, where, tiny_export, *extra, log_dir=tmp_path)
        servers.append(proc)
        return proc.start(wait_ready=wait_ready)

    try:
        yield hub, spec, dict(manifest.plan), start
    finally:
        for s in servers:
            s.stop()
        hub.close()


def test_heterogeneous_clients_get_signed_versioned_models_of_their_planned_shapes(
    env,
    tmp_path: Path,
    state_spec: Path | str,  # noqa: ANN001
) -> None:
    hub, spec, tiny_plan, start = env
    server = start("--buffer-size", "4", "--window-seconds", "60")
    plans = {
        "full": tiny_plan,
        "r8": plan_dict([1], 8, ["query", "value"], 0.5),
        "r4": plan_dict([0, 1], 4, ["query", "key", "value", "attn_out"], 0.25),
        "r2": plan_dict([1], 2, ["ffn_in", "ffn_out"], 1.0),
    }
    cplans = {cid: ClientPlan.from_plan(p, spec) for cid, p in plans.items()}
    for cid, plan in plans.items():
        hub.hello(cid, plan)
    key = load_public_key(tmp_path / "state" / "server_key.pub")
    assert wait_until(lambda: all(version_of(hub, f"client/{c}") == 0 for c in plans), 10)
    for cid, plan in cplans.items():  # version 0 on registration: ΔW = 0 (B = 0, trainable A), no head yet
        msg = decode_model(hub.latest_model(f"client/{cid}"), verify_key=key, expected_target=f"client/{cid}")
        assert all(not msg.tensors[b_name(n)].any() and msg.tensors[a_name(n)].any() for n in plan.ranks)
        assert "head.weight" not in msg.tensors
    rng = np.random.default_rng(0)
    sent = {cid: update_tensors(rng, spec, cplans[cid]) for cid in plans}
    for cid, tensors in sent.items():
        hub.update(update_message(TASK, cid, 1, tensors))
    assert wait_until(lambda: all(version_of(hub, f"client/{c}") == 1 for c in plans), 15), server.log_text()[-3000:]
    assert all(hub.ack_status(c, 1) == "accepted" for c in plans)
    updates = [to_client_update(cid, 10, 0, t, spec) for cid, t in sent.items()]
    (expected,) = aggregate_buffer([ClusterState({}, {})], updates, 0, 0.5)
    for cid, plan in cplans.items():
        msg = decode_model(
            hub.latest_model(f"client/{cid}"), verify_key=key, expected_task=TASK, expected_target=f"client/{cid}"
        )
        assert msg.version == 1
        want = {a_name(n): (r, spec.modules[n].in_features) for n, r in plan.ranks.items()}
        want |= {b_name(n): (spec.modules[n].out_features, r) for n, r in plan.ranks.items()}
        want |= dict(spec.head_shapes)
        assert {k: v.shape for k, v in msg.tensors.items()} == want
        for name, r in plan.ranks.items():
            u, s, vt = np.linalg.svd(expected.modules[name])
            got = msg.tensors[b_name(name)].astype(np.float64) @ msg.tensors[a_name(name)]
            np.testing.assert_allclose(got, (u[:, :r] * s[:r]) @ vt[:r], atol=1e-4)
    cluster = decode_model(hub.latest_model("cluster/0"), verify_key=key, expected_target="cluster/0")
    assert cluster.version == 1
    for name in cplans["r8"].ranks:  # cluster models carry every module at the global max rank R
        assert cluster.tensors[a_name(name)].shape == (spec.modules[name].max_rank, spec.modules[name].in_features)
    with pytest.raises(BadSignature):
        decode_model(hub.latest_model("cluster/0"), verify_key=generate_keypair()[1])
    for cid in plans:  # second round from version 1: versions only grow
        hub.update(update_message(TASK, cid, 2, update_tensors(rng, spec, cplans[cid]), base_version=1))
    assert wait_until(lambda: server.metric("fedhft_model_version") == 2.0, 15)
    assert wait_until(lambda: version_of(hub, "client/r2") == 2, 10)
    seen = [decode_model(p).version for p in hub.models[f"fedhft/v1/{TASK}/model/client/r2"]]
    assert seen == sorted(seen) and sorted(set(seen)) == [0, 1, 2]
    assert server.stop() == 0
    stored = db_rows(state_spec, "SELECT client_id, seq, status FROM updates")
    assert sorted(stored) == sorted((c, s, "aggregated") for c in plans for s in (1, 2))


def test_a_second_server_on_the_same_state_refuses(
    env,
    tmp_path: Path,
    tiny_export: Path,
    mosquitto,
    state_spec: Path | str,  # noqa: ANN001
) -> None:
    _, _, _, start = env
    first = start()
    args = [
        sys.executable, "-m", "fedhft.cli", "server", "run", "--broker", mosquitto.url,
        "--task", TASK, "--state", str(state_spec), "--manifest", str(tiny_export),
    ]  # fmt: skip
    if is_postgres(state_spec):  # another key dir: the database's lock refuses, not the key dir's
        args += ["--key-dir", str(tmp_path / "other-keys")]
    out = subprocess.run(
        args, capture_output=True, text=True, timeout=30, env=dict(os.environ, PYTHONPATH=str(ROOT)), check=False
    )
    assert out.returncode == 1
    assert f"PID {first.proc.pid}" in out.stderr and "in use by another fedhft server" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr  # one line
    assert first.proc.poll() is None and first.metric("fedhft_ready") == 1.0


def test_kill_9_mid_burst_loses_no_acknowledged_update_and_aggregates_none_twice(
    env,
    state_spec: Path | str,  # noqa: ANN001
) -> None:
    hub, spec, tiny_plan, start = env
    extra = ("--buffer-size", "4", "--window-seconds", "60", "--max-staleness", "1000")
    server = start(*extra)
    plan = ClientPlan.from_plan(tiny_plan, spec)
    clients = [f"dev{i}" for i in range(8)]
    for cid in clients:
        hub.hello(cid, tiny_plan)
    payloads = update_payloads(TASK, spec, plan, clients, 20, seed=1)
    topic = f"fedhft/v1/{TASK}/update/"
    infos = [hub.client.publish(topic + cid, p, qos=1) for (cid, _), p in payloads.items()]  # one burst
    assert wait_until(lambda: sum(hub.ack_status(*k) == "accepted" for k in payloads) >= 20, 10, interval=0.005)
    server.kill9()  # mid-burst: updates queued, half-stored or half-aggregated; the rest still reach the broker
    for info in infos:
        info.wait_for_publish(10)
    acked_before_kill = {k for k in payloads if hub.ack_status(*k) == "accepted"}
    assert 20 <= len(acked_before_kill) < len(payloads)
    server = start(*extra)
    for _ in range(3):  # devices resend what was never acknowledged (bounded rounds)
        missing = [k for k in payloads if hub.ack_status(*k) not in ("accepted", "duplicate")]
        if not missing:
            break
        wait_until(lambda m=missing: all(hub.ack_status(*k) for k in m), 3)
        for k in missing:
            if hub.ack_status(*k) is None:
                hub.publish(topic + k[0], payloads[k])
    assert wait_until(lambda: all(hub.ack_status(*k) in ("accepted", "duplicate") for k in payloads), 15)
    assert wait_until(lambda: server.metric("fedhft_pending_updates") in (0.0, 1.0, 2.0, 3.0), 10)  # < M wait
    assert server.stop() == 0
    state = state_spec
    rows = {(c, s): st for c, s, st in db_rows(state, "SELECT client_id, seq, status FROM updates")}
    assert set(rows) == set(payloads)  # every update stored exactly once (UNIQUE(client, seq))
    assert all(rows[k] in ("pending", "aggregated") for k in acked_before_kill)
    versions = db_rows(state, "SELECT version, num_updates FROM versions ORDER BY version")
    assert [v for v, _ in versions] == list(range(1, len(versions) + 1))
    aggregated = sum(1 for st in rows.values() if st == "aggregated")
    assert aggregated == sum(n for _, n in versions)  # no update counted in two versions
    assert aggregated + sum(1 for st in rows.values() if st == "pending") == len(payloads)
    for topic_name, got in hub.models.items():
        seen = [decode_model(p).version for p in got]
        assert seen == sorted(seen), topic_name


def test_bad_updates_are_rejected_counted_and_leave_the_model_alone(env) -> None:  # noqa: ANN001
    hub, spec, tiny_plan, start = env
    server = start("--buffer-size", "2", "--window-seconds", "60", "--clip-norm", "100")
    plan = ClientPlan.from_plan(tiny_plan, spec)
    for cid in ("a", "b"):
        hub.hello(cid, tiny_plan)
    rng = np.random.default_rng(2)
    for cid in ("a", "b"):
        hub.update(update_message(TASK, cid, 1, update_tensors(rng, spec, plan)))
    assert wait_until(lambda: version_of(hub, "client/a") == 1, 15), server.log_text()[-2000:]
    model_before = hub.latest_model("client/a")
    nan = update_tensors(rng, spec, plan)
    first, last = sorted(plan.ranks)[0], sorted(plan.ranks)[-1]
    nan[b_rows_name(first)][0, 0] = np.inf
    wrong = update_tensors(rng, spec, plan)
    del wrong[a_name(last)], wrong[b_rows_name(last)], wrong[rows_name(last)]  # a planned module is missing
    huge = update_tensors(rng, spec, plan) | {
        "layers.7.query.A": rng.standard_normal((16, 60000)).astype(np.float32),
        "layers.7.query.B_rows": np.zeros((1, 16), np.float32),
        "layers.7.query.rows": np.zeros(1, np.int32),
    }
    hub.publish(f"fedhft/v1/{TASK}/update/a", encode_unchecked(update_message(TASK, "a", 2, nan)))
    hub.update(update_message(TASK, "a", 3, wrong))
    hub.update(update_message(TASK, "a", 4, huge), "fp16")
    hub.update(update_message(TASK, "ghost", 1, update_tensors(rng, spec, plan)))
    hub.update(update_message(TASK, "a", 1, update_tensors(rng, spec, plan)))  # replays seq 1
    expected = {
        ("a", 2): "rejected",
        ("a", 3): "rejected",
        ("a", 4): "rejected",
        ("ghost", 1): "rejected",
    }
    assert wait_until(lambda: all(hub.ack_status(*k) == v for k, v in expected.items()), 15)
    assert wait_until(lambda: len(hub.acks.get(("a", 1), [])) == 2, 10)
    assert hub.acks[("a", 1)][-1].status == "duplicate"
    metrics = server.scrape()
    for reason in ("non_finite", "wrong_shape", "too_large", "unknown_client"):
        assert metrics[f'fedhft_updates_total{{reason="{reason}",status="rejected"}}'] == 1.0, reason
    assert metrics['fedhft_updates_total{reason="replay",status="duplicate"}'] == 1.0
    assert metrics['fedhft_updates_total{reason="",status="accepted"}'] == 2.0
    assert metrics["fedhft_model_version"] == 1.0 and metrics["fedhft_pending_updates"] == 0.0
    assert metrics["fedhft_aggregation_seconds_count"] == 1.0
    assert hub.latest_model("client/a") == model_before
    seen = [decode_model(p).version for p in hub.models[f"fedhft/v1/{TASK}/model/client/a"]]
    assert seen == sorted(seen) and seen[-1] == 1  # no version after the good round


def test_service_clusters_planted_groups(env) -> None:  # noqa: ANN001
    hub, spec, _, start = env
    n, k = 9, 3
    server = start(
        "--buffer-size", str(n), "--window-seconds", "60", "--clusters", str(k),
        "--warmup-aggregations", "1", "--recluster-every", "1", "--cluster-signature", "head",
    )  # fmt: skip
    plan = plan_dict([1], 2, ["query"], 0.5)
    cplan = ClientPlan.from_plan(plan, spec)
    rng = np.random.default_rng(3)
    centers = [{key: rng.standard_normal(s) for key, s in spec.head_shapes.items()} for _ in range(k)]
    labels = [i % k for i in range(n)]
    for i in range(n):
        hub.hello(f"c{i}", plan)
    for version in (0, 1):
        for i, g in enumerate(labels):
            head = {key: v + 0.05 * rng.standard_normal(v.shape) for key, v in centers[g].items()}
            tensors = update_tensors(rng, spec, cplan, head=head)
            hub.update(update_message(TASK, f"c{i}", version + 1, tensors, base_version=version))
        assert wait_until(lambda v=version: server.metric("fedhft_model_version") == v + 1.0, 20)
    assert wait_until(lambda: all(hub.latest_model(f"cluster/{c}") for c in range(k)), 10)
    assert wait_until(lambda: all(decode_model(hub.latest_model(f"client/c{i}")).version == 2 for i in range(n)), 10)
    models = [decode_model(hub.latest_model(f"client/c{i}")) for i in range(n)]
    found = [int(m.meta["cluster"]) for m in models]
    assert adjusted_rand_index(labels, found) == 1.0
    clusters = [decode_model(hub.latest_model(f"cluster/{c}")) for c in range(k)]
    for m, g in zip(models, labels, strict=True):
        # soft memberships (default floor 0.1): 1 - 0.1 * 2/3 on its cluster, 0.1 / 3 on the others
        p = np.array([float(x) for x in m.meta["membership"].split(",")])
        np.testing.assert_allclose(np.sort(p), [0.1 / 3, 0.1 / 3, 1 - 0.2 / 3], atol=1e-5)
        mixed = sum(pc * cm.tensors["head.weight"] for pc, cm in zip(p, clusters, strict=True))
        np.testing.assert_allclose(m.tensors["head.weight"], mixed, atol=1e-4)
        dist = [np.linalg.norm(m.tensors["head.weight"] - c["head.weight"]) for c in centers]
        assert int(np.argmin(dist)) == g
    for cm in clusters:  # per-cluster figures for the report
        assert (cm.meta["members"], cm.meta["min_cluster_size"], cm.meta["smallest_cluster"]) == (3, 2, 3)
        assert cm.meta["soft_members"] == pytest.approx(3.0, abs=1e-3)
    metrics = server.scrape()
    assert metrics["fedhft_clusters"] == 3.0
    assert sorted(metrics[f'fedhft_clients{{cluster="{c}"}}'] for c in range(k)) == [3.0, 3.0, 3.0]
    assert all(metrics[f'fedhft_clients_soft{{cluster="{c}"}}'] == pytest.approx(3.0) for c in range(k))
    assert all(f'fedhft_rank_collapse_ratio{{cluster="{c}"}}' in metrics for c in range(k))


def test_a_server_told_not_to_reconnect_stops_on_a_lost_database_and_a_restart_loses_nothing(  # noqa: ANN001
    env, postgres_url: str
) -> None:
    """--db-reconnect-timeout 0: the lost connection stops the server at once (test_pg_reconnect covers riding
    through); what it never acknowledged the broker delivers again to the restarted server."""
    import psycopg

    hub, spec, tiny_plan, start = env
    extra = ("--buffer-size", "100", "--window-seconds", "600")
    server = start(*extra, "--db-reconnect-timeout", "0", state=postgres_url)
    plan = ClientPlan.from_plan(tiny_plan, spec)
    rng = np.random.default_rng(4)
    hub.hello("a", tiny_plan)
    hub.update(update_message(TASK, "a", 1, update_tensors(rng, spec, plan)))
    assert wait_until(lambda: hub.ack_status("a", 1) == "accepted", 10), server.log_text()[-2000:]
    with psycopg.connect(postgres_url, autocommit=True) as admin:  # the database restarts, or the network cuts
        n = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = %s",
            (f"fedhft-server PID {server.proc.pid} on {socket.gethostname()}"[:63],),
        ).fetchone()[0]
    assert n == 1
    second = update_message(TASK, "a", 2, update_tensors(rng, spec, plan))
    hub.update(second)
    assert wait_until(lambda: server.proc.poll() is not None, 15), server.log_text()[-2000:]
    assert server.proc.returncode == 1 and "lost the connection to PostgreSQL" in server.log_text()
    assert "--db-reconnect-timeout 0" in server.log_text()
    assert hub.ack_status("a", 2) is None  # never acknowledged
    server = start(*extra, state=postgres_url)  # its broker session still holds seq 2: delivered again
    assert wait_until(lambda: hub.ack_status("a", 2) == "accepted", 15), server.log_text()[-2000:]
    assert server.stop() == 0
    assert sorted(db_rows(postgres_url, "SELECT client_id, seq, status FROM updates")) == [
        ("a", 1, "pending"),
        ("a", 2, "pending"),
    ]


def test_a_standby_takes_over_from_a_killed_leader_losing_and_doubling_nothing(env, postgres_url: str) -> None:  # noqa: ANN001
    hub, spec, tiny_plan, start = env
    extra = ("--buffer-size", "4", "--window-seconds", "60", "--max-staleness", "1000")
    leader = start(*extra, state=postgres_url)
    standby = start(*extra, "--standby", state=postgres_url, wait_ready=False)
    assert wait_until(lambda: "standby: waiting" in standby.log_text(), 20), standby.log_text()[-2000:]
    assert standby.proc.poll() is None and standby.metric("fedhft_ready") is None  # not serving yet
    plan = ClientPlan.from_plan(tiny_plan, spec)
    clients = [f"dev{i}" for i in range(6)]
    for cid in clients:
        hub.hello(cid, tiny_plan)
    payloads = update_payloads(TASK, spec, plan, clients, 12, seed=5)
    topic = f"fedhft/v1/{TASK}/update/"
    infos = [hub.client.publish(topic + cid, p, qos=1) for (cid, _), p in payloads.items()]
    assert wait_until(lambda: sum(hub.ack_status(*k) == "accepted" for k in payloads) >= 12, 15, interval=0.005)
    leader.kill9()  # mid-burst, likely mid-flush (a version every 4 updates)
    killed = time.monotonic()
    for info in infos:
        info.wait_for_publish(10)
    acked_before_kill = {k for k in payloads if hub.ack_status(*k) == "accepted"}
    assert wait_until(lambda: standby.metric("fedhft_ready") == 1.0, 20), standby.log_text()[-3000:]
    takeover_s = time.monotonic() - killed
    for _ in range(3):  # devices resend what was never acknowledged
        missing = [k for k in payloads if hub.ack_status(*k) not in ("accepted", "duplicate")]
        if not missing:
            break
        wait_until(lambda m=missing: all(hub.ack_status(*k) for k in m), 3)
        for k in missing:
            if hub.ack_status(*k) is None:
                hub.publish(topic + k[0], payloads[k])
    assert wait_until(lambda: all(hub.ack_status(*k) in ("accepted", "duplicate") for k in payloads), 20)
    assert wait_until(lambda: standby.metric("fedhft_pending_updates") in (0.0, 1.0, 2.0, 3.0), 10)
    assert standby.stop() == 0
    print(f"standby serving {takeover_s:.2f} s after the leader's kill -9")
    assert takeover_s < 10
    rows = {(c, s): st for c, s, st in db_rows(postgres_url, "SELECT client_id, seq, status FROM updates")}
    assert set(rows) == set(payloads)  # every update stored exactly once
    assert all(rows[k] in ("pending", "aggregated") for k in acked_before_kill)  # 0 acknowledged lost
    versions = db_rows(postgres_url, "SELECT version, num_updates FROM versions ORDER BY version")
    assert [v for v, _ in versions] == list(range(1, len(versions) + 1))
    aggregated = sum(1 for st in rows.values() if st == "aggregated")
    assert aggregated == sum(n for _, n in versions) and len(versions) >= 2  # none counted twice
    for topic_name, got in hub.models.items():
        seen = [decode_model(p).version for p in got]
        assert seen == sorted(seen), topic_name
