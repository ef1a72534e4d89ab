"""Simulated time, as the server carries it for `fedhft simulate` (0 everywhere else).

A simulated device reports its clock in an update's metrics; the federation stamps the newest of a flush's
clocks into the models it publishes (that arithmetic is in federation.py). The server's part is here: read an
update's clock, and keep the latest version's clock in the state's meta across restarts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from fedhft.protocol import UpdateMessage

META_KEY = "virtual_time"


def virtual_time_of(metrics: Mapping[str, float]) -> float:
    """The simulated device clock an update reports (``metrics["virtual_time"]``), 0 when absent or invalid."""
    value = metrics.get(META_KEY, 0.0) if isinstance(metrics, Mapping) else 0.0
    try:
        value = float(value)
    except (TypeError, ValueError):
        return 0.0
    return value if math.isfinite(value) and value > 0 else 0.0


def sent_at(update: UpdateMessage) -> float:
    """The simulated clock of the device when it sent ``update`` (0 for a real device)."""
    return virtual_time_of(update.metrics)


def restored(meta: Mapping[str, str]) -> float:
    """The latest version's simulated time as the state's meta keeps it."""
    return float(meta.get(META_KEY, "0"))


def to_meta(virtual_time: float) -> dict[str, str]:
    """The meta entry that keeps a version's simulated time."""
    return {META_KEY: repr(virtual_time)}
