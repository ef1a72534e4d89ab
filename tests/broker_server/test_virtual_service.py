"""The server's flush modes end to end: wall-clock sync rounds, and --virtual-time offline and over Mosquitto."""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from fedhft.broker_server.federation import FederationConfig
from fedhft.broker_server.ingest import Inbound
from fedhft.broker_server.service import Server, ServerConfig
from fedhft.broker_server.validation import ClientPlan, GlobalSpec
from fedhft.protocol import HelloMessage, decode_model, encode_hello, encode_update, hello_topic, update_topic
from fedhft.protocol.manifest import load_manifest
from fedhft.protocol.mqtt import make_client
from fedhft.protocol.topics import promise_topic
from fedhft.protocol.virtual_time import PromiseMessage, decode_schedule, encode_promise
from tests.support.server import Hub, ServerProcess, ServerRunCapture, update_message, update_tensors, wait_until

TASK = "vtime"


@pytest.fixture
def tiny(tiny_export: Path) -> tuple[GlobalSpec, dict, ClientPlan]:
    manifest = load_manifest(tiny_export)
    spec = GlobalSpec.from_manifest(manifest)
    return spec, dict(manifest.plan), ClientPlan.from_plan(manifest.plan, spec)


@pytest.fixture
def make_server(tiny_export: Path, tmp_path: Path) -> Iterator[Callable[..., tuple[Server, list]]]:
    """An offline server (no broker) whose publications are recorded as (topic, payload)."""
    servers: list[Server] = []

    def make(**kw: object) -> tuple[Server, list[tuple[str, bytes]]]:
        fed = FederationConfig(**{"buffer_size": 100, "window_seconds": 1e6, **kw.pop("fed", {})})  # type: ignore[arg-type]
        config = ServerConfig("mqtt://127.0.0.1:1", TASK, tmp_path / "state", tiny_export, federation=fed, **kw)  # type: ignore[arg-type]
        server = Server(config)
        sent: list[tuple[str, bytes]] = []
        server.out.publish = lambda topic, payload, retain=False: sent.append((topic, payload))  # type: ignore[method-assign]
        server.ingest.send_ack = lambda *a: None  # type: ignore[method-assign]
        servers.append(server)
        return server, sent

    yield make
    for s in servers:
        s.shutdown()


def hello(tiny: tuple, cid: str) -> Inbound:
    payload = encode_hello(HelloMessage(TASK, cid, "tiny-test", "ab" * 32, tiny[1], time.time()))
    return Inbound(hello_topic(TASK, cid), payload, 0, 0, time.time())


def update(tiny: tuple, cid: str, seq: int, base: int, rng: np.random.Generator) -> Inbound:
    msg = update_message(TASK, cid, seq, update_tensors(rng, tiny[0], tiny[2]), base_version=base)
    return Inbound(update_topic(TASK, cid), encode_update(msg), 0, 0, time.time())


def promise(cid: str, seq: int, base: int, due: float) -> Inbound:
    payload = encode_promise(PromiseMessage(TASK, cid, seq, base, due, time.time()))
    return Inbound(promise_topic(TASK, cid), payload, 0, 0, time.time())


def schedules(sent: list[tuple[str, bytes]]) -> list[tuple[str, float, int]]:
    out = []
    for topic, payload in sent:
        if "/schedule/" in topic:
            s = decode_schedule(payload, expected_task=TASK)
            out.append((s.client_id, s.start_at, s.version))
    return out


def test_wall_clock_sync_round_waits_for_every_registered_client_or_its_deadline(
    make_server: Callable, tiny: tuple
) -> None:
    rng = np.random.default_rng(0)
    server, _ = make_server(mode="sync", round_deadline=100.0)
    server.handle_batch([hello(tiny, "a"), hello(tiny, "b")])
    server.handle_batch([update(tiny, "a", 1, 0, rng)])
    now = time.time()
    coordinator = server.coordinator
    assert not coordinator.due(now) and coordinator.due(coordinator.round_start + 100.0)  # b is late
    server.handle_batch([update(tiny, "b", 1, 0, rng)])
    assert coordinator.due(now)  # everyone delivered from version 0
    coordinator.flush_if_due(now)
    assert server.federation.version == 1
    server.handle_batch([update(tiny, "a", 2, 0, rng)])  # a straggler's stale update does not complete a round
    assert not coordinator.due(time.time())


