"""The coordinator without a broker: flush rule, staleness weights, model factors, clustering, versions."""

from __future__ import annotations

import numpy as np
import pytest

from fedhft.broker_server.aggregation import ClusterState
from fedhft.broker_server.clustering import adjusted_rand_index
from fedhft.broker_server.federation import (
    Federation,
    FederationConfig,
    FederationError,
    PendingUpdate,
)
from fedhft.broker_server.sim_time import virtual_time_of
from fedhft.broker_server.svd import split_factors
from fedhft.broker_server.validation import ClientPlan
from fedhft.broker_server.version_history import PastVersion
from tests.support.server import plan_dict, small_spec, update_tensors

SPEC = small_spec()
NAME = "layers.1.query"


def pending(fed: Federation, uid: int, cid: str, tensors: dict, base: int = 0, samples: int = 10, at: float = 0.0):
    fed.add_pending(PendingUpdate(uid, cid, uid, base, samples, at, tensors))


def full_rows_update(rng: np.random.Generator, rank: int = 2) -> tuple[dict, np.ndarray]:
    """One module, every row sent: returns wire tensors and their exact ΔW."""
    m = SPEC.modules[NAME]
    a = rng.standard_normal((rank, m.in_features)).astype(np.float32)
    b = rng.standard_normal((m.out_features, rank)).astype(np.float32)
    t = {f"{NAME}.A": a, f"{NAME}.B_rows": b, f"{NAME}.rows": np.arange(m.out_features, dtype=np.int32)}
    return t, b.astype(np.float64) @ a.astype(np.float64)


def test_config_errors_name_the_problem() -> None:
    with pytest.raises(FederationError, match="buffer size"):
        FederationConfig(buffer_size=0)
    with pytest.raises(FederationError, match="hysteresis"):
        FederationConfig(hysteresis=2)


def test_flush_when_buffer_full_or_window_expired() -> None:
    fed = Federation(SPEC, FederationConfig(buffer_size=3, window_seconds=10))
    rng = np.random.default_rng(0)
    plan = ClientPlan.from_plan(plan_dict([1], 2, ["query"]), SPEC)
    assert not fed.due(0.0) and fed.seconds_until_due(0.0) is None
    pending(fed, 1, "a", update_tensors(rng, SPEC, plan), at=100.0)
    pending(fed, 2, "b", update_tensors(rng, SPEC, plan), at=103.0)
    assert not fed.due(105.0)
    assert fed.seconds_until_due(105.0) == pytest.approx(5.0)
    assert fed.due(110.0)  # the oldest waited W seconds
    pending(fed, 3, "c", update_tensors(rng, SPEC, plan), at=104.0)
    assert fed.due(104.0) and fed.seconds_until_due(104.0) == 0.0  # M pending


def test_staleness_discounts_old_updates_and_versions_increase() -> None:
    # version 4 is ΔW = 0 and version 1 is kept in the history, also ΔW = 0: each change is the update itself
    cfg = FederationConfig(buffer_size=2, staleness_exponent=0.5, max_staleness=10)
    fed = Federation(SPEC, cfg, version=4, history=[PastVersion(1, [ClusterState({}, {})])])
    rng = np.random.default_rng(1)
    t1, d1 = full_rows_update(rng)
    t2, d2 = full_rows_update(rng)
    pending(fed, 1, "fresh", t1, base=4, samples=10)
    pending(fed, 2, "old", t2, base=1, samples=30)
    result = fed.aggregate()
    assert fed.version == 4 and len(fed.pending) == 2  # aggregate() changes nothing by itself
    s2 = (1 + 3) ** -0.5  # the stale change is discounted, and the discount is not normalized away
    want = (10 * d1 + 30 * s2 * d2) / (10 + 30)
    np.testing.assert_allclose(result.states[0].modules[NAME], want, rtol=1e-6, atol=1e-6)
    assert result.version == 5 and sorted(result.aggregated_ids) == [1, 2]
    fed.apply(result)
    assert fed.version == 5 and not fed.pending
    for v in (6, 7):
        t, _ = full_rows_update(rng)
        pending(fed, 10 + v, "fresh", t, base=fed.version)
        r = fed.aggregate()
        fed.apply(r)
        assert fed.version == v
    assert fed.history.versions() == [0, 1, 4, 5, 6, 7]  # version 0 is always rebuildable


