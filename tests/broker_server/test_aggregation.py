"""Masked dW aggregation of changes, re-factoring, rank-collapse metrics, baselines and buffered aggregation.

The FedBuff arithmetic against hand-computed examples (changes since the received model, staleness, server lr)
is in test_fedbuff.py; here the row aggregation of changes is checked against a loop reference."""

from __future__ import annotations

import numpy as np
import pytest

from fedhft.broker_server.aggregation import (
    ClusterState,
    aggregate_buffer,
    aggregate_changes,
    aggregate_head_changes,
    masked_delta,
    should_aggregate,
    staleness_weight,
)
from fedhft.broker_server.aggregation_inputs import AggregationError, ClientUpdate, MaskedFactors
from fedhft.broker_server.cluster_mixing import personalized_delta
from fedhft.broker_server.factor_aggregation import LoraFactors
from tests.support.reference_baselines import (
    fedavg_factors,
    flexlora_aggregate,
    guard_rank_collapse,
    hetlora_aggregate,
    hetlora_weights,
    rank_collapse_ratio,
    refactor,
    refactor_for_plan,
    singular_energy,
)

SHAPES = {"layers.0.query": (12, 10), "layers.0.value": (12, 10), "layers.1.query": (9, 7)}


def masked(rng: np.random.Generator, out: int, inp: int, rank: int, n_rows: int) -> MaskedFactors:
    rows = np.sort(rng.choice(out, size=n_rows, replace=False))
    return MaskedFactors(
        A=rng.standard_normal((rank, inp)),
        B_rows=rng.standard_normal((n_rows, rank)),
        rows=rows,
        out_features=out,
    )


def random_update(rng: np.random.Generator, cid: str, full: bool = False, base_version: int = 0) -> ClientUpdate:
    rank = int(rng.integers(1, 6))
    modules = {}
    for name, (out, inp) in SHAPES.items():
        if not full and rng.random() < 0.2:
            continue  # this client's plan skips the module
        n_rows = out if full else int(rng.integers(0, out + 1))
        modules[name] = masked(rng, out, inp, rank, n_rows)
    head = {"head.weight": rng.standard_normal((3, 4)), "head.bias": rng.standard_normal(3)}
    return ClientUpdate(cid, int(rng.integers(1, 100)), base_version, modules, head)


def loop_reference(updates, weights, scales):
    """Row-by-row, client-by-client reference for the masked mean change: Σ w s δ / Σ w over a row's senders."""
    out = {}
    for name, (n_out, n_in) in SHAPES.items():
        change = np.zeros((n_out, n_in))
        coverage = np.zeros(n_out)
        for i in range(n_out):
            num, den = np.zeros(n_in), 0.0
            for u, w, sc in zip(updates, weights, scales, strict=True):
                f = u.modules.get(name)
                if f is None or w == 0 or i not in list(f.rows):
                    continue
                j = list(f.rows).index(i)
                num += w * sc * (f.B_rows[j] @ f.A)
                den += w
            coverage[i] = den
            if den > 0:
                change[i] = num / den
        out[name] = (change, coverage)
    return out


# --------------------------------------------------------------------------------------------------
# Masked aggregation of changes
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_masked_aggregation_matches_loop_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    updates = [random_update(rng, f"c{i}") for i in range(6)]
    weights = rng.uniform(0.1, 3.0, size=len(updates))
    weights[rng.integers(len(updates))] = 0.0
    scales = rng.uniform(0.2, 1.0, size=len(updates))  # staleness discounts: outside the normalization
    got = aggregate_changes(updates, weights, shapes=SHAPES, scales=scales)
    want = loop_reference(updates, weights, scales)
    sent = {n for u in updates for n in u.modules}
    assert set(got) == sent
    for name in sent:
        change, coverage = want[name]
        np.testing.assert_allclose(got[name].change, change, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got[name].coverage, coverage, rtol=1e-12)


def test_full_masks_equal_weighted_fedavg_of_changes() -> None:
    rng = np.random.default_rng(1)
    updates = [random_update(rng, f"c{i}", full=True) for i in range(4)]
    weights = np.array([u.num_samples for u in updates], dtype=float)
    got = aggregate_changes(updates, weights)
    for name in SHAPES:
        dense = [u.modules[name].B_rows[np.argsort(u.modules[name].rows)] @ u.modules[name].A for u in updates]
        want = sum(w * d for w, d in zip(weights, dense, strict=True)) / weights.sum()
        np.testing.assert_allclose(got[name].change, want, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got[name].coverage, weights.sum())


