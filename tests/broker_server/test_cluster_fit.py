"""Clustering that personalizes: minimum cluster size, K by BIC within a range, soft memberships, the
signature source (head | delta | both) through the coordinator, and per-cluster figures."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from fedhft.broker_server.aggregation import ClusterState
from fedhft.broker_server.cluster_fit import fit_clusters, membership_entropy, soften
from fedhft.broker_server.clustering import adjusted_rand_index, choose_k_bic, gmm_fit, hard_sizes
from fedhft.broker_server.federation import Federation, FederationConfig, FederationError, PendingUpdate
from fedhft.broker_server.reclustering import SIGNATURES, client_signatures
from fedhft.broker_server.validation import ClientPlan
from fedhft.cli.server import SIGNATURE_CHOICES
from tests.support.server import ServerRunCapture, plan_dict, small_spec, update_tensors

SPEC = small_spec()


def blobs(rng: np.random.Generator, sizes: list[int], spread: float = 10.0, noise: float = 0.3) -> np.ndarray:
    """Points around well-separated centers in 2-D, ``sizes[g]`` of group g, in group order."""
    centers = spread * np.array([[np.cos(a), np.sin(a)] for a in np.linspace(0, 2 * np.pi, len(sizes) + 1)[:-1]])
    return np.vstack([c + noise * rng.standard_normal((n, 2)) for c, n in zip(centers, sizes, strict=True)])


def with_outlier(rng: np.random.Generator) -> np.ndarray:
    """Two groups of five and one far-away point: the unconstrained BIC makes the point its own cluster."""
    return np.vstack([blobs(rng, [5, 5], spread=5.0), [[40.0, 40.0]]])


# ---------------------------------------------------------------------------------------- minimum size


def test_unconstrained_bic_makes_a_singleton_and_the_minimum_size_merges_it() -> None:
    x = with_outlier(np.random.default_rng(0))
    free = choose_k_bic(x, k_max=4)
    assert free.k == 3 and hard_sizes(free.model.resp).min() == 1  # the failure the minimum size is for
    held = fit_clusters(x, k_min=1, k_max=4, min_size=2)
    assert held.k == 2 and hard_sizes(held.resp).min() >= 2 and held.note == ""
    assert 3 in held.merged and set(held.bics) <= {1, 2, 3, 4}
    # the outlier joins a group instead of forming its own; the two groups stay apart
    assert adjusted_rand_index([0] * 5 + [1] * 5, held.resp.argmax(1)[:10]) == 1.0


def test_fixed_k_merges_down_to_the_largest_k_that_holds_the_minimum_size() -> None:
    x = with_outlier(np.random.default_rng(1))
    fit = fit_clusters(x, k_min=3, k_max=3, min_size=2)
    assert fit.k == 2 and hard_sizes(fit.resp).min() >= 2
    assert fit.merged == [3] and "K = 3" in fit.note and "using K = 2" in fit.note
    assert adjusted_rand_index([0] * 5 + [1] * 5, fit.resp.argmax(1)[:10]) == 1.0
    free = fit_clusters(x, k_min=3, k_max=3, min_size=1)  # no minimum: the asked K, no note
    assert free.k == 3 and free.note == ""
    few = fit_clusters(x[:3], k_min=2, k_max=3, min_size=5)  # too few clients for any split
    assert few.k == 1 and "using K = 1" in few.note


def test_bic_within_the_range_picks_the_true_k() -> None:
    rng = np.random.default_rng(2)
    x = blobs(rng, [6, 6, 6, 6])
    truth = np.repeat(np.arange(4), 6)
    fit = fit_clusters(x, k_min=2, k_max=6, min_size=2)
    assert fit.k == 4 and set(fit.bics) == set(range(2, 7)) and fit.note == ""
    assert adjusted_rand_index(truth, fit.resp.argmax(1)) == 1.0
    narrow = fit_clusters(x, k_min=2, k_max=3, min_size=2)  # the range bounds K even when BIC wants more
    assert narrow.k in (2, 3) and set(narrow.bics) == {2, 3}
    with pytest.raises(ValueError, match="min clusters"):
        fit_clusters(x, k_min=3, k_max=2, min_size=2)


# ---------------------------------------------------------------------------------------- soft memberships


def test_memberships_are_soft_on_overlapping_data_and_sum_to_one() -> None:
    rng = np.random.default_rng(3)
    x = np.vstack([rng.standard_normal((20, 2)), rng.standard_normal((20, 2)) + [1.5, 0.0]])  # overlapping
    resp = gmm_fit(x, 2, seed=0).resp
    p = soften(resp, 0.1)
    np.testing.assert_allclose(p.sum(1), 1.0)
    assert p.min() >= 0.05 - 1e-12 and p.max() <= 0.95 + 1e-12
    assert (p.max(1) < 0.8).sum() >= 3  # clients between the groups keep a real share of both
    assert 0 < membership_entropy(p) < 1
    assert membership_entropy(soften(np.eye(2)[[0, 0, 1]], 0.0)) == 0.0


def test_one_hot_posteriors_stay_shared_rows() -> None:
    resp = np.array([[1.0, 0.0, 0.0], [1.0 - 1e-12, 1e-12, 0.0], [0.2, 0.5, 0.3]])
    p = soften(resp, 0.3)
    assert p[0].tobytes() == p[1].tobytes()  # one factorization for both (the model cache key)
    np.testing.assert_allclose(p[0], [0.8, 0.1, 0.1])
    np.testing.assert_allclose(p[2], 0.7 * resp[2] + 0.1)
    assert np.array_equal(soften(resp, 0.0)[1], [1.0, 0.0, 0.0])
    assert np.array_equal(soften(np.ones((2, 1)), 0.3), np.ones((2, 1)))
    with pytest.raises(ValueError, match="floor"):
        soften(resp, 1.5)


# ---------------------------------------------------------------------------------------- signatures


def test_both_signature_weighs_head_and_delta_blocks_equally() -> None:
    rng = np.random.default_rng(4)
    heads = {f"c{i}": {"head.bias": 100.0 * rng.standard_normal(3)} for i in range(6)}
    sketches = {f"c{i}": rng.standard_normal(8) for i in range(5)}  # c5 has no ΔW sketch yet
    empty = [ClusterState({}, {})]
    ids, x = client_signatures("both", heads, heads, sketches, empty, np.ones(1))
    assert ids == [f"c{i}" for i in range(5)] and x.shape == (5, 3 + 8)
    for block in (x[:, :3], x[:, 3:]):
        np.testing.assert_allclose(block.mean(0), 0.0, atol=1e-12)
        assert (block**2).sum(1).mean() == pytest.approx(1.0)
    ids, x = client_signatures("head", heads, heads, sketches, empty, np.ones(1))
    assert len(ids) == 6 and x.shape == (6, 3)
    with pytest.raises(ValueError, match="signature"):
        client_signatures("tail", heads, heads, sketches, empty, np.ones(1))
    assert SIGNATURE_CHOICES == SIGNATURES  # the CLI's light copy


def planted_delta_round(fed: Federation, rng: np.random.Generator, groups: list[int], uid0: int) -> None:
    """Clients of each group send ΔW near their group's (every row) and one shared head plus small noise."""
    plan = ClientPlan.from_plan(plan_dict([0, 1], 2, ["query", "value"], 1.0), SPEC)
    bases = {g: {n: rng.standard_normal((SPEC.modules[n].out_features, 2)) for n in plan.ranks} for g in set(groups)}
    a = {n: np.random.default_rng(99).standard_normal((2, SPEC.modules[n].in_features)) for n in plan.ranks}
    head = {k: np.random.default_rng(98).standard_normal(s) for k, s in SPEC.head_shapes.items()}
    for i, g in enumerate(groups):
        cid = f"c{i:02d}"
        fed.register(cid, plan)
        tensors = update_tensors(
            rng, SPEC, plan, head={k: v + 0.01 * rng.standard_normal(v.shape) for k, v in head.items()}
        )
        for n in plan.ranks:
            tensors[f"{n}.A"] = a[n].astype(np.float32)
            tensors[f"{n}.B_rows"] = (bases[g][n] + 0.05 * rng.standard_normal(bases[g][n].shape)).astype(np.float32)
        fed.add_pending(PendingUpdate(uid0 + i, cid, uid0 + i, fed.version, 10, 0.0, tensors))