def test_models_carry_the_simulated_time_of_their_latest_update() -> None:
    fed = Federation(SPEC, FederationConfig(buffer_size=2), version=0)
    fed.register("a", ClientPlan.from_plan(plan_dict([1], 2, ["query"]), SPEC))
    rng = np.random.default_rng(3)
    for uid, vt in ((1, 12.5), (2, 40.0)):
        t, _ = full_rows_update(rng)
        fed.add_pending(PendingUpdate(uid, "a", uid, 0, 10, 0.0, t, virtual_time_of({"virtual_time": vt})))
    result = fed.aggregate()
    assert fed.virtual_time == 0.0 and result.virtual_time == 40.0  # the slowest device of the flush
    fed.apply(result)
    assert all(m.meta["virtual_time"] == 40.0 for m in fed.cluster_models())
    assert fed.client_model("a").meta["virtual_time"] == 40.0
    assert virtual_time_of({"virtual_time": float("nan")}) == 0.0 and virtual_time_of({}) == 0.0


def test_too_stale_updates_are_dropped_without_a_version() -> None:
    fed = Federation(SPEC, FederationConfig(buffer_size=1, max_staleness=2), version=5)
    t, _ = full_rows_update(np.random.default_rng(2))
    pending(fed, 1, "late", t, base=2)
    pending(fed, 2, "unknown base", t, base=4)  # within max_staleness, but version 4 is not kept (a restart)
    result = fed.aggregate()
    assert result.dropped == {1: "stale", 2: "stale"} and not result.aggregated_ids and result.version == 5
    fed.apply(result)
    assert fed.version == 5 and not fed.pending


def test_client_models_are_best_rank_r_factors_of_exactly_the_planned_shapes() -> None:
    fed = Federation(SPEC, FederationConfig(buffer_size=3))
    rng = np.random.default_rng(3)
    plans = {
        "big": ClientPlan.from_plan(plan_dict([0, 1], 8, ["query", "value", "ffn_in"], 0.5), SPEC),
        "mid": ClientPlan.from_plan(plan_dict([1], 4, ["query", "value"], 0.5), SPEC),
        "low": ClientPlan.from_plan(plan_dict([1], 1, ["query"], 0.25), SPEC),
    }
    for i, (cid, plan) in enumerate(plans.items()):
        fed.register(cid, plan)
        pending(fed, i, cid, update_tensors(rng, SPEC, plan))
    fed.apply(fed.aggregate())
    state = fed.states[0]
    for cid, plan in plans.items():
        model = fed.client_model(cid)
        assert model.target == f"client/{cid}"
        for name, r in plan.ranks.items():
            m = SPEC.modules[name]
            a, b = model.tensors[f"{name}.A"], model.tensors[f"{name}.B"]
            assert a.shape == (r, m.in_features) and b.shape == (m.out_features, r)
            u, s, vt = np.linalg.svd(state.modules[name])
            best = (u[:, :r] * s[:r]) @ vt[:r]
            np.testing.assert_allclose(b.astype(np.float64) @ a, best, atol=1e-5)  # ΔW = B·A (wire convention)
        assert model.tensors["head.weight"].shape == SPEC.head_shapes["head.weight"]
    (cluster,) = fed.cluster_models()
    assert cluster.target == "cluster/0"
    assert all(cluster.tensors[f"{n}.A"].shape[0] == SPEC.modules[n].max_rank for n in state.modules)


def test_dead_components_are_revived_without_changing_the_product() -> None:
    rng = np.random.default_rng(4)
    dw = rng.standard_normal((9, 2)) @ rng.standard_normal((2, 7))  # rank 2, asked for rank 5
    u, s, vt = np.linalg.svd(dw, full_matrices=False)
    b, a = split_factors(u, s, vt, 5, seed=0)
    np.testing.assert_allclose(b @ a, dw, atol=1e-10)
    assert np.all(np.abs(b[:, 2:]) == 0)
    assert np.all(np.linalg.norm(a[2:], axis=1) > 0.1)  # trainable again on the device
    np.testing.assert_allclose(a[2:] @ a[:2].T, 0.0, atol=1e-10)
    b0, a0 = split_factors(np.zeros((9, 0)), np.zeros(0), np.zeros((0, 7)), 3, seed=0)  # nobody sent it
    assert np.all(b0 == 0) and np.all(np.linalg.norm(a0, axis=1) > 0)


