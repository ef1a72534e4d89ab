"""`fedhft profiles list|show`, `fedhft plan` and `fedhft export`: device profiles, the LEGEND plan, the export.

Each command imports what it needs when it runs (export and plan load the torch-side export package).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from fedhft.cli.errors import OneLineErrorGroup
from fedhft.cli.numbers import dumps_rounded
from fedhft.device_profiles.planner import (  # torch-free, stdlib
    DEFAULT_MEMORY_CEILING,
    DEFAULT_OBJECTIVE,
    OBJECTIVES,
    RECOMPUTE_MODES,
)
from fedhft.device_profiles.planner import DEFAULT_UPLOAD_WINDOW as UPLOAD_WINDOW

UPLOAD_WINDOW_HELP = (
    "Upload budget: a device's whole adapter must upload within this many seconds of its own uplink "
    "(its profile's target_upload_seconds if shorter; 0: that target only)."
)
RUNTIME_FORMATS = ("ort", "executorch")  # a --format naming one runtime: the profile must list it
MIN_COMPRESSION_HELP = (
    "Optional cap for every device: an adapter at least this many times smaller than the model (0: none)."
)
OBJECTIVE_HELP = (
    "capacity: the largest plan that fits; memory: the least estimated peak that keeps half the capacity plan's "
    "depth and trainable parameters (recorded in the plan)."
)
objective_option = click.option(
    "--objective", type=click.Choice(OBJECTIVES), default=DEFAULT_OBJECTIVE, show_default=True, help=OBJECTIVE_HELP
)
recompute_option = click.option(
    "--recompute",
    type=click.Choice(["auto", *RECOMPUTE_MODES]),
    default="auto",
    show_default=True,
    help="What ExecuTorch programs recompute in backward instead of keeping: selective (all but the linear "
    "layers' outputs), full (all but each adapted layer's input); auto: the most saving whose step time meets "
    "the profile's target.",
)

memory_ceiling_option = click.option(
    "--memory-ceiling",
    type=click.FloatRange(0.0, 1.0),
    default=round(DEFAULT_MEMORY_CEILING, 4),
    show_default=True,
    help="Capacity objective: keep the plan's estimated peak, on the leanest runtime the profile runs, within this "
    "share of fully fine-tuning the model at the same batch and sequence (0: no ceiling; recorded in the plan).",
)


@click.group("profiles", cls=OneLineErrorGroup)
def profiles_group() -> None:
    """Device profiles shipped with fedhft (or your own TOML file)."""


@profiles_group.command("list")
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


@profiles_group.command("show")
@click.argument("name")
def profiles_show(name: str) -> None:
    """Every field of one profile (a shipped name or a TOML path), as JSON."""
    from fedhft.device_profiles.profile import load_profile, resource_level

    p = load_profile(name)
    d = p.to_dict()
    d["memory_budget_mb"] = p.memory_budget_mb
    d["resource_level"] = resource_level(p)
    click.echo(dumps_rounded(d))


@click.command()
@click.option("--model", default=None, help="Local model directory (default: the packaged MiniLM).")
@click.option("--profile", "profile_name", required=True, help="Profile name or TOML path.")
@click.option("--num-labels", default=2, show_default=True)
@click.option("--max-seq-len", default=128, show_default=True)
@click.option("--runtime", type=click.Choice(["ort", "executorch"]), default=None)
@click.option("--fp32-base", is_flag=True, help="Plan for an fp32 base instead of int8.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option("--upload-window", default=UPLOAD_WINDOW, show_default=True, help=UPLOAD_WINDOW_HELP)
@click.option("--min-compression", default=0.0, show_default=True, help=MIN_COMPRESSION_HELP)
@objective_option
@recompute_option
@memory_ceiling_option
def plan(
    model: str | None,
    profile_name: str,
    num_labels: int,
    max_seq_len: int,
    runtime: str | None,
    fp32_base: bool,
    as_json: bool,
    upload_window: float,
    min_compression: float,
    objective: str,
    recompute: str,
    memory_ceiling: float,
) -> None:
    """Print the LEGEND plan (depth, ranks, targets, mask) for a model on a device, with its estimates."""
    from fedhft.device_profiles.model_shape import read_model
    from fedhft.device_profiles.planner import adapter_bytes, leanest_runtime, plan_lora, planned_runtime, upload_budget
    from fedhft.device_profiles.profile import load_profile

    prof = load_profile(profile_name)
    shape = read_model(model).shape(num_labels, max_seq_len, prof.batch_size)  # what export reads, torch-free
    runtime = runtime or planned_runtime(prof)
    p = plan_lora(
        shape,
        prof,
        int8=not fp32_base,
        runtime=runtime,
        upload_window=upload_window or None,
        min_compression=min_compression or None,
        objective=objective,
        recompute=None if recompute == "auto" else recompute,
        memory_ceiling=memory_ceiling or None,
    )
    if as_json:
        click.echo(json.dumps(p.to_dict(), indent=2))  # exact: equal to the manifest's plan
        return
    e = p.estimate
    budget = upload_budget(shape, prof, upload_window or None, min_compression or None)
    click.echo(
        f"profile {p.profile} (runtime {p.runtime}, budget {p.memory_budget_mb:.0f} MB, {shape.num_layers} layers, "
        f"objective {p.objective})"
    )
    click.echo(
        f"depth {p.depth}: layers {p.layers[0].layer}..{p.layers[-1].layer}, ranks "
        f"{[lp.rank for lp in p.layers]}, targets {list(p.layers[0].targets)}, mask ratio {p.mask_ratio}"
        + (f", recompute {p.recompute}" if p.recompute != "none" else "")
    )
    click.echo(
        f"memory ~{e.memory_mb:.0f} MB (base {e.base_weights_mb}, activations {e.activations_mb}, "
        f"adapter state {e.adapter_state_mb}, runtime {e.runtime_mb}); step ~{e.step_seconds:.2f} s "
        f"({e.step_gflop} GFLOP); upload {e.upload_bytes / 1e3:.1f} kB (~{e.upload_seconds:.2f} s; whole adapter "
        f"{adapter_bytes(shape, p.layers) / 1e3:.1f} kB of a {budget / 1e3:.0f} kB budget); "
        f"{e.adapter_params} trainable params"
    )
    if p.memory_ceiling_mb is not None:
        lean, peak = leanest_runtime(shape, prof, p.layers, p.mask_ratio, p.int8_base, p.recompute)
        click.echo(
            f"memory ceiling {p.memory_ceiling_mb:.0f} MB (a share of full fine-tuning's estimated peak): "
            f"~{peak:.0f} MB on {lean}"
        )


@click.command()
@click.option("--model", default=None, help="Local Hugging Face model directory (default: packaged MiniLM).")
@click.option("--profile", "profiles_arg", required=True, help="Profile names or TOML paths, comma-separated.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["auto", "ort", "executorch", "all"]),
    default="auto",
    show_default=True,
    help="auto: what each profile's runtime needs (ORT artifacts, else the ExecuTorch program); all: both.",
)
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--num-labels", default=2, show_default=True)
@click.option("--max-seq-len", default=128, show_default=True)
@click.option("--fp32-base", is_flag=True, help="Keep the frozen base in fp32 (default int8).")
@click.option("--max-rank", default=16, show_default=True, help="The federation's global maximum LoRA rank.")
@click.option("--depth", type=int, default=None, help="Force one LoRA depth for every profile (ablation).")
@click.option("--seed", default=0, show_default=True)
@click.option("--upload-window", default=UPLOAD_WINDOW, show_default=True, help=UPLOAD_WINDOW_HELP)
@click.option("--min-compression", default=0.0, show_default=True, help=MIN_COMPRESSION_HELP)
@objective_option
@recompute_option
@memory_ceiling_option
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
    upload_window: float,
    min_compression: float,
    objective: str,
    recompute: str,
    memory_ceiling: float,
) -> None:
    """Export per-profile training packages (int8 base + masked LoRA) from a local encoder."""
    from fedhft.device_profiles.model_shape import read_model
    from fedhft.device_profiles.planner import export_formats
    from fedhft.device_profiles.profile import load_profile
    from fedhft.export.pipeline import FORMATS, ExportOptions, export_profile

    names = [n.strip() for n in profiles_arg.split(",") if n.strip()]
    profs = [load_profile(n) for n in names]  # validate all before exporting any
    for prof in profs:
        if fmt in RUNTIME_FORMATS and fmt not in prof.runtimes:
            raise click.ClickException(
                f"profile {prof.name} runs {', '.join(prof.runtimes)}, not {fmt}: use --format auto "
                f"(or {prof.default_runtime})"
            )
    read_model(model).check_seq_len(max_seq_len)
    opts = ExportOptions(
        num_labels=num_labels,
        max_seq_len=max_seq_len,
        int8=not fp32_base,
        seed=seed,
        max_rank=max_rank,
        fixed_depth=depth,
        upload_window=upload_window or None,
        min_compression=min_compression or None,
        objective=objective,
        recompute=None if recompute == "auto" else recompute,
        memory_ceiling=memory_ceiling or None,
    )
    for i, prof in enumerate(profs, 1):
        click.echo(f"[{i}/{len(profs)}] exporting {prof.name} ...", err=True)
        formats = FORMATS if fmt == "all" else export_formats(prof) if fmt == "auto" else (fmt,)
        r = export_profile(model, prof, out, formats, opts)
        e = r.plan.estimate
        sizes = ", ".join(f"{k} {v / 2**20:.1f} MB" for k, v in r.artifact_bytes.items())
        click.echo(
            f"{r.profile}: depth {r.plan.depth} ranks {[lp.rank for lp in r.plan.layers]} "
            f"targets {list(r.plan.layers[0].targets)} mask {r.plan.mask_ratio}"
            f"{'' if r.plan.recompute == 'none' else ' recompute ' + r.plan.recompute} | {r.plan.objective}: "
            f"est {e.memory_mb:.0f} MB, "
            f"{e.step_seconds:.2f} s/step, upload {e.upload_bytes / 1e3:.0f} kB | {sizes} | "
            f"{r.directory} ({r.seconds:.0f} s)"
        )
