"""Simulated device time for `fedhft simulate`: what a round would take on the device the profile describes.

A round costs the model download + steps x the planned step time + the update upload, at the profile's link
speeds (:class:`DeviceTimes`, pure arithmetic; bytes as sent in fp16, indices as int32). Two clocks use it:
the virtual-time rounds of virtual_rounds.py (`fedhft edge run --virtual-time`: no sleeping, the server orders
updates by these times), and the scaled clock :class:`SimClock` (`--sim-time-scale S`), which starts each round
at max(its own clock, the model's simulated time) and sleeps S x the round's duration so that fast devices
still finish first on one machine.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedhft.protocol import ModelMessage
from fedhft.protocol.manifest import Manifest
from fedhft.protocol.tensor_names import is_rows_name

WIRE_BYTES_PER_VALUE = 2  # fp16 encoding
INDEX_BYTES = 4  # row indices travel as int32


def _bytes(size: int, integer: bool) -> int:
    return size * (INDEX_BYTES if integer else WIRE_BYTES_PER_VALUE)


def payload_bytes(tensors: Mapping[str, np.ndarray]) -> int:
    """Bytes of ``tensors`` on the wire, as the simulated links count them."""
    return int(sum(_bytes(t.size, t.dtype.kind in "iu") for t in tensors.values()))


def planned_payload_bytes(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """:func:`payload_bytes` of an update not trained yet, from its exact shapes (``spec.update_shapes()``)."""
    return int(sum(_bytes(int(np.prod(s, dtype=np.int64)), is_rows_name(n)) for n, s in shapes.items()))


@dataclass(frozen=True)
class DeviceTimes:
    """A profile's planned step time and link speeds: the duration of a round."""

    step_seconds: float
    uplink_mbps: float
    downlink_mbps: float

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> DeviceTimes:
        est = manifest.plan["estimate"]
        return cls(
            float(est["step_seconds"]), float(manifest.profile["uplink_mbps"]), float(manifest.profile["downlink_mbps"])
        )

    def download_seconds(self, nbytes: int) -> float:
        return nbytes * 8 / (self.downlink_mbps * 1e6)

    def upload_seconds(self, nbytes: int) -> float:
        return nbytes * 8 / (self.uplink_mbps * 1e6)

    def round_seconds(self, model_bytes: int, steps: int, update_bytes: int) -> float:
        """Download the model, train ``steps`` steps, upload the update."""
        return self.download_seconds(model_bytes) + steps * self.step_seconds + self.upload_seconds(update_bytes)


@dataclass
class SimClock:
    """The scaled :class:`~fedhft.edge_runtime.clock.RoundClock` of a simulated device (`--sim-time-scale`)."""

    times: DeviceTimes
    scale: float  # real seconds slept per simulated second
    now: float = 0.0

    @classmethod
    def from_manifest(cls, manifest: Manifest, scale: float) -> SimClock:
        return cls(DeviceTimes.from_manifest(manifest), scale)

    payload_bytes = staticmethod(payload_bytes)

    def round(
        self, model: ModelMessage, steps: int, update: Mapping[str, np.ndarray], started: float
    ) -> dict[str, float]:
        """Advance the clock by one round, sleep the scaled remainder, return the update's time metrics."""
        meta = model.meta if isinstance(model.meta, Mapping) else {}
        start = max(self.now, float(meta.get("virtual_time", 0.0)))
        duration = self.times.round_seconds(payload_bytes(model.tensors), steps, payload_bytes(update))
        self.now = start + duration
        remaining = self.scale * duration - (time.monotonic() - started)
        if remaining > 0:
            time.sleep(remaining)
        return {"virtual_time": round(self.now, 4), "virtual_duration": round(duration, 4)}