@pytest.mark.parametrize("source", ["delta", "both"])
def test_signature_option_plumbs_through_the_coordinator(source: str) -> None:
    groups = [i % 2 for i in range(10)]
    found = {}
    for sig in ("head", source):
        cfg = FederationConfig(
            buffer_size=10, clusters=2, warmup_aggregations=1, recluster_every=1, cluster_signature=sig, seed=0
        )
        fed = Federation(SPEC, cfg)
        planted_delta_round(fed, np.random.default_rng(5), groups, 0)
        fed.apply(fed.aggregate())
        found[sig] = [int(np.argmax(fed.membership_of(f"c{i:02d}"))) for i in range(10)]
        assert (sig == "head") == (not fed.sketches)  # sketches are kept only when the signature uses them
    assert adjusted_rand_index(groups, found[source]) == 1.0  # the groups differ only in ΔW
    assert adjusted_rand_index(groups, found["head"]) < 0.5  # heads are noise around one head


# ---------------------------------------------------------------------------------------- the federation


def outlier_round(fed: Federation, rng: np.random.Generator, uid0: int) -> None:
    plan = ClientPlan.from_plan(plan_dict([1], 2, ["query"], 1.0), SPEC)
    centers = [{k: 3.0 * rng.standard_normal(s) for k, s in SPEC.head_shapes.items()} for _ in range(3)]
    for i, g in enumerate([0, 0, 0, 1, 1, 1, 2]):  # group 2 is one client
        cid = f"c{i:02d}"
        fed.register(cid, plan)
        head = {k: v + 0.05 * rng.standard_normal(v.shape) for k, v in centers[g].items()}
        fed.add_pending(
            PendingUpdate(uid0 + i, cid, uid0 + i, fed.version, 10, 0.0, update_tensors(rng, SPEC, plan, head=head))
        )


