"""MQTT brokers for fedhft: an embedded one for demos and tests, and a production Mosquitto configuration.

`fedhft broker run` needs a broker that speaks MQTT v5 with shared subscriptions and carries multi-MB
payloads. The choice, in order:

1. **Mosquitto** when installed (Debian/Ubuntu ``mosquitto``; verified: v5, ``$share`` subscriptions,
   payloads up to 100 MB). It runs as a child, ``mosquitto -c <generated conf>`` in the foreground, and is
   stopped by its PID on exit.
2. **iotcore** (PyPI, MIT; the Rust broker rumqttd compiled into a wheel) otherwise: verified here with
   iotcore 0.4.0 (v5 listener, shared subscriptions split 10/10, a 3 MB payload), but only with a TOML
   config that declares a ``[v5.1]`` listener and raises ``max_payload_size`` (the default is 20 KB).
   It also runs in a child process (``iotcore.Broker``). rumqttd keys a shared subscription by its share
   name alone (a second filter under the same name is silently dropped), so the server uses one share
   name per filter (``<group>.update``, ``<group>.hello``), which Mosquitto handles the same way.

Pure-Python brokers were ruled out: amqtt speaks MQTT 3.1.1 only and drops ``$share`` subscriptions.

`fedhft broker config` writes a production Mosquitto setup: a TLS listener, ``allow_anonymous false``,
a password file in Mosquitto's own ``$7$`` format (PBKDF2-HMAC-SHA512, 101 iterations by default, as
``mosquitto_passwd`` writes it) and an ACL in which each client may publish only its own
``update/<id>`` and ``hello/<id>`` and read only its ack, its own client model, the cluster models and the
key chain of its task, while only the server identity may read updates/hellos and publish models, acks and
the key chain. ``fedhft-broker.json`` in the same directory records tasks, identities and revocations, so
``fedhft device add|revoke`` (devices.py) regenerate passwd and acl with the same code.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedhft.atomic import write_atomic
from fedhft.errors import FedHFTError
from fedhft.logs import event
from fedhft.procs import stop_process
from fedhft.protocol.topics import PREFIX, validate_id

log = logging.getLogger("fedhft.broker")

MOSQUITTO_ITERATIONS = 101
MAX_MESSAGE_BYTES = 128 * 2**20  # the protocol's DEFAULT_MAX_BYTES


class BrokerError(FedHFTError):
    """The broker cannot be started or configured."""


# ---------------------------------------------------------------------------------------------- embedded


def find_mosquitto() -> str | None:
    """Path of the mosquitto executable, or None."""
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None
    )


def iotcore_available() -> bool:
    return importlib.util.find_spec("iotcore") is not None


def embedded_mosquitto_config(port: int, bind: str, persistence_dir: Path | None = None) -> str:
    """A Mosquitto config for one anonymous v5-capable listener with unlimited message size.

    With ``persistence_dir``, sessions, queued and retained messages survive a restart (saved every second
    and on a clean stop).
    """
    persistence = (
        f"persistence true\npersistence_location {persistence_dir}/\nautosave_interval 1\n"
        if persistence_dir is not None
        else "persistence false\n"
    )
    return (
        "# fedhft embedded broker (fedhft broker run): demos and tests on one machine, no authentication\n"
        f"listener {port} {bind}\n"
        "allow_anonymous true\n"
        f"{persistence}"
        "max_packet_size 268435455\n"  # the MQTT maximum (0, "no limit", is rejected)
        "max_inflight_messages 100\n"
        "max_queued_messages 100000\n"
        "set_tcp_nodelay true\n"
        "log_dest stderr\n"
        "log_type error\n"
        "log_type warning\n"
    )


def iotcore_config(port: int, bind: str, max_payload: int = MAX_MESSAGE_BYTES) -> str:
    """A rumqttd TOML config (for iotcore) with one MQTT v5 listener and a raised payload limit."""
    return (
        "id = 0\n\n[router]\nid = 0\nmax_connections = 10010\nmax_outgoing_packet_count = 200\n"
        f"max_segment_size = {4 * max_payload}\nmax_segment_count = 10\n\n"
        f'[v5.1]\nname = "v5-1"\nlisten = "{bind}:{port}"\nnext_connection_delay_ms = 1\n'
        "    [v5.1.connections]\n    connection_timeout_ms = 60000\n"
        f"    max_payload_size = {max_payload}\n    max_inflight_count = 100\n"
    )


def wait_for_port(host: str, port: int, timeout: float, alive: Callable[[], bool] | None = None) -> bool:
    """True once host:port accepts TCP connections (False after ``timeout`` or when ``alive()`` is False)."""
    deadline = time.monotonic() + timeout
    target = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            return False
        with contextlib.suppress(OSError), socket.create_connection((target, port), timeout=0.2):
            return True
        time.sleep(0.05)
    return False


@dataclass
class EmbeddedBroker:
    """A broker child process on ``bind:port``; ``start()``, then ``stop()`` (by PID) or use as a context."""

    port: int = 1883
    bind: str = "127.0.0.1"
    backend: str = "auto"  # auto | mosquitto | iotcore
    persistent: bool = False  # mosquitto only: keep sessions, queued and retained messages across restart()
    _proc: subprocess.Popen | None = field(default=None, repr=False)
    _iotcore: object | None = field(default=None, repr=False)
    _dir: Path | None = field(default=None, repr=False)
    chosen: str = ""

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.bind in ("0.0.0.0", "", "::") else self.bind
        return f"mqtt://{host}:{self.port}"

    def _choose(self) -> str:
        if self.backend == "mosquitto" or (self.backend == "auto" and find_mosquitto()):
            if not find_mosquitto():
                raise BrokerError("mosquitto is not installed (apt-get install mosquitto)")
            return "mosquitto"
        if self.backend in ("iotcore", "auto") and iotcore_available():
            return "iotcore"
        raise BrokerError(
            "no MQTT v5 broker available: install Mosquitto (apt-get install mosquitto) or `pip install iotcore`"
        )

    def start(self, timeout: float = 10.0) -> EmbeddedBroker:
        if self.port == 0:
            with socket.socket() as s:
                s.bind((self.bind, 0))
                self.port = int(s.getsockname()[1])
        self.chosen = self._choose()
        if self._dir is None:  # kept by restart(): the persistence file lives there
            self._dir = Path(tempfile.mkdtemp(prefix="fedhft-broker-"))
            self._dir.chmod(0o755)  # Mosquitto started as root reads its files as the mosquitto user
        if self.chosen == "mosquitto":
            conf = self._dir / "mosquitto.conf"
            data = self._dir / "data" if self.persistent else None
            if data is not None:
                data.mkdir(exist_ok=True)
                data.chmod(0o777)  # written by the mosquitto user when started as root
            conf.write_text(embedded_mosquitto_config(self.port, self.bind, data))
            conf.chmod(0o644)
            self._proc = subprocess.Popen([str(find_mosquitto()), "-c", str(conf)])
            alive = self._proc_alive
        else:
            from iotcore import Broker  # optional dependency

            conf = self._dir / "rumqttd.toml"
            conf.write_text(iotcore_config(self.port, self.bind))
            self._iotcore = Broker(config_path=str(conf))
            self._iotcore.start(timeout=timeout)  # type: ignore[attr-defined]
            alive = None
        if not wait_for_port(self.bind, self.port, timeout, alive):
            self.stop()
            raise BrokerError(f"{self.chosen} did not listen on {self.bind}:{self.port} within {timeout} s")
        event(log, "broker listening", backend=self.chosen, url=self.url)
        return self

    def _proc_alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def stop(self) -> None:
        if self._proc is not None:
            stop_process(self._proc)
            self._proc = None
        if self._iotcore is not None:
            self._iotcore.stop()  # type: ignore[attr-defined]
            self._iotcore = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def restart(self, down_seconds: float = 0.0, timeout: float = 10.0) -> EmbeddedBroker:
        """Stop the process (cleanly: a persistent broker saves its state) and start again on the same port."""
        if self.chosen != "mosquitto" or self._proc is None:
            raise BrokerError("restart() needs a running embedded mosquitto")
        stop_process(self._proc)
        self._proc = None
        time.sleep(down_seconds)
        return self.start(timeout)

    def wait(self, stop: threading.Event) -> None:
        """Block until ``stop`` is set or the broker dies (BrokerError)."""
        while not stop.wait(0.5):
            if self.chosen == "mosquitto" and not self._proc_alive():
                raise BrokerError("mosquitto exited unexpectedly")

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------------------------------- production


def mosquitto_password_hash(password: str, salt: bytes | None = None, iterations: int = MOSQUITTO_ITERATIONS) -> str:
    """Mosquitto's ``$7$`` password hash: PBKDF2-HMAC-SHA512 over a 12-byte salt, base64-encoded."""
    salt = secrets.token_bytes(12) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


