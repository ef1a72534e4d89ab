"""When a buffer of updates becomes a new version: FedBuff's K/W rule and FedHFT's synchronous rounds.

Pure functions of counts and times, for either clock: the coordinator feeds them wall seconds, the virtual
clock (virtual_clock.py) a simulated fleet's seconds.
- async (FedBuff): flush when ``buffer_size`` updates are buffered, or ``window`` seconds after the oldest one.
- sync (rounds): flush when every expected device of the round has delivered, or ``round_deadline`` seconds
  after the round started (None: no deadline, the round waits for everyone).

Two caps on what one device contributes (async on the virtual clock, 0: no cap); a device at either waits for
the next flush instead of training again:
- ``rounds_per_version``: updates trained from the current version (an older update landing after a flush does
  not count, so a fast device can still put an older and a current update into one buffer);
- ``updates_per_flush``: updates in the current buffer, whatever version they were trained from.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

from fedhft.broker_server.aggregation import should_aggregate
from fedhft.errors import FedHFTError

MODES = ("async", "sync")


class FlushRuleError(FedHFTError):
    """A flush setting that cannot work."""


@dataclass(frozen=True)
class FlushRule:
    """The mode and its thresholds (``--mode``, ``--buffer-size``, ``--window-seconds``, ``--round-deadline``,
    ``--max-rounds-per-version``, ``--max-updates-per-flush``)."""

    mode: str = "async"
    buffer_size: int = 8
    window: float = 30.0
    round_deadline: float | None = None
    rounds_per_version: int = 0
    updates_per_flush: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise FlushRuleError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.buffer_size < 1:
            raise FlushRuleError(f"buffer size must be >= 1, got {self.buffer_size}")
        if not (math.isfinite(self.window) and self.window > 0):
            raise FlushRuleError(f"window must be > 0 seconds, got {self.window}")
        if self.round_deadline is not None and not (math.isfinite(self.round_deadline) and self.round_deadline > 0):
            raise FlushRuleError(f"round deadline must be > 0 seconds, got {self.round_deadline}")
        if self.rounds_per_version < 0:
            raise FlushRuleError(f"rounds per version must be >= 0 (0: no cap), got {self.rounds_per_version}")
        if self.updates_per_flush < 0:
            raise FlushRuleError(f"updates per flush must be >= 0 (0: no cap), got {self.updates_per_flush}")

    @property
    def sync(self) -> bool:
        return self.mode == "sync"

    # ---- async (FedBuff) --------------------------------------------------------------------------------
    def buffer_due(self, buffered: int, oldest_at: float | None, now: float) -> bool:
        """FedBuff: ``buffer_size`` updates buffered, or the oldest (buffered at ``oldest_at``) waited the window."""
        age = None if oldest_at is None else now - oldest_at
        return should_aggregate(buffered, self.buffer_size, age, self.window)

    def window_closes_at(self, oldest_at: float | None) -> float | None:
        """When the window of the oldest buffered update expires (None with nothing buffered)."""
        return None if oldest_at is None else oldest_at + self.window

    def waits_for_flush(self, rounds_on_version: int, in_buffer: int = 0) -> bool:
        """Async: a device that has delivered ``rounds_on_version`` updates trained from the current version, and
        has ``in_buffer`` updates in the buffer, waits for the next flush (True) or trains again at once (False)."""
        if self.sync:
            return False
        return 0 < self.rounds_per_version <= rounds_on_version or 0 < self.updates_per_flush <= in_buffer

    # ---- sync (rounds) ----------------------------------------------------------------------------------
    def round_due(
        self, expected: Collection[str], delivered: Collection[str], buffered: int, round_start: float, now: float
    ) -> bool:
        """A round ends with something buffered once every expected device delivered or its deadline passed."""
        if buffered < 1:
            return False
        closes = self.round_closes_at(round_start)
        return set(expected) <= set(delivered) or (closes is not None and now >= closes)

    def round_closes_at(self, round_start: float) -> float | None:
        """The round's deadline (None: it waits for every expected device)."""
        return None if self.round_deadline is None else round_start + self.round_deadline
