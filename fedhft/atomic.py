"""Crash-safe file replacement, the one implementation: temp file in the same folder, fsync, rename, folder fsync."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def fsync_dir(folder: Path) -> None:
    """Make renames in ``folder`` durable (where the platform allows opening a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic_with(path: Path, writer: Callable[[Path], None], mode: int = 0o644) -> None:
    """Replace ``path`` by what ``writer(tmp_path)`` writes; a crash leaves the old file or the new one."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        os.fchmod(fd, mode)
        os.close(fd)
        writer(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` by ``data`` atomically and durably."""
    write_atomic_with(path, lambda tmp: tmp.write_bytes(data), mode)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` over `path` atomically, creating the folder first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data)
