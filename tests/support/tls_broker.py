"""A locked-down Mosquitto for tests and bench/security_table.py: a CA and a server certificate for 127.0.0.1
made with `cryptography`, the config written by `fedhft broker config` (TLS, password file, ACL), Mosquitto
in the foreground stopped by PID; a TLS MQTT v5 peer that records CONNACK/PUBACK/SUBACK reasons; and the
security matrix (attempted action x expected x observed) that the test asserts and the bench tabulates.

Mosquitto started as root reads its files as the `mosquitto` user: everything lives in a 0755 folder under
/tmp (not pytest's 0700 tmp tree). Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import ipaddress
import shutil
import ssl
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import paho.mqtt.client as mqtt
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedhft.broker_server.broker.devices import add_device, reload_broker, revoke_device
from fedhft.broker_server.broker.mosquitto_config import TlsFiles
from fedhft.broker_server.broker.registry import read_credentials
from fedhft.cli.broker import broker_config_command
from fedhft.protocol.mqtt import make_client
from tests.support.mosquitto import Mosquitto, free_port
from tests.support.waiting import wait_until

WAIT = 10.0  # bound of every wait (the machine may be busy)


# ---------------------------------------------------------------------------------------------- certificates


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_pem(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o644)  # test only: the mosquitto user must read the server key
    return path


def make_ca(folder: Path, name: str = "ca") -> tuple[Path, ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA (P-256), written as ``<name>.crt``."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(f"fedhft test {name}"))
        .issuer_name(_name(f"fedhft test {name}"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )  # digital_signature, key_cert_sign, crl_sign
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _write_pem(folder / f"{name}.crt", cert.public_bytes(serialization.Encoding.PEM)), key, cert


def make_tls_files(folder: Path, host: str = "127.0.0.1") -> TlsFiles:
    """A CA and a server certificate for ``host`` (IP SAN) and localhost, signed by it."""
    ca_path, ca_key, ca_cert = make_ca(folder)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(host))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host)), x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    crt = _write_pem(folder / "server.crt", cert.public_bytes(serialization.Encoding.PEM))
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    return TlsFiles(str(ca_path), str(crt), str(_write_pem(folder / "server.key", pem)))


# ------------------------------------------------------------------------------------------------------ peer


class Peer:
    """An MQTT v5 client (TLS when ``cafile``) that records its CONNACK, PUBACKs, SUBACKs and messages."""

    def __init__(
        self,
        port: int,
        user: str | None = None,
        password: str | None = None,
        *,
        cafile: str | None = None,
        wait: float = WAIT,
    ) -> None:
        self.lock = threading.Lock()
        self.got: dict[str, list[bytes]] = {}
        self.connack: object | None = None
        self.disconnected = threading.Event()
        self.error: str | None = None
        self.acks: dict[int, object] = {}
        self.c = make_client(
            f"peer-{uuid.uuid4().hex[:8]}",
            username=user,
            password=password,
            tls_ca=cafile,
            reconnect_on_failure=False,
        )
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = lambda *a: self.disconnected.set()
        self.c.on_message = self._on_message
        self.c.on_publish = lambda _c, _u, mid, reason, _p: self._ack(mid, reason)
        self.c.on_subscribe = lambda _c, _u, mid, codes, _p: self._ack(mid, list(codes))
        try:
            self.c.connect("127.0.0.1", port, keepalive=30)
        except (OSError, ssl.SSLError) as e:
            self.error = f"{type(e).__name__}: {e}"
            return
        self.c.loop_start()
        wait_until(lambda: self.connack is not None or self.disconnected.is_set(), wait)

    def _on_connect(self, _c: object, _u: object, _f: object, reason: object, _p: object) -> None:
        self.connack = reason

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.got.setdefault(msg.topic, []).append(bytes(msg.payload))

    def _ack(self, mid: int, reason: object) -> None:
        with self.lock:
            self.acks[mid] = reason

    @property
    def ok(self) -> bool:
        return self.connack is not None and not getattr(self.connack, "is_failure", True)

    def outcome(self) -> str:
        """connected / refused (CONNACK reason) / failed (no CONNACK: TLS or socket error)."""
        if self.error is not None:
            return f"failed ({self.error[:90]})"
        if self.connack is None:
            return "failed (connection closed without a CONNACK)"
        return "connected" if self.ok else f"refused ({self.connack})"

    def _wait_ack(self, mid: int) -> object:
        wait_until(lambda: mid in self.acks, WAIT)
        with self.lock:
            return self.acks.get(mid, "no ack")

    def subscribe(self, *filters: str) -> list[str]:
        """The SUBACK reason of each filter."""
        _, mid = self.c.subscribe([(f, 1) for f in filters])
        codes = self._wait_ack(mid)
        return [str(c) for c in codes] if isinstance(codes, list) else [str(codes)]

    def publish(self, topic: str, payload: bytes = b"x", retain: bool = False) -> str:
        """The PUBACK reason ("Success", "Not authorized", ...)."""
        info = self.c.publish(topic, payload, qos=1, retain=retain)
        return str(self._wait_ack(info.mid))

    def count(self, topic: str) -> int:
        with self.lock:
            return len(self.got.get(topic, []))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.c.disconnect()
        self.c.loop_stop()


# ------------------------------------------------------------------------------------------------------- lab


class _ConfMosquitto(Mosquitto):
    conf_file: Path | None = None

    def config_text(self) -> str:
        assert self.conf_file is not None
        return self.conf_file.read_text()


@dataclass
class TlsLab:
    """A running TLS Mosquitto configured by `fedhft broker config` in ``conf_dir``."""

    root: Path
    tls: TlsFiles
    conf_dir: Path
    port: int
    broker: _ConfMosquitto
    peers: list[Peer] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.broker.proc is not None
        return self.broker.proc.pid

    def password(self, user: str) -> str:
        return read_credentials(self.conf_dir / "credentials.txt")[user]

    def password_file(self, user: str) -> Path:
        path = self.root / f"{user}.password"
        path.write_text(self.password(user) + "\n")
        return path

    def peer(self, user: str | None = None, password: str | None = None, *, tls: bool = True, **kw: object) -> Peer:
        if user is not None and password is None:
            password = self.password(user)
        p = Peer(self.port, user, password, cafile=self.tls.cafile if tls else None, **kw)  # type: ignore[arg-type]
        self.peers.append(p)
        return p

    def log(self) -> str:
        return (self.broker.workdir / "mosquitto.log").read_text(errors="replace")

    def reloads(self) -> int:
        """How many times Mosquitto has logged "Reloading config." (it reloads passwd and acl in the same loop
        iteration, before it reads any later packet)."""
        return self.log().count("Reloading config.")

    def reload(self) -> None:
        """SIGHUP, then wait (bounded) until Mosquitto has reloaded."""
        before = self.reloads()
        reload_broker(self.pid)
        assert wait_until(lambda: self.reloads() > before, WAIT), "mosquitto did not reload"

    def close(self) -> None:
        for p in self.peers:
            p.close()
        self.broker.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def tls_lab(tasks: dict[str, tuple[str, list[str]]]) -> Iterator[TlsLab]:
    """``tasks``: task -> (server user, client ids); each written by `fedhft broker config` (TLS, no persistence)."""
    root = Path(tempfile.mkdtemp(prefix="fedhft-tls-"))
    root.chmod(0o755)
    try:
        tls = make_tls_files(root)
        conf_dir = root / "conf"
        port = free_port()
        for task, (server_user, clients) in tasks.items():
            args = ["--out", str(conf_dir), "--task", task, "--server-user", server_user, "--port", str(port)]
            args += ["--bind", "127.0.0.1", "--cafile", tls.cafile, "--certfile", tls.certfile]
            args += ["--keyfile", tls.keyfile, "--no-persistence"]
            for c in clients:
                args += ["--client", c]
            res = CliRunner().invoke(broker_config_command, args)
            assert res.exit_code == 0, res.output
        conf_dir.chmod(0o755)
        broker = _ConfMosquitto(root / "run", port=port)
        broker.conf_file = conf_dir / "mosquitto.conf"
        broker.start()
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    lab = TlsLab(root, tls, conf_dir, port, broker)
    try:
        yield lab
    finally:
        lab.close()


# ----------------------------------------------------------------------------------------- security matrix

A, B = "alpha", "beta"
MATRIX_TASKS = {A: ("srv-alpha", ["dev-a", "dev-b", "dev-m"]), B: ("srv-beta", ["dev-c"])}  # dev-m: markers


def _t(task: str, rest: str) -> str:
    return f"fedhft/v1/{task}/{rest}"


@dataclass
class Row:
    action: str
    expected: str  # refused | failed | connected | denied | delivered | disconnected
    observed: str
    ok: bool

    def as_dict(self) -> dict[str, object]:
        return {"action": self.action, "expected": self.expected, "observed": self.observed, "ok": self.ok}


class _Matrix:
    """The peers of the matrix and, per observer, a marker some allowed publisher can send it: once the
    marker arrives, anything published (and PUBACKed) before it has been routed, since Mosquitto routes a
    QoS 1 message before its PUBACK and keeps each subscriber's queue in order."""

    def __init__(self, lab: TlsLab) -> None:
        self.lab = lab
        self.rows: list[Row] = []

    def add(self, action: str, expected: str, observed: str, ok: bool) -> None:
        self.rows.append(Row(action, expected, observed, ok))

    def connect(self, action: str, expected: str, peer: Peer) -> Peer:
        out = peer.outcome()
        self.add(action, expected, out, out.startswith(expected))
        return peer

    def barrier(self, observer: Peer, marker: tuple[Peer, str]) -> bool:
        publisher, topic = marker
        before = observer.count(topic)
        publisher.publish(topic, b"marker")
        return wait_until(lambda: observer.count(topic) > before, WAIT)

    def publish(self, action: str, pub: Peer, topic: str, obs: Peer, marker: tuple[Peer, str], exp: str) -> None:
        before = obs.count(topic)
        reason = pub.publish(topic)
        routed = self.barrier(obs, marker)
        n = obs.count(topic) - before
        ok = routed and (n == 0 and reason != "Success" if exp == "denied" else n == 1 and reason == "Success")
        verdict = "denied" if n == 0 else "delivered"
        self.add(action, exp, f"{verdict} (PUBACK {reason}; {n} delivered)", ok)

    def read(self, action: str, user: str, flt: str, pub: Peer, topic: str, marker: tuple[Peer, str]) -> None:
        """A fresh ``user`` peer subscribes to ``flt`` (and the marker); ``pub`` publishes on ``topic``."""
        reader = self.lab.peer(user)
        codes = reader.subscribe(flt, marker[1])
        pub.publish(topic)
        routed = self.barrier(reader, marker)
        n = reader.count(topic)
        verdict = "denied" if n == 0 else "delivered"
        self.add(action, "denied", f"{verdict} (SUBACK {codes[0]}; {n} received)", routed and n == 0)
        reader.close()


