"""What each hello costs the server beyond its own row: cluster figures over the fleet (vectorized, the prior
membership computed once) and the new client's model (factored once per membership and ranks per version)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from fedhft.broker_server.cluster_figures import cluster_figures
from fedhft.broker_server.federation import Federation, FederationConfig
from fedhft.broker_server.metrics import Metrics, refresh_gauges
from fedhft.broker_server.validation import ClientPlan
from tests.support.server import plan_dict, small_spec

SPEC = small_spec()


def reference_figures(memberships: list[np.ndarray], k: int) -> tuple[list[int], list[float]]:
    """The per-client loop the vectorized version replaced."""
    hard, soft = [0] * k, np.zeros(k)
    for p in memberships:
        hard[int(np.argmax(p))] += 1
        soft += np.asarray(p, dtype=np.float64) / max(float(np.sum(p)), 1e-300)
    return hard, [float(v) for v in soft]


@pytest.mark.parametrize("k", [1, 3])
def test_cluster_figures_match_the_per_client_loop(k: int) -> None:
    rng = np.random.default_rng(k)
    memberships = [rng.dirichlet(np.ones(k)).astype(np.float32) for _ in range(300)] + [np.zeros(k)]
    figures = cluster_figures(memberships, k)
    hard, soft = reference_figures(memberships, k)
    assert figures.hard == hard
    assert figures.soft == pytest.approx(soft, rel=1e-6)
    assert cluster_figures([], k).hard == [0] * k


def test_a_wave_of_hellos_costs_no_fleet_sized_work_per_hello() -> None:
    fed = Federation(SPEC, FederationConfig(buffer_size=10**6))
    plan = ClientPlan.from_plan(plan_dict([0, 1], 4, ["query", "value"]), SPEC)
    for i in range(5000):
        fed.register(f"c{i}", plan)
    k, rng = fed.num_clusters, np.random.default_rng(0)
    fed.memberships = {f"c{i}": rng.dirichlet(np.ones(k)) for i in range(2500)}  # half have their own
    figures = fed.cluster_figures()
    prior = fed.prior()
    hard, soft = reference_figures([fed.memberships.get(f"c{i}", prior) for i in range(5000)], k)
    assert figures.hard == hard and figures.soft == pytest.approx(soft)
    metrics = Metrics()
    t0 = time.perf_counter()
    for _ in range(20):
        refresh_gauges(metrics, fed)  # once per hello; was O(clients x clients) through membership_of's prior
    assert (time.perf_counter() - t0) / 20 < 0.25

    first, second = fed.client_model("c4000"), fed.client_model("c4001")  # same prior membership and ranks
    assert first.tensors is second.tensors  # factored once
    assert first.target != second.target
    other = ClientPlan.from_plan(plan_dict([0], 2, ["query"]), SPEC)
    fed.register("small", other)
    small = fed.client_model("small").tensors
    assert small is not first.tensors and small["layers.0.query.A"].shape[0] == 2
