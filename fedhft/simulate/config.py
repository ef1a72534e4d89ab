"""What one simulation run is told (`fedhft simulate`): SimConfig, and the --profiles mix it parses."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from fedhft.errors import FedHFTError
from fedhft.simulate.methods import MethodSpec

DEFAULT_ENCODING = "fp16"  # `fedhft edge run`'s default


class SimulationError(FedHFTError):
    """The simulation cannot run."""


MODES = ("async", "sync")


@dataclass
class SimConfig:
    clients: int
    profiles: dict[str, int]
    dataset: str
    alpha: float
    rounds: int
    method: MethodSpec
    out: Path
    model: str | None = None
    broker: str | None = None
    target_accuracy: float | None = None
    minutes: float | None = None
    seed: int = 0
    local_steps: int = 10
    max_seq_len: int = 64
    learning_rate: float = 2e-3
    time_scale: float = 0.0  # wall clock only: real seconds slept per simulated second
    virtual_time: bool = True  # order the fleet by its devices' clocks (server and edges --virtual-time)
    mode: str | None = None  # "async" | "sync"; None: the method's own (sync for synchronous baselines)
    round_deadline: float | None = None  # sync: virtual seconds a round waits for stragglers (server's default)
    objective: str = "capacity"  # the LEGEND planner's objective (capacity | memory) for fedhft-type methods
    buffer_size: int | None = None  # async: updates per flush (FedBuff's K); None: half the active fleet
    server_lr: float | None = None  # async: FedBuff server learning rate; None: the server's (1.0)
    staleness_exponent: float | None = None  # async: (1 + tau) ** -a; None: 0.5 (0 under sync)
    rounds_per_version: int | None = None  # async: a device's rounds from one version; None: no cap
    updates_per_flush: int | None = None  # virtual time, async: a device's updates in one buffer; None: no cap
    virtual_budget: float | None = None  # virtual time: no round starts at or after this many virtual seconds
    virtual_timeout: float | None = None  # virtual time: the server's --virtual-timeout (its default when None)
    clusters: int = 2
    split: str = "dirichlet"  # "dirichlet" (label skew by alpha) | "natural" (the data set's groups)
    chaos: str | None = None  # a fault spec (fedhft.simulate.chaos): the run is named <method>+chaos
    backend: str = "auto"  # "auto": each profile's own runtime (ORT, else the native ExecuTorch trainer) | "ort"
    max_test: int | None = 1000  # global test cap; each client's test split is capped at a fifth of it
    encoding: str = DEFAULT_ENCODING  # the edges' upload encoding (`fedhft edge run --encoding`); others name the run
    last_k: int = 3  # final figures: mean over the last k global versions
    time_budget: float | None = None  # virtual seconds: also report the newest version at or before it
    hosts: int | None = None  # edge processes: 0 one per device, N `fedhft edge host` processes; None: host_count
    group_column: str | None = None  # a user file's column whose values are the natural groups (--split natural)
    cache_dir: Path = field(
        default_factory=lambda: Path(os.environ.get("FEDHFT_CACHE", Path.home() / ".cache" / "fedhft"))
    )

    @property
    def label(self) -> str:
        """The run's name in the report: the method, then +ENCODING unless fp16, then +chaos."""
        enc = "" if self.encoding == DEFAULT_ENCODING else f"+{self.encoding}"
        return self.method.name + enc + ("+chaos" if self.chaos else "")


def run_mode(cfg: SimConfig) -> str:
    """The server's aggregation mode: --mode, else sync for a synchronous baseline and async for the rest."""
    if cfg.mode is not None and cfg.mode not in MODES:
        raise SimulationError(f"--mode must be one of {MODES}, got {cfg.mode!r}")
    return cfg.mode or ("sync" if cfg.method.synchronous else "async")


PER_PROCESS_MAX = 8  # fleets up to this size run one process per device by default
DEFAULT_HOSTS = 2  # larger ones: this many `fedhft edge host` processes


def host_count(cfg: SimConfig, devices: int) -> int:
    """How many `fedhft edge host` processes run the devices; 0: one `fedhft edge run` process per device (the
    default up to PER_PROCESS_MAX devices and under --chaos, which kills and restarts single devices)."""
    if cfg.hosts is not None:
        if cfg.hosts < 0:
            raise SimulationError(f"--hosts must be >= 0, got {cfg.hosts}")
        if cfg.hosts and cfg.chaos:
            raise SimulationError("--chaos kills single device processes: run it without --hosts (or --hosts 0)")
        return min(cfg.hosts, devices)
    return 0 if cfg.chaos or devices <= PER_PROCESS_MAX else DEFAULT_HOSTS


def parse_profile_mix(text: str) -> dict[str, int]:
    """'rpi4-4gb:4,laptop-x86-16gb:2' -> {name: count}."""
    mix: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, count = part.partition(":")
        try:
            mix[name] = mix.get(name, 0) + (int(count) if count else 1)
        except ValueError as e:
            raise SimulationError(f"--profiles: '{part}' is not NAME:COUNT") from e
    if not mix:
        raise SimulationError("--profiles is empty")
    return mix
