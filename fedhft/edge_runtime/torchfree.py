"""Run code as a device would: with torch, transformers, optimum and executorch not importable."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib.abc import MetaPathFinder

HEAVY = ("torch", "torchao", "transformers", "optimum", "executorch")


class ImportBlocker(MetaPathFinder):
    """A meta-path finder that makes the named top-level packages fail to import."""

    def __init__(self, names: Sequence[str] = HEAVY) -> None:
        self.names = frozenset(names)

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> None:
        if fullname.split(".")[0] in self.names:
            raise ImportError(f"{fullname} is blocked: this code path must run without it")
        return None


def block_heavy_imports(names: Sequence[str] = HEAVY) -> ImportBlocker:
    """Install the blocker (idempotent) and return it; already-imported modules are not affected."""
    for finder in sys.meta_path:
        if isinstance(finder, ImportBlocker):
            return finder
    blocker = ImportBlocker(names)
    sys.meta_path.insert(0, blocker)
    return blocker


def unblock_heavy_imports() -> None:
    """Remove the blocker (for in-process callers, such as tests, that run a torch-free command)."""
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, ImportBlocker)]
