"""The clock a device's rounds run on: real time on a real device, a simulated one under `fedhft simulate`.

A :class:`RoundClock` is told when a round's update is ready and returns the time metrics that go into the
update. On a device (:class:`WallClock`) that is nothing: rounds take the time they take. `fedhft edge run
--sim-time-scale S` (S > 0) picks the scaled simulated clock of sim_clock.py once, at start-up
(:func:`round_clock`). `--virtual-time` rounds do not use a RoundClock: they are scheduled by the server and
timed before training (virtual_rounds.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np

from fedhft.protocol import ModelMessage
from fedhft.protocol.manifest import Manifest


class RoundClock(Protocol):
    def round(
        self, model: ModelMessage, steps: int, update: Mapping[str, np.ndarray], started: float
    ) -> dict[str, float]:
        """One round on ``model`` ended (begun at monotonic time ``started``); the update's time metrics."""
        ...


class WallClock:
    """A real device's: the round took what it took, and the update reports no simulated time."""

    def round(
        self, model: ModelMessage, steps: int, update: Mapping[str, np.ndarray], started: float
    ) -> dict[str, float]:
        return {}


def round_clock(manifest: Manifest, sim_time_scale: float) -> RoundClock:
    """The wall clock, or with ``sim_time_scale`` > 0 the simulated clock of the manifest's device profile."""
    if sim_time_scale <= 0:
        return WallClock()
    from fedhft.edge_runtime.sim_clock import SimClock

    return SimClock.from_manifest(manifest, sim_time_scale)