@dataclass(frozen=True)
class TaskUsers:
    """Who takes part in one task: the server identity and the client ids (each client id is a user name)."""

    server_user: str
    clients: tuple[str, ...] = ()


def _task_acl(task: str, users: TaskUsers) -> list[str]:
    base = f"{PREFIX}/{validate_id(task, 'task', BrokerError)}"
    lines = [
        f"# task {task}",
        f"user {validate_id(users.server_user, 'server user', BrokerError)}",
        f"topic read {base}/update/+",
        f"topic read {base}/hello/+",
        f"topic write {base}/ack/+",
        f"topic write {base}/model/#",
        f"topic write {base}/key",
    ]
    for cid in users.clients:
        validate_id(cid, "client id", BrokerError)
        lines += [
            "",
            f"user {cid}",
            f"topic write {base}/update/{cid}",
            f"topic write {base}/hello/{cid}",
            f"topic read {base}/ack/{cid}",
            f"topic read {base}/model/client/{cid}",
            f"topic read {base}/model/cluster/+",
            f"topic read {base}/key",
        ]
    return lines


def acl_text(tasks: Mapping[str, TaskUsers]) -> str:
    """The ACL, per task: each client may publish only its own update/hello and read only its ack, its own
    client model, its task's cluster models and key chain; only the server identity reads updates/hellos and
    publishes models, acks and the key chain of its task. Mosquitto merges repeated ``user`` blocks."""
    lines = ["# fedhft ACL (generated by `fedhft broker config` / `fedhft device`); user names are client ids"]
    for task in sorted(tasks):
        lines += ["", *_task_acl(task, tasks[task])]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class TlsFiles:
    cafile: str = "/etc/mosquitto/certs/ca.crt"
    certfile: str = "/etc/mosquitto/certs/server.crt"
    keyfile: str = "/etc/mosquitto/certs/server.key"


