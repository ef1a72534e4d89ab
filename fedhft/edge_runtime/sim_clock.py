"""Simulated device time for `fedhft simulate`: what a round would take on the device the profile describes.

A round costs the planned step time x steps, plus the model download and the update upload at the profile's
link speeds. The device clock starts each round at max(its own clock, the model's simulated time) and the
runtime sleeps `scale` x that duration (minus the real time already spent), so that on one machine fast
devices still finish first and stragglers exist as on a real fleet.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedhft.protocol import ModelMessage
from fedhft.protocol.manifest import Manifest

WIRE_BYTES_PER_VALUE = 2  # fp16 encoding


@dataclass
class SimClock:
    """The :class:`~fedhft.edge_runtime.clock.RoundClock` of a simulated device (clock.round_clock picks it)."""

    step_seconds: float
    uplink_mbps: float
    downlink_mbps: float
    scale: float  # real seconds slept per simulated second
    now: float = 0.0

    @classmethod
    def from_manifest(cls, manifest: Manifest, scale: float) -> SimClock:
        est = manifest.plan["estimate"]
        return cls(
            float(est["step_seconds"]),
            float(manifest.profile["uplink_mbps"]),
            float(manifest.profile["downlink_mbps"]),
            scale,
        )

    @staticmethod
    def payload_bytes(tensors: Mapping[str, np.ndarray]) -> int:
        return int(sum(t.size * (4 if t.dtype.kind in "iu" else WIRE_BYTES_PER_VALUE) for t in tensors.values()))

    def round(
        self, model: ModelMessage, steps: int, update: Mapping[str, np.ndarray], started: float
    ) -> dict[str, float]:
        """Advance the clock by one round, sleep the scaled remainder, return the update's time metrics."""
        meta = model.meta if isinstance(model.meta, Mapping) else {}
        start = max(self.now, float(meta.get("virtual_time", 0.0)))
        down = self.payload_bytes(model.tensors) * 8 / (self.downlink_mbps * 1e6)
        up = self.payload_bytes(update) * 8 / (self.uplink_mbps * 1e6)
        duration = steps * self.step_seconds + down + up
        self.now = start + duration
        remaining = self.scale * duration - (time.monotonic() - started)
        if remaining > 0:
            time.sleep(remaining)
        return {"virtual_time": round(self.now, 4), "virtual_duration": round(duration, 4)}
