"""A bounded on-disk queue of encoded updates waiting for the server's ack.

One file per update, ``<seq, 20 digits>.update``, holding the exact bytes that are (re)published: a resend
after a crash or a lost ack reuses the same seq and the same bytes. A file is written atomically before
the update is first published and deleted only when an ack settles it. When the queue holds more than
``limit`` updates the oldest are dropped, with a warning.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from pathlib import Path

from fedhft.atomic import fsync_dir, write_atomic
from fedhft.edge_runtime.state import StateError, remove_stale_temps
from fedhft.logs import event

log = logging.getLogger(__name__)
SUFFIX = ".update"
_NAME_RE = re.compile(r"(\d{20})\.update")


class Outbox:
    """Updates by seq, durable on disk; oldest first."""

    def __init__(self, folder: str | Path, limit: int = 16) -> None:
        if limit < 1:
            raise StateError(f"outbox limit must be >= 1, got {limit}")
        self.dir = Path(folder)
        self.limit = limit
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StateError(f"outbox {self.dir} is not usable: {e.strerror or e}") from e
        remove_stale_temps(self.dir)

    def _path(self, seq: int) -> Path:
        return self.dir / f"{seq:020d}{SUFFIX}"

    def seqs(self) -> list[int]:
        """Seqs of the queued updates, ascending."""
        return sorted(int(m.group(1)) for p in self.dir.iterdir() if (m := _NAME_RE.fullmatch(p.name)))

    def __len__(self) -> int:
        return len(self.seqs())

    def __contains__(self, seq: object) -> bool:
        return isinstance(seq, int) and self._path(seq).is_file()

    def put(self, seq: int, payload: bytes) -> list[int]:
        """Persist ``payload`` as update ``seq`` (durably, before it is published); return dropped seqs."""
        try:
            write_atomic(self._path(seq), bytes(payload))
        except OSError as e:
            raise StateError(f"outbox {self.dir}: cannot store update {seq} ({e.strerror or e})") from e
        queued = self.seqs()
        dropped = queued[: max(0, len(queued) - self.limit)]
        for old in dropped:
            self.remove(old)
            event(
                log, "outbox full: dropped the oldest unacknowledged update", logging.WARNING, seq=old, limit=self.limit
            )
        return dropped

    def get(self, seq: int) -> bytes:
        try:
            return self._path(seq).read_bytes()
        except OSError as e:
            raise StateError(f"outbox {self.dir}: cannot read update {seq} ({e.strerror or e})") from e

    def items(self) -> Iterator[tuple[int, bytes]]:
        """(seq, payload) of every queued update, oldest first."""
        for seq in self.seqs():
            with contextlib.suppress(StateError):
                yield seq, self.get(seq)

    def remove(self, seq: int) -> bool:
        """Delete update ``seq``; False when it was not queued."""
        try:
            self._path(seq).unlink()
        except FileNotFoundError:
            return False
        except OSError as e:
            raise StateError(f"outbox {self.dir}: cannot delete update {seq} ({e.strerror or e})") from e
        fsync_dir(self.dir)
        return True
