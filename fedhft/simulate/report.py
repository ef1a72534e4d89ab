"""Simulation results: one entry per (method, seed) run, the summary across seeds, goals, report.json and the
printed table.

A run's final figures are read off its curve (:mod:`fedhft.simulate.curve`): the mean over the last k global
versions, the newest version at a virtual-time budget, time and upload bytes to the target on the virtual clock.
Personalized figures weight each client by its test examples (the unweighted mean is kept beside it).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from fedhft.errors import FedHFTError
from fedhft.simulate.curve import at_budget, by_version, bytes_before, bytes_to, last_k_mean, time_to
from fedhft.simulate.goals import goals
from fedhft.simulate.metrics import weighted_mean
from fedhft.simulate.summary import summarize, summarize_reference

REPORT = "report.json"
LAST_K = 3


class ReportError(FedHFTError):
    """No readable report."""


def _round(v: float | None, nd: int = 4) -> float | None:
    return None if v is None else round(v, nd)


def personalized_figures(by_client: dict[str, dict]) -> dict[str, float | None]:
    """Mean personalized accuracy and macro-F1 over clients: weighted by test examples, and unweighted."""
    out: dict[str, float | None] = {}
    n = {cid: c["n"] for cid, c in by_client.items()}
    for key in ("accuracy", "macro_f1"):
        vals = {cid: c[key] for cid, c in by_client.items() if c.get(key) is not None}
        out[f"mean_personalized_{key}"] = _round(weighted_mean(vals, n))
        out[f"mean_personalized_{key}_unweighted"] = _round(weighted_mean(vals, dict.fromkeys(n, 1)))
    return out


def cluster_figures(by_client: dict[str, dict], models: dict[int, Any]) -> dict[str, dict]:
    """Per cluster: its clients, their test examples, their weighted personalized figures, and the cluster model
    of the newest version on its members' splits pooled."""
    members: dict[int, dict[str, dict]] = defaultdict(dict)
    for cid, c in by_client.items():
        members[c.get("cluster", 0)][cid] = c
    out = {}
    for k in sorted(set(members) | set(models)):
        cs = members.get(k, {})
        p = personalized_figures(cs)
        m = models.get(k)
        out[str(k)] = {
            "clients": len(cs),
            "test_examples": sum(c["n"] for c in cs.values()),
            "personalized_accuracy": p["mean_personalized_accuracy"],
            "personalized_macro_f1": p["mean_personalized_macro_f1"],
            "model_accuracy": None if m is None else round(m.accuracy, 4),
            "model_macro_f1": None if m is None else round(m.macro_f1, 4),
        }
    return out