def test_virtual_time_offline_processes_by_promised_time_and_schedules_after_the_models(
    make_server: Callable, tiny: tuple, caplog: pytest.LogCaptureFixture
) -> None:
    rng = np.random.default_rng(1)
    server, sent = make_server(virtual_time=True, fed={"buffer_size": 1})
    server.handle_batch([hello(tiny, "fast"), hello(tiny, "slow")])
    assert schedules(sent) == [("fast", 0.0, 0), ("slow", 0.0, 0)]
    with caplog.at_level(logging.WARNING, logger="fedhft.server"):
        server.handle_batch([Inbound(promise_topic(TASK, "fast"), b"garbage", 0, 0, time.time())])
    assert "promise rejected" in caplog.text
    # slow's promise and update come first on the wall clock; fast's update overtakes its own promise
    server.handle_batch([promise("slow", 1, 0, 8.0), update(tiny, "slow", 1, 0, rng), update(tiny, "fast", 1, 0, rng)])
    assert server.federation.version == 0 and len(schedules(sent)) == 2  # fast could still deliver before 8
    server.handle_batch([promise("fast", 1, 0, 3.0)])
    assert server.federation.version == 1 and server.federation.virtual_time == 3.0
    assert schedules(sent)[2:] == [("fast", 3.0, 1)]  # slow@8 waits: fast, scheduled at 3, may deliver before
    server.handle_batch([promise("fast", 2, 1, 10.0), update(tiny, "fast", 2, 1, rng)])
    assert schedules(sent)[3:] == [("slow", 8.0, 2)] and server.federation.virtual_time == 8.0
    stored = server.store.db.execute("SELECT client_id, seq FROM updates WHERE status = 'aggregated' ORDER BY id")
    assert sorted(stored.fetchall()) == [("fast", 1), ("slow", 1)]
    assert server.store.meta()["virtual_time"] == "8.0"
    topics = [t.split("/", 3)[3] for t, _ in sent]
    last_model = max(i for i, t in enumerate(topics) if t.startswith("model/"))
    assert len(topics) - 1 - topics[::-1].index("schedule/slow") > last_model  # version 2's models, then this
    model = decode_model(next(p for t, p in reversed(sent) if t.endswith("model/cluster/0")))
    assert model.version == 2 and model.meta["virtual_time"] == 8.0


def test_virtual_time_a_refused_update_reschedules_its_device(make_server: Callable, tiny: tuple) -> None:
    server, sent = make_server(virtual_time=True, fed={"buffer_size": 1})
    server.handle_batch([hello(tiny, "a")])
    rng = np.random.default_rng(3)
    server.handle_batch([promise("a", 1, 0, 2.5), update(tiny, "a", 1, 7, rng)])  # from a version to come
    assert schedules(sent) == [("a", 0.0, 0), ("a", 2.5, 0)] and server.federation.version == 0


