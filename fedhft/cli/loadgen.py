"""`fedhft loadgen`: N device identities send real updates to a running server through a loopback broker."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command()
@click.option("--devices", type=click.IntRange(min=1), default=100, show_default=True, help="Device identities.")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=50.0, show_default=True,
              help="Updates per second, over the whole fleet.")  # fmt: skip
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="Seconds of sending (after every device registered).")  # fmt: skip
@click.option("--profile", default="phone-midrange-6gb", show_default=True, help="Profile whose plan devices use.")
@click.option(
    "--broker", default="127.0.0.1:1883", show_default=True, help="HOST:PORT (or mqtt://HOST:PORT), loopback."
)
@click.option("--task", default="load", show_default=True, help="The server's --task.")
@click.option(
    "--manifest",
    type=click.Path(path_type=Path, exists=True),
    default=None,
    help="The server's --manifest (default: MiniLM shapes, as --write-manifest writes them).",
)
@click.option("--loops", type=click.IntRange(min=1, max=64), default=4, show_default=True,
              help="Network loop threads the devices are spread over.")  # fmt: skip
@click.option("--prefix", default="load-", show_default=True, help="Device ids are PREFIX0000...")
@click.option("--encoding", type=click.Choice(["fp32", "fp16", "int8"]), default="fp16", show_default=True)
@click.option("--register-timeout", type=float, default=120.0, show_default=True, help="Seconds to wait for hellos.")
@click.option("--drain", type=float, default=30.0, show_default=True, help="Seconds to wait for acks after sending.")
@click.option("--server-pid", type=int, default=None, help="The server's PID for its RSS (default: found by --task).")
@click.option("--json", "json_out", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Also write the report here.")  # fmt: skip
@click.option(
    "--write-manifest",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Only write the shapes-only manifest of --profile into this directory (for `fedhft server run --manifest`).",
)
def loadgen(
    devices: int,
    rate: float,
    duration: float,
    profile: str,
    broker: str,
    task: str,
    manifest: Path | None,
    loops: int,
    prefix: str,
    encoding: str,
    register_timeout: float,
    drain: float,
    server_pid: int | None,
    json_out: Path | None,
    write_manifest: Path | None,
) -> None:
    """Load-test a running `fedhft server run`: register --devices identities on a loopback broker, send --rate
    updates/s of --profile's plan for --duration s; report acked/s, ack latency, rejects, lost and server RSS."""
    from fedhft.protocol.mqtt import parse_broker_url
    from fedhft.simulate.load_plan import load_spec, write_shapes_manifest
    from fedhft.simulate.loadgen import LoadConfig, LoadError, check_loopback, format_report, run_load

    if write_manifest is not None:
        click.echo(write_shapes_manifest(profile, write_manifest))
        return
    address = parse_broker_url(broker, LoadError, scheme_optional=True)
    if address.tls:
        raise LoadError("loadgen speaks plain MQTT to a loopback broker; give mqtt://127.0.0.1:PORT")
    check_loopback(address.host)
    cfg = LoadConfig(
        devices=devices,
        rate=rate,
        duration=duration,
        host=address.host,
        port=address.port,
        task=task,
        loops=loops,
        prefix=prefix,
        encoding=encoding,
        register_timeout=register_timeout,
        drain=drain,
    )
    report = run_load(cfg, load_spec(profile, manifest), server_pid, progress=lambda line: click.echo(line, err=True))
    click.echo(format_report(report))
    if json_out is not None:
        json_out.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
