"""FedBuff as published, checked against hand-computed arithmetic: changes since the model each client received
(rebuilt from the kept versions), staleness discount, server lr, sync equivalence, and the history across a
restart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedhft.broker_server.aggregation import ClusterState
from fedhft.broker_server.federation import Federation, FederationConfig, PendingUpdate
from fedhft.broker_server.restore import past_versions, restore
from fedhft.broker_server.state_store import StateStore
from fedhft.broker_server.validation import ClientPlan
from fedhft.broker_server.version_history import PastVersion
from tests.support.server import plan_dict, small_spec

SPEC = small_spec()
NAME = "layers.1.query"  # 12 x 12, max rank 8
OUT, IN = SPEC.modules[NAME].out_features, SPEC.modules[NAME].in_features
PLAN = ClientPlan.from_plan(plan_dict([1], 2, ["query"], 0.25), SPEC)  # rank 2 on one module


def low_rank(rng: np.random.Generator, rank: int) -> np.ndarray:
    return rng.standard_normal((OUT, rank)) @ rng.standard_normal((rank, IN))


def heads(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: rng.standard_normal(s) for k, s in SPEC.head_shapes.items()}


def upload(rng: np.random.Generator, rows: list[int], head: dict | None = None) -> tuple[dict, np.ndarray]:
    """Wire tensors of a rank-2 upload of ``rows`` and the exact ΔW' of those rows (float64 of the float32)."""
    a = rng.standard_normal((2, IN)).astype(np.float32)
    b = rng.standard_normal((len(rows), 2)).astype(np.float32)
    t = {f"{NAME}.A": a, f"{NAME}.B_rows": b, f"{NAME}.rows": np.array(rows, dtype=np.int32)}
    t |= {k: np.asarray(v, np.float32) for k, v in (head or {}).items()}
    return t, b.astype(np.float64) @ a.astype(np.float64)


def two_versions(cfg: FederationConfig, seed: int = 0) -> tuple[Federation, ClusterState, ClusterState]:
    """A federation at version 4 that keeps version 1. Their ΔW have rank <= 2, so a rank-2 client received
    them exactly (up to float32): R_1 = S1, R_4 = S4."""
    rng = np.random.default_rng(seed)
    s1 = ClusterState({NAME: low_rank(rng, 1)}, heads(rng))
    s4 = ClusterState({NAME: low_rank(rng, 2)}, heads(rng))
    fed = Federation(SPEC, cfg, version=4, states=[s4], history=[PastVersion(1, [s1])])
    for cid in ("old", "fresh"):
        fed.register(cid, PLAN)
    return fed, s1, s4


def add(fed: Federation, uid: int, cid: str, base: int, samples: int, tensors: dict) -> None:
    fed.add_pending(PendingUpdate(uid, cid, uid, base, samples, 0.0, tensors))


def f32(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32).astype(np.float64)


