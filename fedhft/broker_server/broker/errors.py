"""The broker package's error."""

from __future__ import annotations

from fedhft.errors import FedHFTError


class BrokerError(FedHFTError):
    """The broker cannot be started or configured."""
