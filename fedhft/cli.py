"""The `fedhft` command line: profiles, plan, export, edge (server, broker and simulate join as they land)."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import click

from fedhft.errors import FedHFTError
from fedhft.logs import setup_logging


class FedHFTGroup(click.Group):
    """Turns a FedHFTError into one `error: ...` line and exit status 1."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except FedHFTError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)


@click.group(cls=FedHFTGroup)
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.version_option(package_name="fedhft")
def main(verbose: int) -> None:
    """Federated fine-tuning of language models on heterogeneous edge devices."""
    setup_logging(verbose)


# ---- profiles ----------------------------------------------------------------------
@main.group()
def profiles() -> None:
    """Device profiles shipped with fedhft (or your own TOML file)."""


@profiles.command("list")
def profiles_list() -> None:
    """One line per shipped profile."""
    from fedhft.device_profiles.profile import list_profiles, resource_level

    click.echo(
        f"{'name':22} {'arch':8} {'RAM MB':>7} {'budget':>7} {'GFLOP/s':>8} {'up/down Mbit/s':>15} {'level':6} runtimes"
    )
    for p in list_profiles():
        click.echo(
            f"{p.name:22} {p.arch:8} {p.ram_mb:>7} {p.memory_budget_mb:>7.0f} {p.fp32_gflops:>8g} "
            f"{f'{p.uplink_mbps:g}/{p.downlink_mbps:g}':>15} {resource_level(p):6} "
            f"{','.join(p.runtimes)} (default {p.default_runtime})"
        )


@profiles.command("show")
@click.argument("name")
def profiles_show(name: str) -> None:
    """Every field of one profile (a shipped name or a TOML path), as JSON."""
    from fedhft.device_profiles.profile import load_profile, resource_level

    p = load_profile(name)
    d = p.to_dict()
    d["memory_budget_mb"] = p.memory_budget_mb
    d["resource_level"] = resource_level(p)
    click.echo(json.dumps(d, indent=2))