def test_hand_computed_flush_of_a_stale_and_a_fresh_update_with_overlapping_rows() -> None:
    eta = 0.5
    fed, s1, s4 = two_versions(FederationConfig(buffer_size=2, staleness_exponent=0.5, server_lr=eta))
    rng = np.random.default_rng(1)
    h_old, h_fresh = heads(rng), heads(rng)
    t_old, w_old = upload(rng, [0, 1, 2], h_old)  # trained from version 1: tau = 3, s = (1 + 3) ** -0.5 = 0.5
    t_fresh, w_fresh = upload(rng, [2, 3], h_fresh)  # trained from version 4: tau = 0
    add(fed, 1, "old", 1, 30, t_old)
    add(fed, 2, "fresh", 4, 10, t_fresh)
    result = fed.aggregate()
    assert sorted(result.aggregated_ids) == [1, 2] and not result.dropped

    d_old = w_old - s1.modules[NAME][[0, 1, 2]]  # δ = ΔW' − R on the rows sent
    d_fresh = w_fresh - s4.modules[NAME][[2, 3]]
    g = np.zeros((OUT, IN))
    g[0] = 30 * 0.5 * d_old[0] / 30  # only "old" sent rows 0 and 1: its discounted change
    g[1] = 30 * 0.5 * d_old[1] / 30
    g[2] = (30 * 0.5 * d_old[2] + 10 * 1.0 * d_fresh[0]) / (30 + 10)  # the overlap
    g[3] = 10 * 1.0 * d_fresh[1] / 10
    want = s4.modules[NAME] + eta * g
    got = result.states[0].modules[NAME]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(got[4:], s4.modules[NAME][4:])  # rows nobody sent: bit for bit
    for key in SPEC.head_shapes:
        g_head = (30 * 0.5 * (f32(h_old[key]) - s1.head[key]) + 10 * (f32(h_fresh[key]) - s4.head[key])) / 40
        np.testing.assert_allclose(result.states[0].head[key], s4.head[key] + eta * g_head, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("eta", "exponent"), [(1.0, 0.5), (0.3, 0.5), (1.0, 1.0), (0.5, 0.0)])
def test_a_stale_update_alone_moves_its_rows_by_eta_times_discount_times_its_change(
    eta: float, exponent: float
) -> None:
    fed, s1, s4 = two_versions(FederationConfig(buffer_size=1, staleness_exponent=exponent, server_lr=eta))
    t, w = upload(np.random.default_rng(2), [3, 7, 9])
    add(fed, 1, "old", 1, 25, t)
    got = fed.aggregate().states[0].modules[NAME]
    s = (1 + 3) ** -exponent
    want = s4.modules[NAME].copy()
    want[[3, 7, 9]] += eta * s * (w - s1.modules[NAME][[3, 7, 9]])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert not np.allclose(got[[3, 7, 9]], w, atol=1e-3)  # never replaced by the stale ΔW'
    np.testing.assert_array_equal(np.delete(got, [3, 7, 9], axis=0), np.delete(s4.modules[NAME], [3, 7, 9], axis=0))


def test_the_server_lr_scales_the_step_of_a_flush() -> None:
    steps = {}
    for eta in (1.0, 0.3):
        fed, _, s4 = two_versions(FederationConfig(buffer_size=2, server_lr=eta))
        rng = np.random.default_rng(3)
        add(fed, 1, "old", 1, 30, upload(rng, [0, 1, 2], heads(rng))[0])
        add(fed, 2, "fresh", 4, 10, upload(rng, [2, 3], heads(rng))[0])
        new = fed.aggregate().states[0]
        steps[eta] = (new.modules[NAME] - s4.modules[NAME], new.head["head.bias"] - s4.head["head.bias"])
    np.testing.assert_allclose(steps[0.3][0], 0.3 * steps[1.0][0], atol=1e-12)
    np.testing.assert_allclose(steps[0.3][1], 0.3 * steps[1.0][1], atol=1e-12)
    assert np.abs(steps[1.0][0]).max() > 0.1


def test_received_model_is_the_truncated_svd_the_client_got() -> None:
    """With a state of rank above the client's, R is its rank-r truncation (what was published), not ΔW."""
    rng = np.random.default_rng(4)
    s4 = ClusterState({NAME: low_rank(rng, 6)}, {})
    fed = Federation(SPEC, FederationConfig(buffer_size=1), version=4, states=[s4])
    fed.register("a", PLAN)
    published = fed.client_model("a").tensors
    r = published[f"{NAME}.B"].astype(np.float64) @ published[f"{NAME}.A"].astype(np.float64)
    t, w = upload(rng, [5, 6])
    add(fed, 1, "a", 4, 10, t)
    got = fed.aggregate().states[0].modules[NAME]
    np.testing.assert_allclose(got[[5, 6]], s4.modules[NAME][[5, 6]] + (w - r[[5, 6]]), atol=1e-9)
    assert np.linalg.norm(r - s4.modules[NAME]) > 0.1  # the truncation is not the state


