"""Readings of a run's curve (one point per evaluated global version): the final figures as the mean over the last
k versions, the figure at a virtual-time budget, and time and upload bytes to a target accuracy.

A point is a dict with ``version``, ``accuracy``, ``macro_f1`` (absent in reports older than macro-F1),
``virtual_time`` (the server's simulated stamp, 0 when none) and ``wall_time``.
"""

from __future__ import annotations

from collections.abc import Sequence


def by_version(points: Sequence[dict]) -> list[dict]:
    """The points in version order, one per version (the later of duplicates)."""
    return list({p["version"]: p for p in sorted(points, key=lambda p: p["version"])}.values())


def last_k_mean(points: Sequence[dict], key: str, k: int) -> float | None:
    """Mean of ``key`` over the newest k versions (fewer when the run has fewer); None without points."""
    if k < 1:
        raise ValueError(f"last k must be >= 1, got {k}")
    vals = [p.get(key) for p in by_version(points)[-k:]]
    if not vals or any(v is None for v in vals):
        return None
    return sum(vals) / len(vals)


def at_budget(points: Sequence[dict], budget: float | None) -> dict | None:
    """The newest version stamped at or before virtual time ``budget`` (None: no budget, no simulated stamp, or
    nothing published that early)."""
    if budget is None or not any(p.get("virtual_time") for p in points):
        return None
    early = [p for p in by_version(points) if p["virtual_time"] <= budget]
    return early[-1] if early else None


def time_to(points: Sequence[dict], target: float | None, key: str) -> float | None:
    """The earliest ``key`` (virtual_time or wall_time) of a version whose accuracy reached ``target``."""
    if target is None or not any(p[key] for p in points):
        return None  # e.g. no simulated time: the server did not stamp one into model meta
    for p in sorted(points, key=lambda p: p[key]):
        if p["accuracy"] >= target:
            return p[key]
    return None


def bytes_before(updates: Sequence[dict], version: int) -> int:
    """Upload bytes of every update trained from a version older than ``version`` (what it took to publish it)."""
    return sum(u["bytes"] for u in updates if u["base_version"] < version)


def bytes_to(points: Sequence[dict], updates: Sequence[dict], target: float | None) -> int | None:
    """Upload bytes of every update trained before the first version that reached the target."""
    if target is None:
        return None
    hit = next((p for p in by_version(points) if p["accuracy"] >= target), None)
    return None if hit is None else bytes_before(updates, hit["version"])
