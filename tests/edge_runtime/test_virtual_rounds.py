"""Edge rounds on the virtual clock (`fedhft edge run --virtual-time`), and FedBuff's keep-training on the wall
clock: duration arithmetic, schedules, promises before training, and determinism under host load.

The server side is a stub here: tests/scenarios/test_virtual_time_determinism.py runs the real one.
"""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedhft.edge_runtime.client import EdgeClient
from fedhft.edge_runtime.client_config import ClientConfig, ClientError
from fedhft.edge_runtime.local_train import open_trainer
from fedhft.edge_runtime.masking import AdapterSpec, build_update_tensors, params_to_model_tensors
from fedhft.edge_runtime.mqtt_link import Delivered
from fedhft.edge_runtime.sim_clock import DeviceTimes, payload_bytes, planned_payload_bytes
from fedhft.edge_runtime.state import EdgeState
from fedhft.edge_runtime.virtual_rounds import LEAVE_AT, VirtualRounds, round_on_clock
from fedhft.protocol import ModelMessage, UpdateMessage
from fedhft.protocol.manifest import load_manifest
from fedhft.protocol.topics import promise_topic
from fedhft.protocol.virtual_time import ScheduleMessage, decode_promise, encode_schedule
from tests.edge_runtime.test_client import ClientThread, Fed, _HookedTrainer, fed  # noqa: F401 - fed: a fixture
from tests.edge_runtime.test_local_train import write_csv
from tests.support.mosquitto import Mosquitto
from tests.support.server_stub import ServerStub, random_model_tensors, wait_until


def _model(version: int, tensors: dict[str, np.ndarray]) -> ModelMessage:
    return ModelMessage("sst", version, "client/c1", time.time(), "", {}, tensors)


def _schedule(start_at: float, version: int, client_id: str = "c1") -> bytes:
    return encode_schedule(ScheduleMessage("sst", client_id, start_at, version, time.time()))


# ---- arithmetic ----------------------------------------------------------------------------------------------


def test_round_duration_is_download_plus_steps_plus_upload() -> None:
    times = DeviceTimes(step_seconds=0.5, uplink_mbps=2.0, downlink_mbps=8.0)
    model = _model(3, {"m.A": np.zeros((4, 100), np.float32), "m.B": np.zeros((50, 4), np.float32)})
    model_bytes = 2 * (400 + 200)  # fp16 on the wire
    assert payload_bytes(model.tensors) == model_bytes
    rnd = round_on_clock(times, 100.0, model, 10, update_bytes=25_000)
    down, up = model_bytes * 8 / 8e6, 25_000 * 8 / 2e6
    assert rnd.duration == pytest.approx(down + 10 * 0.5 + up, rel=1e-12)
    assert rnd.due == 100.0 + rnd.duration
    assert rnd.metrics() == {"virtual_time": rnd.due, "virtual_start": 100.0, "virtual_duration": rnd.duration}


def test_update_bytes_are_known_from_the_plan_before_training(tiny_export: Path) -> None:
    spec = AdapterSpec.from_manifest(load_manifest(tiny_export))
    rng = np.random.default_rng(0)
    start = {}
    for m in spec.modules:
        start[f"{m.name}.lora_A"] = rng.normal(0, 0.1, (m.rank, m.in_features)).astype(np.float32)
        start[f"{m.name}.lora_B"] = rng.normal(0, 0.1, (m.out_features, m.rank)).astype(np.float32)
    for name, shape in spec.head_shapes.items():
        start[name] = rng.normal(0, 0.1, shape).astype(np.float32)
    trained = {k: v + rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in start.items()}
    real = build_update_tensors(spec, trained, start)
    assert planned_payload_bytes(spec.update_shapes()) == payload_bytes(real) > 0
    assert payload_bytes(params_to_model_tensors(spec, trained)) > 0


# ---- schedules -------------------------------------------------------------------------------------------------