def readings(result: dict, last_k: int = LAST_K, time_budget: float | None = None) -> dict:
    """A run entry with every figure that its curve and per-client scores define re-derived (older reports keep
    what they cannot re-derive: a curve without macro-F1 or upload bytes, clients without test sizes)."""
    pts, target = result.get("accuracy_curve") or [], result.get("target_accuracy")
    newest = by_version(pts)[-1] if pts else None
    budget = at_budget(pts, time_budget)
    out = dict(
        result,
        last_k=last_k,
        time_budget=time_budget,
        final_global_accuracy=_round(last_k_mean(pts, "accuracy", last_k)),
        final_global_macro_f1=_round(last_k_mean(pts, "macro_f1", last_k)),
        last_version_global_accuracy=None if newest is None else _round(newest["accuracy"]),
        version_at_budget=None if budget is None else budget["version"],
        global_accuracy_at_budget=None if budget is None else _round(budget["accuracy"]),
        global_macro_f1_at_budget=None if budget is None else _round(budget.get("macro_f1")),
        simulated_seconds_to_target=time_to(pts, target, "virtual_time"),
        wall_seconds_to_target=time_to(pts, target, "wall_time"),
    )
    if pts and all("bytes_up" in p for p in pts):  # upload bytes before each version, stored with the curve
        hit = next((p for p in by_version(pts) if target is not None and p["accuracy"] >= target), None)
        out["bytes_up_to_target"] = None if hit is None else hit["bytes_up"]
    if "personalized_by_client" in result:
        out.update(personalized_figures(result["personalized_by_client"]))
    return out


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
    snap = traffic.snapshot() if traffic else {"bytes": {}, "messages": {}}
    updates = list(traffic.updates) if traffic else []
    points = [dict(vars(p), bytes_up=bytes_before(updates, p.version)) for p in (evaluator.points if evaluator else [])]
    # Personalized: each client's latest personalized model, on its own test split.
    clusters_of = evaluator.client_clusters() if evaluator else {}
    by_client = {
        cid: {
            "accuracy": round(s.accuracy, 4),
            "macro_f1": round(s.macro_f1, 4),
            "n": s.n,
            "cluster": clusters_of.get(cid, 0),
        }
        for cid, s in sorted((evaluator.personalized if evaluator else {}).items())
    }
    n_updates = max(1, snap["messages"].get("update", 0))
    down = snap["bytes"].get("model/client", 0)
    if cfg.method.shared_model:  # one global model on cluster/0, delivered to every device
        down += snap["bytes"].get("model/cluster", 0) * sum(1 for p in assignment if p in dirs)
    client_profile = {f"c{i:03d}": p for i, p in enumerate(assignment)}
    peak_by_profile: dict[str, float] = defaultdict(float)
    for cid, mb in peaks.items():
        prof = client_profile.get(cid, "?")
        peak_by_profile[prof] = round(max(peak_by_profile[prof], mb), 1)
    result = {
        "method": cfg.method.name,
        "seed": cfg.seed,
        "encoding": cfg.encoding,
        "clients": len(assignment),
        "profiles": dict(cfg.profiles),
        "rounds_per_client": cfg.rounds,
        "personalized_by_client": by_client,
        "by_cluster": cluster_figures(by_client, dict(evaluator.cluster_scores) if evaluator else {}),
        "accuracy_curve": points,
        "bytes_up": snap["bytes"].get("update", 0),
        "bytes_down": down,
        "updates": snap["messages"].get("update", 0),
        "bytes_up_per_client_round": round(snap["bytes"].get("update", 0) / n_updates),
        "bytes_down_per_client_round": round(down / n_updates),
        "broker_bytes_by_kind": snap["bytes"],
        "target_accuracy": cfg.target_accuracy,
        "bytes_up_to_target": bytes_to(points, updates, cfg.target_accuracy),
        "peak_rss_mb_by_profile": dict(peak_by_profile),
        "unable_to_participate": unable,
        "wall_seconds": round(seconds, 1),
        "artifacts": {k: str(v) for k, v in dirs.items()},
    }
    return readings(result, cfg.last_k, cfg.time_budget)


def recompute(result: dict, last_k: int = LAST_K, time_budget: float | None = None) -> dict:
    """Re-derive a run's figures from its curve (for reports of older runs, or another k or budget)."""
    return readings(result, last_k, time_budget)


def build_report(runs: list[dict], config: dict) -> dict:
    """report.json's content: config, runs (re-read with the config's last k and budget), summary, goals."""
    last_k, budget = int(config.get("last_k") or LAST_K), config.get("time_budget")
    runs = [readings(r, last_k, budget) for r in runs]
    seed = int(config.get("seed", 0))
    report = {"config": config, "methods": runs, "summary": summarize(runs, seed)}
    ref = summarize_reference(runs, seed)
    if ref is not None:
        report["reference"] = ref
    report["goals"] = goals(report)
    return report


def write_report(out: Path, results: list[dict], config: dict) -> Path:
    from fedhft.simulate.plots import plot

    path = out / REPORT
    report = build_report(results, config)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    plot(out, report)
    return path


def load_report(out: Path) -> dict:
    """A report.json (or the directory holding one); one ReportError line when there is none to read."""
    path = out / REPORT if out.is_dir() else out
    if not path.is_file():
        where = f"{out} has no {REPORT}" if out.is_dir() else f"{out} does not exist"
        raise ReportError(f"no simulation report: {where} (run `fedhft simulate --out DIR` first)")
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportError(f"{path} is not a readable report: {e}") from e
    if not isinstance(report, dict) or not isinstance(report.get("methods"), list) or "config" not in report:
        raise ReportError(f"{path} is not a simulation report (no config and methods)")
    if not report["methods"]:
        raise ReportError(f"{path} holds no finished runs")
    return report


def reread(report: dict, last_k: int | None = None, time_budget: float | None = None) -> dict:
    """The report re-derived with another last k and/or time budget (None keeps the report's own)."""
    config = dict(report["config"])
    if last_k is not None:
        config["last_k"] = last_k
    if time_budget is not None:
        config["time_budget"] = time_budget
    config.setdefault("seeds", [int(config.get("seed", 0))])
    return build_report(report["methods"], config)


def _f(v: Any, spec: str = ".3f", scale: float = 1.0) -> str:
    return "-" if v is None else format(v / scale, spec)


