"""Which devices each server version took in: per version, its updates by device profile and their mean
staleness (versions behind), from the server's SQLite state after a run. An asynchronous flush takes the first K
updates to arrive, so fast devices can fill it; this shows by how much.
"""

from __future__ import annotations

import sqlite3
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path


def flush_mix(rows: Iterable[tuple[str, int, int]], profile_of: Mapping[str, str]) -> dict[str, dict]:
    """{version: {"updates": {profile: n}, "mean_staleness": s}} from (client, base version, aggregated version)
    rows; a version's staleness counts the versions between an update's base and the one before it."""
    counts: dict[int, Counter[str]] = defaultdict(Counter)
    stale: dict[int, list[int]] = defaultdict(list)
    for client, base, version in rows:
        counts[version][profile_of.get(client, "?")] += 1
        stale[version].append(version - 1 - base)
    return {
        str(v): {"updates": dict(sorted(counts[v].items())), "mean_staleness": round(sum(stale[v]) / len(stale[v]), 2)}
        for v in sorted(counts)
    }


def profile_shares(flushes: Mapping[str, dict]) -> dict[str, float]:
    """Each profile's share of every aggregated update."""
    total: Counter[str] = Counter()
    for f in flushes.values():
        total.update(f["updates"])
    n = sum(total.values())
    return {p: round(c / n, 3) for p, c in sorted(total.items())} if n else {}


def read_flushes(state_db: Path, profile_of: Mapping[str, str]) -> dict[str, dict]:
    """flush_mix of a server's SQLite state (empty when there is none)."""
    if not state_db.is_file():
        return {}
    db = sqlite3.connect(f"file:{state_db}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT client_id, base_version, aggregated_version FROM updates WHERE aggregated_version IS NOT NULL"
        ).fetchall()
    finally:
        db.close()
    return flush_mix(rows, profile_of)
