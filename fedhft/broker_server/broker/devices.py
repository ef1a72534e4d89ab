"""Device provisioning on a broker config directory written by `fedhft broker config`.

``add_device`` gives a device a password (passwd holds only its Mosquitto hash), its ACL entry in its task
and a bundle to copy onto the device::

    <conf>/devices/<client_id>/     (folder 0700)
        password          the broker password (0600): `fedhft edge run --password-file`
        ca.crt            the broker's CA, when the listener has TLS: `--tls-ca`
        server_key.pub    the server's public key: `--server-key`
        device.json       task, client id (= user name), broker URL
    with a model package (`device add --artifacts OUT/<profile>`), also:
        model/            the exported profile directory (`--artifacts model`)
        fedhft-et-trainer the native trainer for the device's architecture, with lib/ (its ExecuTorch libraries),
                          when the package runs on ExecuTorch
        device.env        broker URL, task, client id, credential files, backend: the unit's environment
        fedhft-edge.service  a systemd unit running the exact `fedhft edge run` line, restarted on failure

``revoke_device`` removes the device's password, ACL entry and bundle and records the revocation. Mosquitto
re-reads passwd and acl on SIGHUP (``reload_broker``), which also disconnects clients whose user is gone.
Every change rewrites the files with registry.save_broker_files (atomically, one file at a time) under an
exclusive lock of the directory, so two commands never interleave.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from fedhft.atomic import fsync_dir, write_atomic
from fedhft.broker_server.broker.acl import MOSQUITTO_ITERATIONS
from fedhft.broker_server.broker.errors import BrokerError
from fedhft.broker_server.broker.registry import (
    CREDENTIALS_NAME,
    REGISTRY_NAME,
    BrokerRegistry,
    load_registry,
    locked_config_dir,
    read_credentials,
    save_broker_files,
)
from fedhft.protocol import ProtocolError, load_public_key, save_public_key
from fedhft.protocol.topics import validate_id

DEVICES_DIR = "devices"
MODEL_DIR = "model"
ENV_NAME = "device.env"
UNIT_NAME = "fedhft-edge.service"
TRAINER_NAME = "fedhft-et-trainer"
LIB_DIR = "lib"
DEFAULT_DEVICE_ROOT = "/opt/fedhft"  # the bundle's folder on the device: DEFAULT_DEVICE_ROOT/<client id>


class DeviceError(BrokerError):
    """A device cannot be added, revoked or listed as asked."""


@dataclass(frozen=True)
class BundlePackage:
    """What `device add --artifacts` puts into a bundle besides the credentials."""

    artifacts: Path  # an exported profile directory (holds manifest.json)
    trainer: Path | None = None  # the native trainer built for the device's architecture (ExecuTorch packages)
    trainer_libs: tuple[Path, ...] = ()  # the ExecuTorch shared libraries it links
    device_dir: str | None = None  # the bundle's folder on the device (default DEFAULT_DEVICE_ROOT/<client id>)


@dataclass(frozen=True)
class DeviceBundle:
    """What ``add_device`` wrote for one device."""

    client_id: str
    task: str
    dir: Path
    broker_url: str
    password: str
    warnings: tuple[str, ...] = ()

    def edge_run_line(self) -> str:
        """The exact `fedhft edge run` command of this device: run in its bundle folder on the device, with the
        exported profile directory copied in as ``model/`` and the device's local data as ``data.csv``."""
        tls = " --tls-ca ca.crt" if (self.dir / "ca.crt").exists() else ""
        return (
            f"fedhft edge run --broker {self.broker_url} --task {self.task} --client-id {self.client_id} "
            f"--username {self.client_id} --password-file password{tls} --server-key server_key.pub "
            f"--artifacts {MODEL_DIR} --data data.csv --state-dir state"
        )


