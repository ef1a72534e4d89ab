"""A report's plots (matplotlib, PNG): accuracy.png, global accuracy and macro-F1 against virtual time and
against upload bytes, each method's mean over seeds with a ±std band; traffic.png, upload per client-round.

Each seed's curve is a step function (a version's figure holds until the next version), sampled on one grid
per method so the seeds can be averaged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedhft.simulate.curve import by_version
from fedhft.simulate.summary import run_seed

GRID = 200


def step_values(xs: list[float], ys: list[float], grid: np.ndarray) -> np.ndarray:
    """The value at each grid point of the step curve through (xs, ys): the y of the last x at or before it,
    NaN before the first."""
    order = np.argsort(xs, kind="stable")
    x, y = np.asarray(xs, dtype=float)[order], np.asarray(ys, dtype=float)[order]
    idx = np.searchsorted(x, grid, side="right") - 1
    out = np.where(idx >= 0, y[np.clip(idx, 0, None)], np.nan) if len(x) else np.full(len(grid), np.nan)
    return out


def band(curves: list[tuple[list[float], list[float]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(grid, mean, std) over seeds' step curves; std is 0 where one seed has a value, NaN where none has."""
    top = max((max(x) for x, _ in curves if x), default=0.0)
    grid = np.linspace(0.0, top, GRID)
    vals = np.vstack([step_values(x, y, grid) for x, y in curves])
    have = (~np.isnan(vals)).sum(axis=0)
    with np.errstate(invalid="ignore"):
        mean = np.where(have > 0, np.nansum(vals, axis=0) / np.maximum(have, 1), np.nan)
        var = np.where(have > 1, np.nansum((vals - mean) ** 2, axis=0) / np.maximum(have - 1, 1), 0.0)
    return grid, mean, np.where(have > 0, np.sqrt(var), np.nan)


def _x(points: list[dict], axis: str) -> list[float]:
    if axis == "bytes":
        return [p.get("bytes_up", np.nan) / 1e6 for p in points]
    simulated = any(p.get("virtual_time") for p in points)
    return [p["virtual_time"] if simulated else p["wall_time"] for p in points]


def plot(out: Path, report: dict) -> list[Path]:
    """Write accuracy.png and traffic.png into ``out``; [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    runs: dict[str, list[dict]] = {}
    for r in report["methods"]:
        runs.setdefault(r["method"], []).append(r)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharey="row")
    for method, rs in runs.items():
        color = None
        for row, key in enumerate(("accuracy", "macro_f1")):
            for col, axis in enumerate(("time", "bytes")):
                curves = []
                for r in sorted(rs, key=run_seed):
                    pts = [p for p in by_version(r["accuracy_curve"]) if p.get(key) is not None]
                    x = _x(pts, axis)
                    if pts and not any(np.isnan(x)):
                        curves.append((x, [p[key] for p in pts]))
                if not curves:
                    continue
                grid, mean, std = band(curves)
                ax = axes[row][col]
                label = f"{method} ({len(curves)} seed{'s' if len(curves) > 1 else ''})" if row == col == 0 else None
                (line,) = ax.plot(grid, mean, drawstyle="steps-post", label=label, color=color)
                color = line.get_color()
                if len(curves) > 1:
                    ax.fill_between(grid, mean - std, mean + std, step="post", alpha=0.2, color=color)
    for row, name in enumerate(("global accuracy", "global macro-F1")):
        axes[row][0].set_ylabel(name)
        for col in range(2):
            axes[row][col].grid(alpha=0.3)
    axes[1][0].set_xlabel("virtual time (s; wall-clock where the server stamps none)")
    axes[1][1].set_xlabel("upload MB before the version")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("mean over seeds, band ±1 std")
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=110)
    fig, ax = plt.subplots(figsize=(7, 4))
    summary = report.get("summary") or []
    names = [s["method"] for s in summary if "bytes_up_per_client_round" in s]
    means = [(s["bytes_up_per_client_round"]["mean"] or 0) / 1e3 for s in summary if s["method"] in names]
    stds = [(s["bytes_up_per_client_round"]["std"] or 0) / 1e3 for s in summary if s["method"] in names]
    ax.bar(names, means, yerr=stds, capsize=3)
    ax.set_ylabel("upload per client-round (kB)")
    ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(out / "traffic.png", dpi=120)
    plt.close("all")
    return [out / "accuracy.png", out / "traffic.png"]
