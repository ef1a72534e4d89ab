"""Training waits while the battery is low (`fedhft edge run --battery-min-percent`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from fedhft.logs import event

log = logging.getLogger("fedhft.edge_runtime.client")  # the edge client's log, whichever part of it speaks
BatteryReader = Callable[[], float | None]
POWER_SUPPLY = Path("/sys/class/power_supply")


def read_battery_percent(root: Path = POWER_SUPPLY) -> float | None:
    """Lowest capacity (%) of the Linux batteries under ``root``; None when there is no battery."""
    levels: list[float] = []
    if not root.is_dir():
        return None
    for supply in root.iterdir():
        try:
            if (supply / "type").read_text().strip() != "Battery":
                continue
            levels.append(float((supply / "capacity").read_text().strip()))
        except (OSError, ValueError):
            continue
    return min(levels) if levels else None


class BatteryGate:
    """Says whether a round may start: yes without a limit or a battery; after a low reading, no until the
    next check ``check_seconds`` later."""

    def __init__(self, reader: BatteryReader | None, min_percent: float | None, check_seconds: float) -> None:
        self.reader = reader
        self.min_percent = min_percent
        self.check_seconds = check_seconds
        self._next_check = 0.0

    def ok(self) -> bool:
        limit = self.min_percent
        if limit is None or self.reader is None:
            return True
        now = time.monotonic()
        if now < self._next_check:
            return False
        level = self.reader()
        if level is None or level >= limit:
            return True
        self._next_check = now + self.check_seconds
        event(log, "battery low: training postponed", logging.WARNING, battery=level, minimum=limit)
        return False