def test_factor_averaging_is_not_delta_w_averaging() -> None:
    rng = np.random.default_rng(2)
    clients = [LoraFactors(A=rng.standard_normal((4, 16)), B=rng.standard_normal((20, 4))) for _ in range(5)]
    weights = np.ones(5)
    naive = fedavg_factors(clients, weights).delta()
    exact = sum(c.delta() for c in clients) / 5
    rel = np.linalg.norm(naive - exact) / np.linalg.norm(exact)
    assert rel > 0.5  # avg(B) avg(A) != avg(B A): far from a rounding difference


def test_fedavg_factors_rejects_mixed_ranks() -> None:
    a = LoraFactors(A=np.ones((2, 3)), B=np.ones((4, 2)))
    b = LoraFactors(A=np.ones((3, 3)), B=np.ones((4, 3)))
    with pytest.raises(AggregationError):
        fedavg_factors([a, b], [1, 1])


def test_unsent_rows_and_zero_weight_rows_keep_previous_exactly() -> None:
    rng = np.random.default_rng(3)
    name, (out, inp) = "layers.0.query", SHAPES["layers.0.query"]
    a = ClientUpdate(
        "a", 2, 0, {name: MaskedFactors(rng.standard_normal((3, inp)), rng.standard_normal((2, 3)), [1, 4], out)}
    )
    b = ClientUpdate("b", 0, 0, {name: MaskedFactors(rng.standard_normal((2, inp)), np.ones((2, 2)), [4, 7], out)})
    got = aggregate_changes([a, b], [2.0, 0.0])[name]
    untouched = [i for i in range(out) if i not in (1, 4)]  # row 7 only came from a zero-weight client
    assert np.array_equal(got.change[untouched], np.zeros((len(untouched), inp)))
    assert np.array_equal(got.coverage, np.where(np.isin(np.arange(out), [1, 4]), 2.0, 0.0))
    np.testing.assert_allclose(got.change[[1, 4]], masked_delta(a.modules[name])[1])
    assert list(np.flatnonzero(got.covered)) == [1, 4]
    previous = ClusterState({name: rng.standard_normal((out, inp))})
    (new,) = aggregate_buffer([previous], [a, b], 0, 0.5)
    assert np.array_equal(new.modules[name][untouched], previous.modules[name][untouched])  # bit for bit


def test_missing_modules_start_at_zero_and_unsent_modules_pass_through() -> None:
    rng = np.random.default_rng(4)
    f = MaskedFactors(rng.standard_normal((2, 10)), rng.standard_normal((3, 2)), [0, 5, 11], 12)
    u = ClientUpdate("a", 5, 0, {"layers.0.query": f})
    kept = rng.standard_normal((9, 7))
    (got,) = aggregate_buffer([ClusterState({"layers.1.query": kept})], [u], 0, 0.5)
    rest = np.setdiff1d(np.arange(12), [0, 5, 11])
    assert np.array_equal(got.modules["layers.0.query"][rest], np.zeros((rest.size, 10)))
    np.testing.assert_allclose(got.modules["layers.0.query"][[0, 5, 11]], masked_delta(f)[1])
    assert np.array_equal(got.modules["layers.1.query"], kept)
    assert got.modules["layers.1.query"] is not kept


def test_aggregation_does_not_modify_inputs() -> None:
    rng = np.random.default_rng(5)
    updates = [random_update(rng, f"c{i}") for i in range(3)]
    state = ClusterState({name: rng.standard_normal(shape) for name, shape in SHAPES.items()})
    snapshot = state.copy()
    aggregate_buffer([state], updates, 0, 0.5)
    for k in state.modules:
        assert np.array_equal(state.modules[k], snapshot.modules[k])


def test_shape_disagreements_are_errors() -> None:
    f = MaskedFactors(np.ones((2, 10)), np.ones((1, 2)), [0], 12)
    u = ClientUpdate("a", 5, 0, {"m": f})
    with pytest.raises(AggregationError, match="'m'"):
        aggregate_changes([u], [1.0], shapes={"m": (12, 11)})
    with pytest.raises(AggregationError, match="'m'"):
        aggregate_buffer([ClusterState({"m": np.zeros((13, 10))})], [u], 0, 0.5)
    with pytest.raises(AggregationError):
        aggregate_changes([u], [1.0, 2.0])
    with pytest.raises(AggregationError):
        aggregate_changes([u], [-1.0])
    with pytest.raises(AggregationError):
        aggregate_changes([u], [1.0], scales=[1.5])