def production_config_text(
    out: Path,
    port: int = 8883,
    bind: str | None = None,
    tls: TlsFiles | None = TlsFiles(),
    data_dir: str = "/var/lib/mosquitto/",
    persistence: bool = True,
) -> str:
    """mosquitto.conf: one listener (TLS unless ``tls`` is None), no anonymous access, password file, ACL."""
    lines = [
        "# fedhft production broker (generated by `fedhft broker config`)",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {out / 'passwd'}",
        f"acl_file {out / 'acl'}",
        f"persistence {'true' if persistence else 'false'}",
    ]
    if persistence:
        lines.append(f"persistence_location {data_dir}")
    lines += [
        f"max_packet_size {MAX_MESSAGE_BYTES + 65536}",  # a 128 MiB payload plus topic and properties
        "max_inflight_messages 100",
        "max_queued_messages 100000",
        "",
        f"listener {port}{'' if bind is None else ' ' + bind}",
    ]
    if tls is not None:
        lines += [
            f"cafile {tls.cafile}",
            f"certfile {tls.certfile}",
            f"keyfile {tls.keyfile}",
            "tls_version tlsv1.2",
            "require_certificate false",
        ]
    return "\n".join(lines) + "\n"


# ---- the config directory: registry, credentials, passwd, acl (one writer for broker config and devices) ----

