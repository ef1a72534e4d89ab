"""`fedhft broker config`: write a production Mosquitto setup into a config directory.

mosquitto.conf (mosquitto_config.py), passwd and acl (acl.py), credentials.txt and ``fedhft-broker.json``
(registry.py), and ``<server user>.password`` (0600), what `fedhft server run --password-file` reads. The
registry records tasks, identities and revocations so ``fedhft device add|revoke`` (devices.py) regenerate
passwd and acl with the same code.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

from fedhft.atomic import write_atomic
from fedhft.broker_server.broker.acl import MOSQUITTO_ITERATIONS, TaskUsers
from fedhft.broker_server.broker.errors import BrokerError
from fedhft.broker_server.broker.mosquitto_config import DEFAULT_TLS, TlsFiles, production_config_text
from fedhft.broker_server.broker.registry import (
    CREDENTIALS_NAME,
    BrokerRegistry,
    load_registry,
    locked_config_dir,
    read_credentials,
    save_broker_files,
)
from fedhft.protocol.topics import validate_id


@dataclass(frozen=True)
class ProductionConfig:
    """Paths written by :func:`write_production_config` and the generated credentials."""

    conf: Path
    passwd: Path
    acl: Path
    credentials: Path
    passwords: dict[str, str]
    server_password: Path  # the server identity's password alone: `fedhft server run --password-file`


def write_production_config(
    out: Path,
    task: str,
    server_user: str,
    clients: list[str],
    *,
    port: int = 8883,
    bind: str | None = None,
    tls: TlsFiles | None = DEFAULT_TLS,
    data_dir: str = "/var/lib/mosquitto/",
    persistence: bool = True,
    pid_file: str | None = None,
    iterations: int = MOSQUITTO_ITERATIONS,
) -> ProductionConfig:
    """Write mosquitto.conf, passwd, acl, credentials.txt (0600), the server's password file (0600) and the
    registry into ``out``; with ``pid_file``, Mosquitto writes its PID there (`fedhft device add --pid-file`).

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
    conf, server_password = out / "mosquitto.conf", out / f"{server_user}.password"
    text = production_config_text(out, port, bind, tls, data_dir, persistence, pid_file)
    try:
        write_atomic(server_password, (passwords[server_user] + "\n").encode(), 0o600)
        write_atomic(conf, text.encode(), 0o644)
    except OSError as exc:
        raise BrokerError(f"cannot write into {out} ({exc.strerror or exc})") from exc
    return ProductionConfig(conf, out / "passwd", out / "acl", credentials, passwords, server_password)
