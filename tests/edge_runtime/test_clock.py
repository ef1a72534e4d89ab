"""The round clock is picked once: the wall clock on a device, the profile's simulated clock under simulation."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from fedhft.edge_runtime.clock import WallClock, round_clock
from fedhft.edge_runtime.sim_clock import SimClock
from fedhft.protocol import ModelMessage
from fedhft.protocol.manifest import load_manifest


def model(virtual_time: float | None) -> ModelMessage:
    meta = {} if virtual_time is None else {"virtual_time": virtual_time}
    return ModelMessage("t", 1, "client/c1", time.time(), "", meta, {"w": np.zeros((4, 4), np.float32)})


def test_wall_clock_reports_nothing_and_simulated_clock_follows_the_model(tiny_export: Path) -> None:
    manifest = load_manifest(tiny_export)
    update = {"w": np.zeros((4, 4), np.float32)}
    wall = round_clock(manifest, 0.0)
    assert isinstance(wall, WallClock) and wall.round(model(5.0), 3, update, time.monotonic()) == {}
    sim = round_clock(manifest, 1e-9)
    assert isinstance(sim, SimClock) and sim.scale == 1e-9
    first = sim.round(model(None), 3, update, time.monotonic())
    assert first["virtual_time"] == first["virtual_duration"] > 0
    later = sim.round(model(100.0), 3, update, time.monotonic())  # starts at the model's simulated time
    assert later["virtual_time"] == round(100.0 + later["virtual_duration"], 4)
