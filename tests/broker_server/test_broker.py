"""Brokers: `broker run` (embedded Mosquitto, v5 + shared subscriptions + MB payloads) and `broker config`
(password file + ACL, checked for real against Mosquitto on a plain listener)."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner

from fedhft.broker_server.broker.acl import mosquitto_password_hash
from fedhft.broker_server.broker.embedded import iotcore_config
from fedhft.broker_server.broker.mosquitto_config import production_config_text
from fedhft.broker_server.broker.production import write_production_config
from fedhft.cli.broker import broker_config_command
from fedhft.protocol.mqtt import make_client
from tests.support import ROOT
from tests.support.mosquitto import Mosquitto, free_port
from tests.support.server import wait_until

TASK = "acl-task"


class Peer:
    """A v5 client that records what it receives and how its connection went."""

    def __init__(self, port: int, user: str | None = None, password: str | None = None) -> None:
        self.got: dict[str, list[bytes]] = {}
        self.lock = threading.Lock()
        self.connack: list[object] = []
        self.connected = threading.Event()
        self.c = make_client(
            f"peer-{uuid.uuid4().hex[:8]}", username=user, password=password, reconnect_on_failure=False
        )
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        assert wait_until(lambda: bool(self.connack), 10)

    def _on_connect(self, _c: object, _u: object, _f: object, reason: object, _p: object) -> None:
        self.connack.append(reason)
        if not getattr(reason, "is_failure", True):
            self.connected.set()

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.got.setdefault(msg.topic, []).append(bytes(msg.payload))

    @property
    def ok(self) -> bool:
        return self.connected.is_set()

    def subscribe(self, *filters: str) -> None:
        done = threading.Event()
        self.c.on_subscribe = lambda *a: done.set()
        self.c.subscribe([(f, 1) for f in filters])
        assert done.wait(10)

    def publish(self, topic: str, payload: bytes = b"x") -> None:
        self.c.publish(topic, payload, qos=1).wait_for_publish(10)

    def count(self, topic: str) -> int:
        with self.lock:
            return len(self.got.get(topic, []))

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def test_password_hash_is_mosquittos_pbkdf2_sha512_format() -> None:
    salt = bytes(range(12))
    line = mosquitto_password_hash("s3cret", salt=salt)
    _, seven, iterations, b64salt, b64hash = line.split("$")
    assert (seven, iterations, base64.b64decode(b64salt)) == ("7", "101", salt)
    assert base64.b64decode(b64hash) == hashlib.pbkdf2_hmac("sha512", b"s3cret", salt, 101)


def test_iotcore_fallback_config_declares_a_v5_listener_with_a_large_payload_limit() -> None:
    conf = tomllib.loads(iotcore_config(1884, "127.0.0.1"))
    listener = conf["v5"]["1"]
    assert listener["listen"] == "127.0.0.1:1884"
    assert listener["connections"]["max_payload_size"] >= 16 * 2**20


def test_broker_config_command_writes_tls_config_acl_and_secret_credentials(tmp_path: Path) -> None:
    out = tmp_path / "broker"
    args = ["--out", str(out), "--task", TASK, "--server-user", "srv", "--client", "dev-a", "--client", "dev-b"]
    res = CliRunner().invoke(broker_config_command, args)
    assert res.exit_code == 0, res.output
    conf = (out / "mosquitto.conf").read_text()
    for line in ("allow_anonymous false", "listener 8883", "cafile ", "certfile ", "keyfile ", "acl_file "):
        assert line in conf
    assert oct((out / "credentials.txt").stat().st_mode & 0o777) == "0o600"
    users = [line.split(":")[0] for line in (out / "passwd").read_text().splitlines()]
    assert users == ["srv", "dev-a", "dev-b"]
    assert all("$7$101$" in line for line in (out / "passwd").read_text().splitlines())
    before = (out / "credentials.txt").read_text()
    res = CliRunner().invoke(broker_config_command, [*args, "--client", "dev-c"])
    assert res.exit_code == 0 and before.splitlines()[1:] == (out / "credentials.txt").read_text().splitlines()[1:4]


@pytest.fixture
def acl_broker() -> Iterator[tuple[int, dict[str, str]]]:
    """Mosquitto with the generated password file and ACL on a plain 127.0.0.1 listener."""
    folder = Path(tempfile.mkdtemp(prefix="fedhft-acl-"))  # readable by the mosquitto user (not under tmp_path)
    folder.chmod(0o755)
    port = free_port()
    cfg = write_production_config(
        folder, TASK, "srv", ["dev-a", "dev-b"], port=port, bind="127.0.0.1", tls=None, persistence=False
    )
    text = production_config_text(folder, port, "127.0.0.1", None, persistence=False)

    class AclMosquitto(Mosquitto):
        def config_text(self) -> str:
            return text

    broker = AclMosquitto(folder / "run", port=port).start()
    try:
        yield port, cfg.passwords
    finally:
        broker.stop()
        shutil.rmtree(folder, ignore_errors=True)


def test_acl_lets_each_identity_do_only_its_own_part(acl_broker: tuple[int, dict[str, str]]) -> None:
    port, pw = acl_broker
    base = f"fedhft/v1/{TASK}"
    anonymous = Peer(port)
    wrong = Peer(port, "dev-a", "not-the-password")
    assert not anonymous.ok and not wrong.ok
    anonymous.close()
    wrong.close()
    srv, a, b = Peer(port, "srv", pw["srv"]), Peer(port, "dev-a", pw["dev-a"]), Peer(port, "dev-b", pw["dev-b"])
    try:
        assert srv.ok and a.ok and b.ok
        srv.subscribe(f"$share/g/{base}/update/+", f"$share/g/{base}/hello/+")
        a.subscribe(f"{base}/ack/dev-a", f"{base}/model/client/dev-a", f"{base}/model/cluster/+")
        b.subscribe(f"{base}/ack/dev-a", f"{base}/model/client/dev-a", f"{base}/model/cluster/+", f"{base}/update/+")
        a.publish(f"{base}/update/dev-a")
        a.publish(f"{base}/hello/dev-a")
        a.publish(f"{base}/update/dev-b")  # impersonation
        a.publish(f"{base}/model/cluster/0")  # forging a model
        srv.publish(f"{base}/model/cluster/0")
        srv.publish(f"{base}/model/client/dev-a")
        srv.publish(f"{base}/ack/dev-a")
        assert wait_until(lambda: a.count(f"{base}/ack/dev-a") == 1 and b.count(f"{base}/model/cluster/0") == 1, 10)
        assert wait_until(lambda: srv.count(f"{base}/update/dev-a") == 1 and srv.count(f"{base}/hello/dev-a") == 1, 10)
        assert a.count(f"{base}/model/client/dev-a") == 1 and a.count(f"{base}/model/cluster/0") == 1
        wait_until(lambda: False, 0.5)  # give forbidden messages time to (not) arrive
        assert srv.count(f"{base}/update/dev-b") == 0  # a cannot publish as b
        assert b.count(f"{base}/model/cluster/0") == 1  # only the server's model, not a's forgery
        assert b.count(f"{base}/ack/dev-a") == 0 and b.count(f"{base}/model/client/dev-a") == 0
        assert b.count(f"{base}/update/dev-a") == 0  # devices cannot read updates
    finally:
        for p in (srv, a, b):
            p.close()


def test_broker_run_serves_v5_shared_subscriptions_and_large_payloads_then_stops() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedhft.cli", "broker", "run", "--port", str(port)],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_until(lambda: _listening(port) or proc.poll() is not None, 15) and proc.poll() is None
        s1, s2, pub = Peer(port), Peer(port), Peer(port)
        s1.subscribe("$share/g/big/+")
        s2.subscribe("$share/g/big/+")
        for i in range(10):
            pub.publish(f"big/{i}", os.urandom(2_000_000) if i == 0 else b"x")
        total = lambda: sum(p.count(f"big/{i}") for p in (s1, s2) for i in range(10))  # noqa: E731
        assert wait_until(lambda: total() == 10, 15)
        assert 0 < sum(s1.count(f"big/{i}") for i in range(10)) < 10  # split across the group
        assert max(len(m) for p in (s1, s2) for msgs in p.got.values() for m in msgs) == 2_000_000
        for p in (s1, s2, pub):
            p.close()
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    assert proc.returncode == 0, proc.stderr.read()
    assert wait_until(lambda: not _listening(port), 5)  # the mosquitto child is gone too


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False