class Listener:
    """Records every model and schedule of the task, in the order the broker delivers them."""

    def __init__(self, port: int) -> None:
        self.lock = threading.Lock()
        self.seen: list[tuple[str, str, float, int]] = []  # (kind, target, virtual time, version)
        self.client = make_client(f"listener-{uuid.uuid4().hex[:8]}")
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe([(f"fedhft/v1/{TASK}/schedule/+", 1), (f"fedhft/v1/{TASK}/model/#", 1)])
        assert subscribed.wait(10)

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        if "/schedule/" in msg.topic:
            s = decode_schedule(msg.payload, expected_task=TASK)
            row = ("schedule", s.client_id, s.start_at, s.version)
        else:
            m = decode_model(msg.payload)
            row = ("model", m.target, float(m.meta.get("virtual_time", 0.0)), m.version)
        with self.lock:
            self.seen.append(row)

    def schedules(self) -> list[tuple[str, float, int]]:
        with self.lock:
            return [(c, t, v) for kind, c, t, v in self.seen if kind == "schedule"]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_virtual_time_server_over_mosquitto_orders_by_promises_not_arrival(
    mosquitto, tiny_export: Path, tiny: tuple, tmp_path: Path
) -> None:  # noqa: ANN001
    rng = np.random.default_rng(2)
    listener = Listener(mosquitto.port)
    hub = Hub(mosquitto.port, TASK)
    extra = ("--virtual-time", "--virtual-fleet", "2", "--buffer-size", "1")
    server = ServerProcess(mosquitto.url, TASK, tmp_path / "state", tiny_export, *extra)
    try:
        server.start()
        for cid in ("fast", "slow"):
            hub.hello(cid, tiny[1])
        assert wait_until(lambda: len(listener.schedules()) == 2, 15), server.log_text()[-3000:]
        assert sorted(listener.schedules()) == [("fast", 0.0, 0), ("slow", 0.0, 0)]

        def send_promise(cid: str, seq: int, base: int, due: float) -> None:
            hub.publish(
                promise_topic(TASK, cid), encode_promise(PromiseMessage(TASK, cid, seq, base, due, time.time()))
            )

        def send_update(cid: str, seq: int, base: int) -> None:
            hub.update(update_message(TASK, cid, seq, update_tensors(rng, tiny[0], tiny[2]), base_version=base))

        send_promise("slow", 1, 0, 8.0)  # the slow device's update reaches the server first ...
        send_update("slow", 1, 0)
        send_update("fast", 1, 0)  # ... and the fast one's update overtakes its promise
        assert wait_until(lambda: hub.ack_status("fast", 1) == "accepted", 15)
        time.sleep(0.5)
        assert len(listener.schedules()) == 2  # nothing processed: fast may still deliver before 8
        send_promise("fast", 1, 0, 3.0)
        assert wait_until(lambda: len(listener.schedules()) == 3, 15), server.log_text()[-3000:]
        send_promise("fast", 2, 1, 10.0)
        send_update("fast", 2, 1)
        assert wait_until(lambda: len(listener.schedules()) == 4, 15), server.log_text()[-3000:]
        assert listener.schedules()[2:] == [("fast", 3.0, 1), ("slow", 8.0, 2)]
        with listener.lock:
            seen = list(listener.seen)
        for cid, _, version in listener.schedules():  # each device hears of its model before its schedule
            at = seen.index(
                ("schedule", *next(s for s in seen if s[0] == "schedule" and s[1] == cid and s[3] == version)[1:])
            )
            assert any(k == "model" and t == f"client/{cid}" and v == version for k, t, _, v in seen[:at])
        stamps = {v: t for k, target, t, v in seen if k == "model" and target == "cluster/0"}
        assert stamps[1] == 3.0 and stamps[2] == 8.0  # versions carry the virtual time of the event that made them
        assert server.stop() == 0
    finally:
        server.stop()
        hub.close()
        listener.close()


def test_virtual_time_a_restarted_server_reschedules_the_devices_it_knows(
    mosquitto, tiny_export: Path, tiny: tuple, tmp_path: Path
) -> None:  # noqa: ANN001
    listener = Listener(mosquitto.port)
    hub = Hub(mosquitto.port, TASK)
    extra = ("--virtual-time", "--virtual-fleet", "2", "--buffer-size", "1")
    server = ServerProcess(mosquitto.url, TASK, tmp_path / "state", tiny_export, *extra)
    try:
        server.start()
        for cid in ("a", "b"):
            hub.hello(cid, tiny[1])
        assert wait_until(lambda: len(listener.schedules()) == 2, 15), server.log_text()[-3000:]
        hub.publish(promise_topic(TASK, "a"), encode_promise(PromiseMessage(TASK, "a", 1, 0, 5.0, time.time())))
        time.sleep(0.5)
        server.kill9()  # the clock's schedules and promise die with the process
        server.start()  # nobody says hello again: the fleet would wait forever for schedules
        assert wait_until(lambda: len(listener.schedules()) == 4, 15), server.log_text()[-3000:]
        after = math.nextafter(0.0, math.inf)  # never (0.0, 0) again: a may have acted on it (its promise died)
        assert sorted(listener.schedules()[2:]) == [("a", after, 0), ("b", after, 0)]
        assert server.stop() == 0
    finally:
        server.stop()
        hub.close()
        listener.close()


