"""The fedavg-full baseline end to end: full fine-tuning export, dense `<param>.delta` messages, the server's
FedAvg of dense deltas (persisted), the edge's delta updates and initial + Δθ models, and a real round trip over
Mosquitto with `fedhft server run --aggregator fedavg-full` and two edge clients."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from fedhft.broker_server.aggregation import ClusterState
from fedhft.broker_server.aggregation_inputs import AggregationError, DenseUpdate
from fedhft.broker_server.federation import Federation, FederationConfig, FederationError, PendingUpdate
from fedhft.broker_server.full_aggregation import aggregate_full, full_model_tensors
from fedhft.broker_server.ingest import Inbound
from fedhft.broker_server.service import Server, ServerConfig, ServiceError
from fedhft.broker_server.state_files import state_from_bytes, state_to_bytes
from fedhft.broker_server.strategies import available
from fedhft.broker_server.validation import (
    WRONG_TRAINING,
    ClientPlan,
    GlobalSpec,
    PlanRejected,
    UpdateRejected,
    clip_update,
    decode_checked,
    delta_norm,
)
from fedhft.cli.server import server_run_command
from fedhft.device_profiles.profile import load_profile
from fedhft.edge_runtime.client import EdgeClient
from fedhft.edge_runtime.client_config import ClientConfig, ClientSummary
from fedhft.edge_runtime.full_update import (
    FullSpec,
    bind_initial,
    delta_tensors,
    model_params,
    params_from_model,
    spec_for,
)
from fedhft.edge_runtime.full_update import update_tensors as edge_update_tensors
from fedhft.edge_runtime.masking import AdapterMismatch, AdapterSpec
from fedhft.edge_runtime.ort_backend import OrtTrainer
from fedhft.export.pipeline import ExportError, ExportOptions, export_profile
from fedhft.protocol import (
    HelloMessage,
    ModelMessage,
    NonFiniteTensor,
    ShapeMismatch,
    UnknownTensor,
    decode_model,
    decode_update,
    encode_hello,
    encode_model,
    encode_update,
    generate_keypair,
    hello_topic,
    load_public_key,
    update_topic,
)
from fedhft.protocol.manifest import Manifest, ManifestError, load_manifest
from fedhft.protocol.mqtt import make_client
from fedhft.protocol.tensor_names import delta_name, dense_deltas
from tests.edge_runtime.test_local_train import write_csv
from tests.support.server import SHA, ServerProcess, plan_dict, small_spec, update_message, update_tensors, wait_until
from tests.support.torchfree import run_torchfree

TASK = "full"
FULL_SHAPES = {"enc.w": (4, 3), "enc.b": (4,), "emb.w": (5, 2, 3), "head.weight": (3, 4), "head.bias": (3,)}


@pytest.fixture(scope="module")
def full_export(tiny_model_dir: Path, tiny_profile_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model exported for full fine-tuning (ORT, fp32, every weight trainable)."""
    res = export_profile(
        tiny_model_dir,
        load_profile(tiny_profile_path),
        tmp_path_factory.mktemp("full-export"),
        opts=ExportOptions(num_labels=3, max_seq_len=32, min_compression=None),
        full_finetune=True,
        name="tiny-full",
    )
    return res.directory


def full_spec() -> GlobalSpec:
    """A small full fine-tuning GlobalSpec for pure tests."""
    return replace(small_spec(), full_params=dict(FULL_SHAPES))


def dense(rng: np.random.Generator, scale: float = 0.1, shapes: dict = FULL_SHAPES) -> dict[str, np.ndarray]:
    return {delta_name(n): (scale * rng.standard_normal(s)).astype(np.float32) for n, s in shapes.items()}


# ---- export and manifest ------------------------------------------------------------------------------------