@pytest.mark.parametrize(
    ("a_shape", "b_shape", "rows", "out"),
    [
        ((2, 10), (3, 3), [0, 1, 2], 12),  # B_rows rank != A rank
        ((2, 10), (3, 2), [0, 1], 12),  # row count != B_rows rows
        ((2, 10), (2, 2), [0, 12], 12),  # row out of range
        ((2, 10), (2, 2), [3, 3], 12),  # duplicate rows
        ((2, 10), (2, 2), [0.0, 1.0], 12),  # float rows
        ((0, 10), (2, 0), [0, 1], 12),  # rank 0
    ],
)
def test_client_update_validates_and_names_module(a_shape, b_shape, rows, out) -> None:
    f = MaskedFactors(np.ones(a_shape), np.ones(b_shape), np.asarray(rows), out)
    with pytest.raises(ValueError, match="layers.3.value"):
        ClientUpdate("a", 1, 0, {"layers.3.value": f})


def test_client_update_rejects_non_finite_and_bad_metadata() -> None:
    f = MaskedFactors(np.full((1, 3), np.nan), np.ones((1, 1)), [0], 2)
    with pytest.raises(ValueError, match="layers.0.key"):
        ClientUpdate("a", 1, 0, {"layers.0.key": f})
    with pytest.raises(ValueError):
        ClientUpdate("", 1, 0, {})
    with pytest.raises(ValueError):
        ClientUpdate("a", -1, 0, {})
    with pytest.raises(ValueError, match="head.bias"):
        ClientUpdate("a", 1, 0, {}, head={"head.bias": np.array([np.inf])})


def test_head_change_is_a_discounted_weighted_average() -> None:
    rng = np.random.default_rng(6)
    updates = [random_update(rng, f"c{i}") for i in range(3)]
    w, sc = np.array([1.0, 2.0, 5.0]), np.array([1.0, 0.5, 0.25])
    got = aggregate_head_changes(updates, w, scales=sc)
    for key in ("head.weight", "head.bias"):
        want = sum(wk * sk * u.head[key] for u, wk, sk in zip(updates, w, sc, strict=True)) / w.sum()
        np.testing.assert_allclose(got[key], want)
    assert aggregate_head_changes(updates, np.zeros(3)) == {}  # no weight: no change


# --------------------------------------------------------------------------------------------------
# Re-factoring and rank collapse
# --------------------------------------------------------------------------------------------------


def with_spectrum(rng: np.random.Generator, out: int, inp: int, s: np.ndarray) -> np.ndarray:
    u, _ = np.linalg.qr(rng.standard_normal((out, s.size)))
    v, _ = np.linalg.qr(rng.standard_normal((inp, s.size)))
    return (u * s) @ v.T


@pytest.mark.parametrize("rank", range(1, 9))
def test_refactor_is_truncated_svd_with_planned_shapes(rank: int) -> None:
    rng = np.random.default_rng(7)
    m = rng.standard_normal((7, 5))  # min dim 5 < R = 8: ranks 6..8 are zero-padded
    b, a = refactor(m, rank)
    assert b.shape == (7, rank) and a.shape == (rank, 5)
    s = np.linalg.svd(m, compute_uv=False)
    err = np.linalg.norm(m - b @ a)
    np.testing.assert_allclose(err, np.sqrt((s[rank:] ** 2).sum()), atol=1e-10)  # Eckart-Young
    u, s_, vt = np.linalg.svd(m, full_matrices=False)
    r = min(rank, 5)
    np.testing.assert_allclose(b @ a, (u[:, :r] * s_[:r]) @ vt[:r], atol=1e-10)
    np.testing.assert_allclose(b.T @ b, a @ a.T, atol=1e-10)  # singular values split evenly
    assert np.all(b[:, r:] == 0) and np.all(a[r:] == 0)


