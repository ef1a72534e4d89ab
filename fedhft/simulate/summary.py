"""Across seeds: each method's figures as mean ± std with every seed's value (pure; reads run entries)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fedhft.simulate.metrics import mean_std

# The figures a summary carries, in the table's order.
FIGURES = (
    "final_global_accuracy",
    "final_global_macro_f1",
    "global_accuracy_at_budget",
    "global_macro_f1_at_budget",
    "mean_personalized_accuracy",
    "mean_personalized_macro_f1",
    "mean_personalized_accuracy_unweighted",
    "mean_personalized_macro_f1_unweighted",
    "simulated_seconds_to_target",
    "wall_seconds_to_target",
    "bytes_up_to_target",
    "bytes_up_per_client_round",
    "bytes_down_per_client_round",
    "updates",
    "wall_seconds",
)


def run_seed(run: dict, default: int = 0) -> int:
    """A run entry's seed (reports from before --seeds carry it only in their config)."""
    return int(run.get("seed", default))


def figure(values: dict[int, float | None]) -> dict[str, Any]:
    """{"mean", "std", "by_seed"}: mean and std are None when any seed lacks the value (e.g. never reached the
    target), so a missing seed cannot flatter the mean."""
    mean, std = mean_std(values.values())
    return {"mean": mean, "std": std, "by_seed": {str(s): v for s, v in sorted(values.items())}}


def summarize(runs: Sequence[dict], default_seed: int = 0) -> list[dict[str, Any]]:
    """One entry per method (in the order of first appearance): its seeds and, per figure, mean, std and by_seed."""
    by_method: dict[str, list[dict]] = {}
    for r in runs:
        by_method.setdefault(r["method"], []).append(r)
    out = []
    for method, rs in by_method.items():
        seeds = {run_seed(r, default_seed): r for r in rs}  # a seed run twice: the later entry counts
        entry: dict[str, Any] = {"method": method, "seeds": sorted(seeds)}
        for name in FIGURES:
            if any(name in r for r in seeds.values()):
                entry[name] = figure({s: r.get(name) for s, r in seeds.items()})
        out.append(entry)
    return out


def mean_of(entry: dict | None, name: str) -> float | None:
    """A summary entry's mean of one figure (None when absent)."""
    if entry is None or not isinstance(entry.get(name), dict):
        return None
    return entry[name]["mean"]


def paired_means(a: dict | None, b: dict | None, name: str) -> tuple[float | None, float | None, list[int]]:
    """Two summary entries' means of one figure over the seeds both ran (a comparison of unlike seeds says
    nothing): (mean of a, mean of b, the common seeds); a mean is None when a common seed lacks the figure."""
    if a is None or b is None or not isinstance(a.get(name), dict) or not isinstance(b.get(name), dict):
        return None, None, []
    va, vb = a[name]["by_seed"], b[name]["by_seed"]
    common = sorted(set(va) & set(vb), key=int)
    if not common:
        return None, None, []
    return mean_std(va[s] for s in common)[0], mean_std(vb[s] for s in common)[0], [int(s) for s in common]


REFERENCE_FIGURES = ("global_accuracy", "global_macro_f1", "personalized_accuracy", "personalized_macro_f1")


def summarize_reference(runs: Sequence[dict], default_seed: int = 0) -> dict[str, Any] | None:
    """The no-model reference (fedhft.simulate.reference) across the seeds whose runs carry one: per figure,
    mean, std and by_seed; None when no run carries one. A seed's runs share one split, so one run speaks for it."""
    by_seed = {run_seed(r, default_seed): r["reference"] for r in runs if isinstance(r.get("reference"), dict)}
    if not by_seed:
        return None
    out: dict[str, Any] = {"seeds": sorted(by_seed)}
    for name in REFERENCE_FIGURES:
        out[name] = figure({s: ref.get(name) for s, ref in by_seed.items()})
    return out