def test_full_export_says_full_and_lora_manifests_stay_as_they_were(full_export: Path, tiny_export: Path) -> None:
    m = load_manifest(full_export)
    assert m.training == "full" and m.plan["training"] == "full" and m.mask_ratio == 1.0
    assert m.plan["layers"] == [] and all(t.factor == "full" for t in m.trainable)
    params = sum(int(np.prod(t.shape)) for t in m.trainable)
    assert m.plan["estimate"]["adapter_params"] == pytest.approx(params, rel=0.01)  # the full-FT cost estimate
    assert {"head.weight", "head.bias", "encoder.embeddings.word_embeddings.weight"} <= {t.name for t in m.trainable}
    lora = load_manifest(tiny_export)
    assert lora.training == "lora" and "training" not in lora.plan
    old = m.to_dict()
    del old["plan"]["training"]  # an export from before the field: still recognized by its "full" factors
    assert Manifest.from_dict(old).training == "full"
    bad = m.to_dict()
    bad["trainable"][0]["factor"] = "head"
    with pytest.raises(ManifestError, match="full fine-tuning manifest lists LoRA or head"):
        Manifest.from_dict(bad)


def test_export_refuses_full_finetuning_beyond_the_memory_budget(
    tiny_model_dir: Path, tiny_profile_path: Path, tmp_path: Path
) -> None:
    small = replace(load_profile(tiny_profile_path), ram_mb=100)  # 50 MB budget: below the runtime alone
    with pytest.raises(
        ExportError, match=r"cannot hold full fine-tuning: the planner estimates \d+ MB .* budget of 50 MB"
    ):
        export_profile(
            tiny_model_dir, small, tmp_path, opts=ExportOptions(num_labels=3, max_seq_len=32), full_finetune=True
        )
    assert not [p for p in tmp_path.iterdir() if not p.name.startswith(".")]


# ---- protocol ------------------------------------------------------------------------------------------------


def test_dense_deltas_round_trip_through_the_codec() -> None:
    rng = np.random.default_rng(0)
    tensors = dense(rng)
    msg = update_message(TASK, "c1", 0, tensors)
    exact = decode_update(encode_update(msg, "fp32"), {delta_name(n): s for n, s in FULL_SHAPES.items()})
    assert all(np.array_equal(exact.tensors[k], v) for k, v in tensors.items())
    for enc, tol in (("fp16", 1e-3), ("int8", 0.01)):
        got = decode_update(encode_update(msg, enc)).tensors
        assert got.keys() == tensors.keys()
        for k, v in tensors.items():
            assert got[k].shape == v.shape and got[k].dtype == np.float32
            np.testing.assert_allclose(got[k], v, atol=tol * float(np.abs(v).max()) + 1e-7)
    key, pub = generate_keypair()
    model = ModelMessage(TASK, 3, "cluster/0", time.time(), "", {"kind": "cluster"}, tensors)
    back = decode_model(encode_model(model, key), verify_key=pub, expected_target="cluster/0")
    assert all(np.array_equal(back.tensors[k], v) for k, v in tensors.items())
    with pytest.raises(ShapeMismatch, match="expected shape"):
        decode_update(
            encode_update(msg, "fp16"), {**{delta_name(n): s for n, s in FULL_SHAPES.items()}, "enc.b.delta": (5,)}
        )
    lora = update_tensors(rng, small_spec(), ClientPlan.from_plan(plan_dict([1], 2, ["query"], 1.0), small_spec()))
    with pytest.raises(UnknownTensor, match="only <param>.delta"):
        encode_update(update_message(TASK, "c1", 0, {**lora, "enc.w.delta": tensors["enc.w.delta"]}))
    with pytest.raises(ShapeMismatch, match="needs >= 1 dimension"):
        encode_update(update_message(TASK, "c1", 0, {"enc.w.delta": np.zeros((3, 0), np.float32)}))
    with pytest.raises(NonFiniteTensor):
        encode_update(update_message(TASK, "c1", 0, {"enc.w.delta": np.full((2, 2), np.nan, np.float32)}))


# ---- server: pure math, validation, coordinator ------------------------------------------------------------------


