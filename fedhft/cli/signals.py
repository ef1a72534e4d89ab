"""SIGTERM and SIGINT as a stop request: long-running commands finish their step and exit cleanly.

Two shapes: :func:`stop_on_signals` sets an event that a command's loop polls (server, broker, edges);
:func:`raise_on_signals` raises :class:`StopRequested` in the main thread, so a command that owns child
processes (``fedhft simulate``) unwinds through its ``finally`` blocks and stops them instead of leaving them.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequested(BaseException):  # noqa: N818 - like KeyboardInterrupt, not an error: no `except Exception` eats it
    """SIGTERM or SIGINT arrived; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An event that SIGTERM/SIGINT set while the block runs; the previous handlers come back after it."""
    stop = threading.Event()

    def handler(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextmanager
def raise_on_signals() -> Iterator[None]:
    """The first SIGTERM/SIGINT while the block runs raises StopRequested in the main thread; later ones are
    ignored while the block's cleanup runs (SIGKILL still ends it). The previous handlers come back after it.
    Outside the main thread (e.g. a command invoked from a test's thread) it changes nothing."""
    raised = False

    def handler(signum: int, _frame: FrameType | None) -> None:
        nonlocal raised
        if not raised:
            raised = True
            raise StopRequested(signum)

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
