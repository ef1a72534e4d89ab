"""`fedhft server init|run|rotate-key`: the broker-side aggregation server (torch-free)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from fedhft.broker_server.strategies import available as strategy_names
from fedhft.cli.errors import OneLineErrorGroup
from fedhft.cli.signals import stop_on_signals

ROBUST_CHOICES = ("none", "trimmed-mean", "median")  # = robust.ROBUST_RULES (light import)
SIGNATURE_CHOICES = ("head", "delta", "both")  # = reclustering.SIGNATURES (light import)
ROLE_CHOICES = ("all", "ingest", "aggregator")  # = roles.ROLES (light import)


def _clusters(value: str) -> int | None:
    if value == "auto":
        return None
    try:
        k = int(value)
    except ValueError as exc:
        raise click.BadParameter(f"must be a positive integer or 'auto', got {value!r}") from exc
    if k < 1:
        raise click.BadParameter(f"must be >= 1, got {k}")
    return k


@click.command("run")
@click.option("--broker", required=True, help="mqtt://HOST:PORT (or mqtts://HOST:PORT for TLS).")
@click.option("--task", required=True, help="Task id: the topic tree fedhft/v1/<task>/...")
@click.option(
    "--state",
    "state_dir",
    required=True,
    help="State directory (SQLite, the default), or postgresql://USER@HOST:PORT/DB for state in PostgreSQL.",
)
@click.option(
    "--standby",
    is_flag=True,
    help="With --state postgresql://...: wait while another server holds the database, take over when it dies; "
    "a --standby server that has to step down (another took over while it reconnected) waits again.",
)
@click.option(
    "--role",
    type=click.Choice(ROLE_CHOICES),
    default="all",
    show_default=True,
    help="all: this process ingests, aggregates and publishes. With --state postgresql://... the work splits: "
    "ingest (any number, any machine) validates, stores and acks updates through the shared subscription; "
    "aggregator (one, holding the database's lock; --standby ones wait) aggregates the stored updates and "
    "publishes models.",
)
@click.option(
    "--db-reconnect-timeout",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    help="With --state postgresql://...: seconds a lost database connection is retried (with backoff) before the "
    "server stops; 0 stops at once.",
)
@click.option(
    "--key-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="With --state postgresql://...: the local directory of the signing key (as `server init` makes it).",
)
@click.option(
    "--manifest",
    type=click.Path(path_type=Path, exists=True),
    required=True,
    help="manifest.json (or its profile directory) of any exported profile: the global adapter spec.",
)
@click.option(
    "--clusters", default="1", show_default=True, help="Number of clusters K, or 'auto' (BIC within the range)."
)
@click.option("--min-clusters", default=1, show_default=True, help="Smallest K tried with --clusters auto.")
@click.option("--max-clusters", default=8, show_default=True, help="Largest K tried with --clusters auto.")
@click.option(
    "--min-cluster-size",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Fewest clients a cluster may hold (by largest membership): a K whose fit leaves a smaller cluster is not "
    "used (with a fixed --clusters, the largest smaller K that holds it, logged once).",
)
@click.option(
    "--membership-floor",
    type=click.FloatRange(0, 1, max_open=True),
    default=0.1,
    show_default=True,
    help="Soft memberships: (1 - F) x the mixture posterior + F / K, so no client's membership is degenerate.",
)
@click.option(
    "--cluster-signature",
    type=click.Choice(SIGNATURE_CHOICES),
    default="delta",
    show_default=True,
    help="What clusters clients: head (its classifier head minus the global one), delta (a fixed random sketch "
    "of its uploaded ΔW rows) or both; delta clustered synthetic label- and domain-skewed clients best "
    "(bench/cluster_signature.py).",
)
@click.option(
    "--mode",
    type=click.Choice(["async", "sync"]),
    default="async",
    show_default=True,
    help="async: FedBuff, flush by --buffer-size / --window-seconds. sync: FedHFT's rounds, flush once every "
    "registered device delivered an update from the current version, or at --round-deadline.",
)
@click.option("--buffer-size", default=8, show_default=True, help="Aggregate when M updates are pending ...")
@click.option(
    "--window-seconds",
    default=30.0,
    show_default=True,
    help="... or W s after the oldest arrived (virtual seconds with --virtual-time).",
)
@click.option(
    "--round-deadline",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="--mode sync: a round flushes what it has S seconds after it started (virtual seconds with "
    "--virtual-time); default: it waits for every device.",
)
@click.option(
    "--virtual-time",
    is_flag=True,
    help="Simulation only (`fedhft simulate`): order updates by the virtual times devices promise and tell "
    "each device when (virtual time) and from which version to train, so results do not depend on host load.",
)
@click.option(
    "--max-rounds-per-version",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="--virtual-time, --mode async: a device trains at most N rounds from one version, then waits for the "
    "next flush (0: no cap; an older update landing after a flush does not count; on the wall clock each edge "
    "caps itself with its own --max-rounds-per-version).",
)
@click.option(
    "--max-updates-per-flush",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="--virtual-time, --mode async: a device with N updates in the buffer (trained from any version) waits "
    "for the flush before it trains again (0: no cap).",
)
@click.option(
    "--virtual-fleet",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="--virtual-time: process nothing before this many devices said hello (the simulated fleet's size), so "
    "the first round does not depend on which device process started first.",
)
@click.option(
    "--virtual-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=300.0,
    show_default=True,
    help="--virtual-time: after this many wall seconds in which no device sent anything and nothing could be "
    "processed, drop the devices still owing an update (or a promise) until they say hello again.",
)
@click.option(
    "--staleness-exponent",
    default=0.5,
    show_default=True,
    help="FedBuff staleness discount (1 + tau) ** -a of an update tau versions old: it scales the update's change "
    "and is not normalized away.",
)
@click.option(
    "--max-staleness",
    default=10,
    show_default=True,
    help="Drop updates older than V versions; the server keeps the last V + 1 versions (in memory and on disk) "
    "to rebuild the model each update trained from.",
)
@click.option("--clip-norm", type=float, default=None, help="Scale down updates whose ΔW L2 norm exceeds C.")
@click.option(
    "--clip-multiple",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Poisoning bound: at each flush, shrink every update whose change since the model it trained from "
    "(ΔW rows and head) exceeds this multiple of the running median change norm, e.g. 2 (fedhft, flexlora).",
)
@click.option(
    "--robust",
    type=click.Choice(ROBUST_CHOICES),
    default="none",
    show_default=True,
    help="Poisoning bound: aggregate ΔW and the head by a coordinate-wise weighted trimmed mean or median "
    "instead of the mean of the changes; a row a client did not send counts as unchanged (aggregators fedhft, "
    "flexlora).",
)
@click.option(
    "--trim-fraction",
    type=click.FloatRange(0, 0.5, max_open=True),
    default=0.2,
    show_default=True,
    help="Share of the weight --robust trimmed-mean cuts off each tail.",
)
@click.option("--warmup-aggregations", default=2, show_default=True, help="Aggregations before clustering.")
@click.option("--recluster-every", default=5, show_default=True, help="Re-estimate memberships every N.")
@click.option("--hysteresis", default=0.1, show_default=True, help="Membership margin needed to switch.")
@click.option(
    "--server-lr",
    default=1.0,
    show_default=True,
    help="FedBuff server learning rate eta: each flush adds eta x the discounted mean change of its updates since "
    "the models they trained from (1 with fresh updates: the weighted mean of the trained models).",
)
@click.option(
    "--aggregator",
    type=click.Choice(strategy_names()),
    default="fedhft",
    show_default=True,
    help="fedhft: masked ΔW + SVD with clustering. Baselines (dense updates only, --clusters 1): flexlora "
    "(ΔW mean + SVD per client rank), fedavg (FedAvg of LoRA factors A, B), hetlora (zero-padded factors "
    "weighted by samples x ||B A||, truncated per client rank), fedavg-full (FedAvg of full fine-tuning: "
    "sample-weighted mean of dense parameter deltas; needs a full fine-tuning manifest). More strategies: "
    "FEDHFT_STRATEGIES=name=module:Class (see fedhft.broker_server.strategies).",
)
@click.option("--group", default="fedhft-server", show_default=True, help="Shared-subscription group.")
@click.option("--client-id", default=None, help="MQTT client id (default fedhft-server-<task>-<group>).")
@click.option("--username", default=None, help="Broker user name.")
@click.option("--password", default=None, envvar="FEDHFT_MQTT_PASSWORD", help="Broker password (or env).")
@click.option(
    "--password-file", type=click.Path(path_type=Path, dir_okay=False), default=None, help="Read it from a file."
)
@click.option("--tls-ca", type=click.Path(path_type=Path, exists=True), default=None, help="CA file for TLS.")
@click.option("--metrics-port", type=int, default=None, help="Serve Prometheus metrics on this port.")
@click.option("--metrics-host", default="127.0.0.1", show_default=True, help="Address of the metrics port.")
@click.option(
    "--keep-versions",
    default=2,
    show_default=True,
    help="Cluster-state versions kept on disk (at least max-staleness + 1, so a restart still rebuilds what "
    "stale updates trained from).",
)
@click.option("--model-encoding", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--decode-threads", type=int, default=None, help="Threads decoding updates (default min(4, CPUs)).")
@click.option("--seed", default=0, show_default=True)
def server_run_command(
    broker: str,
    task: str,
    state_dir: str,
    standby: bool,
    role: str,
    db_reconnect_timeout: float,
    key_dir: Path | None,
    manifest: Path,
    clusters: str,
    min_clusters: int,
    max_clusters: int,
    mode: str,
    min_cluster_size: int,
    membership_floor: float,
    cluster_signature: str,
    buffer_size: int,
    window_seconds: float,
    round_deadline: float | None,
    virtual_time: bool,
    max_rounds_per_version: int,
    max_updates_per_flush: int,
    virtual_fleet: int,
    virtual_timeout: float,
    staleness_exponent: float,
    max_staleness: int,
    clip_norm: float | None,
    clip_multiple: float | None,
    robust: str,
    trim_fraction: float,
    warmup_aggregations: int,
    recluster_every: int,
    hysteresis: float,
    server_lr: float,
    aggregator: str,
    group: str,
    client_id: str | None,
    username: str | None,
    password: str | None,
    password_file: Path | None,
    tls_ca: Path | None,
    metrics_port: int | None,
    metrics_host: str,
    keep_versions: int,
    model_encoding: str,
    decode_threads: int | None,
    seed: int,
) -> None:
    """Run the federated server: validate and durably store updates, aggregate (FedBuff or sync rounds),
    publish models."""
    from fedhft.broker_server.federation import FederationConfig
    from fedhft.broker_server.roles import role_problem
    from fedhft.broker_server.service import Server, ServerConfig
    from fedhft.broker_server.state_dir import StandbyStopped, SteppedDown, is_postgres, state_label
    from fedhft.credentials import resolve_password

    problem = role_problem(role, state_dir, standby=standby, virtual_time=virtual_time)
    if problem:  # a usage error: one line, exit status 2
        click.echo(f"error: {problem}", err=True)
        sys.exit(2)

    caps = {"--max-rounds-per-version": max_rounds_per_version, "--max-updates-per-flush": max_updates_per_flush}
    for name in (n for n, value in caps.items() if value and not (virtual_time and mode == "async")):
        click.echo(f"error: {name} needs --virtual-time and --mode async (on the wall clock each edge caps its own "
                   "rounds: fedhft edge run --max-rounds-per-version)", err=True)  # fmt: skip
        sys.exit(2)
    password = resolve_password(password, password_file)

    fed = FederationConfig(
        buffer_size=buffer_size,
        window_seconds=window_seconds,
        staleness_exponent=staleness_exponent,
        max_staleness=max_staleness,
        clusters=_clusters(clusters),
        min_clusters=min_clusters,
        max_clusters=max_clusters,
        min_cluster_size=min_cluster_size,
        membership_floor=membership_floor,
        cluster_signature=cluster_signature,
        warmup_aggregations=warmup_aggregations,
        recluster_every=recluster_every,
        hysteresis=hysteresis,
        server_lr=server_lr,
        seed=seed,
        aggregator=aggregator,
        robust=robust,
        trim_fraction=trim_fraction,
        clip_multiple=clip_multiple,
    )
    config = ServerConfig(
        broker=broker,
        task=task,
        state_dir=state_dir if is_postgres(state_dir) else Path(state_dir),
        key_dir=key_dir,
        standby=standby,
        role=role,
        db_reconnect_timeout=db_reconnect_timeout,
        manifest=manifest,
        federation=fed,
        clip_norm=clip_norm,
        group=group,
        client_id=client_id,
        username=username,
        password=password,
        tls_ca=tls_ca,
        metrics_port=metrics_port,
        metrics_host=metrics_host,
        keep_versions=keep_versions,
        model_encoding=model_encoding,
        mode=mode,
        round_deadline=round_deadline,
        virtual_time=virtual_time,
        rounds_per_version=max_rounds_per_version,
        updates_per_flush=max_updates_per_flush,
        virtual_timeout=virtual_timeout,
        virtual_fleet=virtual_fleet,
        **({} if decode_threads is None else {"decode_threads": max(1, decode_threads)}),
    )
    with stop_on_signals() as stop:
        while True:
            try:
                server = Server(config, stop)
            except StandbyStopped:
                click.echo("fedhft server: the standby stopped before it took over", err=True)
                return
            key = f"public key {(key_dir or Path(state_dir)) / 'server_key.pub'}" if role != "ingest" else "no key"
            click.echo(
                f"fedhft server ({role}): task {task}, {state_label(state_dir)}, version "
                f"{server.federation.version}, {key}",
                err=True,
            )
            try:
                server.run(stop)
                return
            except SteppedDown as exc:
                if not standby or stop.is_set():
                    raise
                click.echo(f"fedhft server: {exc}; waiting for the lock again (--standby)", err=True)


def _refuse_database(state_dir: Path) -> None:
    """The key commands work on a directory; a PostgreSQL state keeps its key in `server run --key-dir`."""
    from fedhft.broker_server.state_dir import POSTGRES_SCHEMES, StateError

    if str(state_dir).startswith(tuple(s.rstrip("/") for s in POSTGRES_SCHEMES)):  # click.Path folds the //
        raise StateError(
            "a postgresql:// state keeps no key files: pass the directory given to `server run --key-dir` as --state"
        )


@click.command("init")
@click.option(
    "--state", "state_dir", type=click.Path(path_type=Path, file_okay=False), required=True, help="State directory."
)
def server_init_command(state_dir: Path) -> None:
    """Create the state directory and the server's signing key before the first start (kept if it exists).

    STATE/server_key.pub is what `fedhft device add --server-key` gives each device."""
    from fedhft.broker_server.key_rotation import init_server_state

    _refuse_database(state_dir)
    pub, kid, new = init_server_state(state_dir)
    click.echo(f"{'created' if new else 'kept'} the server key {kid} in {state_dir}; devices get {pub}")


@click.command("rotate-key")
@click.option(
    "--state", "state_dir", type=click.Path(path_type=Path, file_okay=False), required=True, help="State directory."
)
def server_rotate_key_command(state_dir: Path) -> None:
    """Replace the server's signing key; the old key signs the new one into the key chain.

    Stop the server first: rotation takes the state directory's lock (a running server makes it fail, naming
    its PID). On its next start the server publishes the chain (retained), so devices, also ones offline
    now, move from the key they trust to the new one, and then refuse models signed by the old key.
    Provision new devices with the new server_key.pub.
    """
    from fedhft.broker_server.key_rotation import rotate_server_key

    _refuse_database(state_dir)
    r = rotate_server_key(state_dir)
    click.echo(f"server key rotated: {r.old_key_id} -> {r.new_key_id} (chain link {r.index})")
    click.echo(f"public key for new devices: {r.public_key}; key chain: {r.chain}")


@click.group("server", cls=OneLineErrorGroup)
def server_group() -> None:
    """The broker-side aggregation server (torch-free)."""


server_group.add_command(server_init_command)
server_group.add_command(server_run_command)
server_group.add_command(server_rotate_key_command)
