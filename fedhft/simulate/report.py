"""Simulation results: one entry per method, the combined report.json, plots and the printed table."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

REPORT = "report.json"


def _time_to(points: list[dict], target: float | None, key: str) -> float | None:
    if target is None or not any(p[key] for p in points):
        return None  # e.g. no simulated time: the server did not stamp one into model meta
    for p in sorted(points, key=lambda p: p[key]):
        if p["accuracy"] >= target:
            return p[key]
    return None


def _bytes_to(points: list[dict], updates: list[dict], target: float | None) -> int | None:
    """Upload bytes of every update trained before the first version that reached the target."""
    if target is None:
        return None
    hit = next((p for p in sorted(points, key=lambda p: p["version"]) if p["accuracy"] >= target), None)
    if hit is None:
        return None
    return sum(u["bytes"] for u in updates if u["base_version"] < hit["version"])


def method_result(
    cfg: Any,
    run_dir: Path,
    assignment: list[str],
    dirs: dict,
    unable: dict,
    evaluator: Any,
    traffic: Any,
    peaks: dict[str, float],
    seconds: float,
) -> dict[str, Any]:
    points = [dict(vars(p)) for p in (evaluator.points if evaluator else [])]
    snap = traffic.snapshot() if traffic else {"bytes": {}, "messages": {}}
    updates = list(traffic.updates) if traffic else []
    # Personalized accuracy: each client's accuracy of the model it last received, on its own test split.
    last: dict[str, dict] = {}
    for u in updates:
        if "eval_accuracy" in u and (u["client"] not in last or u["seq"] >= last[u["client"]]["seq"]):
            last[u["client"]] = u
    personalized = [u["eval_accuracy"] for u in last.values()]
    n_updates = max(1, snap["messages"].get("update", 0))
    client_profile = {f"c{i:03d}": p for i, p in enumerate(assignment)}
    peak_by_profile: dict[str, float] = defaultdict(float)
    for cid, mb in peaks.items():
        prof = client_profile.get(cid, "?")
        peak_by_profile[prof] = round(max(peak_by_profile[prof], mb), 1)
    final = max(points, key=lambda p: (p["version"], p["accuracy"]))["accuracy"] if points else None
    best_final = None
    if points:
        top = max(p["version"] for p in points)
        best_final = max(p["accuracy"] for p in points if p["version"] == top)
    return {
        "method": cfg.method.name,
        "clients": len(assignment),
        "profiles": dict(cfg.profiles),
        "rounds_per_client": cfg.rounds,
        "final_global_accuracy": best_final if best_final is not None else final,
        "mean_personalized_accuracy": round(sum(personalized) / len(personalized), 4) if personalized else None,
        "accuracy_curve": points,
        "bytes_up": snap["bytes"].get("update", 0),
        "bytes_down": snap["bytes"].get("model/client", 0),
        "updates": snap["messages"].get("update", 0),
        "bytes_up_per_client_round": round(snap["bytes"].get("update", 0) / n_updates),
        "bytes_down_per_client_round": round(snap["bytes"].get("model/client", 0) / n_updates),
        "broker_bytes_by_kind": snap["bytes"],
        "target_accuracy": cfg.target_accuracy,
        "simulated_seconds_to_target": _time_to(points, cfg.target_accuracy, "virtual_time"),
        "wall_seconds_to_target": _time_to(points, cfg.target_accuracy, "wall_time"),
        "bytes_up_to_target": _bytes_to(points, updates, cfg.target_accuracy),
        "peak_rss_mb_by_profile": dict(peak_by_profile),
        "unable_to_participate": unable,
        "wall_seconds": round(seconds, 1),
        "artifacts": {k: str(v) for k, v in dirs.items()},
    }


def recompute(result: dict) -> dict:
    """Re-derive the time-to-target fields from a result's accuracy curve (for reports of older runs)."""
    pts, target = result["accuracy_curve"], result.get("target_accuracy")
    return dict(
        result,
        simulated_seconds_to_target=_time_to(pts, target, "virtual_time"),
        wall_seconds_to_target=_time_to(pts, target, "wall_time"),
    )


def write_report(out: Path, results: list[dict], config: dict) -> Path:
    path = out / REPORT
    path.write_text(json.dumps({"config": config, "methods": results}, indent=2, default=str) + "\n")
    plot(out, results)
    return path


def plot(out: Path, results: list[dict]) -> list[Path]:
    """accuracy.png (accuracy vs simulated time) and traffic.png (upload bytes); needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        pts = sorted(r["accuracy_curve"], key=lambda p: p["version"])
        simulated = any(p["virtual_time"] for p in pts)
        xs = [p["virtual_time"] if simulated else p["wall_time"] for p in pts]
        ax.plot(xs, [p["accuracy"] for p in pts], marker=".", label=r["method"])
    ax.set_xlabel("time (s): simulated where the server stamps it, else wall-clock")
    ax.set_ylabel("global test accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    made.append(out / "accuracy.png")
    fig, ax = plt.subplots(figsize=(7, 4))
    names = [r["method"] for r in results]
    ax.bar(names, [r["bytes_up_per_client_round"] / 1e3 for r in results])
    ax.set_ylabel("upload per client-round (kB)")
    ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(out / "traffic.png", dpi=120)
    made.append(out / "traffic.png")
    plt.close("all")
    return made


def table(report: dict) -> str:
    rows = [
        f"{'method':22} {'global acc':>10} {'personal acc':>12} {'up kB/rnd':>10} {'down kB/rnd':>11} "
        f"{'updates':>7} {'sim s→tgt':>9} {'up MB→tgt':>9} {'wall s':>7}"
    ]
    for r in report["methods"]:

        def f(v: Any, spec: str = ".3f") -> str:
            return "-" if v is None else format(v, spec)

        rows.append(
            f"{r['method']:22} {f(r['final_global_accuracy']):>10} {f(r['mean_personalized_accuracy']):>12} "
            f"{r['bytes_up_per_client_round'] / 1e3:>10.1f} {r['bytes_down_per_client_round'] / 1e3:>11.1f} "
            f"{r['updates']:>7} {f(r['simulated_seconds_to_target'], '.0f'):>9} "
            f"{f(None if r['bytes_up_to_target'] is None else r['bytes_up_to_target'] / 1e6, '.2f'):>9} "
            f"{r['wall_seconds']:>7.0f}"
        )
        if r["unable_to_participate"]:
            rows.append(f"  unable to participate: {r['unable_to_participate']}")
    return "\n".join(rows)


def load_report(out: Path) -> dict:
    path = out / REPORT if out.is_dir() else out
    return json.loads(path.read_text())