def test_aggregate_full_is_the_discounted_weighted_mean_of_the_deltas_added_to_the_state() -> None:
    rng = np.random.default_rng(1)
    state = ClusterState(modules={"w": rng.standard_normal((3, 2)), "b": np.ones(3)})
    before = state.copy()
    d1, d2 = rng.standard_normal((3, 2)), rng.standard_normal((3, 2))
    ups = [DenseUpdate(10, 4, {"w": d1, "b": np.full(3, 2.0)}), DenseUpdate(30, 3, {"w": d2})]
    out = aggregate_full(state, ups, current_version=4, staleness_exponent=0.5, server_lr=0.5)
    s2 = 2**-0.5  # (1 + tau) ** -a discounts the stale delta; the samples alone normalize (FedBuff)
    np.testing.assert_allclose(out.modules["w"], before.modules["w"] + 0.5 * (10 * d1 + 30 * s2 * d2) / 40)
    np.testing.assert_allclose(out.modules["b"], 1.0 + 0.5 * 2.0)  # only client 1 sent b: its delta, at eta
    alone = aggregate_full(state, ups[1:], current_version=4, staleness_exponent=0.5, server_lr=0.5)
    np.testing.assert_allclose(alone.modules["w"], before.modules["w"] + 0.5 * s2 * d2)  # stale alone: eta s δ
    sync = aggregate_full(state, [replace(u, base_version=4) for u in ups], 4, 0.5)  # fresh, eta 1: FedAvg
    np.testing.assert_allclose(sync.modules["w"], before.modules["w"] + (10 * d1 + 30 * d2) / 40)
    assert all(np.array_equal(state.modules[k], before.modules[k]) for k in before.modules)  # inputs untouched
    fresh = aggregate_full(ClusterState(modules={}), [DenseUpdate(1, 0, {"v": np.ones(2)})], 0, 0.0)
    np.testing.assert_array_equal(fresh.modules["v"], np.ones(2))  # version 0 is Δθ = 0
    with pytest.raises(AggregationError, match="shape"):
        aggregate_full(state, [DenseUpdate(1, 4, {"w": np.ones((2, 3))})], 4, 0.0)
    with pytest.raises(AggregationError, match="NaN"):
        aggregate_full(state, [DenseUpdate(1, 4, {"b": np.full(3, np.inf)})], 4, 0.0)
    tensors = full_model_tensors(out, {"w": (3, 2), "z": (2,)})
    assert tensors["z.delta"].dtype == np.float32 and not tensors["z.delta"].any()
    assert dense_deltas({"w.delta": d1, "head.weight": d1}).keys() == {"w"}


def test_ort_keeps_its_memory_arena_only_for_full_fine_tuning(full_export: Path, tiny_export: Path) -> None:
    """onnxruntime-training 1.19.2 corrupts the heap training a full export without its arena (bench/edge_memory.py);
    LoRA exports train without it (less resident memory). Both train a step."""
    from fedhft.edge_runtime.ort_backend import OrtTrainer

    ids, mask, labels = np.ones((2, 32), np.int64), np.ones((2, 32), np.int64), np.array([0, 1])
    for export, arena in ((full_export, True), (tiny_export, False)):
        trainer = OrtTrainer(export)
        assert trainer._opts.enable_cpu_mem_arena is arena and trainer._opts.enable_mem_pattern is arena
        assert np.isfinite(trainer.train_step(ids, mask, labels).loss)


def test_specs_and_plans_keep_lora_and_full_fine_tuning_apart(full_export: Path, tiny_export: Path) -> None:
    fspec, lspec = (
        GlobalSpec.from_manifest(load_manifest(full_export)),
        GlobalSpec.from_manifest(load_manifest(tiny_export)),
    )
    assert fspec.training == "full" and lspec.training == "lora" and not lspec.full_params
    assert fspec.fingerprint() != replace(fspec, full_params={}).fingerprint()
    plan = ClientPlan.from_plan(load_manifest(full_export).plan, fspec)
    assert plan.training == "full" and plan.ranks == {} and plan.mask_ratio == 1.0
    shapes = plan.update_shapes(fspec)
    assert shapes == {delta_name(n): s for n, s in fspec.full_params.items()}
    assert plan.max_update_bytes(fspec) > 4 * sum(int(np.prod(s)) for s in shapes.values())
    with pytest.raises(PlanRejected, match="plan trains LoRA adapters: this server's manifest is a full fine-tuning"):
        ClientPlan.from_plan(load_manifest(tiny_export).plan, fspec)
    with pytest.raises(PlanRejected, match="plan is full fine-tuning .* this server's manifest trains LoRA"):
        ClientPlan.from_plan(load_manifest(full_export).plan, lspec)
    assert (
        next(p.type.choices for p in server_run_command.params if p.name == "aggregator") == available()
        and "fedavg-full" in available()
    )
    with pytest.raises(FederationError, match="needs a full fine-tuning manifest"):
        Federation(lspec, FederationConfig(aggregator="fedavg-full"))
    with pytest.raises(FederationError, match="use --aggregator fedavg-full"):
        Federation(fspec, FederationConfig(aggregator="fedhft"))