def test_fresh_updates_at_server_lr_one_give_the_synchronous_weighted_mean() -> None:
    """Every update from the current version and rank >= the state's: the flush is today's synchronous rule,
    (1 − η)·old + η·(weighted mean of the trained rows) on covered rows, old elsewhere."""
    rng = np.random.default_rng(5)
    s = ClusterState({NAME: low_rank(rng, 1)}, heads(rng))
    for eta in (1.0, 0.4):
        fed = Federation(SPEC, FederationConfig(buffer_size=3, server_lr=eta), version=2, states=[s])
        sent = {}
        for i, (cid, rows, n) in enumerate((("a", [0, 1, 2], 10), ("b", [2, 3], 30), ("c", [2, 8], 20))):
            fed.register(cid, PLAN)
            hd = heads(rng)
            t, w = upload(rng, rows, hd)
            sent[cid] = (rows, w, n, hd)
            add(fed, i, cid, 2, n, t)
        new = fed.aggregate().states[0]
        num, den = np.zeros((OUT, IN)), np.zeros(OUT)
        for rows, w, n, _ in sent.values():
            num[rows] += n * w
            den[rows] += n
        want = s.modules[NAME].copy()
        hit = den > 0
        want[hit] = (1 - eta) * want[hit] + eta * num[hit] / den[hit, None]
        np.testing.assert_allclose(new.modules[NAME], want, atol=1e-6)
        mean_bias = sum(n * f32(hd["head.bias"]) for _, _, n, hd in sent.values()) / 60
        np.testing.assert_allclose(new.head["head.bias"], (1 - eta) * s.head["head.bias"] + eta * mean_bias, atol=1e-6)


def test_factor_baselines_add_discounted_changes_of_their_factors() -> None:
    """fedavg: the first c components move by η·s·(A' − A_m) for a lone stale update (its base: version m)."""
    plan = ClientPlan.from_plan(plan_dict([1], 2, ["query"], 1.0), SPEC)
    fed = Federation(SPEC, FederationConfig(buffer_size=1, aggregator="fedavg", server_lr=0.5))
    fed.register("a", plan)
    rng = np.random.default_rng(6)
    first, _ = upload(rng, list(range(OUT)))
    add(fed, 1, "a", 0, 10, first)
    fed.apply(fed.aggregate())  # version 1
    a1 = fed.states[0].modules[f"{NAME}.A"].copy()
    add(fed, 2, "a", 1, 10, upload(rng, list(range(OUT)))[0])
    fed.apply(fed.aggregate())  # version 2
    a2 = fed.states[0].modules[f"{NAME}.A"].copy()
    stale, _ = upload(rng, list(range(OUT)))
    add(fed, 3, "a", 1, 10, stale)  # trained from version 1, one version old: s = 2 ** -0.5
    got = fed.aggregate().states[0].modules[f"{NAME}.A"]
    np.testing.assert_allclose(got[:2], a2[:2] + 0.5 * 2**-0.5 * (stale[f"{NAME}.A"] - f32(a1[:2])), atol=1e-6)
    np.testing.assert_array_equal(got[2:], a2[2:])