def _rounds(tiny_export: Path, **kw: object) -> VirtualRounds:
    spec = AdapterSpec.from_manifest(load_manifest(tiny_export))
    state = EdgeState("sst", "c1", "0" * 64)
    return VirtualRounds("sst", "c1", spec, DeviceTimes(0.1, 1.0, 1.0), state, **kw)  # type: ignore[arg-type]


def test_a_round_waits_for_its_schedule_and_for_the_model_it_names(tiny_export: Path) -> None:
    vr = _rounds(tiny_export)
    tensors = {"x.A": np.zeros((2, 2), np.float32)}
    assert vr.ready(_model(1, tensors)) is None  # no schedule yet
    vr.on_schedule(_schedule(5.0, 2))
    assert vr.ready(None) is None and vr.ready(_model(1, tensors)) is None  # version 2 not here yet
    sched = vr.ready(_model(2, tensors))
    assert sched is not None and (sched.start_at, sched.version) == (5.0, 2)
    vr.on_schedule(_schedule(4.0, 2))  # older than the pending one
    assert vr.pending == sched
    vr.taken(sched)
    assert vr.pending is None and vr.state.last_schedule == [5.0, 2]
    vr.on_schedule(_schedule(5.0, 2))  # redelivered after a reconnect: not trained twice
    assert vr.pending is None
    vr.on_schedule(b"not a schedule")
    vr.on_schedule(_schedule(6.0, 2, client_id="c2"))  # someone else's
    assert vr.pending is None and not vr.finished