def test_randomized_refactor_is_close_to_exact_and_deterministic() -> None:
    rng = np.random.default_rng(8)
    m = with_spectrum(rng, 300, 200, np.geomspace(10, 1, 8)) + 0.01 * rng.standard_normal((300, 200))
    b, a = refactor(m, 8)
    br, ar = refactor(m, 8, method="randomized", seed=3)
    exact_err, rand_err = np.linalg.norm(m - b @ a), np.linalg.norm(m - br @ ar)
    assert rand_err <= exact_err * 1.001
    np.testing.assert_allclose(br @ ar, b @ a, atol=1e-3 * np.linalg.norm(m))
    br2, ar2 = refactor(m, 8, method="randomized", seed=3)
    assert np.array_equal(br, br2) and np.array_equal(ar, ar2)
    with pytest.raises(AggregationError):
        refactor(m, 8, method="qr")
    with pytest.raises(AggregationError):
        refactor(m, 0)


def test_refactor_for_plan_gives_each_module_its_planned_rank() -> None:
    rng = np.random.default_rng(9)
    global_delta = {name: rng.standard_normal(shape) for name, shape in SHAPES.items()}
    plan = {"layers.0.query": 1, "layers.0.value": 4, "layers.1.query": 8}
    got = refactor_for_plan(global_delta, plan)
    assert set(got) == set(plan)
    for name, r in plan.items():
        b, a = got[name]
        assert b.shape == (SHAPES[name][0], r) and a.shape == (r, SHAPES[name][1])
    with pytest.raises(AggregationError, match="layers.9.query"):
        refactor_for_plan(global_delta, {"layers.9.query": 2})


def test_singular_energy_and_collapse_ratio() -> None:
    rng = np.random.default_rng(10)
    s = np.array([4.0, 2.0, 1.0, 1.0])
    m = with_spectrum(rng, 10, 8, s)
    total = (s**2).sum()
    np.testing.assert_allclose(singular_energy(m, 6), np.r_[s**2 / total, 0, 0], atol=1e-12)
    np.testing.assert_allclose(rank_collapse_ratio(m, 2, 4), 2.0 / 20.0)
    assert rank_collapse_ratio(np.zeros((4, 4)), 1, 2) == 0.0
    assert np.all(singular_energy(np.zeros((4, 4)), 2) == 0)
    with pytest.raises(AggregationError):
        rank_collapse_ratio(m, 3, 3)


def test_guard_rank_collapse_rescales_only_the_faded_band() -> None:
    rng = np.random.default_rng(11)
    s = np.array([5.0, 4.0, 0.2, 0.1, 0.05])
    m = with_spectrum(rng, 12, 9, s)
    guarded = guard_rank_collapse(m, r_low=2, r_high=4, floor=0.01)
    assert guarded.gain > 1
    np.testing.assert_allclose(guarded.ratio_after, 0.01)
    np.testing.assert_allclose(rank_collapse_ratio(guarded.delta_w, 2, 4), 0.01)
    s_new = np.linalg.svd(guarded.delta_w, compute_uv=False)
    np.testing.assert_allclose(s_new[[0, 1, 4]], s[[0, 1, 4]], atol=1e-10)  # head and beyond-band kept
    np.testing.assert_allclose(s_new[2:4], s[2:4] * guarded.gain, atol=1e-10)

    capped = guard_rank_collapse(m, 2, 4, floor=0.5, max_gain=2.0)
    assert capped.gain == 2.0 and capped.ratio_after < 0.5

    fine = guard_rank_collapse(m, 2, 4, floor=1e-4)
    assert fine.gain == 1.0 and np.array_equal(fine.delta_w, m)

    no_tail = with_spectrum(rng, 12, 9, np.array([3.0, 1.0]))
    untouched = guard_rank_collapse(no_tail, 2, 4, floor=0.1)
    assert untouched.gain == 1.0 and untouched.ratio_before < 1e-20
    assert np.array_equal(untouched.delta_w, no_tail)


# --------------------------------------------------------------------------------------------------
# Staleness and buffering
# --------------------------------------------------------------------------------------------------


def test_staleness_weight() -> None:
    assert staleness_weight(5, 5, 0.5) == 1.0
    assert staleness_weight(7, 4, 0.5) == pytest.approx(0.5)  # (1 + 3) ** -0.5
    assert staleness_weight(10, 0, 0.0) == 1.0
    values = [staleness_weight(10, 10 - tau, 0.7) for tau in range(10)]
    assert all(a > b for a, b in zip(values, values[1:], strict=False))
    with pytest.raises(ValueError):
        staleness_weight(3, 4, 0.5)
    with pytest.raises(ValueError):
        staleness_weight(3, 1, -1.0)


