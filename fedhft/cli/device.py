"""`fedhft device add|revoke|list`: device credentials, ACL entries and bundles on a broker config directory."""

from __future__ import annotations

import json
from pathlib import Path

import click

from fedhft.cli.errors import OneLineErrorGroup

UNIT_NAME = "fedhft-edge.service"  # the systemd unit a device bundle may hold
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
    @_reload_options
    def add(
        conf_dir: Path,
        task: str,
        client_id: str,
        server_key: Path | None,
        broker_url: str | None,
        rotate_password: bool,
        reload_pid: int | None,
        pid_file: Path | None,
    ) -> None:
        """Create a device's password, ACL entry and bundle (conf/devices/<id>/: copy it to the device)."""
        from fedhft.broker_server.broker.devices import add_device

        b = add_device(
            conf_dir.resolve(), task, client_id, server_key, rotate_password=rotate_password, broker_url=broker_url
        )
        click.echo(f"device {b.client_id} in task {b.task}: bundle {b.dir} (copy it to the device; keep it secret)")
        for w in b.warnings:
            click.echo(f"warning: {w}", err=True)
        click.echo("on the device, in the bundle folder with the exported profile as model/ and the data as data.csv:")
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
