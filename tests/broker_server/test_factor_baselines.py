"""The baseline aggregators through the coordinator and the server: FedAvg of LoRA factors, HetLoRA, FlexLoRA.

These flushes are synchronous (every update fresh from version 0, server lr 1), where FedBuff's change-based
rule gives the papers' averages; stale updates and the server lr are in test_fedbuff.py."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from fedhft.broker_server.aggregation import ClusterState
from fedhft.broker_server.factor_aggregation import LoraFactors
from fedhft.broker_server.federation import Federation, FederationConfig, FederationError, PendingUpdate
from fedhft.broker_server.ingest import Inbound
from fedhft.broker_server.service import Server, ServerConfig, ServiceError
from fedhft.broker_server.state_files import state_from_bytes, state_to_bytes
from fedhft.broker_server.strategies import available
from fedhft.broker_server.strategies.base import MASKED
from fedhft.broker_server.strategies.fedavg import FedAvg
from fedhft.broker_server.validation import ClientPlan, GlobalSpec, UpdateRejected
from fedhft.cli.server import server_run_command
from fedhft.protocol import HelloMessage, encode_hello, encode_update, hello_topic, update_topic
from fedhft.protocol.manifest import load_manifest
from tests.support.reference_baselines import fedavg_factors, hetlora_aggregate, hetlora_weights
from tests.support.server import SHA, plan_dict, small_spec, update_message, update_tensors

SPEC = small_spec()
NAME = "layers.1.query"


def dense_plan(rank: int, targets: tuple[str, ...] = ("query",)) -> ClientPlan:
    return ClientPlan.from_plan(plan_dict([1], rank, list(targets), 1.0), SPEC)


def factors_of(tensors: dict, name: str = NAME) -> LoraFactors:
    """The dense (A, B) of wire tensors (every row sent, sorted)."""
    assert np.array_equal(tensors[f"{name}.rows"], np.arange(SPEC.modules[name].out_features))
    return LoraFactors(A=tensors[f"{name}.A"], B=tensors[f"{name}.B_rows"])


def flush(aggregator: str, plans: dict[str, ClientPlan], samples: dict[str, int], seed: int = 0) -> tuple:
    """One coordinator flush of one random dense update per client; returns (federation, wire tensors)."""
    fed = Federation(SPEC, FederationConfig(buffer_size=len(plans), staleness_exponent=0, aggregator=aggregator))
    rng = np.random.default_rng(seed)
    sent = {}
    for i, (cid, plan) in enumerate(plans.items()):
        fed.register(cid, plan)
        sent[cid] = update_tensors(rng, SPEC, plan, scale=0.5)
        fed.add_pending(PendingUpdate(i, cid, i, 0, samples[cid], 0.0, sent[cid]))
    result = fed.aggregate()
    assert sorted(result.aggregated_ids) == list(range(len(plans))) and not result.dropped
    fed.apply(result)
    return fed, sent


def test_aggregator_choices_and_config_errors() -> None:
    assert next(p.type.choices for p in server_run_command.params if p.name == "aggregator") == available()
    with pytest.raises(FederationError, match="aggregator must be one of"):
        FederationConfig(aggregator="fedprox")
    with pytest.raises(FederationError, match="without clustering"):
        FederationConfig(aggregator="hetlora", clusters=2)


def test_fedavg_model_is_the_sample_weighted_average_of_the_factors() -> None:
    plans = {"a": dense_plan(2), "b": dense_plan(2), "c": dense_plan(2)}
    samples = {"a": 10, "b": 30, "c": 60}
    fed, sent = flush("fedavg", plans, samples)
    want = fedavg_factors([factors_of(sent[c]) for c in plans], [samples[c] for c in plans])
    for cid in plans:
        model = fed.client_model(cid).tensors
        np.testing.assert_allclose(model[f"{NAME}.A"], want.A, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(model[f"{NAME}.B"], want.B, rtol=1e-5, atol=1e-6)
        w = np.array([samples[c] for c in plans], dtype=np.float64) / 100
        head = sum(wk * sent[c]["head.weight"].astype(np.float64) for wk, c in zip(w, plans, strict=True))
        np.testing.assert_allclose(model["head.weight"], head, rtol=1e-5, atol=1e-6)  # head averaged as usual
    # components no client has keep version 0: LoRA-initialized A rows, zero B columns
    a0, b0 = fed.strategy.global_factors(ClusterState(modules={}), NAME)
    np.testing.assert_array_equal(fed.states[0].modules[f"{NAME}.A"][2:], a0[2:])
    assert np.all(fed.states[0].modules[f"{NAME}.B"][:, 2:] == 0) and np.all(b0 == 0)
    (cluster,) = fed.cluster_models()
    assert cluster.tensors[f"{NAME}.A"].shape == (SPEC.modules[NAME].max_rank, SPEC.modules[NAME].in_features)


def test_hetlora_pads_weights_by_samples_times_norm_and_truncates_per_client_rank() -> None:
    plans = {"low": dense_plan(2, ("query", "value")), "mid": dense_plan(4), "high": dense_plan(6)}
    samples = {"low": 50, "mid": 20, "high": 10}
    fed, sent = flush("hetlora", plans, samples, seed=1)
    factors = [factors_of(sent[c]) for c in plans]
    n = [samples[c] for c in plans]
    oracle = hetlora_aggregate(factors, n)
    norms = np.array([np.linalg.norm(f.B @ f.A) for f in factors])
    np.testing.assert_allclose(oracle.weights, np.array(n) * norms / (np.array(n) * norms).sum())
    np.testing.assert_allclose(hetlora_weights(factors, n), oracle.weights)
    state = fed.states[0].modules
    np.testing.assert_allclose(state[f"{NAME}.A"][:6], oracle.global_factors.A, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(state[f"{NAME}.B"][:, :6], oracle.global_factors.B, rtol=1e-6, atol=1e-7)
    for cid, plan in plans.items():
        model = fed.client_model(cid).tensors
        assert sorted(k for k in model if k.endswith(".A")) == sorted(f"{m}.A" for m in plan.ranks)
        for name, r in plan.ranks.items():
            m = SPEC.modules[name]
            a, b = model[f"{name}.A"], model[f"{name}.B"]
            assert a.shape == (r, m.in_features) and b.shape == (m.out_features, r)
            np.testing.assert_allclose(a, state[f"{name}.A"][:r], rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(b, state[f"{name}.B"][:, :r], rtol=1e-6, atol=1e-7)
    # only "low" sent layers.1.value: its own factors come back (a single sender has weight 1), up to the float32
    # rounding of the version-0 factors it received (its change is taken from those)
    low = sent["low"]
    np.testing.assert_allclose(state["layers.1.value.A"][:2], low["layers.1.value.A"], rtol=1e-6, atol=1e-7)
    # fedavg on the same updates weighs by samples only
    fedavg, _ = flush("fedavg", plans, samples, seed=1)
    plain_a = sum(nk * np.pad(f.A, ((0, 6 - f.rank), (0, 0))) for nk, f in zip(n, factors, strict=True)) / sum(n)
    np.testing.assert_allclose(fedavg.states[0].modules[f"{NAME}.A"][:6], plain_a, rtol=1e-6, atol=1e-7)
    assert not np.allclose(plain_a, oracle.global_factors.A)


def test_fedavg_differs_from_flexlora_on_the_same_updates() -> None:
    plans = {"a": dense_plan(2), "b": dense_plan(2)}
    samples = {"a": 10, "b": 30}
    fedavg, sent = flush("fedavg", plans, samples, seed=2)
    flex, sent_again = flush("flexlora", plans, samples, seed=2)
    assert all(np.array_equal(sent[c][f"{NAME}.A"], sent_again[c][f"{NAME}.A"]) for c in plans)
    w = np.array([0.25, 0.75])
    mean_dw = sum(wk * factors_of(sent[c]).delta() for wk, c in zip(w, plans, strict=True))
    np.testing.assert_allclose(flex.states[0].modules[NAME], mean_dw, rtol=1e-6, atol=1e-7)  # FlexLoRA: mean of B·A
    avg = fedavg_factors([factors_of(sent[c]) for c in plans], w)
    fedavg_dw = fedavg.strategy.delta(fedavg.states[0], NAME)
    np.testing.assert_allclose(fedavg_dw, avg.B @ avg.A, rtol=1e-6, atol=1e-7)  # FedAvg: B̄·Ā
    assert np.linalg.norm(fedavg_dw - mean_dw) > 0.1 * np.linalg.norm(mean_dw)
    for cid in plans:
        m_avg, m_flex = fedavg.client_model(cid).tensors, flex.client_model(cid).tensors
        assert m_avg[f"{NAME}.A"].shape == m_flex[f"{NAME}.A"].shape == (2, SPEC.modules[NAME].in_features)
        prod = m_avg[f"{NAME}.B"].astype(np.float64) @ m_avg[f"{NAME}.A"]
        assert not np.allclose(prod, m_flex[f"{NAME}.B"].astype(np.float64) @ m_flex[f"{NAME}.A"], atol=1e-3)


def test_version_zero_is_the_delta_w_paths_lora_initialization() -> None:
    plan = dense_plan(3, ("query", "ffn_in"))
    models = []
    for aggregator in ("fedhft", "fedavg", "hetlora"):
        fed = Federation(SPEC, FederationConfig(aggregator=aggregator, seed=4))
        fed.register("a", plan)
        models.append(fed.client_model("a").tensors)
    for other in models[1:]:
        assert other.keys() == models[0].keys()
        for k in models[0]:
            np.testing.assert_allclose(other[k], models[0][k], rtol=1e-6, atol=1e-7)


def test_masked_updates_are_refused_by_the_baselines_only() -> None:
    rng = np.random.default_rng(5)
    masked = update_tensors(rng, SPEC, ClientPlan.from_plan(plan_dict([1], 2, ["query"], 0.5), SPEC))
    Federation(SPEC, FederationConfig()).check_update(masked)
    for aggregator in ("fedavg", "hetlora", "flexlora"):
        fed = Federation(SPEC, FederationConfig(buffer_size=2, aggregator=aggregator))
        with pytest.raises(UpdateRejected, match="dense") as info:
            fed.check_update(masked)
        assert info.value.reason == MASKED
        fed.check_update(update_tensors(rng, SPEC, dense_plan(2)))
        fed.add_pending(PendingUpdate(1, "a", 1, 0, 10, 0.0, masked))  # e.g. stored under another aggregator
        fed.add_pending(PendingUpdate(2, "b", 1, 0, 10, 0.0, update_tensors(rng, SPEC, dense_plan(2))))
        result = fed.aggregate()
        assert result.dropped == {1: MASKED} and result.aggregated_ids == [2]


def test_factor_state_round_trips_through_the_state_file_format() -> None:
    plans = {"a": dense_plan(2), "b": dense_plan(4, ("query", "value"))}
    fed, _ = flush("hetlora", plans, {"a": 5, "b": 7}, seed=6)
    restored = Federation(
        SPEC,
        fed.config,
        version=fed.version,
        states=[state_from_bytes(state_to_bytes(s)) for s in fed.states],
    )
    for cid, plan in plans.items():
        restored.register(cid, plan)
        got, want = restored.client_model(cid).tensors, fed.client_model(cid).tensors
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    assert FedAvg(SPEC).module_names(fed.states[0]) == [
        "layers.1.query",
        "layers.1.value",
    ]


# ---- the server process's handling (no broker) ---------------------------------------------------------------

TASK = "baselines"


@pytest.fixture
def tiny(tiny_export: Path) -> tuple[GlobalSpec, dict, ClientPlan]:
    manifest = load_manifest(tiny_export)
    spec = GlobalSpec.from_manifest(manifest)
    plan = dict(manifest.plan) | {"mask_ratio": 1.0}
    return spec, plan, ClientPlan.from_plan(plan, spec)


@pytest.fixture
def make_server(tiny_export: Path, tmp_path: Path) -> Iterator[Callable[..., tuple[Server, list]]]:
    servers: list[Server] = []

    def make(aggregator: str) -> tuple[Server, list]:
        fed = FederationConfig(buffer_size=100, window_seconds=1e6, staleness_exponent=0, aggregator=aggregator)
        server = Server(ServerConfig("mqtt://127.0.0.1:1", TASK, tmp_path / "state", tiny_export, federation=fed))
        acks: list = []
        server.ingest.send_ack = lambda cid, seq, status, reason: acks.append((cid, seq, status, reason))  # type: ignore[method-assign]
        servers.append(server)
        return server, acks

    yield make
    for s in servers:
        s.shutdown()


def inbound(topic: str, payload: bytes) -> Inbound:
    return Inbound(topic, payload, 0, 0, time.time())


def test_server_runs_fedavg_rejects_masks_and_keeps_its_factor_state_across_restarts(
    make_server: Callable, tiny: tuple
) -> None:
    spec, plan_doc, plan = tiny
    rng = np.random.default_rng(7)
    server, acks = make_server("fedavg")
    hellos = [
        inbound(hello_topic(TASK, c), encode_hello(HelloMessage(TASK, c, "tiny-test", SHA, plan_doc, time.time())))
        for c in ("a", "b")
    ]
    server.handle_batch(hellos)
    masked_plan = ClientPlan(plan.ranks, 0.5)
    updates = [
        ("a", 1, update_tensors(rng, spec, plan)),
        ("b", 1, update_tensors(rng, spec, plan)),
        ("b", 2, update_tensors(rng, spec, masked_plan)),
    ]
    server.handle_batch(
        [inbound(update_topic(TASK, c), encode_update(update_message(TASK, c, s, t), "fp32")) for c, s, t in updates]
    )
    assert [a[2] for a in acks] == ["accepted", "accepted", "rejected"]
    assert acks[2][3].startswith(f"{MASKED}: aggregator fedavg takes dense updates")
    assert server.aggregate_and_publish() and server.federation.version == 1
    name = next(iter(plan.ranks))
    want = fedavg_factors([LoraFactors(A=t[f"{name}.A"], B=t[f"{name}.B_rows"]) for _, _, t in updates[:2]], [10, 10])
    model = server.federation.client_model("a").tensors
    np.testing.assert_allclose(model[f"{name}.A"], want.A, rtol=1e-5, atol=1e-6)
    assert server.store.meta()["aggregator"] == "fedavg"
    server.shutdown()

    with pytest.raises(ServiceError, match="--aggregator fedavg"):
        make_server("fedhft")
    server, _ = make_server("fedavg")
    assert server.federation.version == 1
    restored = server.federation.client_model("a").tensors
    assert restored.keys() == model.keys() and all(np.array_equal(restored[k], model[k]) for k in model)