def device_env_text(bundle: DeviceBundle, trainer: bool) -> str:
    """``device.env``: what the device is (KEY=value lines, read by the unit and by `. ./device.env`)."""
    d = bundle.dir
    lines = [
        f"# fedhft edge device {bundle.client_id}: read by {UNIT_NAME} (in a shell: set -a; . ./{ENV_NAME}; set +a)",
        f"FEDHFT_BROKER={bundle.broker_url}",
        f"FEDHFT_TASK={bundle.task}",
        f"FEDHFT_CLIENT_ID={bundle.client_id}",
        f"FEDHFT_USERNAME={bundle.client_id}",
        "FEDHFT_PASSWORD_FILE=password",
        f"FEDHFT_TLS_CA={'ca.crt' if (d / 'ca.crt').exists() else ''}",
        f"FEDHFT_SERVER_KEY={'server_key.pub' if (d / 'server_key.pub').exists() else ''}",
        "FEDHFT_BACKEND=auto",  # `edge run --backend` reads it: ORT, else the bundled native trainer
    ]
    if trainer:
        lines += [f"FEDHFT_NATIVE_TRAINER={TRAINER_NAME}", f"LD_LIBRARY_PATH={LIB_DIR}"]
    return "\n".join(lines) + "\n"


def unit_text(bundle: DeviceBundle, device_dir: str) -> str:
    """``fedhft-edge.service``: the edge line in the bundle's folder on the device, started at boot."""
    return (
        "[Unit]\n"
        f"Description=fedhft edge client {bundle.client_id} (task {bundle.task})\n"
        "Wants=network-online.target\nAfter=network-online.target\n\n"
        "[Service]\n"
        f"WorkingDirectory={device_dir}\n"
        f"EnvironmentFile={device_dir}/{ENV_NAME}\n"
        f"ExecSearchPath={device_dir}/venv/bin:/usr/local/bin:/usr/bin:/bin\n"
        f"ExecStart={bundle.edge_run_line()}\n"
        "Restart=on-failure\nRestartSec=10\n\n"
        "[Install]\nWantedBy=multi-user.target\n"
    )


def _add_package(bundle: DeviceBundle, package: BundlePackage) -> list[str]:
    """Copy the model package (and native trainer) into the bundle, write device.env and the unit; return the
    new file names."""
    d = bundle.dir
    shutil.copytree(package.artifacts, d / MODEL_DIR)
    files = [MODEL_DIR]
    if package.trainer is not None:
        shutil.copyfile(package.trainer, d / TRAINER_NAME)
        (d / TRAINER_NAME).chmod(0o755)
        files.append(TRAINER_NAME)
        if package.trainer_libs:
            (d / LIB_DIR).mkdir()
            for lib in package.trainer_libs:
                shutil.copyfile(lib, d / LIB_DIR / lib.name)
            files.append(LIB_DIR)
    device_dir = package.device_dir or f"{DEFAULT_DEVICE_ROOT}/{bundle.client_id}"
    write_atomic(d / ENV_NAME, device_env_text(bundle, package.trainer is not None).encode(), 0o600)
    write_atomic(d / UNIT_NAME, unit_text(bundle, device_dir).encode(), 0o644)
    return [*files, ENV_NAME, UNIT_NAME]


@dataclass(frozen=True)
class DeviceEntry:
    """One line of ``list_devices``."""

    client_id: str
    task: str
    status: str  # active | revoked
    bundle: Path | None
    revoked_at: float | None = None


@contextlib.contextmanager
def _locked(conf_dir: Path) -> Iterator[BrokerRegistry]:
    """The registry of ``conf_dir``, read under an exclusive lock held until the block ends."""
    if not (conf_dir / REGISTRY_NAME).exists():
        raise DeviceError(
            f"{conf_dir} has no {REGISTRY_NAME}: write it with `fedhft broker config --out {conf_dir} ...` first"
        )
    with locked_config_dir(conf_dir):
        registry = load_registry(conf_dir)
        assert registry is not None
        yield registry