def pm(fig: dict | None, spec: str = ".3f", scale: float = 1.0) -> str:
    """'mean ± std' of a summary figure ('-' when missing; the mean alone for one seed)."""
    if not fig or fig.get("mean") is None:
        return "-"
    if len(fig["by_seed"]) < 2:
        return _f(fig["mean"], spec, scale)
    return f"{_f(fig['mean'], spec, scale)}±{_f(fig['std'], spec, scale)}"


# (header, figure, format, scale) of the table's columns
COLUMNS = (
    ("global acc", "final_global_accuracy", ".3f", 1.0),
    ("global F1", "final_global_macro_f1", ".3f", 1.0),
    ("acc@budget", "global_accuracy_at_budget", ".3f", 1.0),
    ("personal acc", "mean_personalized_accuracy", ".3f", 1.0),
    ("personal F1", "mean_personalized_macro_f1", ".3f", 1.0),
    ("up kB/rnd", "bytes_up_per_client_round", ".1f", 1e3),
    ("sim s→tgt", "simulated_seconds_to_target", ".0f", 1.0),
    ("up MB→tgt", "bytes_up_to_target", ".2f", 1e6),
    ("wall s", "wall_seconds", ".0f", 1.0),
)
SEED_LINES = ("final_global_accuracy", "final_global_macro_f1", "mean_personalized_accuracy")


def table(report: dict) -> str:
    """The comparison: one row per method (mean ± std over its seeds), every seed's value of the headline
    figures, chaos accounting, and the goals."""
    c = report.get("config", {})
    summary = report.get("summary") or summarize(report["methods"], int(c.get("seed", 0)))
    widths = [max(11, len(h)) for h, *_ in COLUMNS]
    rows = [f"{'method':24} {'seeds':>5} " + " ".join(f"{h:>{w}}" for (h, *_), w in zip(COLUMNS, widths, strict=True))]
    for s in summary:
        cells = [pm(s.get(key), spec, scale) for _, key, spec, scale in COLUMNS]
        rows.append(
            f"{s['method']:24} {len(s['seeds']):>5} "
            + " ".join(f"{v:>{w}}" for v, w in zip(cells, widths, strict=True))
        )
        if len(s["seeds"]) > 1:
            for key in SEED_LINES:
                if key in s:
                    vals = ", ".join(f"{seed}: {_f(v)}" for seed, v in s[key]["by_seed"].items())
                    rows.append(f"  {key} by seed: {vals}")
    for r in report["methods"]:
        tag = f"{r['method']} seed {r.get('seed', c.get('seed', 0))}"
        if r.get("unable_to_participate"):
            rows.append(f"  {tag}: unable to participate: {r['unable_to_participate']}")
        if r.get("chaos"):
            rows.append(f"  {tag}: " + chaos_line(r["chaos"]))
        if r.get("stopped_at_wall_limit"):
            last = max((p["version"] for p in r.get("accuracy_curve", [])), default=0)
            rows.append(
                f"  {tag}: cut short at the {r.get('wall_limit_minutes', 0):g}-minute wall-time limit at version "
                f"{last}: its figures depend on the host's speed (rerun with a larger --minutes)"
            )
    ref = report.get("reference") or summarize_reference(report["methods"], int(c.get("seed", 0)))
    if ref is not None:
        rows.append(reference_line(ref))
    k, budget = c.get("last_k", LAST_K), c.get("time_budget")
    rows.append(
        f"final = mean of the last {k} global versions; acc@budget = newest version at virtual time "
        f"{'-' if budget is None else f'{budget:g} s'}; personalized weighted by test examples"
    )
    for g in report.get("goals") or goals(report):
        measured = "-" if g["measured"] is None else g["measured"]
        rows.append(f"goal: {g['goal']}: {measured} (need >= {g['need']}) {'met' if g['met'] else 'NOT met'}")
    return "\n".join(rows)


def reference_line(ref: dict[str, Any]) -> str:
    """One line of the no-model reference: what a method must beat to have learned anything."""
    n = len(ref["seeds"])
    return (
        f"no model ({n} seed{'s' if n > 1 else ''}): the fleet's majority label scores global acc "
        f"{pm(ref['global_accuracy'])}, macro-F1 {pm(ref['global_macro_f1'])}; each client's own majority label "
        f"scores personalized acc {pm(ref['personalized_accuracy'])}, macro-F1 {pm(ref['personalized_macro_f1'])}"
    )


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
