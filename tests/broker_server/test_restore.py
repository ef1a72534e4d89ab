"""Decoding stored updates again (restore, the aggregator's feed): what is unreadable is lost, never the state."""

from __future__ import annotations

import pytest

from fedhft.broker_server.restore import decode_pending
from fedhft.broker_server.state_dir import StateError, StateLost, SteppedDown
from fedhft.broker_server.state_schema import StoredUpdate
from tests.broker_server.test_fedbuff import SPEC


class Store:
    """load_payload raises ``exc`` (a store whose database is gone, or whose update's payload is)."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def load_payload(self, _stored: StoredUpdate) -> bytes:
        raise self.exc


ROW = StoredUpdate(7, "a", 1, 0, 10, 0.5, 0.0, None, 1.0)


def test_an_unreadable_payload_is_reported_lost() -> None:
    pending, lost = decode_pending(Store(StateError("update a/1 has no stored payload")), SPEC, [ROW])  # type: ignore[arg-type]
    assert (pending, lost) == ([], [7])


@pytest.mark.parametrize("exc", [StateLost("no database"), SteppedDown("another server took the lock")])
def test_a_lost_state_propagates_and_marks_nothing_lost(exc: StateLost) -> None:
    """A server that must step down while reading pending updates must stop: taken as "cannot be read", the
    update would be marked rejected and the server would go on beside the one that took over."""
    with pytest.raises(type(exc)):
        decode_pending(Store(exc), SPEC, [ROW])  # type: ignore[arg-type]