def broker_url_hint(registry: BrokerRegistry) -> str:
    """``mqtts://HOST:PORT`` (or ``mqtt://`` without TLS); HOST is the listener address when it has one."""
    host = registry.bind if registry.bind not in (None, "", "0.0.0.0", "::") else "BROKER-HOST"
    return f"{'mqtt' if registry.tls is None else 'mqtts'}://{host}:{registry.port}"


def _write_bundle(
    conf_dir: Path,
    registry: BrokerRegistry,
    task: str,
    client_id: str,
    password: str,
    server_pub: Path | None,
    broker_url: str,
    package: BundlePackage | None = None,
) -> tuple[Path, tuple[str, ...]]:
    """Write the bundle into a temp folder, then rename it into place (replacing an older one)."""
    root = conf_dir / DEVICES_DIR
    root.mkdir(mode=0o700, exist_ok=True)
    root.chmod(0o700)
    tmp = Path(tempfile.mkdtemp(prefix=f".{client_id}.", suffix=".tmp", dir=root))
    warnings: list[str] = []
    files = ["password", "device.json"]
    try:
        write_atomic(tmp / "password", (password + "\n").encode(), 0o600)
        if registry.tls is not None:
            ca = Path(registry.tls.cafile)
            if ca.is_file():
                shutil.copyfile(ca, tmp / "ca.crt")
                files.append("ca.crt")
            else:
                warnings.append(f"the broker's CA file {ca} is not here: copy it to the device as ca.crt")
        if server_pub is not None:
            save_public_key(tmp / "server_key.pub", load_public_key(server_pub))
            files.append("server_key.pub")
        else:
            warnings.append("no --server-key: copy the server's server_key.pub to the device")
        if package is not None:
            files += _add_package(DeviceBundle(client_id, task, tmp, broker_url, password), package)
        info = {
            "task": task,
            "client_id": client_id,
            "username": client_id,
            "broker": broker_url,
            "files": sorted(files),
            "created_at": time.time(),
        }
        write_atomic(tmp / "device.json", (json.dumps(info, indent=1) + "\n").encode(), 0o600)
        final = root / client_id
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, tuple(warnings)


def add_device(
    conf_dir: Path,
    task: str,
    client_id: str,
    server_pub: Path | None = None,
    *,
    rotate_password: bool = False,
    broker_url: str | None = None,
    iterations: int = MOSQUITTO_ITERATIONS,
    package: BundlePackage | None = None,
) -> DeviceBundle:
    """Give ``client_id`` a password and its ACL entry in ``task``, and write its bundle.

    An id that already exists is an error naming it, unless ``rotate_password`` (same task only). With
    ``package`` the bundle also holds the model, the native trainer when given, device.env and the unit."""
    conf_dir = Path(conf_dir)
    validate_id(client_id, "client id", DeviceError)
    validate_id(task, "task", DeviceError)
    if server_pub is not None and not Path(server_pub).exists():
        raise DeviceError(
            f"--server-key {server_pub} does not exist: create the server's key first with "
            "`fedhft server init --state DIR` (then give DIR/server_key.pub)"
        )
    if server_pub is not None:
        try:
            load_public_key(server_pub)
        except ProtocolError as exc:
            raise DeviceError(f"--server-key: {exc}") from exc
    if package is not None and not (Path(package.artifacts) / "manifest.json").is_file():
        raise DeviceError(f"--artifacts {package.artifacts} has no manifest.json: give an `fedhft export` profile dir")
    with _locked(conf_dir) as registry:
        if task not in registry.tasks:
            raise DeviceError(
                f"task {task!r} is not configured in {conf_dir} (tasks: {sorted(registry.tasks)}); "
                f"add it with `fedhft broker config --out {conf_dir} --task {task} --server-user ...`"
            )
        users = registry.tasks[task]
        other = registry.task_of_client(client_id)
        if client_id in {u.server_user for u in registry.tasks.values()}:
            raise DeviceError(f"{client_id!r} is a server identity, not a device id")
        if other is not None and other != task:
            raise DeviceError(f"device {client_id!r} already exists in task {other!r}")
        if other == task and not rotate_password:
            raise DeviceError(f"device {client_id!r} already exists in task {task!r} (use --rotate-password)")
        passwords = read_credentials(conf_dir / CREDENTIALS_NAME)
        passwords = {u: passwords.get(u) or secrets.token_urlsafe(18) for u in registry.users()}
        passwords[client_id] = secrets.token_urlsafe(18)
        if other is None:
            registry.tasks[task] = replace(users, clients=(*users.clients, client_id))
        save_broker_files(conf_dir, registry, passwords, iterations)
        url = broker_url or broker_url_hint(registry)
        folder, warnings = _write_bundle(
            conf_dir, registry, task, client_id, passwords[client_id], server_pub, url, package
        )
    return DeviceBundle(client_id, task, folder, url, passwords[client_id], warnings)


