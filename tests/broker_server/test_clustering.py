"""Client signatures, k-means / GMM / BIC, stable memberships, ARI and independent cluster states."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fedhft.broker_server.aggregation import ClusterState, aggregate_buffer
from fedhft.broker_server.aggregation_inputs import ClientUpdate, MaskedFactors
from fedhft.broker_server.clustering import (
    adjusted_rand_index,
    align_clusters,
    choose_k_bic,
    gmm_fit,
    init_cluster_states,
    kmeans,
    signature,
    update_memberships,
)


def planted_clients(seed: int = 0, n: int = 30, k: int = 3, noise: float = 0.05):
    """n clients whose heads are noisy copies of k well-separated heads; returns (updates, labels)."""
    rng = np.random.default_rng(seed)
    centers = [(rng.standard_normal((3, 8)), rng.standard_normal(3)) for _ in range(k)]
    labels = np.arange(n) % k
    rng.shuffle(labels)
    updates = []
    for i, c in enumerate(labels):
        w, b = centers[c]
        head = {
            "head.weight": w + noise * rng.standard_normal(w.shape),
            "head.bias": b + noise * rng.standard_normal(b.shape),
        }
        updates.append(ClientUpdate(f"client{i}", 50, 0, {}, head))
    return updates, labels


def signatures(updates) -> np.ndarray:
    return np.stack([signature(u) for u in updates])


# --------------------------------------------------------------------------------------------------
# Signatures
# --------------------------------------------------------------------------------------------------


def test_head_signature_is_flattened_unit_head() -> None:
    head = {"head.weight": np.arange(6.0).reshape(2, 3), "head.bias": np.array([1.0, -1.0])}
    u = ClientUpdate("a", 1, 0, {}, head)
    sig = signature(u)
    want = np.r_[head["head.bias"], head["head.weight"].ravel()]  # keys in sorted order
    np.testing.assert_allclose(sig, want / np.linalg.norm(want))
    ref = {"head.bias": np.array([1.0, -1.0])}
    np.testing.assert_allclose(signature(u, reference_head=ref)[:2], 0.0)


def test_projection_signature_depends_only_on_zero_filled_delta_w() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 10)), rng.standard_normal((3, 2))
    rows = np.array([1, 4, 9])
    f1 = MaskedFactors(a, b, rows, 12)
    t = np.array([[2.0, 1.0], [0.5, 3.0]])  # another factorization of the same rows
    f2 = MaskedFactors(np.linalg.solve(t, a), b @ t, rows, 12)
    # a superset of rows whose extra rows are exactly zero is the same zero-filled dW
    f3 = MaskedFactors(a, np.vstack([b, np.zeros((1, 2))]), np.r_[rows, 6], 12)
    sigs = [signature(ClientUpdate(f"c{i}", 1, 0, {"layers.0.query": f})) for i, f in enumerate((f1, f2, f3))]
    assert sigs[0].shape == (64,)
    np.testing.assert_allclose(np.linalg.norm(sigs[0]), 1.0)
    np.testing.assert_allclose(sigs[1], sigs[0], atol=1e-12)
    np.testing.assert_allclose(sigs[2], sigs[0], atol=1e-12)
    other = signature(ClientUpdate("d", 1, 0, {"layers.0.query": f1}), seed=1)
    assert not np.allclose(other, sigs[0])
    assert signature(ClientUpdate("e", 1, 0, {"layers.0.query": f1}), projection_dim=10).shape == (10,)


def test_projection_signatures_cluster_planted_delta_w() -> None:
    rng = np.random.default_rng(1)
    out, inp, r = 16, 12, 2
    bases = [(rng.standard_normal((out, r)), rng.standard_normal((r, inp))) for _ in range(3)]
    labels = np.arange(24) % 3
    updates = []
    for i, c in enumerate(labels):
        b, a = bases[c]
        rows = np.sort(rng.choice(out, size=12, replace=False))  # each client masks different rows
        b_rows = b[rows] + 0.05 * rng.standard_normal((12, r))
        updates.append(ClientUpdate(f"c{i}", 1, 0, {"layers.0.query": MaskedFactors(a, b_rows, rows, out)}))
    x = signatures(updates)
    assert adjusted_rand_index(labels, kmeans(x, 3, seed=0).labels) >= 0.9


# --------------------------------------------------------------------------------------------------
# k-means, GMM, BIC
# --------------------------------------------------------------------------------------------------


def test_kmeans_and_gmm_recover_planted_clusters() -> None:
    updates, labels = planted_clients()
    x = signatures(updates)
    km = kmeans(x, 3, seed=0)
    assert adjusted_rand_index(labels, km.labels) >= 0.9
    gmm = gmm_fit(x, 3, seed=0)
    assert adjusted_rand_index(labels, gmm.labels) >= 0.9
    np.testing.assert_allclose(gmm.resp.sum(1), 1.0)
    np.testing.assert_allclose(gmm.weights.sum(), 1.0)
    assert gmm.resp.shape == (30, 3) and gmm.means.shape == gmm.variances.shape == (3, x.shape[1])
    assert np.all(gmm.variances > 0) and np.isfinite(gmm.log_likelihood)
    again = kmeans(x, 3, seed=0)
    assert np.array_equal(again.labels, km.labels)


def test_bic_picks_the_planted_k() -> None:
    updates, _ = planted_clients()
    choice = choose_k_bic(signatures(updates), k_max=6, seed=0)
    assert choice.k == 3
    assert set(choice.bics) == set(range(1, 7))
    assert choice.model.resp.shape == (30, 3)


def test_kmeans_input_errors() -> None:
    with pytest.raises(ValueError):
        kmeans(np.zeros((2, 3)), 3)
    with pytest.raises(ValueError):
        kmeans(np.full((4, 2), np.nan), 2)
    with pytest.raises(ValueError):
        choose_k_bic(np.zeros((4, 2)), k_max=1, k_min=2)


def test_kmeans_handles_duplicate_points() -> None:
    x = np.vstack([np.zeros((5, 2)), np.ones((5, 2))])
    result = kmeans(x, 3, seed=0)
    assert result.inertia == pytest.approx(0.0)
    assert adjusted_rand_index(np.r_[np.zeros(5), np.ones(5)], result.labels) > 0.5


# --------------------------------------------------------------------------------------------------
# Memberships with hysteresis
# --------------------------------------------------------------------------------------------------


def soft(labels: np.ndarray, k: int, confidence: float = 0.9) -> np.ndarray:
    resp = np.full((labels.size, k), (1 - confidence) / (k - 1))
    resp[np.arange(labels.size), labels] = confidence
    return resp


def test_update_memberships_first_round_is_the_new_resp() -> None:
    new = soft(np.array([0, 1, 2]), 3)
    out = update_memberships(None, new, 0.2)
    assert np.array_equal(out, new) and out is not new


def test_permuted_and_perturbed_clusters_keep_labels() -> None:
    rng = np.random.default_rng(2)
    labels = np.arange(30) % 3
    old = soft(labels, 3)
    new = old + rng.uniform(0, 0.05, size=old.shape)
    new /= new.sum(1, keepdims=True)
    perm = np.array([2, 0, 1])
    shuffled = new[:, np.argsort(perm)]  # the new fit numbers its clusters differently
    assert np.array_equal(align_clusters(old, shuffled), perm)
    out = update_memberships(old, shuffled, hysteresis=0.1)
    assert np.array_equal(out.argmax(1), labels)
    np.testing.assert_allclose(out, new)


def test_hysteresis_blocks_small_moves_and_allows_clear_ones() -> None:
    labels = np.arange(12) % 3
    old = soft(labels, 3)
    new = old.copy()
    new[0] = [0.45, 0.50, 0.05]  # client 0 (cluster 0) barely prefers cluster 1 now
    new[1] = [0.05, 0.05, 0.90]  # client 1 (cluster 1) clearly moved to cluster 2
    out = update_memberships(old, new, hysteresis=0.2)
    assert np.array_equal(out[0], old[0])
    assert np.array_equal(out[1], new[1])
    assert np.array_equal(out[2:], new[2:])
    no_damping = update_memberships(old, new, hysteresis=0.0)
    assert no_damping[0].argmax() == 1


def test_greedy_alignment_above_brute_force_limit() -> None:
    k = 8
    labels = np.arange(40) % k
    old = soft(labels, k, 0.93)
    perm = np.array([3, 7, 0, 5, 1, 6, 2, 4])
    assert np.array_equal(align_clusters(old, old[:, np.argsort(perm)]), perm)


def test_update_memberships_rejects_shape_changes() -> None:
    with pytest.raises(ValueError):
        update_memberships(np.full((4, 2), 0.5), np.full((4, 3), 1 / 3), 0.1)
    with pytest.raises(ValueError):
        update_memberships(None, np.full((4, 2), 0.5), 1.5)


# --------------------------------------------------------------------------------------------------
# Adjusted Rand index
# --------------------------------------------------------------------------------------------------


def test_adjusted_rand_index_known_values() -> None:
    assert adjusted_rand_index([0, 0, 1, 1], [1, 1, 0, 0]) == 1.0
    assert adjusted_rand_index([0, 0, 1, 1], [0, 0, 1, 2]) == pytest.approx(4 / 7)
    assert adjusted_rand_index([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(-0.5)
    assert adjusted_rand_index([0, 0, 0], [0, 0, 0]) == 1.0
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 4, 400), rng.integers(0, 4, 400)
    assert abs(adjusted_rand_index(a, b)) < 0.05  # chance level
    for p in itertools.permutations(range(4)):
        assert adjusted_rand_index(a, np.array(p)[a]) == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------------
# Independent cluster states
# --------------------------------------------------------------------------------------------------


def test_cluster_states_are_independent_copies() -> None:
    initial = ClusterState({"layers.0.query": np.zeros((4, 3))}, {"head.bias": np.zeros(2)})
    states = init_cluster_states(initial, 3)
    states[0].modules["layers.0.query"][1, 2] = 7.0
    states[0].head["head.bias"] += 1.0
    states[0].modules["layers.1.query"] = np.ones((2, 2))
    for other in (states[1], states[2], initial):
        assert np.all(other.modules["layers.0.query"] == 0)
        assert np.all(other.head["head.bias"] == 0)
        assert set(other.modules) == {"layers.0.query"}
    shared = [initial] * 3  # the pitfall: one object under three names
    shared[0].modules["layers.0.query"][0, 0] = 1.0
    assert shared[2].modules["layers.0.query"][0, 0] == 1.0
    with pytest.raises(ValueError):
        init_cluster_states(initial, 0)


def test_buffered_aggregation_keeps_clusters_apart() -> None:
    rng = np.random.default_rng(4)
    states = init_cluster_states(ClusterState({"m": np.zeros((4, 3))}), 2)
    f = MaskedFactors(rng.standard_normal((2, 3)), rng.standard_normal((4, 2)), np.arange(4), 4)
    update = ClientUpdate("a", 10, 0, {"m": f})
    c0, c1 = aggregate_buffer(states, [update], 0, 0.5, memberships={"a": np.array([1.0, 0.0])})
    assert np.abs(c0.modules["m"]).sum() > 0
    assert np.all(c1.modules["m"] == 0)
    arrays = [c0.modules["m"], c1.modules["m"], states[0].modules["m"], states[1].modules["m"]]
    assert not any(np.shares_memory(a, b) for a, b in itertools.combinations(arrays, 2))
