"""The command lines a simulation starts its server and its edge runtimes with (`fedhft server run`,
`fedhft edge run`): each part runs as its own process, as in a real deployment.

Under virtual time (the default) both run with --virtual-time: the server schedules rounds by the devices'
clocks and aggregates in --mode async|sync; each edge stops once it is scheduled from version --rounds (the
run's length in server versions) or at the --virtual-budget. On the wall clock (`--wall-clock`) edges sleep
--time-scale x their simulated round time and each trains --rounds rounds.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fedhft.edge_runtime.device_file import option_args
from fedhft.simulate.config import SimConfig, run_mode
from fedhft.simulate.data import ClientSplit


def fedhft_cli() -> list[str]:
    """The `fedhft` command of this interpreter."""
    return [sys.executable, "-m", "fedhft.cli"]


def server_command(cfg: SimConfig, url: str, task: str, state: Path, manifest: Path, n_active: int) -> list[str]:
    m = cfg.method
    sync = run_mode(cfg) == "sync"
    virtual = cfg.virtual_time and not sync  # the server applies the per-device caps on the virtual clock
    buffer = n_active if sync else cfg.buffer_size or max(2, n_active // 2)
    exponent = 0.0 if sync else (0.5 if cfg.staleness_exponent is None else cfg.staleness_exponent)
    window = 3600.0 if sync else 20.0
    return [
        *fedhft_cli(),
        "server",
        "run",
        "--broker",
        url,
        "--task",
        task,
        "--state",
        str(state),
        "--manifest",
        str(manifest),
        "--buffer-size",
        str(buffer),
        "--window-seconds",
        str(window),
        "--clusters",
        str(cfg.clusters if m.clustering else 1),
        "--warmup-aggregations",
        "2",
        "--staleness-exponent",
        str(exponent),
        *(["--server-lr", str(cfg.server_lr)] if cfg.server_lr is not None and not sync else []),
        *(["--max-rounds-per-version", str(cfg.rounds_per_version)] if cfg.rounds_per_version and virtual else []),
        *(["--max-updates-per-flush", str(cfg.updates_per_flush)] if cfg.updates_per_flush and virtual else []),
        "--seed",
        str(cfg.seed),
        "--aggregator",
        m.aggregator,
        *_clock_args(cfg, n_active),
        *m.server_args,
    ]


CHAOS_VIRTUAL_TIMEOUT = 30.0  # wall seconds of fleet-wide silence before a killed device's promise expires


def _clock_args(cfg: SimConfig, n_active: int) -> list[str]:
    """The server's virtual-time and mode options (on the wall clock only an explicit --mode). The first round
    waits for the whole fleet's hello; under chaos a killed device's promise expires sooner than by default."""
    args = ["--mode", run_mode(cfg)] if cfg.virtual_time or cfg.mode else []
    if cfg.virtual_time:
        args += ["--virtual-time", "--virtual-fleet", str(n_active)]
        timeout = cfg.virtual_timeout or (CHAOS_VIRTUAL_TIMEOUT if cfg.chaos else None)
        if timeout is not None:
            args += ["--virtual-timeout", str(timeout)]
    if cfg.round_deadline is not None:
        args += ["--round-deadline", str(cfg.round_deadline)]
    return args


def edge_command(
    cfg: SimConfig,
    package: Path,
    train: Path,
    test: Path,
    url: str,
    task: str,
    cid: str,
    cdir: Path,
    pub: Path,
    label_arg: str,
    client: ClientSplit,
) -> list[str]:
    """`fedhft edge run` for one device (its options: :func:`edge_options`)."""
    return edge_command_of(edge_options(cfg, package, train, test, url, task, cid, cdir, pub, label_arg, client))


def edge_command_of(options: dict[str, object]) -> list[str]:
    """`fedhft edge run` with these options (by name)."""
    return [*fedhft_cli(), "edge", "run", *option_args(options)]


def host_command(devices: Path) -> list[str]:
    """`fedhft edge host` for the devices file ``devices`` (each device's table: :func:`edge_options`)."""
    return [*fedhft_cli(), "edge", "host", "--devices", str(devices)]


def edge_options(
    cfg: SimConfig,
    package: Path,
    train: Path,
    test: Path,
    url: str,
    task: str,
    cid: str,
    cdir: Path,
    pub: Path,
    label_arg: str,
    client: ClientSplit,
) -> dict[str, object]:
    """One device's `fedhft edge run` options, by name (a flag is True)."""
    opts: dict[str, object] = {
        "artifacts": str(package),
        "data": str(train),
        "broker": url,
        "task": task,
        "client-id": cid,
        "state-dir": str(cdir / "state"),
        "server-key": str(pub),
        "local-steps": cfg.local_steps,
        "lr": cfg.method.learning_rate or cfg.learning_rate,
        "seed": cfg.seed + client.client,
        "labels": label_arg,
        "eval-data": str(test),
        "encoding": cfg.encoding,
        "ack-timeout": "60" if cfg.virtual_time else "20",  # minutes, not days: re-send an unacked update sooner
    }
    if cfg.virtual_time:  # rounds when scheduled, until the run's last version or its virtual budget
        opts |= {"virtual-time": True, "rounds": 0, "until-version": cfg.rounds or None}
        opts["until-time"] = cfg.virtual_budget or None
    else:
        opts |= {"rounds": cfg.rounds, "sim-time-scale": cfg.time_scale}
        if run_mode(cfg) == "sync":  # one update per client and round: no second round on the same model
            opts["max-rounds-per-version"] = 1
        elif cfg.rounds_per_version:  # on the wall clock each edge caps its own rounds
            opts["max-rounds-per-version"] = cfg.rounds_per_version
    if not cfg.method.mask and cfg.method.planner != "full":
        opts["mask-ratio"] = "1.0"
    return opts
