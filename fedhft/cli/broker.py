"""`fedhft broker run|config`: an embedded MQTT broker for one machine, and a production Mosquitto setup."""

from __future__ import annotations

from pathlib import Path

import click

from fedhft.cli.errors import OneLineErrorGroup
from fedhft.cli.signals import stop_on_signals


@click.command("run")
@click.option("--port", default=1883, show_default=True, help="TCP port (0: pick a free one).")
@click.option("--bind", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--backend", type=click.Choice(["auto", "mosquitto", "iotcore"]), default="auto", show_default=True)
def broker_run_command(port: int, bind: str, backend: str) -> None:
    """Run an embedded MQTT v5 broker (anonymous; for demos and tests on one machine) until Ctrl+C."""
    from fedhft.broker_server.broker.embedded import EmbeddedBroker

    with stop_on_signals() as stop:
        broker = EmbeddedBroker(port=port, bind=bind, backend=backend).start()
        try:
            click.echo(f"fedhft broker ({broker.chosen}) listening on {broker.url}", err=True)
            if bind not in ("127.0.0.1", "localhost", "::1"):
                click.echo("warning: this broker allows anonymous access; use `fedhft broker config`", err=True)
            broker.wait(stop)
        finally:
            broker.stop()


@click.command("config")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Directory to write into.")
@click.option("--task", required=True)
@click.option("--server-user", required=True, help="User name of the server identity.")
@click.option("--client", "clients", multiple=True, help="A client id (repeat); it is also its user name.")
@click.option("--port", default=8883, show_default=True)
@click.option("--bind", default=None, help="Listener address (default: all).")
@click.option("--cafile", default="/etc/mosquitto/certs/ca.crt", show_default=True)
@click.option("--certfile", default="/etc/mosquitto/certs/server.crt", show_default=True)
@click.option("--keyfile", default="/etc/mosquitto/certs/server.key", show_default=True)
@click.option("--data-dir", default="/var/lib/mosquitto/", show_default=True, help="Mosquitto persistence.")
@click.option("--no-tls", is_flag=True, help="Plain listener (testing on a private network only).")
@click.option("--no-persistence", is_flag=True, help="Keep no retained messages or sessions across restarts.")
@click.option(
    "--pid-file",
    default=None,
    help="Mosquitto writes its PID here (e.g. /run/mosquitto/mosquitto.pid, a folder the mosquitto user may "
    "write): `fedhft device add|revoke --pid-file` signals it.",
)
def broker_config_command(
    out: Path,
    task: str,
    server_user: str,
    clients: tuple[str, ...],
    port: int,
    bind: str | None,
    cafile: str,
    certfile: str,
    keyfile: str,
    data_dir: str,
    no_tls: bool,
    no_persistence: bool,
    pid_file: str | None,
) -> None:
    """Write a production Mosquitto config: TLS listener, password file, per-client ACL, credentials.

    Re-run it to add clients or another task (what the directory holds is kept); `fedhft device add|revoke`
    manage single devices in the same directory."""
    from fedhft.broker_server.broker.mosquitto_config import TlsFiles
    from fedhft.broker_server.broker.production import write_production_config

    tls = None if no_tls else TlsFiles(cafile, certfile, keyfile)
    cfg = write_production_config(
        out.resolve(),
        task,
        server_user,
        list(clients),
        port=port,
        bind=bind,
        tls=tls,
        data_dir=data_dir,
        persistence=not no_persistence,
        pid_file=pid_file,
    )
    click.echo(f"wrote {cfg.conf}, {cfg.passwd}, {cfg.acl}")
    click.echo(f"credentials (mode 0600): {cfg.credentials}")
    click.echo(f"server: fedhft server run --username {server_user} --password-file {cfg.server_password} ...")
    click.echo(f"run: mosquitto -c {cfg.conf}")


@click.group("broker", cls=OneLineErrorGroup)
def broker_group() -> None:
    """An embedded MQTT broker for one machine, and production Mosquitto configuration."""


broker_group.add_command(broker_run_command)
broker_group.add_command(broker_config_command)
