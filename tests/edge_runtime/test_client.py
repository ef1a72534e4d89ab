"""`fedhft edge run` against a real Mosquitto and a stub server: rounds, faults, refusals, crash recovery.

Every wait is bounded (wait_until / run timeouts); the broker listens on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from fedhft.cli import main
from fedhft.edge_runtime.client import EdgeClient
from fedhft.edge_runtime.client_config import ClientConfig, ClientSummary
from fedhft.edge_runtime.local_train import open_trainer
from fedhft.edge_runtime.masking import AdapterSpec
from fedhft.edge_runtime.mqtt_link import Delivered, LinkDown, LinkUp, MqttLink
from fedhft.protocol import generate_keypair
from fedhft.protocol.envelope import FLAG_SIGNED
from fedhft.protocol.manifest import load_manifest
from fedhft.protocol.tensor_names import a_name, b_name, b_rows_name, rows_name
from tests.edge_runtime.test_local_train import write_csv
from tests.support import ROOT
from tests.support.mosquitto import Mosquitto
from tests.support.server_stub import ServerStub, random_model_tensors, wait_until
from tests.support.torchfree import run_torchfree

TASK = "sst"


class Fed:
    """One federation for a test: broker, stub server (key on disk), local data, a client config."""

    def __init__(self, tiny_export: Path, broker: Mosquitto, tmp: Path) -> None:
        self.export = tiny_export
        self.broker = broker
        self.tmp = tmp
        self.spec = AdapterSpec.from_manifest(load_manifest(tiny_export))
        self.stub = ServerStub(broker.port, TASK, self.spec).start()
        self.key = tmp / "server.pub"
        self.stub.save_key(self.key)
        self.data = write_csv(tmp / "local.csv", 40)
        self.model = random_model_tensors(self.spec, seed=3)

    def config(self, client_id: str = "c1", **kw: object) -> ClientConfig:
        base = ClientConfig(
            artifacts=self.export,
            data=self.data,
            broker=self.broker.url,
            task=TASK,
            client_id=client_id,
            state_dir=self.tmp / f"state-{client_id}",
            server_key=self.key,
            local_steps=5,
            rounds=1,
            backoff_base=0.2,
            backoff_cap=2.0,
        )
        return replace(base, **kw)  # type: ignore[arg-type]

    def cli_args(self, client_id: str, *extra: str) -> list[str]:
        cfg = self.config(client_id)
        return [
            sys.executable,
            "-m",
            "fedhft.cli",
            "-v",
            "edge",
            "run",
            *("--artifacts", str(cfg.artifacts), "--data", str(cfg.data), "--broker", cfg.broker),
            *("--task", TASK, "--client-id", client_id, "--state-dir", str(cfg.state_dir)),
            *("--server-key", str(self.key)),
            *extra,
        ]


@pytest.fixture
def fed(tiny_export: Path, mosquitto: Mosquitto, tmp_path: Path) -> Iterator[Fed]:
    f = Fed(tiny_export, mosquitto, tmp_path)
    try:
        yield f
    finally:
        f.stub.stop()


class ClientThread:
    """EdgeClient.run in a background thread, bounded by a timeout."""

    def __init__(self, client: EdgeClient, timeout: float = 30.0) -> None:
        self.client = client
        self.stop = threading.Event()
        self.result: list[ClientSummary] = []
        self.thread = threading.Thread(target=lambda: self.result.append(client.run(self.stop, timeout)))
        self.thread.start()

    def join(self, timeout: float = 30.0) -> ClientSummary:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "client did not finish"
        return self.result[0]

    def halt(self) -> ClientSummary:
        self.stop.set()
        return self.join(10)


def test_client_registers_trains_and_sends_a_masked_update(fed: Fed) -> None:
    fed.stub.publish_model(1, "client/c1", fed.model, meta={"round": 1})
    summary = ClientThread(EdgeClient(fed.config())).join()
    assert summary.rounds_trained == 1 and summary.acked == {0: "accepted"} and summary.model_version == 1
    assert not fed.stub.errors
    (hello,) = fed.stub.hellos
    manifest = load_manifest(fed.export)
    assert hello.client_id == "c1" and hello.profile == manifest.profile_name
    assert hello.plan == manifest.plan and len(hello.manifest_sha256) == 64
    (upd,) = fed.stub.updates  # decoded by the stub with the manifest's exact shapes
    assert (upd.seq, upd.base_version, upd.num_samples) == (0, 1, 5 * 8)
    assert upd.manifest_sha256 == hello.manifest_sha256 and np.isfinite(upd.loss)
    for m in fed.spec.modules:
        rows = upd.tensors[rows_name(m.name)]
        assert len(rows) == int(np.ceil(manifest.mask_ratio * m.out_features))
        assert upd.tensors[a_name(m.name)].shape == (m.rank, m.in_features)
        # trained for 5 small steps from the received model: A and the (scaled) B rows stay near it
        a_model = fed.model[a_name(m.name)][: m.rank]
        b_model = fed.model[b_name(m.name)][rows, : m.rank]
        assert np.abs(upd.tensors[a_name(m.name)] - a_model).max() < 0.02
        assert np.abs(upd.tensors[b_rows_name(m.name)] - b_model).max() < 0.02 * fed.spec.scaling(m)
    state = json.loads((fed.tmp / "state-c1" / "state.json").read_text())
    assert (state["next_seq"], state["model_version"], state["trained_version"]) == (1, 1, 1)
    assert not list((fed.tmp / "state-c1" / "outbox").iterdir())


class _HookedTrainer:
    """A trainer that calls ``hook`` once, at its first training step."""

    def __init__(self, inner: object, hook: Callable[[], None]) -> None:
        self.inner, self.hook, self.fired = inner, hook, False

    def train_step(self, *args: object) -> object:
        if not self.fired:
            self.fired = True
            self.hook()
        return self.inner.train_step(*args)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


@pytest.fixture
def persistent_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A Mosquitto that keeps sessions, subscriptions and retained messages across restarts (as deployed)."""
    # Run as root, mosquitto drops to its own user: the database folder must be reachable and writable by it,
    # which pytest's 0700 tmp tree is not.
    with tempfile.TemporaryDirectory(prefix="fedhft-mosquitto-db-") as db:
        os.chmod(db, 0o777)
        broker = Mosquitto(tmp_path / "broker", extra_config=f"persistence true\npersistence_location {db}/\n")
        broker.start()
        try:
            yield broker
        finally:
            broker.stop()