def revoke_device(conf_dir: Path, task: str, client_id: str, *, iterations: int = MOSQUITTO_ITERATIONS) -> None:
    """Remove the device's password line, ACL entry and bundle; record the revocation."""
    conf_dir = Path(conf_dir)
    with _locked(conf_dir) as registry:
        users = registry.tasks.get(task)
        if users is None or client_id not in users.clients:
            where = registry.task_of_client(client_id)
            also = f" (it is in task {where!r})" if where else ""
            raise DeviceError(f"no device {client_id!r} in task {task!r}{also}")
        registry.tasks[task] = replace(users, clients=tuple(c for c in users.clients if c != client_id))
        registry.revoked.append({"client_id": client_id, "task": task, "revoked_at": time.time()})
        passwords = read_credentials(conf_dir / CREDENTIALS_NAME)
        passwords = {u: passwords.get(u) or secrets.token_urlsafe(18) for u in registry.users()}
        save_broker_files(conf_dir, registry, passwords, iterations)
        shutil.rmtree(conf_dir / DEVICES_DIR / client_id, ignore_errors=True)


def list_devices(conf_dir: Path) -> list[DeviceEntry]:
    """Active devices of every task, then revoked ones (latest revocation of ids not active again)."""
    conf_dir = Path(conf_dir)
    registry = load_registry(conf_dir)
    if registry is None:
        raise DeviceError(f"{conf_dir} has no {REGISTRY_NAME}: write it with `fedhft broker config` first")
    out = []
    for task in sorted(registry.tasks):
        for cid in registry.tasks[task].clients:
            bundle = conf_dir / DEVICES_DIR / cid
            out.append(DeviceEntry(cid, task, "active", bundle if bundle.is_dir() else None))
    active = {e.client_id for e in out}
    latest: dict[str, dict] = {}
    for rec in registry.revoked:
        if rec.get("client_id") not in active:
            latest[str(rec.get("client_id"))] = rec
    for cid, rec in sorted(latest.items()):
        out.append(DeviceEntry(cid, str(rec.get("task")), "revoked", None, rec.get("revoked_at")))
    return out


def pid_from_file(path: Path) -> int:
    """The PID written in ``path`` (e.g. Mosquitto's ``pid_file``)."""
    try:
        text = Path(path).read_text().strip()
        pid = int(text.split()[0])
    except (OSError, ValueError, IndexError) as exc:
        raise DeviceError(f"{path}: no PID in it ({exc})") from exc
    if pid <= 0:
        raise DeviceError(f"{path}: {pid} is not a PID")
    return pid


def reload_broker(pid: int) -> None:
    """SIGHUP ``pid``: Mosquitto re-reads passwd and acl (a revoked device is refused and disconnected)."""
    if pid <= 0:
        raise DeviceError(f"{pid} is not a PID")
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError as exc:
        raise DeviceError(f"no broker process with PID {pid}: the change takes effect at its next start") from exc
    except PermissionError as exc:
        raise DeviceError(f"not allowed to signal PID {pid}: run as the broker's user or root") from exc
