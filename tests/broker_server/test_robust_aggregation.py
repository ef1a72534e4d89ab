"""Robust aggregation math (trimmed mean, median, sample caps, clipping) on changes, and its wiring into the
coordinator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedhft.broker_server import aggregation, aggregation_inputs
from fedhft.broker_server.aggregation import (
    ClusterState,
    aggregate_buffer,
    aggregate_changes,
    aggregate_head_changes,
    change_norm,
)
from fedhft.broker_server.aggregation_inputs import ClientUpdate, MaskedFactors
from fedhft.broker_server.federation import Federation, FederationConfig, FederationError, PendingUpdate
from fedhft.broker_server.robust import (
    ROBUST_RULES,
    RobustError,
    capped_samples,
    clip_bound,
    clip_scales,
    robust_combine,
    weighted_median,
    weighted_trimmed_mean,
)
from fedhft.broker_server.validation import ClientPlan, to_client_update
from tests.support.server import ServerRunCapture, plan_dict, small_spec, update_tensors

SPEC = small_spec()


def trimmed_reference(x: np.ndarray, k: int) -> np.ndarray:
    """Drop the k smallest and k largest values along axis 0, then average (the textbook trimmed mean)."""
    s = np.sort(x, axis=0)
    return s[k : x.shape[0] - k].mean(0)


@pytest.mark.parametrize("n", [1, 2, 5, 10])
def test_median_equals_numpy_on_dense_equal_weights(n: int) -> None:
    x = np.random.default_rng(n).standard_normal((n, 7, 3))
    np.testing.assert_allclose(weighted_median(x, np.ones((n, 1, 1))), np.median(x, axis=0), rtol=0, atol=1e-15)
    np.testing.assert_allclose(robust_combine(x, np.full((n, 1, 1), 0.1), "median"), np.median(x, axis=0), atol=1e-15)


@pytest.mark.parametrize(("n", "beta", "k"), [(10, 0.2, 2), (5, 0.2, 1), (8, 0.25, 2), (6, 0.0, 0)])
def test_trimmed_mean_equals_the_textbook_one_when_beta_n_is_whole(n: int, beta: float, k: int) -> None:
    x = np.random.default_rng(n).standard_normal((n, 4, 5))
    for w in (np.ones((n, 1, 1)), np.full((n, 1, 1), 0.37)):
        np.testing.assert_allclose(weighted_trimmed_mean(x, w, beta), trimmed_reference(x, k), atol=1e-12)
    if beta == 0:
        np.testing.assert_allclose(robust_combine(x, np.ones((n, 1, 1)), "none"), x.mean(0), atol=1e-12)


def test_fractional_trim_and_few_senders() -> None:
    a, b, c = 1.0, 2.0, 30.0
    got = weighted_trimmed_mean(np.array([c, a, b]), np.ones(3), 0.2)  # cuts 0.6 of a value at each end
    assert got == pytest.approx((0.4 * a + b + 0.4 * c) / 1.8)
    assert weighted_trimmed_mean(np.array([5.0]), np.ones(1), 0.4) == 5.0  # one sender: its value
    assert weighted_trimmed_mean(np.array([1.0, 3.0]), np.ones(2), 0.4) == 2.0  # two: their mean
    assert weighted_median(np.array([1.0, 3.0]), np.array([1.0, 3.0])) == 3.0  # two: the heavier one
    assert weighted_median(np.array([1.0, 2.0, 3.0]), np.array([2.0, 1.0, 1.0])) == 1.5  # like [1, 1, 2, 3]


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=9),
    data=st.data(),
)
def test_integer_weights_act_as_repeated_values(values: list[float], data: st.DataObject) -> None:
    weights = data.draw(st.lists(st.integers(0, 3), min_size=len(values), max_size=len(values)))
    v, w = np.array(values), np.array(weights, dtype=np.float64)
    repeated = np.repeat(v, w.astype(int))
    if repeated.size == 0:
        assert weighted_median(v, w, fill=7.0) == 7.0 and weighted_trimmed_mean(v, w, 0.25, fill=7.0) == 7.0
        return
    assert weighted_median(v, w) == pytest.approx(np.median(repeated), rel=1e-12, abs=1e-9)
    if repeated.size % 4 == 0:  # beta * total is whole: the textbook trimmed mean of the repetitions
        k = repeated.size // 4
        want = trimmed_reference(repeated, k)
        assert weighted_trimmed_mean(v, w, 0.25) == pytest.approx(want, rel=1e-9, abs=1e-6)


def test_absent_entries_are_ignored_and_nan_never_comes_out() -> None:
    x = np.array([[1.0, np.nan, 4.0], [np.nan, np.nan, 2.0], [3.0, np.nan, 100.0]])
    w = np.array([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 0.0, 1.0]])
    for rule in ROBUST_RULES:
        out = robust_combine(x, w, rule, 0.2)
        assert np.isfinite(out).all() and out[1] == 0.0  # nobody: the fill value
        assert out[0] == pytest.approx(2.0)  # the two present values only
    assert robust_combine(x, w, "median")[2] == 4.0
    with pytest.raises(RobustError, match="finite"):
        weighted_median(np.array([np.nan]), np.ones(1))
    with pytest.raises(RobustError, match="weights"):
        weighted_median(np.ones(2), np.array([1.0, -1.0]))
    with pytest.raises(RobustError, match="trim fraction"):
        weighted_trimmed_mean(np.ones(2), np.ones(2), 0.5)
    with pytest.raises(RobustError, match="robust rule"):
        robust_combine(np.ones(2), np.ones(2), "krum")


def test_sample_caps_and_clip_bounds() -> None:
    np.testing.assert_array_equal(capped_samples([10, 20, 1_000_000]), [10, 20, 20])
    assert capped_samples([]).size == 0
    assert clip_bound([1.0, 2.0, 3.0, float("nan"), 0.0], 2.0) == 4.0
    assert clip_bound([], 2.0) is None
    with pytest.raises(RobustError):
        clip_bound([1.0], 0.0)
    np.testing.assert_allclose(clip_scales([1.0, 4.0, 8.0], 4.0), [1.0, 1.0, 0.5])
    np.testing.assert_array_equal(clip_scales([1.0, 9.0], None), [1.0, 1.0])
    with pytest.raises(RobustError):
        clip_scales([1.0], 0.0)


def masked_update(cid: str, rows: list[int], values: np.ndarray, n_in: int = 3, n_out: int = 6) -> ClientUpdate:
    """A change whose rows ``rows`` are ``values`` exactly (A = identity-like, rank n_in)."""
    a = np.eye(n_in)
    return ClientUpdate(cid, 10, 0, {"m": MaskedFactors(A=a, B_rows=values, rows=np.array(rows), out_features=n_out)})


@pytest.mark.parametrize("rule", ["median", "trimmed-mean"])
def test_masks_unsent_rows_vote_for_no_change(rule: str, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(4)
    senders = {
        f"c{i}": sorted(int(r) for r in rng.choice(5, size=int(rng.integers(1, 5)), replace=False)) for i in range(7)
    }
    senders["c0"] = [0, 1, 2, 3, 4]  # row 5: nobody sends it
    updates = [masked_update(c, rows, rng.standard_normal((len(rows), 3))) for c, rows in senders.items()]
    updates.append(ClientUpdate("other", 10, 0, {}))  # adapts no module: no vote on m
    weights = rng.uniform(0.5, 2.0, size=len(updates))
    got = aggregate_changes(updates, weights, rule=rule, trim_fraction=0.2)["m"]
    for row in range(6):
        votes, sent = [], 0.0
        for u, wk in zip(updates[:-1], weights[:-1], strict=True):
            f = u.modules["m"]
            if row in f.rows:
                votes.append(f.B_rows[list(f.rows).index(row)])
                sent += wk
            else:
                votes.append(np.zeros(3))
        assert got.coverage[row] == pytest.approx(sent)
        if not sent:  # nobody sent it: no change
            np.testing.assert_array_equal(got.change[row], 0.0)
            continue
        want = robust_combine(np.array(votes), weights[:-1, None], rule, 0.2)
        np.testing.assert_allclose(got.change[row], want, atol=1e-12)
    monkeypatch.setattr(aggregation, "ROBUST_CHUNK", 7 * 3)  # one row per chunk: the same result
    chunked = aggregate_changes(updates, weights, rule=rule, trim_fraction=0.2)["m"]
    np.testing.assert_array_equal(chunked.change, got.change)


def test_a_row_only_a_minority_sends_keeps_its_value_under_robust_rules() -> None:
    honest = [masked_update(f"h{i}", [0, 1], np.ones((2, 3))) for i in range(8)]
    attackers = [masked_update(f"a{i}", [0, 5], np.full((2, 3), -50.0)) for i in range(2)]
    for rule in ("median", "trimmed-mean"):
        got = aggregate_changes(honest + attackers, np.ones(10), rule=rule)["m"]
        assert np.all((got.change[1] > 0.9) & (got.change[1] <= 1.0))  # honest rows: (nearly) the honest change
        np.testing.assert_allclose(got.change[5], 0.0)  # the attackers' own row: outvoted by "unchanged"
        assert got.change[0].min() > 0.5
    mean = aggregate_changes(honest + attackers, np.ones(10))["m"]
    np.testing.assert_allclose(mean.change[5], -50.0)


def test_a_poisoned_minority_moves_the_mean_but_not_the_robust_rules() -> None:
    rng = np.random.default_rng(5)
    honest = rng.normal(1.0, 0.1, size=(8, 6, 3))
    updates = [masked_update(f"h{i}", list(range(6)), honest[i]) for i in range(8)]
    updates += [masked_update(f"a{i}", list(range(6)), -10 * honest[i]) for i in range(2)]
    updates[-1].num_samples = 1_000_000  # a self-reported sample count does not buy the vote
    for u in updates:
        u.head = {"head.bias": np.array([1.0, 2.0, 3.0]) * (-10 if u.client_id.startswith("a") else 1)}
    state = ClusterState(modules={}, head={})
    results = {
        rule: aggregate_buffer([state], updates, 0, 0.0, rule=rule, trim_fraction=0.2)[0]
        for rule in ("none", "median", "trimmed-mean")
    }
    assert np.all(results["none"].modules["m"] < 0)  # the mean is taken over
    for rule in ("median", "trimmed-mean"):
        assert np.abs(results[rule].modules["m"] - 1.0).max() < 0.3
        np.testing.assert_allclose(results[rule].head["head.bias"], [1.0, 2.0, 3.0])
    head = aggregate_head_changes(updates, np.ones(10), rule="median")
    np.testing.assert_allclose(head["head.bias"], [1.0, 2.0, 3.0])


def test_config_checks_the_new_options() -> None:
    assert FederationConfig(robust="median").robust == "median"
    with pytest.raises(FederationError, match="robust must be one of"):
        FederationConfig(robust="krum")
    with pytest.raises(FederationError, match="works on ΔW"):
        FederationConfig(robust="median", aggregator="fedavg")
    with pytest.raises(FederationError, match="trim fraction"):
        FederationConfig(trim_fraction=0.5)
    with pytest.raises(FederationError, match="clip multiple must be"):
        FederationConfig(clip_multiple=0.0)
    with pytest.raises(FederationError, match="clip multiple works on ΔW"):
        FederationConfig(clip_multiple=2.0, aggregator="hetlora")
    FederationConfig(robust="trimmed-mean", aggregator="flexlora", clip_multiple=3.0)


def test_change_norm_and_clip_scales_in_the_pure_aggregation() -> None:
    u = masked_update("a", [1, 4], np.array([[3.0, 0.0, 0.0], [0.0, 4.0, 0.0]]))
    u.head = {"head.bias": np.array([1.0, 1.0])}
    assert change_norm(u) == pytest.approx(np.sqrt(25.0 + 2.0))
    state = ClusterState(modules={"m": np.ones((6, 3))}, head={"head.bias": np.zeros(2)})
    (got,) = aggregate_buffer([state], [u], 0, 0.0, clip_scales=[0.5])
    np.testing.assert_allclose(got.modules["m"][[1, 4]], 1.0 + 0.5 * u.modules["m"].B_rows)
    np.testing.assert_array_equal(got.modules["m"][[0, 2, 3, 5]], 1.0)  # unsent rows: untouched
    np.testing.assert_allclose(got.head["head.bias"], [0.5, 0.5])
    with pytest.raises(aggregation_inputs.AggregationError, match="clip scale"):
        aggregate_buffer([state], [u], 0, 0.0, clip_scales=[1.5])


def test_clip_multiple_shrinks_outlying_changes() -> None:
    plan = ClientPlan.from_plan(plan_dict([0, 1], 4, ["query", "value"], 0.5), SPEC)
    fed = Federation(SPEC, FederationConfig(buffer_size=5, staleness_exponent=0.0, clip_multiple=2.0))
    rng = np.random.default_rng(6)
    for i in range(5):
        cid = f"c{i}"
        fed.register(cid, plan)
        tensors = update_tensors(rng, SPEC, plan, scale=0.1)
        if i == 4:
            tensors = {k: (v * 30 if k.endswith(".B_rows") else v) for k, v in tensors.items()}
        fed.add_pending(PendingUpdate(i, cid, 0, 0, 10, 0.0, tensors))
    updates = [p.update for p in fed.pending]
    result = fed.aggregate()
    norms = [change_norm(u) for u in updates]  # version 0: ΔW = 0 and no head yet, so the change is the update
    assert result.update_norms == pytest.approx(norms) and result.clipped == 1
    scales = clip_scales(norms, 2.0 * float(np.median(norms)))
    assert scales[4] < 0.2 and np.all(scales[:4] == 1.0)
    (want,) = aggregate_buffer([ClusterState({}, {})], updates, 0, 0.0, clip_scales=scales)
    for name, value in want.modules.items():
        np.testing.assert_allclose(result.states[0].modules[name], value, rtol=1e-12)
    fed.apply(result)
    assert list(fed._norms) == pytest.approx(norms)
    # next flush: the same client moves its head by 50 from the model it received; that change is clipped
    current = fed.states[0]
    moved = update_tensors(rng, SPEC, plan, scale=0.1, head={k: v + 50.0 for k, v in current.head.items()})
    fed.add_pending(PendingUpdate(9, "c0", 1, 1, 10, 0.0, moved))
    result = fed.aggregate()
    (norm,) = result.update_norms
    received = fed.history.received(1, "c0", fed.clients)
    change = fed.strategy.inner.change(to_client_update("c0", 10, 1, moved, SPEC), received, dict)
    np.testing.assert_allclose(change.head["head.bias"], 50.0, rtol=1e-5)
    assert norm == pytest.approx(change_norm(change))
    assert result.clipped == 1
    scale = 2.0 * float(np.median(norms + [norm])) / norm
    new_bias = result.states[0].head["head.bias"]
    np.testing.assert_allclose(new_bias - current.head["head.bias"], 50.0 * scale, rtol=1e-5)
    plain = Federation(SPEC, FederationConfig(buffer_size=5))
    plain.register("c0", plan)
    plain.add_pending(PendingUpdate(0, "c0", 0, 0, 10, 0.0, moved))
    assert plain.aggregate().update_norms == [] and plain.aggregate().clipped == 0


def test_server_run_passes_the_options(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    run = ServerRunCapture(monkeypatch, tmp_path)
    args = ["--robust", "trimmed-mean", "--trim-fraction", "0.3"]
    res = run.invoke(*args, "--clip-multiple", "2.5")
    assert res.exit_code == 0, res.output
    fed = run.config.federation
    assert (fed.robust, fed.trim_fraction, fed.clip_multiple) == ("trimmed-mean", 0.3, 2.5)
    res = run.invoke(*args, "--robust", "krum")
    assert res.exit_code == 2 and "krum" in res.output
    res = run.invoke("--robust", "trimmed-mean", "--trim-fraction", "0.5")
    assert res.exit_code == 2 and "0.5" in res.output