def planted_round(fed: Federation, rng: np.random.Generator, centers: list[dict], labels: list[int], uid0: int) -> None:
    plan = ClientPlan.from_plan(plan_dict([1], 2, ["query"], 1.0), SPEC)
    for i, g in enumerate(labels):
        cid = f"c{i:02d}"
        fed.register(cid, plan)
        head = {k: v + 0.05 * rng.standard_normal(v.shape) for k, v in centers[g].items()}
        pending(fed, uid0 + i, cid, update_tensors(rng, SPEC, plan, head=head), base=fed.version)


def make_centers(rng: np.random.Generator, k: int = 3) -> list[dict]:
    return [{key: rng.standard_normal(shape) for key, shape in SPEC.head_shapes.items()} for _ in range(k)]


@pytest.mark.parametrize("clusters", [3, None])
def test_clustering_recovers_planted_groups(clusters: int | None) -> None:
    rng = np.random.default_rng(5)
    labels = [i % 3 for i in range(12)]
    centers = make_centers(rng)
    cfg = FederationConfig(  # no membership floor: a client takes exactly its cluster's model
        buffer_size=12,
        clusters=clusters,
        max_clusters=5,
        warmup_aggregations=1,
        recluster_every=1,
        membership_floor=0,
        cluster_signature="head",  # the groups are planted in the heads
    )
    fed = Federation(SPEC, cfg)
    planted_round(fed, rng, centers, labels, 0)
    result = fed.aggregate()
    assert result.reclustered and len(result.states) == 3
    fed.apply(result)
    assert fed.num_clusters == 3
    found = [int(np.argmax(fed.membership_of(f"c{i:02d}"))) for i in range(12)]
    assert adjusted_rand_index(labels, found) == 1.0
    # the cluster states start as independent copies, then drift apart with their members' heads
    planted_round(fed, rng, centers, labels, 100)
    fed.apply(fed.aggregate())
    for i, g in enumerate(labels):
        head = fed.client_model(f"c{i:02d}").tensors["head.weight"]
        np.testing.assert_allclose(head, centers[g]["head.weight"], atol=0.1)
    assert sorted(fed.clients_per_cluster()) == [4, 4, 4]


def test_memberships_stay_put_under_hysteresis() -> None:
    rng = np.random.default_rng(6)
    labels = [i % 3 for i in range(12)]
    centers = make_centers(rng)
    cfg = FederationConfig(
        buffer_size=12, clusters=3, warmup_aggregations=1, recluster_every=1, hysteresis=0.5, cluster_signature="head"
    )
    fed = Federation(SPEC, cfg)
    planted_round(fed, rng, centers, labels, 0)
    fed.apply(fed.aggregate())
    before = {cid: int(np.argmax(p)) for cid, p in fed.memberships.items()}
    planted_round(fed, rng, centers, labels, 100)  # same groups, new noise: cluster indices must not permute
    fed.apply(fed.aggregate())
    after = {cid: int(np.argmax(p)) for cid, p in fed.memberships.items()}
    assert after == before


def test_rank_collapse_ratio_is_reported_per_cluster() -> None:
    fed = Federation(SPEC, FederationConfig(buffer_size=2))
    rng = np.random.default_rng(7)
    low = ClientPlan.from_plan(plan_dict([1], 1, ["query"], 1.0), SPEC)
    high = ClientPlan.from_plan(plan_dict([1], 8, ["query"], 1.0), SPEC)
    fed.register("low", low)
    fed.register("high", high)
    pending(fed, 1, "low", update_tensors(rng, SPEC, low))
    pending(fed, 2, "high", update_tensors(rng, SPEC, high))
    fed.apply(fed.aggregate())
    (ratio,) = fed.collapse_ratios()
    s2 = np.linalg.svd(fed.states[0].modules[NAME], compute_uv=False) ** 2
    assert ratio == pytest.approx(s2[1:8].sum() / s2[:1].sum(), rel=1e-6)