def test_should_aggregate() -> None:
    assert should_aggregate(4, 4, 0.1, 60.0)
    assert not should_aggregate(3, 4, 10.0, 60.0)
    assert should_aggregate(1, 4, 60.0, 60.0)
    assert not should_aggregate(0, 4, 1e9, 60.0)
    assert not should_aggregate(2, 4, None, 60.0)
    with pytest.raises(ValueError):
        should_aggregate(1, 0, 1.0, 1.0)


def test_aggregate_buffer_single_cluster_adds_the_discounted_mean_change() -> None:
    rng = np.random.default_rng(12)
    updates = [random_update(rng, f"c{i}", base_version=int(rng.integers(0, 5))) for i in range(5)]
    state = ClusterState({n: rng.standard_normal(s) for n, s in SHAPES.items()}, {"head.bias": np.ones(3)})
    before = state.copy()
    n = np.array([u.num_samples for u in updates], dtype=float)
    sc = np.array([staleness_weight(5, u.base_version, 0.5) for u in updates])
    (new,) = aggregate_buffer([state], updates, current_version=5, staleness_exponent=0.5, server_lr=0.7)
    want = aggregate_changes(updates, n, scales=sc)
    for name in SHAPES:
        np.testing.assert_allclose(new.modules[name], state.modules[name] + 0.7 * want[name].change)
    heads = aggregate_head_changes(updates, n, scales=sc)
    np.testing.assert_allclose(new.head["head.bias"], 1.0 + 0.7 * heads["head.bias"])
    np.testing.assert_allclose(new.head["head.weight"], heads["head.weight"])  # a first head: taken as sent
    for name in SHAPES:  # the input state is not modified
        assert np.array_equal(state.modules[name], before.modules[name])


def test_aggregate_buffer_server_lr_moves_covered_rows_only() -> None:
    rng = np.random.default_rng(13)
    name = "layers.0.query"
    f = MaskedFactors(rng.standard_normal((2, 10)), rng.standard_normal((2, 2)), [3, 8], 12)
    u = ClientUpdate("a", 4, 2, {name: f})
    old = rng.standard_normal((12, 10))
    (new,) = aggregate_buffer([ClusterState({name: old})], [u], 2, 1.0, server_lr=0.25)
    rows, d_rows = masked_delta(f)
    np.testing.assert_allclose(new.modules[name][rows], old[rows] + 0.25 * d_rows)
    rest = np.setdiff1d(np.arange(12), rows)
    assert np.array_equal(new.modules[name][rest], old[rest])
    with pytest.raises(ValueError):
        aggregate_buffer([ClusterState({name: old})], [u], 2, 1.0, server_lr=0.0)
    with pytest.raises(ValueError):
        aggregate_buffer([ClusterState({name: old})], [u], 1, 1.0)  # base version newer than current


def test_aggregate_buffer_routes_updates_by_membership() -> None:
    rng = np.random.default_rng(14)
    name, out, inp = "layers.0.query", 12, 10
    a = ClientUpdate("a", 10, 0, {name: masked(rng, out, inp, 2, out)}, {"head.bias": np.ones(3)})
    b = ClientUpdate("b", 10, 0, {name: masked(rng, out, inp, 3, out)}, {"head.bias": -np.ones(3)})
    zero = ClusterState({name: np.zeros((out, inp))}, {"head.bias": np.zeros(3)})
    states = [zero.copy(), zero.copy()]
    members = {"a": np.array([1.0, 0.0]), "b": np.array([0.25, 0.75])}
    c0, c1 = aggregate_buffer(states, [a, b], 0, 0.5, memberships=members)
    da, db = (masked_delta(u.modules[name]) for u in (a, b))
    dense_a, dense_b = np.zeros((out, inp)), np.zeros((out, inp))
    dense_a[da[0]], dense_b[db[0]] = da[1], db[1]
    np.testing.assert_allclose(c0.modules[name], (dense_a + 0.25 * dense_b) / 1.25)
    np.testing.assert_allclose(c1.modules[name], dense_b)
    np.testing.assert_allclose(c0.head["head.bias"], np.full(3, 0.75 / 1.25))
    np.testing.assert_allclose(c1.head["head.bias"], -np.ones(3))
    assert not np.shares_memory(c0.modules[name], c1.modules[name])
    with pytest.raises(ValueError, match="'b'"):
        aggregate_buffer(states, [a, b], 0, 0.5, memberships={"a": np.array([1.0, 0.0])})


