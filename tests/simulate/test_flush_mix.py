"""Which devices each version took in: counts by profile, staleness, shares, and reading a server's SQLite state."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from fedhft.simulate.flush_mix import flush_mix, profile_shares, read_flushes

PROFILE_OF = {"c000": "laptop", "c001": "laptop", "c002": "phone"}
# (client, base version, aggregated version): version 1 took three laptop updates, version 2 a laptop's and a phone's
ROWS = [("c000", 0, 1), ("c001", 0, 1), ("c000", 0, 1), ("c001", 1, 2), ("c002", 0, 2)]


def test_flush_mix_counts_profiles_and_staleness_per_version() -> None:
    mix = flush_mix(ROWS, PROFILE_OF)
    assert mix == {
        "1": {"updates": {"laptop": 3}, "mean_staleness": 0.0},
        "2": {"updates": {"laptop": 1, "phone": 1}, "mean_staleness": 0.5},  # the phone trained from version 0
    }
    assert flush_mix([("c009", 0, 1)], PROFILE_OF) == {"1": {"updates": {"?": 1}, "mean_staleness": 0.0}}


def test_profile_shares_over_every_aggregated_update() -> None:
    assert profile_shares(flush_mix(ROWS, PROFILE_OF)) == {"laptop": 0.8, "phone": 0.2}
    assert profile_shares({}) == {}


def test_read_flushes_reads_aggregated_updates_only(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "state.sqlite3")
    db.execute("CREATE TABLE updates (client_id TEXT, base_version INTEGER, aggregated_version INTEGER)")
    db.executemany("INSERT INTO updates VALUES (?, ?, ?)", [*ROWS, ("c002", 2, None)])  # the last is pending
    db.commit()
    db.close()
    assert read_flushes(tmp_path / "state.sqlite3", PROFILE_OF) == flush_mix(ROWS, PROFILE_OF)
    assert read_flushes(tmp_path / "missing.sqlite3", PROFILE_OF) == {}