# ---- plan ----------------------------------------------------------------------
@main.command()
@click.option("--model", default=None, help="Local model directory (default: the packaged MiniLM).")
@click.option("--profile", "profile_name", required=True, help="Profile name or TOML path.")
@click.option("--num-labels", default=2, show_default=True)
@click.option("--max-seq-len", default=128, show_default=True)
@click.option("--runtime", type=click.Choice(["ort", "executorch"]), default=None)
@click.option("--fp32-base", is_flag=True, help="Plan for an fp32 base instead of int8.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option("--min-compression", default=500.0, show_default=True, help="Upload budget (0: none); see export.")
def plan(
    model: str | None,
    profile_name: str,
    num_labels: int,
    max_seq_len: int,
    runtime: str | None,
    fp32_base: bool,
    as_json: bool,
    min_compression: float,
) -> None:
    """Print the LEGEND plan (depth, ranks, targets, mask) for a model on a device, with its estimates."""
    from fedhft.device_profiles.model_shape import read_model
    from fedhft.device_profiles.planner import plan_lora, planned_runtime
    from fedhft.device_profiles.profile import load_profile

    prof = load_profile(profile_name)
    shape = read_model(model).shape(num_labels, max_seq_len, prof.batch_size)  # what export reads, torch-free
    runtime = runtime or planned_runtime(prof)
    p = plan_lora(shape, prof, int8=not fp32_base, runtime=runtime, min_compression=min_compression or None)
    if as_json:
        click.echo(json.dumps(p.to_dict(), indent=2))
        return
    e = p.estimate
    click.echo(
        f"profile {p.profile} (runtime {p.runtime}, budget {p.memory_budget_mb:.0f} MB, {shape.num_layers} layers)"
    )
    click.echo(
        f"depth {p.depth}: layers {p.layers[0].layer}..{p.layers[-1].layer}, ranks "
        f"{[lp.rank for lp in p.layers]}, targets {list(p.layers[0].targets)}, mask ratio {p.mask_ratio}"
    )
    click.echo(
        f"memory ~{e.memory_mb:.0f} MB (base {e.base_weights_mb}, activations {e.activations_mb}, "
        f"adapter state {e.adapter_state_mb}, runtime {e.runtime_mb}); step ~{e.step_seconds:.2f} s "
        f"({e.step_gflop} GFLOP); upload {e.upload_bytes / 1e3:.1f} kB (~{e.upload_seconds:.2f} s); "
        f"{e.adapter_params} trainable params"
    )


# ---- export ----------------------------------------------------------------------
@main.command()
@click.option("--model", default=None, help="Local Hugging Face model directory (default: packaged MiniLM).")
@click.option("--profile", "profiles_arg", required=True, help="Profile names or TOML paths, comma-separated.")
@click.option("--format", "fmt", type=click.Choice(["ort", "executorch", "all"]), default="ort", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--num-labels", default=2, show_default=True)
@click.option("--max-seq-len", default=128, show_default=True)
@click.option("--fp32-base", is_flag=True, help="Keep the frozen base in fp32 (default int8).")
@click.option("--max-rank", default=16, show_default=True, help="The federation's global maximum LoRA rank.")
@click.option("--depth", type=int, default=None, help="Force one LoRA depth for every profile (ablation).")
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--min-compression",
    default=500.0,
    show_default=True,
    help="Upload budget: a device's adapter is at least this many times smaller than the full model (0: none).",
)
def export(
    model: str | None,
    profiles_arg: str,
    fmt: str,
    out: Path,
    num_labels: int,
    max_seq_len: int,
    fp32_base: bool,
    max_rank: int,
    depth: int | None,
    seed: int,
    min_compression: float,
) -> None:
    """Export per-profile training packages (int8 base + masked LoRA) from a local encoder."""
    from fedhft.device_profiles.model_shape import read_model
    from fedhft.device_profiles.profile import load_profile
    from fedhft.export.pipeline import FORMATS, ExportOptions, export_profile

    names = [n.strip() for n in profiles_arg.split(",") if n.strip()]
    profs = [load_profile(n) for n in names]  # validate all before exporting any
    read_model(model).check_seq_len(max_seq_len)
    formats = FORMATS if fmt == "all" else (fmt,)
    opts = ExportOptions(
        num_labels=num_labels,
        max_seq_len=max_seq_len,
        int8=not fp32_base,
        seed=seed,
        max_rank=max_rank,
        fixed_depth=depth,
        min_compression=min_compression or None,
    )
    for i, prof in enumerate(profs, 1):
        click.echo(f"[{i}/{len(profs)}] exporting {prof.name} ...", err=True)
        r = export_profile(model, prof, out, formats, opts)
        e = r.plan.estimate
        sizes = ", ".join(f"{k} {v / 2**20:.1f} MB" for k, v in r.artifact_bytes.items())
        click.echo(
            f"{r.profile}: depth {r.plan.depth} ranks {[lp.rank for lp in r.plan.layers]} "
            f"targets {list(r.plan.layers[0].targets)} mask {r.plan.mask_ratio} | est {e.memory_mb:.0f} MB, "
            f"{e.step_seconds:.2f} s/step, upload {e.upload_bytes / 1e3:.0f} kB | {sizes} | "
            f"{r.directory} ({r.seconds:.0f} s)"
        )


# ---- edge --------------------------------------------------------------------------------------------------
@main.group()
def edge() -> None:
    """The device side: local training and the federated client (torch-free with the ORT backend)."""


def _register_edge() -> None:
    from fedhft.edge_runtime.cli_edge import run_command, train_command

    edge.add_command(train_command)
    edge.add_command(run_command)


_register_edge()


# ---- server and broker -------------------------------------------------------------------------------------
@main.group()
def server() -> None:
    """The broker-side aggregation server (torch-free)."""


@main.group()
def broker() -> None:
    """An embedded MQTT broker for one machine, and production Mosquitto configuration."""


def _register_server() -> None:
    from fedhft.broker_server.cli_device import device_group
    from fedhft.broker_server.cli_server import (
        broker_config_command,
        broker_run_command,
        server_rotate_key_command,
        server_run_command,
    )

    server.add_command(server_run_command)
    server.add_command(server_rotate_key_command)
    broker.add_command(broker_run_command)
    broker.add_command(broker_config_command)
    main.add_command(device_group())


_register_server()


# ---- simulate and report -----------------------------------------------------------------------------------
@main.command()
@click.option("--clients", type=int, required=True, help="Number of edge runtimes.")
@click.option("--profiles", "profiles_arg", required=True, help="P1:n1,P2:n2,... (counts sum to --clients).")
@click.option("--dataset", default="bbc-news", show_default=True, help="A registered data set or a CSV/JSONL file.")
@click.option("--alpha", default=0.3, show_default=True, help="Dirichlet label-skew (smaller: more non-IID).")
@click.option(
    "--split",
    type=click.Choice(["dirichlet", "natural"]),
    default="dirichlet",
    show_default=True,
    help="dirichlet: label skew by --alpha; natural: by the data set's own groups (e.g. department).",
)
@click.option(
    "--max-test", default=1000, show_default=True, help="Cap on the global test set (and 1/5 of it per client)."
)
@click.option("--rounds", default=5, show_default=True, help="Local rounds per client.")
@click.option("--minutes", type=float, default=None, help="Stop after this many minutes.")
@click.option(
    "--method",
    "methods",
    default="fedhft",
    show_default=True,
    help="Comma-separated: fedhft, fedavg-lora, hetlora, flexlora (one run each, same split and seed).",
)
@click.option("--no-clustering", is_flag=True, help="fedhft ablation: one cluster.")
@click.option("--no-planner", is_flag=True, help="fedhft ablation: every device gets the same depth.")
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--broker", default=None, help="Use this broker instead of starting one (mqtt://HOST:PORT).")
@click.option("--target-accuracy", type=float, default=None)
@click.option("--model", default=None, help="Local model directory (default: the packaged MiniLM).")
@click.option("--local-steps", default=10, show_default=True)
@click.option("--max-seq-len", default=64, show_default=True)
@click.option("--lr", default=2e-3, show_default=True)
@click.option("--time-scale", default=0.02, show_default=True, help="Real seconds slept per simulated second.")
@click.option("--clusters", default=2, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--backend",
    type=click.Choice(["auto", "ort"]),
    default="auto",
    show_default=True,
    help="auto: each device trains with its profile's runtime (ORT, else the native ExecuTorch trainer, as on a "
    "Raspberry Pi); ort: ONNX Runtime on every device.",
)
@click.option(
    "--chaos",
    default=None,
    help="Fault spec, e.g. 'default' or 'edge-kill=2,server-kill=1,broker-restart=1,drop=2,duplicate=2,delay=2': "
    "each method then runs clean and again with these faults, same seed.",
)
def simulate(
    clients: int,
    profiles_arg: str,
    dataset: str,
    alpha: float,
    split: str,
    max_test: int,
    rounds: int,
    minutes: float | None,
    methods: str,
    no_clustering: bool,
    no_planner: bool,
    out: Path,
    broker: str | None,
    target_accuracy: float | None,
    model: str | None,
    local_steps: int,
    max_seq_len: int,
    lr: float,
    time_scale: float,
    clusters: int,
    seed: int,
    backend: str,
    chaos: str | None,
) -> None:
    """The whole system on one machine: export, broker, server, N edge runtimes, evaluation, report."""
    from fedhft.simulate.methods import method_spec
    from fedhft.simulate.report import load_report, table, write_report
    from fedhft.simulate.runner import SimConfig, parse_profile_mix, run, with_clean_reference

    mix = parse_profile_mix(profiles_arg)
    specs = [method_spec(m.strip(), no_clustering, no_planner) for m in methods.split(",") if m.strip()]
    out.mkdir(parents=True, exist_ok=True)
    results = []
    if chaos:
        from fedhft.simulate.chaos import ChaosSpec

        ChaosSpec.parse(chaos)  # a bad spec fails before anything runs
    for spec in specs:
        cfg = SimConfig(
            clients=clients,
            profiles=mix,
            dataset=dataset,
            alpha=alpha,
            split=split,
            max_test=max_test,
            rounds=rounds,
            method=spec,
            out=out,
            model=model,
            broker=broker,
            target_accuracy=target_accuracy,
            minutes=minutes,
            seed=seed,
            local_steps=local_steps,
            max_seq_len=max_seq_len,
            learning_rate=lr,
            time_scale=time_scale,
            clusters=clusters,
            backend=backend,
        )
        clean = run(cfg, progress=lambda line: click.echo(line, err=True))
        results.append(clean)
        if chaos:
            faulty = run(replace(cfg, chaos=chaos), progress=lambda line: click.echo(line, err=True))
            results.append(with_clean_reference(faulty, clean))
    config = {
        "clients": clients,
        "profiles": mix,
        "dataset": dataset,
        "alpha": alpha,
        "split": split,
        "rounds": rounds,
        "local_steps": local_steps,
        "max_seq_len": max_seq_len,
        "seed": seed,
        "time_scale": time_scale,
        "chaos": chaos,
        "backend": backend,
    }
    path = write_report(out, results, config)
    click.echo(table(load_report(path)))
    click.echo(f"report: {path}")


@main.command()
@click.argument("out", type=click.Path(exists=True, path_type=Path))
def report(out: Path) -> None:
    """Print the comparison table of a simulation's report.json."""
    from fedhft.simulate.report import load_report, table

    click.echo(table(load_report(out)))


if __name__ == "__main__":
    main()
