"""`fedhft device add|revoke|list`: device credentials, ACL entries and bundles on a broker config directory."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import click

from fedhft.cli.errors import OneLineErrorGroup

CONF_HELP = "Broker config directory written by `fedhft broker config --out` (or FEDHFT_BROKER_CONF)."


def _conf_option(f):  # noqa: ANN001, ANN202 - a click decorator
    return click.option(
        "--conf",
        "conf_dir",
        envvar="FEDHFT_BROKER_CONF",
        type=click.Path(path_type=Path, file_okay=False, exists=True),
        required=True,
        help=CONF_HELP,
    )(f)


def _reload_options(f):  # noqa: ANN001, ANN202
    f = click.option(
        "--pid-file",
        type=click.Path(path_type=Path, dir_okay=False, exists=True),
        default=None,
        help="...or the file holding its PID.",
    )(f)
    return click.option(
        "--reload-pid", type=int, default=None, help="SIGHUP this running Mosquitto so the change applies now..."
    )(f)


def _reload(reload_pid: int | None, pid_file: Path | None) -> None:
    from fedhft.broker_server.broker.devices import DeviceError, pid_from_file, reload_broker

    if reload_pid is not None and pid_file is not None:
        raise DeviceError("give --reload-pid or --pid-file, not both")
    pid = reload_pid if pid_file is None else pid_from_file(pid_file)
    if pid is None:
        click.echo("broker not signalled: the change applies when Mosquitto gets SIGHUP or restarts", err=True)
        return
    reload_broker(pid)
    click.echo(f"sent SIGHUP to the broker (PID {pid}): passwd and acl re-read", err=True)


def bundle_package(artifacts: Path, trainer: Path | None, trainer_libs: Path | None, device_dir: str | None):  # noqa: ANN201
    """The BundlePackage of `device add --artifacts`: with the native trainer for the device's architecture
    when the package has no ORT artifacts (one line says when none is available)."""
    import platform

    from fedhft.broker_server.broker.devices import BundlePackage, DeviceError
    from fedhft.edge_runtime.native_backend import binary_arch, executorch_root, find_trainer_binary
    from fedhft.edge_runtime.trainer import BackendError
    from fedhft.protocol.manifest import load_manifest

    manifest = load_manifest(artifacts)
    if "ort" in manifest.artifacts or "executorch" not in manifest.artifacts:
        return BundlePackage(artifacts, device_dir=device_dir)
    arch = str(manifest.profile.get("arch", ""))
    if trainer is None and arch == platform.machine():
        try:
            trainer = find_trainer_binary()
        except BackendError:
            trainer = None
        if trainer is not None and trainer_libs is None:
            with contextlib.suppress(BackendError):
                trainer_libs = executorch_root() / "lib"
    if trainer is None:
        click.echo(
            f"warning: no native trainer for {arch or 'the device'} in the bundle: build one "
            f"({'bench/aarch64_native.sh' if arch == 'aarch64' else 'make native'}) and give --trainer PATH",
            err=True,
        )
        return BundlePackage(artifacts, device_dir=device_dir)
    built_for = binary_arch(trainer)
    if arch and built_for != arch:
        raise DeviceError(f"--trainer {trainer} is built for {built_for or 'no known CPU'}, the device is {arch}")
    libs = tuple(sorted(trainer_libs.glob("libexecutorch*.so"))) if trainer_libs is not None else ()
    if not libs:
        click.echo("warning: no libexecutorch*.so given (--trainer-libs): the device must provide them", err=True)
    return BundlePackage(artifacts, trainer, libs, device_dir)


def device_group() -> click.Group:
    """The `device` command group."""

    @click.group("device", cls=OneLineErrorGroup)
    def device() -> None:
        """Provision devices on a production broker: credentials, ACL entry, bundle; revoke them."""

    @device.command("add")
    @_conf_option
    @click.option("--task", required=True, help="The task the device joins.")
    @click.option("--client-id", required=True, help="The device's id (also its broker user name).")
    @click.option(
        "--server-key",
        type=click.Path(path_type=Path, dir_okay=False),
        default=None,
        help="The server's STATE/server_key.pub (`fedhft server init --state STATE`): copied into the bundle.",
    )
    @click.option("--broker-url", default=None, help="URL the device uses (default: from the listener).")
    @click.option("--rotate-password", is_flag=True, help="The device exists: give it a new password.")
    @click.option(
        "--artifacts",
        type=click.Path(path_type=Path, file_okay=False, exists=True),
        default=None,
        help="OUT/<profile> from `fedhft export`: copied into the bundle as model/, with device.env and a "
        "systemd unit (and the native trainer when the package runs on ExecuTorch).",
    )
    @click.option(
        "--trainer",
        type=click.Path(path_type=Path, dir_okay=False, exists=True),
        default=None,
        help="The native trainer built for the device's architecture (aarch64: bench/aarch64_native.sh builds "
        "WORK/build/fedhft-et-trainer); default: this machine's build when the architectures match.",
    )
    @click.option(
        "--trainer-libs",
        type=click.Path(path_type=Path, file_okay=False, exists=True),
        default=None,
        help="Folder with the trainer's libexecutorch*.so (default: the installed executorch's lib/ for a "
        "trainer built here).",
    )
    @click.option("--device-dir", default=None, help="The bundle's folder on the device (default /opt/fedhft/ID).")
    @_reload_options
    def add(
        conf_dir: Path,
        task: str,
        client_id: str,
        server_key: Path | None,
        broker_url: str | None,
        rotate_password: bool,
        artifacts: Path | None,
        trainer: Path | None,
        trainer_libs: Path | None,
        device_dir: str | None,
        reload_pid: int | None,
        pid_file: Path | None,
    ) -> None:
        """Create a device's password, ACL entry and bundle (conf/devices/<id>/: copy it to the device)."""
        from fedhft.broker_server.broker.devices import ENV_NAME, UNIT_NAME, add_device

        package = None if artifacts is None else bundle_package(artifacts, trainer, trainer_libs, device_dir)
        b = add_device(
            conf_dir.resolve(),
            task,
            client_id,
            server_key,
            rotate_password=rotate_password,
            broker_url=broker_url,
            package=package,
        )
        click.echo(f"device {b.client_id} in task {b.task}: bundle {b.dir} (copy it to the device; keep it secret)")
        for w in b.warnings:
            click.echo(f"warning: {w}", err=True)
        if package is None:
            click.echo(
                "on the device, in the bundle folder with the exported profile as model/ and the data as data.csv:"
            )
        else:
            click.echo(
                f"on the device, in the bundle folder with the data as data.csv (set -a; . ./{ENV_NAME}; set +a):"
            )
        click.echo(b.edge_run_line())
        if (b.dir / UNIT_NAME).exists():
            enable = f"sudo cp {UNIT_NAME} /etc/systemd/system/ && sudo systemctl enable --now {UNIT_NAME}"
            click.echo(f"or, to start it at boot: {enable}")
        _reload(reload_pid, pid_file)

    @device.command("revoke")
    @_conf_option
    @click.option("--task", required=True)
    @click.option("--client-id", required=True)
    @_reload_options
    def revoke(conf_dir: Path, task: str, client_id: str, reload_pid: int | None, pid_file: Path | None) -> None:
        """Remove a device's password, ACL entry and bundle; with --reload-pid/--pid-file it is refused now."""
        from fedhft.broker_server.broker.devices import revoke_device

        revoke_device(conf_dir.resolve(), task, client_id)
        click.echo(f"device {client_id} revoked from task {task}")
        _reload(reload_pid, pid_file)

    @device.command("list")
    @_conf_option
    @click.option("--json", "as_json", is_flag=True, help="One JSON object per device.")
    def list_(conf_dir: Path, as_json: bool) -> None:
        """Devices of every task: active ones, then revoked ones."""
        from fedhft.broker_server.broker.devices import list_devices

        for e in list_devices(conf_dir.resolve()):
            if as_json:
                click.echo(
                    json.dumps(
                        {
                            "client_id": e.client_id,
                            "task": e.task,
                            "status": e.status,
                            "bundle": None if e.bundle is None else str(e.bundle),
                            "revoked_at": e.revoked_at,
                        }
                    )
                )
            else:
                click.echo(f"{e.client_id}\t{e.task}\t{e.status}\t{e.bundle or '-'}")

    return device