def test_broker_restart_mid_round_delivers_the_queued_update_once(
    tiny_export: Path, persistent_broker: Mosquitto, tmp_path: Path
) -> None:
    broker = persistent_broker
    f = Fed(tiny_export, broker, tmp_path)
    try:
        f.stub.publish_model(1, "client/c1", f.model)
        trainer = _HookedTrainer(open_trainer("ort", tiny_export), broker.stop)  # the broker dies mid-round
        client = EdgeClient(f.config(local_steps=20), trainer=trainer)  # type: ignore[arg-type]
        run = ClientThread(client, timeout=40)
        outbox = tmp_path / "state-c1" / "outbox"
        wait_until(lambda: len(list(outbox.glob("*.update"))) == 1, 20, "the update in the outbox")
        assert broker.proc is None and not f.stub.raw
        broker.start()
        summary = run.join(40)
        assert summary.acked == {0: "accepted"} and summary.rounds_trained == 1
        assert list(f.stub.raw) == [0] and len(f.stub.raw[0]) == 1  # delivered exactly once
        assert not f.stub.errors and not list(outbox.glob("*.update"))
    finally:
        f.stub.stop()


def _strip_signature(payload: bytes) -> bytes:
    body = bytearray(payload[:-64])
    body[6] &= ~FLAG_SIGNED
    return bytes(body)


