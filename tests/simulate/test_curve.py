"""Readings of a synthetic curve: last-k mean, the version at a virtual-time budget, time and bytes to target."""

from __future__ import annotations

import pytest

from fedhft.simulate.curve import at_budget, bytes_to, last_k_mean, time_to

CURVE = [  # version, accuracy, macro-F1, virtual time (a noisy last version, as a 1-update flush)
    {"version": v, "accuracy": a, "macro_f1": f, "virtual_time": t, "wall_time": 10.0 * v}
    for v, a, f, t in [
        (1, 0.40, 0.30, 30.0),
        (2, 0.70, 0.60, 60.0),
        (3, 0.85, 0.80, 95.0),
        (4, 0.88, 0.86, 130.0),
        (5, 0.62, 0.50, 150.0),
    ]
]


def test_last_k_mean_averages_the_newest_versions() -> None:
    assert last_k_mean(CURVE, "accuracy", 3) == pytest.approx((0.85 + 0.88 + 0.62) / 3)
    assert last_k_mean(CURVE, "macro_f1", 2) == pytest.approx((0.86 + 0.50) / 2)
    assert last_k_mean(CURVE, "accuracy", 1) == pytest.approx(0.62)
    assert last_k_mean(CURVE[:2], "accuracy", 3) == pytest.approx(0.55)  # fewer versions than k
    assert last_k_mean(list(reversed(CURVE)), "accuracy", 3) == last_k_mean(CURVE, "accuracy", 3)  # by version
    assert last_k_mean([], "accuracy", 3) is None
    with pytest.raises(ValueError):
        last_k_mean(CURVE, "accuracy", 0)


def test_time_budget_takes_the_newest_version_stamped_at_or_before_it() -> None:
    assert at_budget(CURVE, 100.0)["version"] == 3
    assert at_budget(CURVE, 130.0)["version"] == 4  # stamped exactly at the budget counts
    assert at_budget(CURVE, 1e9)["version"] == 5
    assert at_budget(CURVE, 10.0) is None  # nothing published yet
    assert at_budget(CURVE, None) is None
    unstamped = [dict(p, virtual_time=0.0) for p in CURVE]
    assert at_budget(unstamped, 100.0) is None  # no virtual clock: no budget reading


def test_time_and_bytes_to_target_read_the_first_version_that_reached_it() -> None:
    assert time_to(CURVE, 0.8, "virtual_time") == 95.0
    assert time_to(CURVE, 0.99, "virtual_time") is None
    updates = [{"base_version": b, "bytes": 100} for b in (0, 0, 1, 2, 2, 3)]
    assert bytes_to(CURVE, updates, 0.8) == 500  # every update trained from versions 0-2
    assert bytes_to(CURVE, updates, None) is None