class _Link:
    """Records what would be published."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, object]] = []

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, token: object = None) -> None:
        self.sent.append((topic, payload, token))


def test_past_its_bounds_a_device_promises_the_end_of_time_and_leaves(tiny_export: Path) -> None:
    vr = _rounds(tiny_export, until_version=3, until_time=50.0)
    vr.link = link = _Link()  # type: ignore[assignment]
    vr.state.next_seq = 7
    vr.on_schedule(_schedule(10.0, 2))
    assert vr.pending is not None and not vr.finished and not link.sent
    vr.on_schedule(_schedule(11.0, 3))
    assert vr.finished and vr.pending is None and not vr.left
    ((topic, payload, token),) = link.sent
    leave = decode_promise(payload)
    assert topic == promise_topic("sst", "c1") and (leave.seq, leave.base_version, leave.due) == (7, 3, LEAVE_AT)
    vr.on_delivered(Delivered(token, True, ""))
    assert vr.left
    spec = AdapterSpec.from_manifest(load_manifest(tiny_export))
    again = VirtualRounds("sst", "c1", spec, vr.times, vr.state, until_version=3)  # a restart: still gone
    assert again.finished and again.left
    late = _rounds(tiny_export, until_time=50.0)
    late.on_schedule(_schedule(50.0, 1))
    assert late.finished


def test_virtual_time_and_scaled_sleeps_exclude_each_other(fed: Fed) -> None:  # noqa: F811
    with pytest.raises(ClientError, match="exclude each other"):
        EdgeClient(fed.config(virtual_time=True, sim_time_scale=0.1))


# ---- a device on the virtual clock, against the stub --------------------------------------------------------


def test_the_device_trains_when_scheduled_and_promises_before_training(fed: Fed) -> None:  # noqa: F811
    stub, manifest = fed.stub, load_manifest(fed.export)
    stub.publish_model(0, "client/c1", fed.model)
    promised_at_first_step: list[int] = []

    def first_step() -> None:  # training starts: the promise must already be on its way to the server
        with contextlib.suppress(AssertionError):
            wait_until(lambda: stub.promises, 10, "the promise")
        promised_at_first_step.append(len(stub.promises))

    cfg = fed.config(virtual_time=True, rounds=2, local_steps=5)
    trainer = _HookedTrainer(open_trainer("ort", fed.export, manifest, learning_rate=cfg.learning_rate), first_step)
    run = ClientThread(EdgeClient(cfg, trainer=trainer), timeout=40)  # type: ignore[arg-type]
    wait_until(lambda: stub.hellos, 20, "the hello")
    time.sleep(1.0)
    assert not stub.promises and not stub.updates  # a model alone starts nothing
    stub.publish_schedule("c1", 10.0, 1)  # version 1 is not there yet
    time.sleep(1.0)
    assert not stub.promises
    model1 = random_model_tensors(fed.spec, seed=7)
    stub.publish_model(1, "client/c1", model1)
    wait_until(lambda: len(stub.updates) == 1, 20, "the first update")
    (p0,), (u0,) = stub.promises, stub.updates
    times = DeviceTimes.from_manifest(manifest)
    planned = planned_payload_bytes(fed.spec.update_shapes())
    assert planned == payload_bytes(u0.tensors)
    d = times.round_seconds(payload_bytes(model1), 5, planned)
    assert (p0.seq, p0.base_version, p0.due) == (0, 1, 10.0 + d) and u0.base_version == 1
    assert u0.metrics["virtual_time"] == p0.due and u0.metrics["virtual_duration"] == d
    assert stub.arrivals[:2] == [("promise", "c1", 0), ("update", "c1", 0)]
    assert promised_at_first_step == [1]  # promised before the first training step
    assert "train_seconds" not in u0.metrics and u0.created_at == p0.due  # no host timing in it
    stub.publish_schedule("c1", 10.0, 1)  # the same schedule again: already done
    time.sleep(1.0)
    assert len(stub.promises) == 1
    stub.publish_schedule("c1", p0.due, 1)  # nothing newer yet: another round on version 1 (FedBuff)
    summary = run.join(30)
    assert summary.rounds_trained == 2 and summary.acked == {0: "accepted", 1: "accepted"}
    p1, u1 = stub.promises[1], stub.updates[1]
    assert (p1.seq, p1.base_version, p1.due) == (1, 1, p0.due + d)
    assert (u1.seq, u1.base_version, u1.metrics["virtual_time"]) == (1, 1, p1.due)
    a = next(n for n in u0.tensors if n.endswith(".A"))
    assert not np.array_equal(u0.tensors[a], u1.tensors[a])  # the second round went on from the first
    assert not stub.errors


# ---- determinism: a minimal scheduler, the same runs with and without host load -----------------------------


def _fake_scheduler(stub: ServerStub, clients: list[str], rounds: int, timeout: float) -> None:
    """What the virtual-time server does, minimally: on a hello, model 0 and a schedule at 0; on each update, the
    client's next model version (fixed tensors per version) and a schedule at the update's virtual time."""
    versions: dict[str, int] = {}
    seen = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with stub.lock:
            hellos = [h.client_id for h in stub.hellos]
            updates = list(stub.updates)
        for cid in hellos:
            if cid not in versions:
                versions[cid] = 0
                stub.publish_model(0, f"client/{cid}", random_model_tensors(stub.spec, seed=100))
                stub.publish_schedule(cid, 0.0, 0)
        for upd in updates[seen:]:
            v = versions[upd.client_id] = versions[upd.client_id] + 1
            stub.publish_model(v, f"client/{upd.client_id}", random_model_tensors(stub.spec, seed=100 + v))
            stub.publish_schedule(upd.client_id, float(upd.metrics["virtual_time"]), v)
        seen = len(updates)
        if seen >= rounds * len(clients):
            return
        time.sleep(0.05)
    raise AssertionError(f"the fake scheduler saw {seen} of {rounds * len(clients)} updates; {stub.errors}")


def _fingerprint(upd: UpdateMessage) -> tuple:
    digest = hashlib.sha256()
    for name in sorted(upd.tensors):
        digest.update(name.encode() + np.ascontiguousarray(upd.tensors[name]).tobytes())
    return (upd.client_id, upd.seq, upd.base_version, upd.metrics["virtual_time"], upd.loss, digest.hexdigest())


def _scheduled_run(tiny_export: Path, broker: Mosquitto, tmp: Path, task: str) -> tuple[list, list]:
    spec = AdapterSpec.from_manifest(load_manifest(tiny_export))
    stub = ServerStub(broker.port, task, spec).start()
    clients, rounds = ["c1", "c2"], 3
    try:
        tmp.mkdir(parents=True)
        stub.save_key(tmp / "server.pub")
        data = write_csv(tmp / "local.csv", 40)
        threads = []
        for i, cid in enumerate(clients):
            cfg = ClientConfig(
                artifacts=tiny_export,
                data=data,
                broker=broker.url,
                task=task,
                client_id=cid,
                state_dir=tmp / f"state-{cid}",
                server_key=tmp / "server.pub",
                local_steps=5,
                rounds=rounds,
                seed=i + 1,
                virtual_time=True,
                backoff_base=0.2,
                backoff_cap=2.0,
            )
            threads.append(ClientThread(EdgeClient(cfg), timeout=90))
        _fake_scheduler(stub, clients, rounds, timeout=80)
        for t in threads:
            assert t.join(30).rounds_trained == rounds
        updates = sorted((_fingerprint(u) for u in stub.updates), key=lambda f: (f[0], f[1]))
        promises = sorted((p.client_id, p.seq, p.base_version, p.due) for p in stub.promises)
        assert not stub.errors, stub.errors
        return updates, promises
    finally:
        stub.stop()


def test_scheduled_rounds_compute_the_same_under_host_load(
    tiny_export: Path, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    quiet = _scheduled_run(tiny_export, mosquitto, tmp_path / "quiet", "det-quiet")
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        loaded = _scheduled_run(tiny_export, mosquitto, tmp_path / "loaded", "det-loaded")
    finally:
        for p in hogs:
            p.kill()
            p.wait(10)
    updates, promises = quiet
    assert [(u[0], u[1], u[2]) for u in updates] == [(c, s, s) for c in ("c1", "c2") for s in range(3)]
    for cid in ("c1", "c2"):  # every round of a device lasts as long: download, 5 steps, upload
        t = [u[3] for u in updates if u[0] == cid]
        assert t[0] > 0 and t[1] == pytest.approx(2 * t[0]) and t[2] == pytest.approx(3 * t[0])
    assert promises == [u[:4] for u in updates]  # each update landed when it was promised to
    assert loaded == quiet


# ---- wall clock: a device that finishes keeps training (FedBuff) --------------------------------------------


def test_a_finished_device_keeps_training_on_its_newest_model(fed: Fed) -> None:  # noqa: F811
    fed.stub.publish_model(1, "client/c1", fed.model)
    summary = ClientThread(EdgeClient(fed.config(rounds=3)), timeout=40).join(40)
    assert summary.rounds_trained == 3 and summary.acked == {0: "accepted", 1: "accepted", 2: "accepted"}
    ups = fed.stub.updates
    assert [u.base_version for u in ups] == [1, 1, 1]
    a = next(n for n in ups[0].tensors if n.endswith(".A"))
    assert not np.array_equal(ups[0].tensors[a], ups[1].tensors[a])  # trained on, not the same round again


def test_rounds_per_version_are_bounded_and_wait_for_the_ack(fed: Fed) -> None:  # noqa: F811
    fed.stub.ack = False
    fed.stub.publish_model(1, "client/c1", fed.model)
    run = ClientThread(EdgeClient(fed.config(rounds=3, max_rounds_per_version=2)), timeout=60)
    wait_until(lambda: 0 in fed.stub.raw, 20, "the first update")
    time.sleep(1.5)
    assert list(fed.stub.raw) == [0]  # unacknowledged: no second round piles up behind it
    fed.stub.ack = True
    fed.stub.ack_all_pending()
    wait_until(lambda: 1 in fed.stub.raw, 20, "the second round on version 1")
    time.sleep(1.5)
    assert sorted(fed.stub.raw) == [0, 1]  # two rounds on version 1, then it waits for a newer model
    fed.stub.publish_model(2, "client/c1", fed.model)
    assert run.join(30).rounds_trained == 3
    assert [u.base_version for u in fed.stub.updates] == [1, 1, 2]
