"""Device commands: `fedhft edge train` (offline, one device) and `fedhft edge run` (federated, over MQTT).

Torch-free: with the ORT or native backend both run with torch and transformers blocked, as on a device.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from fedhft.cli.errors import OneLineErrorGroup
from fedhft.cli.signals import stop_on_signals
from fedhft.edge_runtime.client_config import ClientConfig, ClientSummary
from fedhft.edge_runtime.local_train import BACKENDS
from fedhft.edge_runtime.trainer import DEFAULT_TRAINER_TIMEOUT
from fedhft.protocol import ENCODINGS

ARTIFACTS_HELP = "Profile directory written by `fedhft export` (holds manifest.json)."
DATA_HELP = "Labelled local data: .csv/.tsv with a header, or .jsonl objects."
LABELS_HELP = "Comma-separated label names in id order (so every client maps names to the same ids)."
trainer_timeout_option = click.option(
    "--trainer-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_TRAINER_TIMEOUT,
    show_default=True,
    help="Seconds the native trainer may take per call (one step, load or save) before the run stops; "
    "raise it on slow or emulated devices. Other backends ignore it.",
)


def _label_names(labels: str | None) -> tuple[str, ...] | None:
    return None if labels is None else tuple(x.strip() for x in labels.split(",") if x.strip())


@click.command("train")
@click.option("--artifacts", type=click.Path(file_okay=False, path_type=Path), required=True, help=ARTIFACTS_HELP)
@click.option("--data", type=click.Path(dir_okay=False, path_type=Path), required=True, help=DATA_HELP)
@click.option("--epochs", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Train this many batches instead of --epochs.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Default: the plan's batch size.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True)
@click.option("--text-column", default="text", show_default=True)
@click.option("--label-column", default="label", show_default=True)
@click.option("--labels", default=None, help=LABELS_HELP)
@click.option("--eval-fraction", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.1, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-train-seconds", type=click.FloatRange(min=0, min_open=True), default=None)
@click.option(
    "--save-adapter",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write the trained adapter here in the peft LoRA format (+ head.safetensors).",
)
@click.option(
    "--backend",
    type=click.Choice(list(BACKENDS)),
    default="auto",
    show_default=True,
    envvar="FEDHFT_BACKEND",
    help="auto: ORT when the package has ORT artifacts and onnxruntime is installed, else the native trainer "
    "(or FEDHFT_BACKEND).",
)
@trainer_timeout_option
def train_command(
    artifacts: Path,
    data: Path,
    epochs: int,
    steps: int | None,
    batch_size: int | None,
    lr: float,
    text_column: str,
    label_column: str,
    labels: str | None,
    eval_fraction: float,
    seed: int,
    max_train_seconds: float | None,
    save_adapter: Path | None,
    backend: str,
    trainer_timeout: float,
) -> None:
    """Fine-tune the adapter on local data, without a server: loss and accuracy before and after."""
    backend = _resolve_backend(backend, artifacts)
    _torch_free_if(backend)
    from fedhft.edge_runtime.adapter_io import save_peft_adapter
    from fedhft.edge_runtime.data import check_num_labels, load_labelled_file, split_holdout, steps_per_epoch
    from fedhft.edge_runtime.local_train import evaluate, open_trainer, train_local
    from fedhft.edge_runtime.tokenize import TextEncoder
    from fedhft.protocol.manifest import load_manifest

    manifest = load_manifest(artifacts)
    texts, ids, names = load_labelled_file(data, text_column, label_column, _label_names(labels))
    check_num_labels(ids, names, manifest.num_labels, str(data))
    train_idx, eval_idx = split_holdout(len(texts), eval_fraction, seed)
    train_texts, train_labels = [texts[i] for i in train_idx], ids[train_idx]
    eval_texts, eval_labels = [texts[i] for i in eval_idx], ids[eval_idx]
    batch = batch_size or int(manifest.plan.get("batch_size", 8))
    total = steps or epochs * steps_per_epoch(len(train_texts), batch)
    trainer = open_trainer(backend, artifacts, manifest, learning_rate=lr, trainer_timeout=trainer_timeout)
    encoder = TextEncoder.for_manifest(manifest, artifacts)
    click.echo(
        f"{manifest.profile_name}: {len(train_texts)} train / {len(eval_texts)} eval examples, "
        f"{len(names)} labels, batch {batch}, {total} steps",
        err=True,
    )
    before = evaluate(trainer, encoder, eval_texts, eval_labels, batch) if eval_texts else None
    if before is not None:
        click.echo(f"eval before: loss {before.loss:.4f} accuracy {before.accuracy:.4f}", err=True)
    with click.progressbar(length=total, label="training", file=sys.stderr) as bar:
        report = train_local(
            trainer,
            encoder,
            train_texts,
            train_labels,
            steps=steps,
            epochs=None if steps else epochs,
            batch_size=batch,
            seed=seed,
            max_seconds=max_train_seconds,
            progress=lambda _done, _total, _loss: bar.update(1),
        )
    after = evaluate(trainer, encoder, eval_texts, eval_labels, batch) if eval_texts else None
    line = (
        f"trained {report.steps} steps ({report.samples} samples) in {report.seconds:.1f} s: "
        f"train loss {report.loss:.4f} accuracy {report.accuracy:.4f}"
    )
    if after is not None and before is not None:
        line += (
            f"; eval loss {before.loss:.4f} -> {after.loss:.4f}, "
            f"accuracy {before.accuracy:.4f} -> {after.accuracy:.4f} (n={after.samples})"
        )
    if save_adapter is not None:
        save_peft_adapter(save_adapter, manifest, trainer.get_parameters())
        line += f"; adapter saved to {save_adapter}"
    click.echo(line)


def _resolve_backend(backend: str, artifacts: Path) -> str:
    """``--backend auto`` made concrete from the package's manifest (one rule: backend_choice)."""
    if backend != "auto":
        return backend
    from fedhft.edge_runtime.backend_choice import choose_backend

    return choose_backend(artifacts)