def test_virtual_time_a_restored_update_schedules_its_device_at_its_time(make_server: Callable, tiny: tuple) -> None:
    rng = np.random.default_rng(2)
    first, _ = make_server(virtual_time=True, fed={"buffer_size": 2})
    first.handle_batch([hello(tiny, "a"), hello(tiny, "b"), promise("a", 1, 0, 3.0)])  # a's promise dies below
    late = update_message(TASK, "b", 1, update_tensors(rng, tiny[0], tiny[2]))
    late = dataclasses.replace(late, metrics={"virtual_time": 6.0})  # b's update overtook its promise
    first.handle_batch([Inbound(update_topic(TASK, "b"), encode_update(late), 0, 0, time.time())])
    assert first.federation.version == 0 and not first.federation.pending  # stored, held by the clock
    first.shutdown()  # the process dies: its clock (a's promise, b's held update) with it
    server, sent = make_server(virtual_time=True, fed={"buffer_size": 2})
    assert [p.client_id for p in server.federation.pending] == ["b"]
    assert server.pacing is not None
    server.pacing.advance(time.time())  # what its first idle step does
    assert schedules(sent) == [("a", math.nextafter(0.0, math.inf), 0)]  # b waits for its update's time
    server.handle_batch([promise("a", 2, 0, 4.0), update(tiny, "a", 2, 0, rng)])
    assert server.federation.version == 1  # a's update and b's restored one make the buffer of 2
    assert schedules(sent)[1:] == [("a", 4.0, 1)]
    server.handle_batch([promise("a", 3, 1, 7.0)])
    assert schedules(sent)[2:] == [("b", 6.0, 1)]


def test_server_run_passes_the_flush_options(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    run = ServerRunCapture(monkeypatch, tmp_path)
    res = run.invoke()
    assert res.exit_code == 0, res.output
    config = run.config
    assert (config.mode, config.round_deadline, config.virtual_time, config.virtual_timeout) == (
        "async",
        None,
        False,
        300.0,
    )
    extra = ["--mode", "sync", "--round-deadline", "40", "--virtual-time", "--virtual-timeout", "60"]
    extra += ["--virtual-fleet", "8"]
    res = run.invoke(*extra)
    assert res.exit_code == 0, res.output
    config = run.config
    assert (config.mode, config.round_deadline, config.virtual_time, config.virtual_timeout) == ("sync", 40, True, 60)
    assert config.flush_rule().round_closes_at(10.0) == 50.0 and config.virtual_fleet == 8
    res = run.invoke("--mode", "rounds")
    assert res.exit_code == 2 and "rounds" in res.output
    res = run.invoke("--virtual-time", "--max-rounds-per-version", "2")
    assert res.exit_code == 0, res.output
    assert run.config.flush_rule().rounds_per_version == 2
    res = run.invoke("--max-rounds-per-version", "1")  # the wall clock: each edge caps its own rounds
    assert res.exit_code == 2 and "needs --virtual-time" in res.output
    res = run.invoke("--virtual-time", "--max-updates-per-flush", "1")
    assert res.exit_code == 0, res.output
    assert run.config.flush_rule().updates_per_flush == 1
    res = run.invoke("--virtual-time", "--mode", "sync", "--max-updates-per-flush", "1")
    assert res.exit_code == 2 and "needs --virtual-time and --mode async" in res.output
    res = run.invoke("--round-deadline", "0")
    assert res.exit_code == 2 and "round-deadline" in res.output