def test_robust_rules_vote_over_changes_of_stale_updates() -> None:
    """Honest clients all changed their rows by D from version 1; an attacker by −50·D. The median moves the
    current rows by η·s·D: it votes over changes, not over the stale ΔW' (which would drag rows back to S1)."""
    cfg = FederationConfig(buffer_size=6, robust="median", server_lr=1.0, staleness_exponent=0.5)
    fed, s1, s4 = two_versions(cfg)
    rng = np.random.default_rng(7)
    d = rng.standard_normal((OUT, IN))
    rows = [0, 1, 2, 3]
    for i in range(6):
        cid = f"c{i}"
        fed.register(cid, PLAN)
        target = s1.modules[NAME][rows] + (d[rows] if i < 5 else -50 * d[rows])
        u, s_, vt = np.linalg.svd(target, full_matrices=False)  # a rank-2 upload near the target
        t = {f"{NAME}.A": vt[:2].astype(np.float32), f"{NAME}.B_rows": (u[:, :2] * s_[:2]).astype(np.float32)}
        t[f"{NAME}.rows"] = np.array(rows, dtype=np.int32)
        sent = t[f"{NAME}.B_rows"].astype(np.float64) @ t[f"{NAME}.A"].astype(np.float64)
        if i == 0:
            honest_change = sent - s1.modules[NAME][rows]
        add(fed, i, cid, 1, 10, t)
    got = fed.aggregate().states[0].modules[NAME]
    np.testing.assert_allclose(got[rows], s4.modules[NAME][rows] + 0.5 * honest_change, atol=1e-5)
    np.testing.assert_array_equal(got[4:], s4.modules[NAME][4:])


def commit(store: StateStore, fed: Federation, keep_versions: int) -> None:
    result = fed.aggregate()
    memberships = {cid: list(map(float, p)) for cid, p in result.memberships.items()}
    store.commit_version(
        result.version, result.states, result.aggregated_ids, memberships, {}, keep_versions=keep_versions
    )
    fed.apply(result)


@pytest.mark.parametrize("keep_versions", [11, 2])
def test_a_restart_keeps_the_history_or_drops_what_it_cannot_rebuild(tmp_path: Path, keep_versions: int) -> None:
    cfg = FederationConfig(buffer_size=1, max_staleness=10)
    store = StateStore(tmp_path / "state", "task", SPEC.fingerprint())
    try:
        store.upsert_client("a", "p", "00" * 32, plan_dict([1], 2, ["query"], 0.25))
        fed = Federation(SPEC, cfg)
        fed.register("a", PLAN)
        rng = np.random.default_rng(8)
        for v in range(4):
            add(fed, v, "a", v, 10, upload(rng, [v, v + 1], heads(rng))[0])
            commit(store, fed, keep_versions)
        stale, _ = upload(rng, [2, 5], heads(rng))
        add(fed, 9, "a", 1, 10, stale)  # trained from version 1; the current one is 4
        before = fed.aggregate()
        restored, _ = restore(store, SPEC, cfg)
    finally:
        store.close()
    add(restored, 9, "a", 1, 10, stale)
    after = restored.aggregate()
    if keep_versions == 11:
        assert restored.history.versions() == [0, 1, 2, 3, 4]
        assert after.aggregated_ids == [9]
        np.testing.assert_array_equal(after.states[0].modules[NAME], before.states[0].modules[NAME])
        np.testing.assert_array_equal(after.states[0].head["head.bias"], before.states[0].head["head.bias"])
    else:  # versions 1 and 2 were pruned from disk: the update's base cannot be rebuilt
        assert restored.history.versions() == [0, 3, 4]
        assert after.dropped == {9: "stale"} and not after.aggregated_ids


def test_each_version_keeps_the_memberships_its_models_were_built_with(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    store = StateStore(tmp_path / "state", "task", SPEC.fingerprint())
    try:
        two = [ClusterState({NAME: low_rank(rng, 1)}, heads(rng)) for _ in range(2)]
        for v, p in ((1, [0.25, 0.75]), (2, [1.0, 0.0]), (3, [0.5, 0.5])):
            store.commit_version(v, two, [], {"a": p}, {}, keep_versions=11)
        (tmp_path / "state" / "states" / store.versions()[0].state_dir / "memberships.json").unlink()
        past = past_versions(store, max_staleness=10)
    finally:
        store.close()
    assert [p.version for p in past] == [2]  # version 1 lost its memberships (2 clusters): not rebuildable
    assert past[0].memberships == {"a": [1.0, 0.0]}
    np.testing.assert_array_equal(past[0].states[1].modules[NAME], two[1].modules[NAME])