def test_aggregate_buffer_with_empty_buffer_keeps_state() -> None:
    state = ClusterState({"m": np.arange(6.0).reshape(2, 3)}, {"head.bias": np.ones(2)})
    (new,) = aggregate_buffer([state], [], 3, 0.5)
    assert np.array_equal(new.modules["m"], state.modules["m"])
    assert np.array_equal(new.head["head.bias"], state.head["head.bias"])
    assert new.modules["m"] is not state.modules["m"]


def test_personalized_delta_is_the_membership_mixture() -> None:
    rng = np.random.default_rng(15)
    states = [ClusterState({"m": rng.standard_normal((4, 3))}, {"head.bias": rng.standard_normal(2)}) for _ in range(3)]
    one_hot = personalized_delta(states, np.array([0.0, 1.0, 0.0]))
    assert np.array_equal(one_hot.modules["m"], states[1].modules["m"])
    assert np.array_equal(one_hot.head["head.bias"], states[1].head["head.bias"])
    mix = personalized_delta(states, np.array([1.0, 1.0, 2.0]))  # normalized to 0.25, 0.25, 0.5
    want = 0.25 * states[0].modules["m"] + 0.25 * states[1].modules["m"] + 0.5 * states[2].modules["m"]
    np.testing.assert_allclose(mix.modules["m"], want)
    with pytest.raises(ValueError):
        personalized_delta(states, np.array([1.0, 0.0]))


# --------------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------------


def dense_clients(rng: np.random.Generator, ranks: list[int], out: int = 10, inp: int = 8) -> list[LoraFactors]:
    return [
        LoraFactors(A=rng.standard_normal((r, inp)), B=rng.uniform(0.1, 2) * rng.standard_normal((out, r)))
        for r in ranks
    ]


def test_hetlora_weights_and_truncation() -> None:
    rng = np.random.default_rng(16)
    ranks = [2, 4, 6]
    clients = dense_clients(rng, ranks)
    samples = np.array([10.0, 20.0, 30.0])
    norms = np.array([np.linalg.norm(c.B @ c.A) for c in clients])
    result = hetlora_aggregate(clients, samples)
    np.testing.assert_allclose(result.weights, samples * norms / (samples * norms).sum())
    np.testing.assert_allclose(hetlora_weights(clients, samples), result.weights)
    a_pad = sum(w * np.pad(c.A, ((0, 6 - c.rank), (0, 0))) for w, c in zip(result.weights, clients, strict=True))
    b_pad = sum(w * np.pad(c.B, ((0, 0), (0, 6 - c.rank))) for w, c in zip(result.weights, clients, strict=True))
    np.testing.assert_allclose(result.global_factors.A, a_pad)
    np.testing.assert_allclose(result.global_factors.B, b_pad)
    for r, c in zip(ranks, result.per_client, strict=True):
        assert c.A.shape == (r, 8) and c.B.shape == (10, r)
        np.testing.assert_allclose(c.A, a_pad[:r])
        np.testing.assert_allclose(c.B, b_pad[:, :r])


def test_flexlora_is_svd_of_sample_weighted_delta_w() -> None:
    rng = np.random.default_rng(17)
    ranks = [1, 3, 5]
    clients = dense_clients(rng, ranks)
    samples = np.array([5.0, 1.0, 4.0])
    result = flexlora_aggregate(clients, samples)
    avg = sum(n * c.B @ c.A for n, c in zip(samples, clients, strict=True)) / samples.sum()
    np.testing.assert_allclose(result.delta_w, avg)
    for r, c in zip(ranks, result.per_client, strict=True):
        b, a = refactor(avg, r)
        assert c.B.shape == (10, r) and c.A.shape == (r, 8)
        np.testing.assert_allclose(c.B @ c.A, b @ a, atol=1e-10)
    custom = flexlora_aggregate(clients, samples, ranks=[2, 2, 2])
    assert all(c.rank == 2 for c in custom.per_client)


@pytest.mark.parametrize(("rows", "ok"), [([0, 2, 5], True), ([5, 0, 2], True), ([0, 2, 2], False), ([2, 0, 2], False)])
def test_masked_rows_must_be_distinct_sorted_or_not(rows: list[int], ok: bool) -> None:
    f = MaskedFactors(A=np.ones((2, 3)), B_rows=np.ones((3, 2)), rows=np.array(rows), out_features=6)
    if ok:
        f.check("m")
    else:
        with pytest.raises(AggregationError, match="distinct"):
            f.check("m")
