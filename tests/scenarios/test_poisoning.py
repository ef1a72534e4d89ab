"""Poisoning with real training: 2 of 10 clients send scaled or sign-flipped updates (tests/support/poisoning.py).

Dense uploads (mask ratio 1.0), so every row has all ten votes; bench/poisoning.py also runs FedHFT's
masked uploads, where the robust rules need more rounds (each row has fewer votes).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.poisoning import ATTACKS, Outcome, Setup, run

SETUP = Setup(honest=8, attackers=2, rounds=5, local_steps=12, mask_ratio=1.0)


@pytest.fixture(scope="module")
def clean(tiny_export: Path) -> Outcome:
    return run(tiny_export, SETUP, {}, None)


def test_the_clean_run_learns_the_task(clean: Outcome) -> None:
    assert clean.accuracy[0] < 0.5 and clean.final >= 0.9, clean.accuracy


def test_a_trimmed_mean_holds_accuracy_under_sign_flips_where_the_mean_collapses(
    tiny_export: Path, clean: Outcome
) -> None:
    plain = run(tiny_export, SETUP, {}, ATTACKS["sign-flip"])
    robust = run(tiny_export, SETUP, {"robust": "trimmed-mean", "trim_fraction": 0.2}, ATTACKS["sign-flip"])
    assert clean.final - robust.final <= 0.03, (clean.accuracy, robust.accuracy)
    assert clean.final - plain.final >= 0.2, (clean.accuracy, plain.accuracy)


def test_a_median_holds_accuracy_under_boosted_updates(tiny_export: Path, clean: Outcome) -> None:
    robust = run(tiny_export, SETUP, {"robust": "median"}, ATTACKS["scale"])  # the mean: ~0.4 (bench/poisoning.py)
    assert clean.final - robust.final <= 0.03, (clean.accuracy, robust.accuracy)