def test_coordinator_runs_fedavg_full_and_refuses_the_other_kind_of_update() -> None:
    spec = full_spec()
    rng = np.random.default_rng(2)
    fed = Federation(spec, FederationConfig(buffer_size=2, staleness_exponent=0, aggregator="fedavg-full"))
    plan = ClientPlan.from_plan({"training": "full"}, spec)
    fed.register("a", plan)
    v0 = fed.client_model("a")
    assert v0.tensors.keys() == {delta_name(n) for n in FULL_SHAPES}
    assert not any(t.any() for t in v0.tensors.values()) and fed.cluster_models() == []  # v0: Δθ = 0, no cluster
    lora = update_tensors(rng, spec, ClientPlan.from_plan(plan_dict([1], 2, ["query"], 1.0), small_spec()))
    with pytest.raises(UpdateRejected) as err:
        fed.check_update(lora)
    assert err.value.reason == WRONG_TRAINING and "takes dense parameter deltas" in err.value.detail
    lora_fed = Federation(small_spec(), FederationConfig(aggregator="fedhft"))
    with pytest.raises(UpdateRejected, match="carries dense deltas"):
        lora_fed.check_update(dense(rng))
    sent = {c: dense(rng) for c in ("a", "b")}
    fed.register("b", plan)
    for i, (cid, n) in enumerate((("a", 10), ("b", 30))):
        fed.check_update(sent[cid])
        fed.add_pending(PendingUpdate(i, cid, i, 0, n, 0.0, sent[cid]))
    result = fed.aggregate()
    fed.apply(result)
    assert fed.version == 1 and fed.client_models() == []  # one global model per version, on cluster/0
    (cluster,) = fed.cluster_models()
    assert cluster.target == "cluster/0" and cluster.meta["cluster"] == 0
    for k in sent["a"]:
        want = (10 * sent["a"][k].astype(np.float64) + 30 * sent["b"][k]) / 40
        np.testing.assert_allclose(cluster.tensors[k], want, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(fed.client_model("a").tensors[k], cluster.tensors[k])
    clipped, scale = clip_update(sent["a"], 0.5 * delta_norm(sent["a"]))  # --clip-norm bounds dense deltas too
    assert scale == pytest.approx(0.5) and np.allclose(clipped["enc.w.delta"], 0.5 * sent["a"]["enc.w.delta"])
    restored = Federation(
        spec, fed.config, version=1, states=[state_from_bytes(state_to_bytes(s)) for s in result.states]
    )
    assert all(np.array_equal(restored.cluster_models()[0].tensors[k], cluster.tensors[k]) for k in sent["a"])


def test_decode_names_the_training_mismatch(full_export: Path) -> None:
    spec = GlobalSpec.from_manifest(load_manifest(full_export))
    plan = ClientPlan.from_plan({"training": "full"}, spec)
    lspec = small_spec()
    lplan = ClientPlan.from_plan(plan_dict([1], 2, ["query"], 1.0), lspec)
    lora = update_tensors(np.random.default_rng(3), lspec, lplan)
    with pytest.raises(UpdateRejected, match="registered full fine-tuning .* but sent LoRA tensors") as err:
        decode_checked(encode_update(update_message(TASK, "c1", 0, lora)), spec, plan, TASK, "c1")
    assert err.value.reason == WRONG_TRAINING
    payload = encode_update(update_message(TASK, "c1", 0, dense(np.random.default_rng(4))))
    with pytest.raises(UpdateRejected, match="registered a LoRA plan but sent dense parameter deltas"):
        decode_checked(payload, lspec, lplan, TASK, "c1")


# ---- server process handling and persistence (no broker) ---------------------------------------------------------


def inbound(topic: str, payload: bytes) -> Inbound:
    return Inbound(topic, payload, 0, 0, time.time())


@pytest.fixture
def make_server(full_export: Path, tmp_path: Path) -> Iterator[Callable[..., tuple[Server, list]]]:
    servers: list[Server] = []

    def make(aggregator: str = "fedavg-full") -> tuple[Server, list]:
        fed = FederationConfig(buffer_size=100, window_seconds=1e6, staleness_exponent=0, aggregator=aggregator)
        server = Server(ServerConfig("mqtt://127.0.0.1:1", TASK, tmp_path / "state", full_export, federation=fed))
        acks: list = []
        server.ingest.send_ack = lambda cid, seq, status, reason: acks.append((cid, seq, status, reason))  # type: ignore[method-assign]
        servers.append(server)
        return server, acks

    yield make
    for s in servers:
        s.shutdown()


def test_server_aggregates_dense_deltas_and_restores_them(make_server: Callable, full_export: Path) -> None:
    manifest = load_manifest(full_export)
    shapes = {t.name: tuple(t.shape) for t in manifest.trainable}
    rng = np.random.default_rng(5)
    server, acks = make_server()
    hello = [
        inbound(hello_topic(TASK, c), encode_hello(HelloMessage(TASK, c, "tiny-test", SHA, manifest.plan, time.time())))
        for c in ("a", "b")
    ]
    server.handle_batch(hello)
    assert set(server.registry) == {"a", "b"} and server.registry["a"].plan.training == "full"
    sent = {c: dense(rng, 1e-3, shapes) for c in ("a", "b")}
    lora = update_tensors(rng, small_spec(), ClientPlan.from_plan(plan_dict([1], 2, ["query"], 1.0), small_spec()))
    server.handle_batch(
        [inbound(update_topic(TASK, c), encode_update(update_message(TASK, c, 1, t), "fp32")) for c, t in sent.items()]
        + [inbound(update_topic(TASK, "a"), encode_update(update_message(TASK, "a", 2, lora), "fp32"))]
    )
    assert [a[2] for a in acks] == ["accepted", "accepted", "rejected"]
    assert acks[2][3].startswith(f"{WRONG_TRAINING}: client registered full fine-tuning")
    assert server.aggregate_and_publish() and server.federation.version == 1
    model = server.federation.cluster_models()[0].tensors
    for k, v in sent["a"].items():
        np.testing.assert_allclose(model[k], (v.astype(np.float64) + sent["b"][k]) / 2, rtol=1e-6, atol=1e-9)
    server.shutdown()
    with pytest.raises(ServiceError, match="--aggregator fedavg-full"):
        make_server("fedhft")
    server, _ = make_server()
    assert server.federation.version == 1
    again = server.federation.cluster_models()[0].tensors
    assert again.keys() == model.keys() and all(np.array_equal(again[k], model[k]) for k in model)


# ---- edge ----------------------------------------------------------------------------------------------------


def test_edge_builds_delta_updates_and_loads_initial_plus_delta(full_export: Path, tiny_export: Path) -> None:
    manifest = load_manifest(full_export)
    trainer = OrtTrainer(full_export)
    initial = trainer.get_parameters()
    spec = spec_for(manifest)
    assert isinstance(spec, FullSpec) and isinstance(spec_for(load_manifest(tiny_export)), AdapterSpec)
    with pytest.raises(AdapterMismatch, match="no initial weights"):
        model_params(spec, {})
    spec = bind_initial(spec, trainer)
    rng = np.random.default_rng(6)
    trained = {k: v + rng.standard_normal(v.shape).astype(np.float32) * 1e-3 for k, v in initial.items()}
    up = edge_update_tensors(spec, trained, initial)
    assert up.keys() == spec.update_shapes().keys()
    np.testing.assert_array_equal(up["head.bias.delta"], trained["head.bias"] - initial["head.bias"])
    assert delta_tensors(spec, trained, initial).keys() == up.keys()
    params = params_from_model(manifest, initial, up)
    assert all(np.array_equal(params[k], initial[k] + up[delta_name(k)]) for k in initial)
    trainer.set_parameters(params)  # a published model loads into a trainer of the package
    assert np.array_equal(trainer.get_parameters()["head.weight"], params["head.weight"])
    with pytest.raises(AdapterMismatch, match="missing"):
        params_from_model(manifest, initial, {k: v for k, v in up.items() if k != "head.bias.delta"})
    with pytest.raises(AdapterMismatch, match="not parameter deltas"):
        params_from_model(manifest, initial, {**up, "layers.0.query.A": np.zeros((2, 32), np.float32)})


def test_the_full_update_path_runs_with_torch_blocked(full_export: Path) -> None:
    out = run_torchfree(
        "import json\n"
        "import numpy as np\n"
        "from fedhft.edge_runtime.full_update import bind_initial, params_from_model, spec_for, update_tensors\n"
        "from fedhft.edge_runtime.ort_backend import OrtTrainer\n"
        f"tr = OrtTrainer({str(full_export)!r}, learning_rate=1e-2)\n"
        "init = tr.get_parameters()\n"
        "spec = bind_initial(spec_for(tr.manifest), tr)\n"
        "ids = np.full((2, 8), 1000)\n"
        "loss = tr.train_step(ids, np.ones_like(ids), np.array([0, 1])).loss\n"
        "up = update_tensors(spec, tr.get_parameters(), init)\n"
        "tr.set_parameters(params_from_model(tr.manifest, init, up))\n"
        "moved = float(np.abs(up['head.weight.delta']).max())\n"
        "print(json.dumps({'tensors': len(up), 'loss': loss, 'moved': moved}))\n"
    )
    assert out["tensors"] == len(load_manifest(full_export).trainable) and np.isfinite(out["loss"]) and out["moved"] > 0


# ---- end to end: `fedhft server run --aggregator fedavg-full` + two edge clients over Mosquitto -----------------


class Recorder:
    """Forwards to a trainer; keeps the trainer's weights right after every model load."""

    def __init__(self, inner: OrtTrainer) -> None:
        self.inner = inner
        self.loaded: list[dict[str, np.ndarray]] = []

    def set_parameters(self, values: dict[str, np.ndarray]) -> None:
        self.inner.set_parameters(values)
        self.loaded.append(self.inner.get_parameters())

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


class Tap:
    """Collects every update and model payload of the task."""

    def __init__(self, port: int) -> None:
        self.lock = threading.Lock()
        self.updates: list[bytes] = []
        self.models: dict[str, list[bytes]] = {}
        self.client = make_client(f"tap-{uuid.uuid4().hex[:8]}")
        self.client.on_message = self._on_message
        ready = threading.Event()
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe([(f"fedhft/v1/{TASK}/update/+", 1), (f"fedhft/v1/{TASK}/model/#", 1)])
        assert ready.wait(10), "tap did not get its SUBACK"

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            if "/update/" in msg.topic:
                self.updates.append(bytes(msg.payload))
            else:
                self.models.setdefault(msg.topic.split("/model/")[1], []).append(bytes(msg.payload))

    def model(self, target: str, version: int, key: object) -> ModelMessage | None:
        with self.lock:
            payloads = list(self.models.get(target, []))
        for p in payloads:
            m = decode_model(p, verify_key=key)
            if m.version == version:
                return m
        return None

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_two_edge_clients_train_two_rounds_of_fedavg_full_over_mosquitto(
    full_export: Path,
    mosquitto,
    tmp_path: Path,  # noqa: ANN001
) -> None:
    manifest = load_manifest(full_export)
    n_params = sum(int(np.prod(t.shape)) for t in manifest.trainable)
    initial = OrtTrainer(full_export).get_parameters()
    tap = Tap(mosquitto.port)
    server = ServerProcess(
        mosquitto.url, TASK, tmp_path / "server", full_export,
        "--aggregator", "fedavg-full", "--buffer-size", "2", "--window-seconds", "60", "--staleness-exponent", "0",
    )  # fmt: skip
    runs: dict[str, tuple[threading.Thread, list[ClientSummary], Recorder]] = {}
    try:
        server.start()
        key = load_public_key(tmp_path / "server" / "server_key.pub")
        for cid in ("c1", "c2"):
            cfg = ClientConfig(
                artifacts=full_export,
                data=write_csv(tmp_path / f"{cid}.csv", 24),
                broker=mosquitto.url,
                task=TASK,
                client_id=cid,
                state_dir=tmp_path / f"edge-{cid}",
                server_key=tmp_path / "server" / "server_key.pub",
                local_steps=3,
                rounds=2,
                learning_rate=5e-3,
                seed=int(cid[1]),
                backoff_base=0.2,
                backoff_cap=2.0,
                max_rounds_per_version=1,  # round 2 trains from version 1, as FedAvg rounds do
            )
            rec = Recorder(OrtTrainer(full_export, learning_rate=5e-3))
            client = EdgeClient(cfg, trainer=rec)  # type: ignore[arg-type]
            out: list[ClientSummary] = []
            thread = threading.Thread(target=lambda c=client, o=out: o.append(c.run(timeout=60)))
            thread.start()
            runs[cid] = (thread, out, rec)
        for thread, _, _ in runs.values():
            thread.join(75)
            assert not thread.is_alive(), "an edge client did not finish"
        assert wait_until(lambda: tap.model("cluster/0", 2, key) is not None, 30), server.log_text()[-3000:]
    finally:
        server.stop()
        tap.close()
    for cid, (_, out, rec) in runs.items():
        summary = out[0]
        assert summary.rounds_trained == 2 and sorted(summary.acked.values()) == ["accepted", "accepted"], cid
        assert [len(p) for p in rec.loaded] == [len(initial)] * 2
    # updates: dense <param>.delta of every parameter, about 2 bytes per parameter in fp16 before zlib
    updates = [decode_update(p) for p in tap.updates]
    assert len({(u.client_id, u.seq) for u in updates}) == 4
    for payload, u in zip(tap.updates, updates, strict=True):
        assert u.tensors.keys() == {delta_name(t.name) for t in manifest.trainable}
        assert all(u.tensors[delta_name(t.name)].shape == tuple(t.shape) for t in manifest.trainable)
        raw = int.from_bytes(payload[12:16], "little")  # the envelope's decompressed body length
        assert 2 * n_params < raw < 2 * n_params + 64 * 1024
        assert len(payload) < raw + 1024
    # the global model: version 1 = sample-weighted mean of the round-1 deltas; version 2 adds round 2's
    v = {ver: tap.model("cluster/0", ver, key) for ver in (1, 2)}
    assert v[1] is not None and v[2] is not None
    for ver, base in ((1, 0), (2, 1)):
        ups = [u for u in updates if u.base_version == base]
        assert len(ups) == 2
        prev = v[ver - 1].tensors if ver > 1 else None  # type: ignore[union-attr]
        total = sum(u.num_samples for u in ups)
        for k in ups[0].tensors:
            mean = sum(u.num_samples * u.tensors[k].astype(np.float64) for u in ups) / total
            want = mean + (prev[k] if prev is not None else 0.0)
            np.testing.assert_allclose(v[ver].tensors[k], want, rtol=1e-5, atol=1e-7)  # type: ignore[union-attr]
    # each client trained round 2 from exactly initial + global Δθ of version 1
    for _, (_, _, rec) in runs.items():
        round1, round2 = rec.loaded
        assert all(np.array_equal(round1[k], initial[k]) for k in initial)  # version 0: the exported weights
        for k in initial:
            np.testing.assert_array_equal(round2[k], initial[k] + v[1].tensors[delta_name(k)])  # type: ignore[union-attr]
    print(json.dumps({"params": n_params, "update_wire_bytes": [len(p) for p in tap.updates]}))