def test_federation_holds_the_minimum_size_logs_once_and_reports_figures(caplog: pytest.LogCaptureFixture) -> None:
    cfg = FederationConfig(
        buffer_size=7,
        clusters=3,
        min_cluster_size=2,
        warmup_aggregations=1,
        recluster_every=1,
        cluster_signature="head",
    )
    fed = Federation(SPEC, cfg)
    rng = np.random.default_rng(6)
    with caplog.at_level(logging.WARNING, logger="fedhft.server"):
        for r in range(3):
            outlier_round(fed, rng, 100 * r)
            fed.apply(fed.aggregate())
    notes = [rec for rec in caplog.records if "keeps every cluster >= 2" in rec.getMessage()]
    assert len(notes) == 1 and "K = 3" in notes[0].getMessage()
    assert fed.num_clusters == 2
    figures = fed.cluster_figures()
    assert min(figures.hard) >= 2 and sum(figures.hard) == 7 and figures.smallest == min(figures.hard)
    assert sum(figures.soft) == pytest.approx(7.0)
    for p in fed.memberships.values():  # soft by default: the floor keeps every share >= 0.1 / K
        assert p.sum() == pytest.approx(1.0) and p.min() >= 0.05 - 1e-12
    models = fed.cluster_models()
    assert [m.meta["members"] for m in models] == figures.hard
    assert all(m.meta["min_cluster_size"] == 2 and m.meta["smallest_cluster"] == figures.smallest for m in models)
    assert sum(float(m.meta["soft_members"]) for m in models) == pytest.approx(7.0, abs=1e-3)
    meta = fed.client_model("c00").meta
    assert np.array([float(v) for v in str(meta["membership"]).split(",")]).sum() == pytest.approx(1.0, abs=1e-5)


def test_auto_k_stays_within_the_range() -> None:
    cfg = FederationConfig(
        buffer_size=7, clusters=None, min_clusters=2, max_clusters=2, warmup_aggregations=1, cluster_signature="head"
    )
    fed = Federation(SPEC, cfg)
    outlier_round(fed, np.random.default_rng(7), 0)
    fed.apply(fed.aggregate())
    assert fed.num_clusters == 2 and min(fed.clients_per_cluster()) >= 2


def test_cluster_config_errors_name_the_problem() -> None:
    with pytest.raises(FederationError, match="cluster signature"):
        FederationConfig(cluster_signature="tail")
    with pytest.raises(FederationError, match="min clusters <= max clusters"):
        FederationConfig(clusters=None, min_clusters=4, max_clusters=3)
    with pytest.raises(FederationError, match="min cluster size"):
        FederationConfig(min_cluster_size=0)
    with pytest.raises(FederationError, match="membership floor"):
        FederationConfig(membership_floor=1.0)


def test_server_run_passes_the_clustering_options(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    run = ServerRunCapture(monkeypatch, tmp_path)
    res = run.invoke()
    assert res.exit_code == 0, res.output
    fed = run.config.federation
    defaults = (fed.min_cluster_size, fed.membership_floor, fed.cluster_signature, fed.min_clusters, fed.max_clusters)
    assert defaults == (2, 0.1, "delta", 1, 8)
    args = ["--clusters", "auto", "--min-clusters", "2", "--max-clusters", "4", "--min-cluster-size", "3"]
    args += ["--membership-floor", "0.2", "--cluster-signature", "both"]
    res = run.invoke(*args)
    assert res.exit_code == 0, res.output
    fed = run.config.federation
    assert (fed.clusters, fed.min_clusters, fed.max_clusters, fed.min_cluster_size) == (None, 2, 4, 3)
    assert (fed.membership_floor, fed.cluster_signature) == (0.2, "both")
    res = run.invoke(*args, "--cluster-signature", "tail")
    assert res.exit_code == 2 and "tail" in res.output
    res = run.invoke(*args, "--min-clusters", "5")
    assert res.exit_code != 0 and "min clusters <= max clusters" in str(res.exception)
