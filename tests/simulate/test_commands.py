"""The command lines `fedhft simulate` starts its server and edges with: virtual time by default, the mode and
deadline passed to the server, the run's length as server versions; the wall clock's scaled sleeps on request."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fedhft.simulate.commands import edge_command, server_command
from fedhft.simulate.config import SimConfig, SimulationError, run_mode
from fedhft.simulate.data import ClientSplit
from fedhft.simulate.methods import method_spec


def _cfg(method: str = "fedhft", **kw: object) -> SimConfig:
    cfg = SimConfig(4, {"p": 4}, "d", 0.3, 5, method_spec(method), Path("out"))
    return replace(cfg, **kw)  # type: ignore[arg-type]


def _server(cfg: SimConfig) -> list[str]:
    return server_command(cfg, "mqtt://h:1", "t", Path("s"), Path("m.json"), 4)


def _edge(cfg: SimConfig) -> list[str]:
    p = Path("x")
    client = ClientSplit(2, np.arange(3), np.arange(1))
    return edge_command(cfg, p, p, p, "mqtt://h:1", "t", "c002", p, p, "0,1", client)


def _opt(cmd: list[str], name: str) -> str | None:
    return cmd[cmd.index(name) + 1] if name in cmd else None


def test_virtual_time_is_the_default_and_rounds_count_server_versions() -> None:
    server, edge = _server(_cfg()), _edge(_cfg())
    assert "--virtual-time" in server and _opt(server, "--mode") == "async" and "--round-deadline" not in server
    assert _opt(server, "--virtual-fleet") == "4" and "--virtual-timeout" not in server  # the server's default
    assert _opt(_server(_cfg(chaos="default")), "--virtual-timeout") == "30.0"  # killed devices expire sooner
    assert "--virtual-time" in edge and "--sim-time-scale" not in edge
    assert (_opt(edge, "--rounds"), _opt(edge, "--until-version"), _opt(edge, "--until-time")) == ("0", "5", None)


def test_mode_deadline_budget_and_timeout_reach_server_and_edges() -> None:
    cfg = _cfg("fedhft", mode="sync", round_deadline=120.0, virtual_budget=900.0, virtual_timeout=30.0)
    server, edge = _server(cfg), _edge(cfg)
    assert (_opt(server, "--mode"), _opt(server, "--round-deadline"), _opt(server, "--virtual-timeout")) == (
        "sync",
        "120.0",
        "30.0",
    )
    assert _opt(server, "--buffer-size") == "4" and _opt(edge, "--until-time") == "900.0"
    assert run_mode(_cfg("fedavg-lora")) == "sync" and run_mode(_cfg("fedhft")) == "async"
    with pytest.raises(SimulationError, match="--mode"):
        run_mode(_cfg(mode="sometimes"))


def test_the_wall_clock_keeps_scaled_sleeps_and_one_round_per_version_for_sync() -> None:
    sync = _cfg("fedavg-lora", virtual_time=False, time_scale=0.02)
    server, edge = _server(sync), _edge(sync)
    assert "--virtual-time" not in server and "--mode" not in server  # a server without virtual time runs it
    assert (_opt(edge, "--rounds"), _opt(edge, "--sim-time-scale"), _opt(edge, "--max-rounds-per-version")) == (
        "5",
        "0.02",
        "1",
    )
    assert "--max-rounds-per-version" not in _edge(_cfg(virtual_time=False))  # async: keep training


def test_fedbuff_knobs_reach_the_async_server_and_sync_ignores_them() -> None:
    default = _server(_cfg())
    assert (_opt(default, "--buffer-size"), _opt(default, "--staleness-exponent")) == ("2", "0.5")
    assert "--server-lr" not in default  # the server's own default
    tuned = _server(_cfg(buffer_size=3, server_lr=0.5, staleness_exponent=1.0))
    assert (_opt(tuned, "--buffer-size"), _opt(tuned, "--server-lr"), _opt(tuned, "--staleness-exponent")) == (
        "3",
        "0.5",
        "1.0",
    )
    sync = _server(_cfg(mode="sync", buffer_size=3, server_lr=0.5, staleness_exponent=1.0))
    assert (_opt(sync, "--buffer-size"), _opt(sync, "--staleness-exponent"), "--server-lr" in sync) == (
        "4",
        "0.0",
        False,
    )


def test_a_rounds_per_version_cap_goes_to_the_virtual_server_or_to_each_wall_clock_edge() -> None:
    capped = _cfg(rounds_per_version=1)
    assert _opt(_server(capped), "--max-rounds-per-version") == "1"  # the server schedules on the virtual clock
    assert "--max-rounds-per-version" not in _edge(capped)
    assert "--max-rounds-per-version" not in _server(_cfg())  # no cap by default
    assert "--max-rounds-per-version" not in _server(replace(capped, mode="sync"))  # rounds cap themselves
    wall = replace(capped, virtual_time=False, time_scale=0.02)
    assert "--max-rounds-per-version" not in _server(wall) and _opt(_edge(wall), "--max-rounds-per-version") == "1"


def test_a_per_flush_cap_goes_to_the_virtual_async_server_only() -> None:
    capped = _cfg(updates_per_flush=1)
    assert _opt(_server(capped), "--max-updates-per-flush") == "1" and "--max-updates-per-flush" not in _edge(capped)
    assert "--max-updates-per-flush" not in _server(replace(capped, mode="sync"))
