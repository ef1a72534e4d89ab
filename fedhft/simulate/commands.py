"""The command lines a simulation starts its server and its edge runtimes with (`fedhft server run`,
`fedhft edge run`): each part runs as its own process, as in a real deployment."""

from __future__ import annotations

import sys
from pathlib import Path

from fedhft.simulate.config import SimConfig
from fedhft.simulate.data import ClientSplit


def fedhft_cli() -> list[str]:
    """The `fedhft` command of this interpreter."""
    return [sys.executable, "-m", "fedhft.cli"]


def server_command(cfg: SimConfig, url: str, task: str, state: Path, manifest: Path, n_active: int) -> list[str]:
    m = cfg.method
    buffer = n_active if m.synchronous else max(2, n_active // 2)
    window = 3600.0 if m.synchronous else 20.0
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
        "0" if m.synchronous else "0.5",
        "--seed",
        str(cfg.seed),
        "--aggregator",
        m.aggregator,
        *m.server_args,
    ]


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
    cmd = [
        *fedhft_cli(),
        "edge",
        "run",
        "--artifacts",
        str(package),
        "--data",
        str(train),
        "--broker",
        url,
        "--task",
        task,
        "--client-id",
        cid,
        "--state-dir",
        str(cdir / "state"),
        "--server-key",
        str(pub),
        "--rounds",
        str(cfg.rounds),
        "--local-steps",
        str(cfg.local_steps),
        "--lr",
        str(cfg.method.learning_rate or cfg.learning_rate),
        "--seed",
        str(cfg.seed + client.client),
        "--labels",
        label_arg,
        "--eval-data",
        str(test),
        "--sim-time-scale",
        str(cfg.time_scale),
        "--encoding",
        cfg.encoding,
        "--ack-timeout",  # a simulated fleet runs minutes, not days: re-send an unacknowledged update sooner
        "20",
    ]
    if not cfg.method.mask and cfg.method.planner != "full":
        cmd += ["--mask-ratio", "1.0"]
    return cmd