def test_bad_models_are_refused_and_the_last_good_one_is_kept(fed: Fed) -> None:
    good = fed.stub.publish_model(1, "client/c1", fed.model)
    run = ClientThread(EdgeClient(fed.config(rounds=2, max_rounds_per_version=1)), timeout=40)
    wait_until(lambda: 0 in fed.stub.raw, 20, "the first update")
    other_key, _ = generate_keypair()
    tampered = bytearray(fed.stub.model_payload(2, "client/c1", fed.model))
    tampered[len(tampered) // 2] ^= 0x01
    bad = [
        bytes(tampered),
        _strip_signature(fed.stub.model_payload(3, "client/c1", fed.model)),
        fed.stub.model_payload(4, "client/c1", fed.model, key=other_key),
        fed.stub.model_payload(5, "client/c1", fed.model, task="another-task"),
        fed.stub.model_payload(0, "client/c1", fed.model),
        fed.stub.model_payload(6, "client/c2", fed.model),
    ]
    for payload in bad:
        fed.stub.publish_raw("client/c1", payload)
    refused = run.client.summary.refused_models
    wait_until(lambda: len(refused) == len(bad), 20, "every bad model refused")
    kinds = [r.split(":")[0] for r in refused]
    assert kinds == ["BadSignature", "BadSignature", "BadSignature", "WrongTask", "StaleModel", "WrongRecipient"]
    assert "not signed" in refused[1]
    assert run.client.state.model_version == 1
    assert (fed.tmp / "state-c1" / "model.bin").read_bytes() == good
    assert list(fed.stub.raw) == [0]  # no training on a refused model
    fed.stub.publish_model(7, "client/c1", fed.model)  # a good model still gets through
    summary = run.join(30)
    assert summary.rounds_trained == 2 and summary.acked == {0: "accepted", 1: "accepted"}
    assert [u.base_version for u in fed.stub.updates] == [1, 7]


def test_low_battery_postpones_training(fed: Fed) -> None:
    level = [5.0]
    client = EdgeClient(fed.config(battery_min_percent=20, battery_check_seconds=0.1), battery=lambda: level[0])
    fed.stub.publish_model(1, "client/c1", fed.model)
    run = ClientThread(client, timeout=30)
    wait_until(lambda: client.state.model_version == 1, 20, "the model")
    time.sleep(0.5)
    assert client.summary.rounds_trained == 0 and not fed.stub.raw
    level[0] = 80.0
    assert run.join(20).acked == {0: "accepted"}


def test_the_client_follows_the_cluster_the_server_names(fed: Fed) -> None:
    fed.stub.publish_model(1, "client/c1", fed.model, meta={"cluster": 2})
    run = ClientThread(EdgeClient(fed.config(rounds=2, max_rounds_per_version=1)), timeout=30)
    wait_until(lambda: 0 in fed.stub.raw, 20, "the first update")
    assert run.client.state.cluster == 2
    fed.stub.publish_model(2, "cluster/2", fed.model)
    assert run.join(20).acked == {0: "accepted", 1: "accepted"}
    assert [u.base_version for u in fed.stub.updates] == [1, 2]
    assert json.loads((fed.tmp / "state-c1" / "state.json").read_text())["cluster"] == 2


def test_an_update_without_ack_is_published_again_with_the_same_bytes(fed: Fed) -> None:
    fed.stub.ack = False
    fed.stub.publish_model(1, "client/c1", fed.model)
    run = ClientThread(EdgeClient(fed.config(ack_timeout=0.5)), timeout=30)
    wait_until(lambda: len(fed.stub.raw.get(0, [])) >= 2, 20, "update 0 published again")
    assert len(set(fed.stub.raw[0])) == 1
    fed.stub.ack = True
    fed.stub.ack_all_pending()
    assert run.join(20).acked == {0: "accepted"}


def _wait_for_log(path: Path, text: str, proc: subprocess.Popen, timeout: float) -> None:
    def seen() -> bool:
        assert proc.poll() is None, path.read_text()[-3000:]
        return text in path.read_text()

    wait_until(seen, timeout, f"{text!r} in the client log")


def test_kill_minus_nine_mid_training_resumes_with_the_same_seqs(fed: Fed) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    log = fed.tmp / "client.log"
    state_dir = fed.tmp / "state-c1"
    fed.stub.ack = False
    fed.stub.publish_model(1, "client/c1", fed.model)

    def start(*extra: str) -> subprocess.Popen:
        with open(log, "ab") as err:
            return subprocess.Popen(fed.cli_args("c1", *extra), stdout=subprocess.PIPE, stderr=err, env=env)

    # A: one round, never acked; SIGTERM ends it cleanly with the update still queued
    a = start("--local-steps", "3")
    try:
        wait_until(lambda: 0 in fed.stub.raw, 30, "update 0 from A")
        a.send_signal(signal.SIGTERM)
        out, _ = a.communicate(timeout=15)
    finally:
        a.kill()
    assert a.returncode == 0 and b"1 round(s) trained, 0 update(s) acked, model version 1, 1 queued" in out
    # B: a newer model arrives; B resends update 0 and is killed -9 in the middle of training on it
    fed.stub.publish_model(2, "client/c1", fed.model)
    b = start("--local-steps", "100000")
    try:
        _wait_for_log(log, "training started version=2 steps=100000 seq=1", b, 30)
        time.sleep(0.3)
        b.send_signal(signal.SIGKILL)
        b.wait(10)
    finally:
        b.kill()
    assert b.returncode == -signal.SIGKILL
    state = json.loads((state_dir / "state.json").read_text())
    assert (state["next_seq"], state["model_version"], state["trained_version"]) == (1, 2, 1)
    # C: the server acks again; C resends update 0 (same seq, same bytes), retrains model 2 as seq 1, exits
    fed.stub.ack = True
    c = start("--local-steps", "3", "--rounds", "1")
    try:
        out, _ = c.communicate(timeout=40)
    finally:
        c.kill()
    assert c.returncode == 0, log.read_text()[-3000:]
    assert b"1 round(s) trained, 2 update(s) acked, model version 2, 0 queued" in out
    assert sorted(fed.stub.raw) == [0, 1] and not fed.stub.errors
    assert len(fed.stub.raw[0]) >= 2 and len(set(fed.stub.raw[0])) == 1  # resent, byte for byte
    assert [(u.seq, u.base_version) for u in fed.stub.updates] == [(0, 1), (1, 2)]
    state = json.loads((state_dir / "state.json").read_text())
    assert (state["next_seq"], state["trained_version"]) == (2, 2)
    assert not list((state_dir / "outbox").glob("*.update"))


def test_a_federated_round_runs_with_torch_blocked(fed: Fed) -> None:
    fed.stub.publish_model(4, "client/tf", fed.model)
    cfg = fed.config("tf")
    code = (
        "import json, sys\nfrom pathlib import Path\n"
        "from fedhft.edge_runtime.client import EdgeClient\n"
        "from fedhft.edge_runtime.client_config import ClientConfig\n"
        f"cfg = ClientConfig(artifacts=Path({str(cfg.artifacts)!r}), data=Path({str(cfg.data)!r}), "
        f"broker={cfg.broker!r}, task={TASK!r}, client_id='tf', state_dir=Path({str(cfg.state_dir)!r}), "
        f"server_key=Path({str(fed.key)!r}), local_steps=5, rounds=1)\n"
        "s = EdgeClient(cfg).run(timeout=60)\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'executorch'))\n"
        "print(json.dumps({'heavy': heavy, 'acked': s.acked, 'rounds': s.rounds_trained}))\n"
    )
    res = run_torchfree(code, timeout=90)
    assert res == {"heavy": [], "acked": {"0": "accepted"}, "rounds": 1}
    assert [(u.client_id, u.base_version) for u in fed.stub.updates] == [("tf", 4)]


def test_edge_run_user_errors_are_one_line(tiny_export: Path, tmp_path: Path) -> None:
    data = write_csv(tmp_path / "d.csv", 6)
    key = tmp_path / "server.pub"
    key.write_text("00" * 32 + "\n")
    base = ["run", "--artifacts", str(tiny_export), "--data", str(data), "--task", TASK, "--client-id", "c1"]
    base += ["--state-dir", str(tmp_path / "state")]
    cases = [
        (["--broker", "http://x:1", "--server-key", str(key)], "broker URL"),
        (["--broker", "mqtt://127.0.0.1:1", "--server-key", str(tmp_path / "none.pub")], "cannot read public key"),
        (["--broker", "mqtt://127.0.0.1:1", "--server-key", str(data)], "expected 64 hex characters"),
    ]
    for extra, message in cases:
        res = CliRunner().invoke(main, ["edge", *base, *extra])
        assert res.exit_code == 1 and res.stderr.startswith("error: ") and message in res.stderr, res.output
        assert len(res.stderr.strip().splitlines()) == 1


def test_link_connects_once_a_late_broker_comes_up(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "late")
    events: queue.Queue[object] = queue.Queue()
    link = MqttLink(broker.url, "late-client", events, backoff_base=0.1, backoff_cap=0.5).start()
    try:
        time.sleep(0.5)  # a few refused attempts, each reported with its retry delay
        downs = [events.get_nowait() for _ in range(events.qsize())]
        assert downs and all(isinstance(d, LinkDown) and not d.was_up and d.retry_in > 0 for d in downs)
        assert not link.connected.is_set()
        broker.start()
        while isinstance(ev := events.get(timeout=10), LinkDown):
            pass
        assert isinstance(ev, LinkUp)
        link.publish("fedhft/test", b"x", token="t")
        delivered = events.get(timeout=10)
        assert isinstance(delivered, Delivered) and delivered.token == "t" and delivered.ok
    finally:
        link.stop()
        broker.stop()
