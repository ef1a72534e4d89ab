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
    # Personalized accuracy: each client's latest personalized model, on its own test split.
    personalized = dict(evaluator.personalized) if evaluator else {}
    by_cluster: dict[int, list[float]] = defaultdict(list)
    clusters_of = evaluator.client_clusters() if evaluator else {}
    for cid, acc in personalized.items():
        by_cluster[clusters_of.get(cid, 0)].append(acc)
    n_updates = max(1, snap["messages"].get("update", 0))
    down = snap["bytes"].get("model/client", 0)
    if cfg.method.shared_model:  # one global model on cluster/0, delivered to every device
        down += snap["bytes"].get("model/cluster", 0) * sum(1 for p in assignment if p in dirs)
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
        "mean_personalized_accuracy": (
            round(sum(personalized.values()) / len(personalized), 4) if personalized else None
        ),
        "personalized_accuracy_by_client": {k: round(v, 4) for k, v in sorted(personalized.items())},
        "personalized_accuracy_by_cluster": {str(c): round(sum(v) / len(v), 4) for c, v in sorted(by_cluster.items())},
        "accuracy_curve": points,
        "bytes_up": snap["bytes"].get("update", 0),
        "bytes_down": down,
        "updates": snap["messages"].get("update", 0),
        "bytes_up_per_client_round": round(snap["bytes"].get("update", 0) / n_updates),
        "bytes_down_per_client_round": round(down / n_updates),
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
    report = {"config": config, "methods": results}
    report["goals"] = goals(report)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
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
        if r.get("chaos"):
            rows.append("  " + chaos_line(r["chaos"]))
    for g in report.get("goals") or goals(report):
        measured = "-" if g["measured"] is None else g["measured"]
        rows.append(f"goal: {g['goal']}: {measured} (need >= {g['need']}) {'met' if g['met'] else 'NOT met'}")
    return "\n".join(rows)


def chaos_line(c: dict[str, Any]) -> str:
    """One line of a chaos run's accounting."""
    faults = ", ".join(f"{k} {v}" for k, v in sorted(c["faults_injected"].items())) or "none"
    delta = c.get("accuracy_delta_points")
    return (
        f"chaos: faults [{faults}]; updates produced {c['updates_produced']}, acknowledged {c['acknowledged']}, "
        f"aggregated {c['aggregated']}, pending {c['pending_at_end']}, acknowledged-but-lost "
        f"{c['acknowledged_but_lost']}, duplicates aggregated {c['duplicates_aggregated']}"
        + ("" if delta is None else f"; accuracy vs clean run {delta:+.1f} points")
    )


def load_report(out: Path) -> dict:
    path = out / REPORT if out.is_dir() else out
    return json.loads(path.read_text())


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else round(a / b, 2)


def goals(report: dict) -> list[dict[str, Any]]:
    """The product's goals for this comparison, measured from the report (only those its methods allow)."""
    by = {r["method"]: r for r in report["methods"]}
    out: list[dict[str, Any]] = []
    fh, lora, full, flat = (
        by.get("fedhft"),
        by.get("fedavg-lora"),
        by.get("fedavg-full"),
        by.get("fedhft-no-clustering"),
    )

    def add(goal: str, measured: float | None, need: float, note: str) -> None:
        out.append(
            {
                "goal": goal,
                "measured": measured,
                "need": need,
                "met": measured is not None and measured >= need,
                "note": note,
            }
        )

    if fh and lora:
        add(
            "upload bytes to target, fedavg-lora ÷ fedhft",
            _ratio(lora["bytes_up_to_target"], fh["bytes_up_to_target"]),
            3.0,
            f"target accuracy {fh.get('target_accuracy')}; '-' when a method never reached it",
        )
        add(
            "simulated time to target, fedavg-lora ÷ fedhft",
            _ratio(lora["simulated_seconds_to_target"], fh["simulated_seconds_to_target"]),
            2.5,
            "heterogeneous devices, simulated clock",
        )
    if fh and full:
        add(
            "upload per client-round, fedavg-full ÷ fedhft",
            _ratio(full["bytes_up_per_client_round"], fh["bytes_up_per_client_round"]),
            500.0,
            "",
        )
    if fh and flat:
        a, b = fh["mean_personalized_accuracy"], flat["mean_personalized_accuracy"]
        add(
            "personalized accuracy, with clustering − without (points)",
            None if a is None or b is None else round(100 * (a - b), 1),
            0.0,
            f"alpha {report['config'].get('alpha')}",
        )
    return out