def _torch_free_if(backend: str) -> None:
    """With the ORT or native backend, run as a device does: torch and transformers cannot be imported
    (onnxruntime would otherwise import an installed torch, ~250 MB)."""
    if backend in ("ort", "native") and "torch" not in sys.modules:
        from fedhft.edge_runtime.torchfree import block_heavy_imports, unblock_heavy_imports

        block_heavy_imports()
        ctx = click.get_current_context(silent=True)
        if ctx is not None:  # lifted when the command ends: in-process callers (tests) get their imports back
            ctx.call_on_close(unblock_heavy_imports)


@click.command("run")
@click.option("--artifacts", type=click.Path(file_okay=False, path_type=Path), required=True, help=ARTIFACTS_HELP)
@click.option("--data", type=click.Path(dir_okay=False, path_type=Path), required=True, help=DATA_HELP)
@click.option("--broker", required=True, help="mqtt://HOST:PORT or mqtts://HOST:PORT")
@click.option("--task", required=True, help="Federated task id (topic level).")
@click.option("--client-id", required=True, help="This device's id (topic level; unique per task).")
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Durable state: checkpoint, seq counter, last good model, outbox.",
)
@click.option(
    "--server-key",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The server's Ed25519 public key (64 hex characters); models not signed by it are refused.",
)
@click.option("--username", default=None)
@click.option("--password", default=None, envvar="FEDHFT_MQTT_PASSWORD", help="Or FEDHFT_MQTT_PASSWORD.")
@click.option(
    "--password-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Read the broker password from this file (the device bundle's `password`).",
)
@click.option("--tls-ca", type=click.Path(dir_okay=False), default=None, help="CA file: connect with TLS.")
@click.option("--local-steps", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--rounds", type=click.IntRange(min=0), default=0, show_default=True, help="0 = forever.")
@click.option("--max-train-seconds", type=click.FloatRange(min=0, min_open=True), default=None)
@click.option("--encoding", type=click.Choice(list(ENCODINGS)), default="fp16", show_default=True)
@click.option("--outbox-limit", type=click.IntRange(min=1), default=16, show_default=True)
@click.option(
    "--battery-min-percent",
    type=click.FloatRange(0, 100),
    default=None,
    help="Postpone training while the battery (/sys/class/power_supply) is below this level.",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Default: the plan's batch size.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--text-column", default="text", show_default=True)
@click.option("--label-column", default="label", show_default=True)
@click.option("--labels", default=None, help=LABELS_HELP)
@click.option("--cluster", type=click.IntRange(min=0), default=None, help="Initial cluster to take models from.")
@click.option(
    "--ack-timeout",
    type=click.FloatRange(min=1),
    default=300.0,
    show_default=True,
    help="Publish an update again when the server has not acked it this many seconds after the broker took it.",
)
@click.option(
    "--backend",
    type=click.Choice(list(BACKENDS)),
    default="auto",
    show_default=True,
    envvar="FEDHFT_BACKEND",
    help="auto: ORT when the package has ORT artifacts and onnxruntime is installed, else the native trainer "
    "(or FEDHFT_BACKEND).",
)
@click.option(
    "--eval-data",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Local test split: the received model's accuracy on it goes into each update's metrics.",
)
@click.option(
    "--mask-ratio",
    type=click.FloatRange(0, 1, min_open=True),
    default=None,
    help="Override the manifest's upload mask (1.0: every row, as unmasked baselines do).",
)
@click.option(
    "--sim-time-scale",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Simulation: sleep this x the profile's simulated round time (0: off).",
)
@click.option(
    "--virtual-time",
    is_flag=True,
    help="Simulation (`fedhft server run --virtual-time`): start each round when the server's schedule says, "
    "promise when its update lands by the profile's step time and link speeds, never sleep.",
)
@click.option(
    "--until-version",
    type=click.IntRange(min=1),
    default=None,
    help="With --virtual-time: stop once scheduled from this model version or a later one.",
)
@click.option(
    "--until-time",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="With --virtual-time: stop once scheduled at this virtual time (seconds) or later.",
)
@click.option(
    "--max-rounds-per-version",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Rounds trained on one model version; 0: keep training on the newest model until a newer one comes.",
)
@click.option(
    "--reset-state",
    is_flag=True,
    help="Start this device over (after a 'corrupt' state error or a re-export): delete the saved state, "
    "checkpoint, last model and queued updates in --state-dir; seqs restart above any earlier one.",
)
@trainer_timeout_option
def run_command(
    artifacts: Path,
    data: Path,
    broker: str,
    task: str,
    client_id: str,
    state_dir: Path,
    server_key: Path,
    username: str | None,
    password: str | None,
    password_file: Path | None,
    tls_ca: str | None,
    local_steps: int,
    rounds: int,
    max_train_seconds: float | None,
    encoding: str,
    outbox_limit: int,
    battery_min_percent: float | None,
    batch_size: int | None,
    lr: float,
    seed: int,
    text_column: str,
    label_column: str,
    labels: str | None,
    cluster: int | None,
    ack_timeout: float,
    backend: str,
    eval_data: Path | None,
    mask_ratio: float | None,
    sim_time_scale: float,
    virtual_time: bool,
    until_version: int | None,
    until_time: float | None,
    max_rounds_per_version: int,
    reset_state: bool,
    trainer_timeout: float,
) -> None:
    """Join a federated task: receive signed models, train locally, send masked updates (crash-safe)."""
    cfg = client_config(**locals())
    _torch_free_if(cfg.backend)
    from fedhft.edge_runtime.client import EdgeClient

    client = EdgeClient(cfg, status=lambda line: click.echo(line, err=True))  # connection state changes
    with stop_on_signals() as stop:  # the client then finishes its step and exits cleanly
        summary = client.run(stop)
    click.echo(summary_line(client_id, summary, len(client.outbox)))


def summary_line(client_id: str, summary: ClientSummary, queued: int) -> str:
    return (
        f"{client_id}: {summary.rounds_trained} round(s) trained, {len(summary.acked)} update(s) acked, "
        f"model version {summary.model_version}, {queued} queued"
    )


def client_config(
    *, labels: str | None, lr: float, password_file: Path | None, backend: str, **options: object
) -> ClientConfig:
    """The ClientConfig of `fedhft edge run`'s parsed options (a hosted device's too): --backend auto made
    concrete, the password read from --password-file, the label names split."""
    from fedhft.credentials import resolve_password

    password = resolve_password(options.pop("password"), password_file)  # type: ignore[arg-type]
    return ClientConfig(
        backend=_resolve_backend(backend, options["artifacts"]),  # type: ignore[arg-type]
        password=password,
        learning_rate=lr,
        label_names=_label_names(labels),
        **options,  # type: ignore[arg-type]
    )


def device_configs(path: Path) -> list[ClientConfig]:
    """The devices of a `fedhft edge host --devices` file, each parsed as `fedhft edge run`'s options."""
    from fedhft.edge_runtime.device_file import device_entries, option_args

    configs = []
    for i, entry in enumerate(device_entries(path)):
        try:
            ctx = run_command.make_context("run", option_args(entry), resilient_parsing=False)
        except click.ClickException as e:
            raise click.UsageError(f"{path}: device {i + 1}: {e.format_message()}") from e
        configs.append(client_config(**ctx.params))
    return configs


@click.command("host")
@click.option(
    "--devices",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="JSON or TOML list of devices, each a table of `fedhft edge run` options (optional shared defaults).",
)
def host_command(devices: Path) -> None:
    """Run many devices in one process: each its own client (identity, state, outbox, MQTT session), devices of
    one package sharing one loaded training runtime."""
    configs = device_configs(devices)
    _torch_free_if("ort" if {c.backend for c in configs} <= {"ort", "native"} else "executorch")
    from fedhft.edge_runtime.host import run_host

    with stop_on_signals() as stop:
        result = run_host(configs, stop, status=lambda line: click.echo(line, err=True))
    for cid, summary in result.summaries.items():
        click.echo(
            summary_line(cid, summary, result.queued[cid])
            + (f", failed: {result.failed[cid]}" if cid in result.failed else "")
        )
    if result.failed:
        raise click.ClickException(f"{len(result.failed)} of {len(configs)} device(s) stopped on an error")


@click.group("edge", cls=OneLineErrorGroup)
def edge_group() -> None:
    """The device side: local training and the federated client (torch-free with the ORT or native backend)."""


edge_group.add_command(train_command)
edge_group.add_command(run_command)
edge_group.add_command(host_command)
