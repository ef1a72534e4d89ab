"""The broker config directory: ``fedhft-broker.json`` (tasks, identities, revocations), credentials, passwd, acl.

One writer (``save_broker_files``) for `fedhft broker config` and `fedhft device`, under an exclusive lock
of the directory (``locked_config_dir``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedhft.atomic import write_atomic
from fedhft.broker_server.broker.acl import MOSQUITTO_ITERATIONS, TaskUsers, acl_text, mosquitto_password_hash
from fedhft.broker_server.broker.errors import BrokerError
from fedhft.broker_server.broker.mosquitto_config import TlsFiles
from fedhft.credentials import CREDENTIALS_HEADER
from fedhft.protocol.topics import validate_id

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
    cred = CREDENTIALS_HEADER + "\n"
    cred += "".join(f"{u} {passwords[u]}\n" for u in users)
    passwd = "".join(f"{u}:{mosquitto_password_hash(passwords[u], iterations=iterations)}\n" for u in users)
    try:
        write_atomic(out / CREDENTIALS_NAME, cred.encode(), 0o600)
        write_atomic(out / REGISTRY_NAME, registry.to_json().encode(), 0o644)
        write_atomic(out / "passwd", passwd.encode(), 0o644)
        write_atomic(out / "acl", acl_text(registry.tasks).encode(), 0o644)
    except OSError as exc:
        raise BrokerError(f"cannot write the broker configuration into {out} ({exc.strerror or exc})") from exc
