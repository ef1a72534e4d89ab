"""raise_on_signals: the first SIGTERM/SIGINT raises StopRequested in the main thread, the cleanup it unwinds
through is not interrupted by a second one, and the previous handlers come back."""

from __future__ import annotations

import os
import signal

import pytest

from fedhft.cli.signals import StopRequested, raise_on_signals


def test_the_first_sigterm_raises_and_a_second_is_ignored_during_cleanup() -> None:
    before = signal.getsignal(signal.SIGTERM)
    cleaned = []
    with pytest.raises(StopRequested) as caught:
        with raise_on_signals():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                signal.sigtimedwait([], 0.1)  # let the handler run here, if it has not already
                pytest.fail("no StopRequested")
            finally:
                os.kill(os.getpid(), signal.SIGTERM)  # a second signal during the cleanup changes nothing
                cleaned.append(True)
    assert caught.value.signum == signal.SIGTERM and str(caught.value) == "SIGTERM"
    assert cleaned == [True]
    assert signal.getsignal(signal.SIGTERM) is before


def test_sigint_raises_too_and_nothing_is_caught_as_an_ordinary_error() -> None:
    with pytest.raises(StopRequested) as caught:
        with raise_on_signals():
            try:
                os.kill(os.getpid(), signal.SIGINT)
                signal.sigtimedwait([], 0.1)
            except Exception:  # noqa: BLE001 - what a command's broad handlers do must not swallow a stop
                pytest.fail("a stop was caught as an Exception")
    assert caught.value.signum == signal.SIGINT