REGISTRY_NAME = "fedhft-broker.json"
CREDENTIALS_NAME = "credentials.txt"
CONFIG_LOCK_NAME = ".fedhft-config.lock"
REGISTRY_FORMAT = 1


@contextlib.contextmanager
def locked_config_dir(out: Path) -> Iterator[None]:
    """Hold an exclusive flock on config directory ``out`` (broker config and device commands never interleave)."""
    try:
        fd = os.open(out / CONFIG_LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise BrokerError(f"cannot lock {out} ({exc.strerror or exc})") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@dataclass
class BrokerRegistry:
    """``fedhft-broker.json``: the listener and, per task, its server identity and clients; revocations."""

    port: int
    bind: str | None
    tls: TlsFiles | None
    tasks: dict[str, TaskUsers] = field(default_factory=dict)
    revoked: list[dict[str, Any]] = field(default_factory=list)  # {"client_id", "task", "revoked_at"}

    def users(self) -> list[str]:
        """Every user name, server identities first within each task, without repeats."""
        out: list[str] = []
        for task in sorted(self.tasks):
            for user in (self.tasks[task].server_user, *self.tasks[task].clients):
                if user not in out:
                    out.append(user)
        return out

    def task_of_client(self, client_id: str) -> str | None:
        return next((t for t, u in self.tasks.items() if client_id in u.clients), None)

    def check(self) -> None:
        """BrokerError unless ids are valid, each client is in one task only and no server user is a client."""
        servers = {u.server_user for u in self.tasks.values()}
        seen: dict[str, str] = {}
        for task, users in self.tasks.items():
            validate_id(task, "task", BrokerError)
            validate_id(users.server_user, "server user", BrokerError)
            for cid in users.clients:
                validate_id(cid, "client id", BrokerError)
                if cid in servers:
                    raise BrokerError(f"user {cid!r} cannot be both a server identity and a client")
                if cid in seen:
                    raise BrokerError(f"client id {cid!r} is already a client of task {seen[cid]!r}")
                seen[cid] = task

    def to_json(self) -> str:
        tls = None if self.tls is None else asdict(self.tls)
        tasks = {t: {"server_user": u.server_user, "clients": list(u.clients)} for t, u in sorted(self.tasks.items())}
        obj = {"format": REGISTRY_FORMAT, "listener": {"port": self.port, "bind": self.bind, "tls": tls}}
        return json.dumps(obj | {"tasks": tasks, "revoked": self.revoked}, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str) -> BrokerRegistry:
        try:
            obj = json.loads(text)
            if obj.get("format") != REGISTRY_FORMAT:
                raise ValueError(f"format {obj.get('format')!r}, expected {REGISTRY_FORMAT}")
            lis = obj["listener"]
            reg = cls(
                port=int(lis["port"]),
                bind=lis["bind"],
                tls=None if lis["tls"] is None else TlsFiles(**lis["tls"]),
                tasks={
                    str(t): TaskUsers(str(u["server_user"]), tuple(str(c) for c in u["clients"]))
                    for t, u in obj["tasks"].items()
                },
                revoked=list(obj.get("revoked", [])),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise BrokerError(f"{source}: not a fedhft broker registry ({exc})") from exc
        reg.check()
        return reg


def load_registry(out: Path) -> BrokerRegistry | None:
    """The registry of config directory ``out``, or None when it has none."""
    path = out / REGISTRY_NAME
    try:
        return BrokerRegistry.from_json(path.read_text(), str(path)) if path.exists() else None
    except OSError as exc:
        raise BrokerError(f"cannot read {path} ({exc.strerror or exc})") from exc


def read_credentials(path: Path) -> dict[str, str]:
    """``credentials.txt``: user -> password (lines ``user password``; ``#`` comments)."""
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#") and " " in line:
            user, password = line.split(" ", 1)
            out[user] = password
    return out


def save_broker_files(
    out: Path,
    registry: BrokerRegistry,
    passwords: Mapping[str, str],
    iterations: int = MOSQUITTO_ITERATIONS,
) -> None:
    """Write credentials.txt (0600), the registry, passwd and acl (0644: Mosquitto started as root reads them
    as the mosquitto user), each atomically, in that order: a crash never loses a password that passwd holds."""
    registry.check()
    users = registry.users()
    missing = [u for u in users if u not in passwords]
    if missing:
        raise BrokerError(f"no password for users {missing}")
    cred = "# fedhft broker credentials: user password (keep secret; give each device its own line)\n"
    cred += "".join(f"{u} {passwords[u]}\n" for u in users)
    passwd = "".join(f"{u}:{mosquitto_password_hash(passwords[u], iterations=iterations)}\n" for u in users)
    try:
        write_atomic(out / CREDENTIALS_NAME, cred.encode(), 0o600)
        write_atomic(out / REGISTRY_NAME, registry.to_json().encode(), 0o644)
        write_atomic(out / "passwd", passwd.encode(), 0o644)
        write_atomic(out / "acl", acl_text(registry.tasks).encode(), 0o644)
    except OSError as exc:
        raise BrokerError(f"cannot write the broker configuration into {out} ({exc.strerror or exc})") from exc


@dataclass(frozen=True)
class ProductionConfig:
    """Paths written by :func:`write_production_config` and the generated credentials."""

    conf: Path
    passwd: Path
    acl: Path
    credentials: Path
    passwords: dict[str, str]


def write_production_config(
    out: Path,
    task: str,
    server_user: str,
    clients: list[str],
    *,
    port: int = 8883,
    bind: str | None = None,
    tls: TlsFiles | None = TlsFiles(),
    data_dir: str = "/var/lib/mosquitto/",
    persistence: bool = True,
    iterations: int = MOSQUITTO_ITERATIONS,
) -> ProductionConfig:
    """Write mosquitto.conf, passwd, acl, credentials.txt (0600) and the registry into ``out``.

    Adds to what ``out`` already holds: other tasks, this task's earlier clients (``fedhft device add``) and
    every known password are kept, so re-running to add clients rotates nothing.
    """
    validate_id(server_user, "server user", BrokerError)
    for cid in clients:
        validate_id(cid, "client id", BrokerError)
    if server_user in clients or len(set(clients)) != len(clients):
        raise BrokerError("the server user and the client ids must all differ")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BrokerError(f"cannot create {out} ({exc.strerror or exc})") from exc
    credentials = out / CREDENTIALS_NAME
    with locked_config_dir(out):
        registry = load_registry(out) or BrokerRegistry(port, bind, tls)
        registry.port, registry.bind, registry.tls = port, bind, tls
        earlier = registry.tasks.get(task, TaskUsers(server_user)).clients
        registry.tasks[validate_id(task, "task", BrokerError)] = TaskUsers(
            server_user, (*earlier, *(c for c in clients if c not in earlier))
        )
        registry.revoked = [r for r in registry.revoked if r.get("client_id") not in clients]
        known = read_credentials(credentials)
        passwords = {u: known.get(u) or secrets.token_urlsafe(18) for u in registry.users()}
        save_broker_files(out, registry, passwords, iterations)
    conf = out / "mosquitto.conf"
    try:
        write_atomic(conf, production_config_text(out, port, bind, tls, data_dir, persistence).encode(), 0o644)
    except OSError as exc:
        raise BrokerError(f"cannot write {conf} ({exc.strerror or exc})") from exc
    return ProductionConfig(conf, out / "passwd", out / "acl", credentials, passwords)
