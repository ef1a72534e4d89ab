"""`fedhft simulate` (the whole system on one machine, with a report) and `fedhft report` (print one)."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import click

from fedhft.cli.export import OBJECTIVE_HELP
from fedhft.cli.signals import StopRequested, raise_on_signals
from fedhft.device_profiles.planner import DEFAULT_OBJECTIVE, OBJECTIVES


class MethodOption(click.Option):
    """--method, whose help lists every method `fedhft simulate` accepts (read when help is shown)."""

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        from fedhft.simulate.methods import methods

        self.help = (self.help or "").replace("{methods}", ", ".join(methods()))
        return super().get_help_record(ctx)


LAST_K_HELP = "Final accuracy and macro-F1: the mean over the last K global versions."
BUDGET_HELP = "Also report the newest global version stamped at or before this virtual time (seconds)."


@click.command()
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
    "--group-column",
    default=None,
    help="Your own CSV/JSONL --dataset: the column whose values (a user, a department, ...) are the groups of "
    "--split natural.",
)
@click.option(
    "--max-test", default=1000, show_default=True, help="Cap on the global test set (and 1/5 of it per client)."
)
@click.option(
    "--rounds",
    default=5,
    show_default=True,
    help="Length of the run: server versions (virtual time), or local rounds per client (--wall-clock).",
)
@click.option(
    "--minutes",
    type=float,
    default=None,
    help="Wall-time limit of each run (default 60 on the wall clock, 480 on the virtual clock, where a run ends at "
    "--rounds or --virtual-budget); a run cut short by it is marked stopped_at_wall_limit in the report.",
)
@click.option(
    "--method",
    "methods",
    cls=MethodOption,
    default="fedhft",
    show_default=True,
    help="Comma-separated (one run each, same split and seed): {methods}.",
)
@click.option("--no-clustering", is_flag=True, help="fedhft ablation: one cluster.")
@click.option(
    "--no-planner",
    is_flag=True,
    help="fedhft ablation: every device gets the same depth and ranks, the deepest and largest the weakest holds.",
)
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--broker", default=None, help="Use this broker instead of starting one (mqtt://HOST:PORT).")
@click.option("--target-accuracy", type=float, default=None)
@click.option("--model", default=None, help="Local model directory (default: the packaged MiniLM).")
@click.option("--local-steps", default=10, show_default=True)
@click.option("--max-seq-len", default=64, show_default=True)
@click.option("--lr", default=2e-3, show_default=True)
@click.option(
    "--virtual-time/--wall-clock",
    default=True,
    show_default=True,
    help="Order arrivals by the devices' simulated clocks (deterministic, no sleeping), or by the host's clock.",
)
@click.option(
    "--mode",
    type=click.Choice(["async", "sync"]),
    default=None,
    help="Server aggregation: buffered asynchronous (FedBuff) or synchronous rounds. Default: sync for the "
    "synchronous baselines (fedavg-lora, hetlora, flexlora, fedavg-full), async otherwise.",
)
@click.option(
    "--round-deadline",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="--mode sync: virtual seconds a round waits for stragglers (default: the server's).",
)
@click.option(
    "--objective",
    type=click.Choice(OBJECTIVES),
    default=DEFAULT_OBJECTIVE,
    show_default=True,
    help="The LEGEND planner's objective for fedhft and its ablations (the baselines' planners are fixed): "
    + OBJECTIVE_HELP,
)
@click.option(
    "--buffer-size",
    type=click.IntRange(min=1),
    default=None,
    help="--mode async: updates per flush (FedBuff's K). Default: half the active fleet (at least 2).",
)
@click.option(
    "--server-lr",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="--mode async: the server learning rate of each flush (default: the server's, 1.0).",
)
@click.option(
    "--staleness-exponent",
    type=click.FloatRange(min=0),
    default=None,
    help="--mode async: an update tau versions old counts (1 + tau) ** -a (default 0.5).",
)
@click.option(
    "--max-rounds-per-version",
    type=click.IntRange(min=1),
    default=None,
    help="--mode async: a device trains at most N rounds from one model version, then waits for the next "
    "(default: no cap, a device that delivers trains again at once).",
)
@click.option(
    "--max-updates-per-flush",
    type=click.IntRange(min=1),
    default=None,
    help="Virtual time, --mode async: a device with N updates in the server's buffer waits for the flush before "
    "it trains again (default: no cap).",
)
@click.option(
    "--virtual-budget",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Virtual time: no round starts after this many simulated seconds.",
)
@click.option(
    "--virtual-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Virtual time: `fedhft server run --virtual-timeout` (wall seconds of fleet-wide silence before a "
    "promise that never comes expires); default: the server's, 30 under --chaos.",
)
@click.option(
    "--time-scale",
    default=0.02,
    show_default=True,
    help="--wall-clock: real seconds slept per simulated second.",
)
@click.option("--clusters", default=2, show_default=True)
@click.option("--seed", default=0, show_default=True, help="The first seed (see --seeds).")
@click.option("--seeds", "seeds_arg", default=None, help="N (seeds --seed ... --seed+N-1) or a list 0,1,2.")
@click.option(
    "--encoding",
    "encodings",
    default="fp16",
    show_default=True,
    help="The edges' upload encoding, comma-separated to compare (fp32, fp16, int8); runs other than fp16 are "
    "named METHOD+ENCODING.",
)
@click.option("--last-k", default=3, show_default=True, type=click.IntRange(min=1), help=LAST_K_HELP)
@click.option("--time-budget", type=click.FloatRange(min=0), default=None, help=BUDGET_HELP)
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
@click.option(
    "--hosts",
    type=click.IntRange(min=0),
    default=None,
    help="Edge processes: 0 = one `fedhft edge run` per device; N = N `fedhft edge host` processes sharing the "
    "devices and their loaded runtimes. Default: one per device up to 8 devices or under --chaos, else 2 hosts.",
)
def simulate(
    clients: int,
    profiles_arg: str,
    dataset: str,
    alpha: float,
    split: str,
    group_column: str | None,
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
    virtual_time: bool,
    mode: str | None,
    round_deadline: float | None,
    objective: str,
    buffer_size: int | None,
    server_lr: float | None,
    staleness_exponent: float | None,
    max_rounds_per_version: int | None,
    max_updates_per_flush: int | None,
    virtual_budget: float | None,
    virtual_timeout: float | None,
    time_scale: float,
    clusters: int,
    seed: int,
    seeds_arg: str | None,
    encodings: str,
    last_k: int,
    time_budget: float | None,
    backend: str,
    chaos: str | None,
    hosts: int | None,
) -> None:
    """The whole system on one machine: export, broker, server, N edge runtimes, evaluation, report."""
    from fedhft.simulate.config import SimConfig, SimulationError, host_count, parse_profile_mix
    from fedhft.simulate.methods import MethodError, method_spec
    from fedhft.simulate.report import load_report, table, write_report
    from fedhft.simulate.seeds import parse_encodings, parse_seeds, run_seeds

    if max_updates_per_flush and not virtual_time:
        raise SimulationError("--max-updates-per-flush needs virtual time: on the wall clock (--wall-clock) no edge "
                              "sees the server's buffer; use --max-rounds-per-version")  # fmt: skip
    mix = parse_profile_mix(profiles_arg)
    specs = [method_spec(m.strip(), no_clustering, no_planner) for m in methods.split(",") if m.strip()]
    if not specs:
        raise MethodError("--method names no method")
    seeds, encs = parse_seeds(seeds_arg, seed), parse_encodings(encodings)
    out.mkdir(parents=True, exist_ok=True)
    if chaos:
        from fedhft.simulate.chaos import ChaosSpec

        ChaosSpec.parse(chaos)  # a bad spec fails before anything runs
    base = SimConfig(
        clients=clients,
        profiles=mix,
        dataset=dataset,
        alpha=alpha,
        split=split,
        max_test=max_test,
        rounds=rounds,
        method=specs[0],
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
        virtual_time=virtual_time,
        mode=mode,
        round_deadline=round_deadline,
        objective=objective,
        buffer_size=buffer_size,
        server_lr=server_lr,
        staleness_exponent=staleness_exponent,
        rounds_per_version=max_rounds_per_version,
        updates_per_flush=max_updates_per_flush,
        virtual_budget=virtual_budget,
        virtual_timeout=virtual_timeout,
        clusters=clusters,
        backend=backend,
        last_k=last_k,
        time_budget=time_budget,
        group_column=group_column,
        hosts=hosts,
    )
    host_count(replace(base, chaos=chaos), clients)  # --hosts with --chaos fails before anything runs
    try:
        with raise_on_signals():  # a stop unwinds the run, which stops the processes it started
            results = run_seeds(base, specs, seeds, encs, chaos, progress=lambda line: click.echo(line, err=True))
    except StopRequested as stop:
        click.echo(f"stopped by {stop}: the simulation's broker, server and edges were stopped", err=True)
        sys.exit(128 + stop.signum)
    config = {
        "clients": clients,
        "profiles": mix,
        "dataset": dataset,
        "alpha": alpha,
        "split": split,
        "rounds": rounds,
        "local_steps": local_steps,
        "max_seq_len": max_seq_len,
        "seed": seeds[0],
        "seeds": seeds,
        "encodings": encs,
        "last_k": last_k,
        "time_budget": time_budget,
        "time_scale": None if virtual_time else time_scale,
        "virtual_time": virtual_time,
        "mode": mode,
        "round_deadline": round_deadline,
        "virtual_budget": virtual_budget,
        "chaos": chaos,
        "backend": backend,
        "hosts": hosts,
    }
    # FedBuff's knobs enter the configuration only when set, so reports from before them stay comparable
    asked = {"buffer_size": buffer_size, "server_lr": server_lr, "staleness_exponent": staleness_exponent,
             "max_rounds_per_version": max_rounds_per_version,
             "max_updates_per_flush": max_updates_per_flush}  # fmt: skip
    config |= {k: v for k, v in asked.items() if v is not None}
    if objective != DEFAULT_OBJECTIVE:  # likewise: reports from before the option read as capacity
        config["objective"] = objective
    path = write_report(out, results, config)
    click.echo(table(load_report(path)))
    click.echo(f"report: {path}")


@click.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--last-k", type=click.IntRange(min=1), default=None, help=LAST_K_HELP + " Default: the report's.")
@click.option("--time-budget", type=click.FloatRange(min=0), default=None, help=BUDGET_HELP + " Default: the report's.")
def report(out: Path, last_k: int | None, time_budget: float | None) -> None:
    """Print the comparison table of a simulation's report.json (re-read with another --last-k/--time-budget)."""
    from fedhft.simulate.report import load_report, reread, table

    click.echo(table(reread(load_report(out), last_k, time_budget)))
