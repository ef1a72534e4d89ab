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
``update/<id>`` and ``hello/<id>`` and read only its ack, its own client model and the cluster models of
its task, while only the server identity may read updates/hellos and publish models and acks.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib.util
import logging
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fedhft.errors import FedHFTError
from fedhft.logs import event
from fedhft.procs import stop_process
from fedhft.protocol.topics import PREFIX, validate_id

log = logging.getLogger("fedhft.broker")

MOSQUITTO_ITERATIONS = 101
MAX_MESSAGE_BYTES = 64 * 2**20  # the protocol's DEFAULT_MAX_BYTES


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


def embedded_mosquitto_config(port: int, bind: str) -> str:
    """A Mosquitto config for one anonymous v5-capable listener with unlimited message size."""
    return (
        "# fedhft embedded broker (fedhft broker run): demos and tests on one machine, no authentication\n"
        f"listener {port} {bind}\n"
        "allow_anonymous true\n"
        "persistence false\n"
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
        self._dir = Path(tempfile.mkdtemp(prefix="fedhft-broker-"))
        self._dir.chmod(0o755)  # Mosquitto started as root reads its files as the mosquitto user
        if self.chosen == "mosquitto":
            conf = self._dir / "mosquitto.conf"
            conf.write_text(embedded_mosquitto_config(self.port, self.bind))
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


def acl_text(task: str, server_user: str, clients: list[str]) -> str:
    """The ACL: each client its own update/hello (write) and ack/client model/cluster models (read)."""
    base = f"{PREFIX}/{validate_id(task, 'task', BrokerError)}"
    lines = [
        f"# fedhft ACL for task {task} (generated by `fedhft broker config`); user names are client ids",
        "",
        f"user {validate_id(server_user, 'server user', BrokerError)}",
        f"topic read {base}/update/+",
        f"topic read {base}/hello/+",
        f"topic write {base}/ack/+",
        f"topic write {base}/model/#",
    ]
    for cid in clients:
        validate_id(cid, "client id", BrokerError)
        lines += [
            "",
            f"user {cid}",
            f"topic write {base}/update/{cid}",
            f"topic write {base}/hello/{cid}",
            f"topic read {base}/ack/{cid}",
            f"topic read {base}/model/client/{cid}",
            f"topic read {base}/model/cluster/+",
        ]
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
        f"max_packet_size {MAX_MESSAGE_BYTES + 65536}",  # a 64 MiB payload plus topic and properties
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


def _read_credentials(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#") and " " in line:
            user, password = line.split(" ", 1)
            out[user] = password
    return out


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
    """Write mosquitto.conf, passwd, acl and credentials.txt (0600: user password per line) into ``out``.

    Passwords already in ``out/credentials.txt`` are kept, so re-running to add clients rotates nothing.
    """
    users = [validate_id(server_user, "server user", BrokerError)] + [
        validate_id(c, "client id", BrokerError) for c in clients
    ]
    if len(set(users)) != len(users):
        raise BrokerError("the server user and the client ids must all differ")
    try:
        out.mkdir(parents=True, exist_ok=True)
        credentials = out / "credentials.txt"
        known = _read_credentials(credentials)
        passwords = {u: known.get(u) or secrets.token_urlsafe(18) for u in users}
        passwd = out / "passwd"
        passwd.write_text(
            "".join(f"{u}:{mosquitto_password_hash(p, iterations=iterations)}\n" for u, p in passwords.items())
        )
        passwd.chmod(0o644)  # hashes only; Mosquitto started as root reads it as the mosquitto user
        acl = out / "acl"
        acl.write_text(acl_text(task, server_user, clients))
        acl.chmod(0o644)
        fd = os.open(credentials, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("# fedhft broker credentials: user password (keep secret; give each device its own line)\n")
            fh.writelines(f"{u} {p}\n" for u, p in passwords.items())
        conf = out / "mosquitto.conf"
        conf.write_text(production_config_text(out, port, bind, tls, data_dir, persistence))
        conf.chmod(0o644)
    except OSError as exc:
        raise BrokerError(f"cannot write the broker configuration into {out} ({exc.strerror or exc})") from exc
    return ProductionConfig(conf, passwd, acl, credentials, passwords)