def security_matrix(lab: TlsLab) -> list[Row]:
    """Try every action of the matrix against ``lab`` (configured with MATRIX_TASKS); one Row each."""
    m = _Matrix(lab)
    # ---- connections
    m.connect("anonymous client connects over TLS", "refused", lab.peer())
    m.connect("dev-a connects with a wrong password", "refused", lab.peer("dev-a", "wrong-password"))
    m.connect("dev-a's password used as user dev-b", "refused", lab.peer("dev-b", lab.password("dev-a")))
    m.connect("dev-a connects in plaintext MQTT to the TLS port", "failed", lab.peer("dev-a", tls=False))
    with tempfile.TemporaryDirectory() as other:
        other_ca, _, _ = make_ca(Path(other), "other-ca")
        p = Peer(lab.port, "dev-a", lab.password("dev-a"), cafile=str(other_ca))
        lab.peers.append(p)
        m.connect("dev-a connects over TLS trusting another CA (impostor broker)", "failed", p)
    srv = m.connect("srv-alpha (server identity) connects over TLS", "connected", lab.peer("srv-alpha"))
    srv_b = m.connect("srv-beta (server identity of beta) connects over TLS", "connected", lab.peer("srv-beta"))
    a = m.connect("dev-a connects over TLS with its password", "connected", lab.peer("dev-a"))
    b = lab.peer("dev-b")
    c = lab.peer("dev-c")
    marker = lab.peer("dev-m")
    if not all(x.ok for x in (srv, srv_b, a, b, c, marker)):
        m.add("setup: every identity connected", "connected", "not all connected", False)
        return m.rows
    srv.subscribe(f"$share/g/{_t(A, 'update/+')}", f"$share/g/{_t(A, 'hello/+')}")
    a.subscribe(_t(A, "model/client/dev-a"), _t(A, "model/cluster/+"), _t(A, "key"), _t(A, "ack/dev-a"))
    b.subscribe(_t(A, "model/cluster/+"), _t(A, "key"), _t(A, "ack/dev-b"))
    c.subscribe(_t(B, "model/cluster/+"), _t(B, "key"))
    to_srv = (marker, _t(A, "hello/dev-m"))  # markers: an allowed publisher and topic for each observer
    to_alpha_devices = (srv, _t(A, "model/cluster/9"))
    to_c = (srv_b, _t(B, "model/cluster/9"))

    # ---- what a device may publish: its own update and hello, nothing else
    m.publish("dev-a publishes its own update (server identity reads it)", a, _t(A, "update/dev-a"), srv, to_srv,
              "delivered")  # fmt: skip
    m.publish("dev-a publishes its own hello (server identity reads it)", a, _t(A, "hello/dev-a"), srv, to_srv,
              "delivered")  # fmt: skip
    m.publish("dev-a publishes on dev-b's update topic", a, _t(A, "update/dev-b"), srv, to_srv, "denied")
    m.publish("dev-a publishes on dev-b's hello topic", a, _t(A, "hello/dev-b"), srv, to_srv, "denied")
    m.publish("dev-a publishes a cluster model", a, _t(A, "model/cluster/0"), b, to_alpha_devices, "denied")
    m.publish("dev-a publishes its own client model", a, _t(A, "model/client/dev-a"), a, to_alpha_devices, "denied")
    m.publish("dev-a publishes on the key-chain topic", a, _t(A, "key"), b, to_alpha_devices, "denied")
    m.publish("dev-a publishes an ack for dev-b", a, _t(A, "ack/dev-b"), b, to_alpha_devices, "denied")

    # ---- what a device may read: its ack and client model, its task's cluster models and key chain
    m.read("dev-a reads task beta's cluster models", "dev-a", _t(B, "model/cluster/+"), srv_b,
           _t(B, "model/cluster/0"), to_alpha_devices)  # fmt: skip
    m.read("dev-a reads task beta's key chain", "dev-a", _t(B, "key"), srv_b, _t(B, "key"), to_alpha_devices)
    m.read("dev-a reads dev-b's client model", "dev-a", _t(A, "model/client/dev-b"), srv,
           _t(A, "model/client/dev-b"), to_alpha_devices)  # fmt: skip
    m.read("dev-a reads dev-b's acks", "dev-a", _t(A, "ack/dev-b"), srv, _t(A, "ack/dev-b"), to_alpha_devices)
    m.read("dev-a reads every device's updates", "dev-a", _t(A, "update/+"), b, _t(A, "update/dev-b"),
           to_alpha_devices)  # fmt: skip
    m.read("dev-a reads everything (fedhft/#): dev-b's model", "dev-a", "fedhft/#", srv,
           _t(A, "model/client/dev-b"), to_alpha_devices)  # fmt: skip
    m.read("srv-alpha reads task beta's updates", "srv-alpha", _t(B, "update/+"), c, _t(B, "update/dev-c"),
           to_srv)  # fmt: skip

    # ---- the server identity: models, acks and key chain of its own task only
    m.publish("srv-alpha publishes a cluster model of alpha", srv, _t(A, "model/cluster/0"), b, to_alpha_devices,
              "delivered")  # fmt: skip
    m.publish("srv-alpha publishes dev-a's client model", srv, _t(A, "model/client/dev-a"), a, to_alpha_devices,
              "delivered")  # fmt: skip
    m.publish("srv-alpha publishes the key chain of alpha", srv, _t(A, "key"), b, to_alpha_devices, "delivered")
    m.publish("srv-alpha publishes an ack for dev-a", srv, _t(A, "ack/dev-a"), a, to_alpha_devices, "delivered")
    m.publish("srv-alpha publishes a model of task beta", srv, _t(B, "model/cluster/0"), c, to_c, "denied")
    m.publish("srv-alpha publishes the key chain of task beta", srv, _t(B, "key"), c, to_c, "denied")

    # ---- provisioning: `fedhft device add` / `revoke` + SIGHUP on the running broker
    add_device(lab.conf_dir, A, "dev-new")
    lab.reload()
    new = m.connect("device added (fedhft device add + SIGHUP) connects", "connected", lab.peer("dev-new"))
    if new.ok:
        m.publish("the added device publishes its update", new, _t(A, "update/dev-new"), srv, to_srv, "delivered")
    password = lab.password("dev-new")
    revoke_device(lab.conf_dir, A, "dev-new")
    lab.reload()
    kicked = wait_until(new.disconnected.is_set, WAIT)
    m.add("revoked device's open connection (fedhft device revoke + SIGHUP)", "disconnected",
          "disconnected" if kicked else "still connected", kicked)  # fmt: skip
    m.connect("revoked device connects again", "refused", lab.peer("dev-new", password))
    return m.rows


def markdown_table(rows: list[Row]) -> str:
    lines = ["| attempted action | expected | observed | as expected |", "| --- | --- | --- | --- |"]
    lines += [f"| {r.action} | {r.expected} | {r.observed} | {'yes' if r.ok else '**NO**'} |" for r in rows]
    return "\n".join(lines)
