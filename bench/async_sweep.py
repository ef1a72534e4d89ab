"""The sweep behind fedhft's asynchronous defaults: FedBuff's K (updates per flush), the server learning rate and
the staleness exponent, one knob at a time around the defaults, beside FedHFT's synchronous rounds.

Every point is a real `fedhft simulate` of fedhft on a small heterogeneous fleet (one device of each shipped
profile, BBC News at alpha 0.3, 60 virtual seconds) on the devices' virtual clock, so the figures do not depend
on host load. Each finished (point, seed) is kept in bench/results/async_sweep.json at once (the bench resumes);
the table gives mean ± std over seeds and every seed's global macro-F1. One more point uploads int8 instead of
fp16 (halves the bytes; the default only if accuracy holds), and one trains the planner's `--objective memory` plans
(what the shallower, lower-peak plans cost in accuracy).

Usage: `python bench/async_sweep.py [--seeds 0,1] [--points base,k1,...] [--dry-run]`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from fedhft.simulate.seeds import parse_seeds
from fedhft.simulate.summary import summarize

RESULTS = Path(__file__).parent / "results"
OUT = RESULTS / "async_sweep.json"
FLEET = ["--clients", "4", "--profiles", "rpi4-4gb:1,phone-lowend-3gb:1,phone-midrange-6gb:1,laptop-x86-16gb:1"]
ARGS = FLEET + ["--dataset", "bbc-news", "--alpha", "0.3", "--rounds", "60", "--virtual-budget", "60"]
ARGS += ["--local-steps", "6", "--max-test", "300", "--target-accuracy", "0.5", "--backend", "ort"]
DEFAULTS = {"buffer_size": 2, "server_lr": 1.0, "staleness_exponent": 0.5}  # K = half of 4 active devices
# name -> (method, the knobs that differ from DEFAULTS)
POINTS: dict[str, tuple[str, dict[str, float | str]]] = {
    "default": ("fedhft", {}),
    "K=1": ("fedhft", {"buffer_size": 1}),
    "K=4": ("fedhft", {"buffer_size": 4}),
    "lr=0.5": ("fedhft", {"server_lr": 0.5}),
    "lr=2": ("fedhft", {"server_lr": 2.0}),
    "a=0": ("fedhft", {"staleness_exponent": 0.0}),
    "a=1": ("fedhft", {"staleness_exponent": 1.0}),
    "sync": ("fedhft-sync", {}),
    "int8": ("fedhft", {"encoding": "int8"}),  # uploads in int8 instead of fp16 (the edge's default)
    "memory plans": ("fedhft", {"objective": "memory"}),  # the planner's --objective memory: shallower plans
}
FIGURES = (
    ("final_global_accuracy", "global acc"),
    ("final_global_macro_f1", "global F1"),
    ("mean_personalized_accuracy", "pers. acc"),
    ("simulated_seconds_to_target", "virtual s to 0.5"),
    ("bytes_up_to_target", "MB to 0.5"),
)


def command(point: str, seed: int, out: Path) -> list[str]:
    method, knobs = POINTS[point]
    cmd = [sys.executable, "-m", "fedhft.cli", "simulate", *ARGS, "--method", method, "--seed", str(seed)]
    for k, v in knobs.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    return cmd + ["--out", str(out)]


def fmt(entry: dict | None, name: str) -> str:
    if not entry or not isinstance(entry.get(name), dict) or entry[name]["mean"] is None:
        return "-"
    scale = 1e-6 if name.startswith("bytes") else 1.0
    m, s = entry[name]["mean"] * scale, (entry[name]["std"] or 0.0) * scale
    digits = 3 if scale == 1.0 and m < 2 else 2
    if len(entry[name]["by_seed"]) == 1:  # one seed: no spread to show
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f}±{s:.{digits}f}"


def table(runs: dict[str, list[dict]]) -> str:
    lines = ["| point | K | server lr | a | seeds | " + " | ".join(h for _, h in FIGURES) + " | F1 by seed |"]
    lines.append("|---|---:|---:|---:|---:|" + "---:|" * len(FIGURES) + "---|")
    for point, (method, knobs) in POINTS.items():
        if not runs.get(point):
            continue
        (entry,) = summarize(runs[point])
        k = {**DEFAULTS, **knobs}
        knob = (
            ("all", "-", "0")
            if method == "fedhft-sync"
            else (k["buffer_size"], k["server_lr"], k["staleness_exponent"])
        )
        by_seed = ", ".join(f"{s}: {v:.3f}" for s, v in entry["final_global_macro_f1"]["by_seed"].items())
        lines.append(
            f"| {point} | {knob[0]} | {knob[1]} | {knob[2]} | {len(entry['seeds'])} | "
            + " | ".join(fmt(entry, n) for n, _ in FIGURES)
            + f" | {by_seed} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--points", default=",".join(POINTS))
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args()
    seeds, points = parse_seeds(a.seeds, 0), [p for p in a.points.split(",") if p]
    data = json.loads(OUT.read_text()) if OUT.is_file() else {"args": ARGS, "defaults": DEFAULTS, "runs": {}}
    if data.get("args") != ARGS:  # another fleet: its runs are not comparable
        data = {"args": ARGS, "defaults": DEFAULTS, "runs": {}}
    runs: dict[str, list[dict]] = data["runs"]
    todo = [(p, s) for s in seeds for p in points if s not in {r["seed"] for r in runs.get(p, [])}]
    print(f"async sweep: {len(todo)} run(s) to go: " + ", ".join(f"{p}/seed {s}" for p, s in todo))
    if a.dry_run:
        return
    for i, (point, seed) in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {point}, seed {seed}", flush=True)
        with tempfile.TemporaryDirectory(prefix="fedhft-sweep-") as tmp:
            subprocess.run(command(point, seed, Path(tmp)), check=True, stdout=subprocess.DEVNULL)
            (run,) = json.loads((Path(tmp) / "report.json").read_text())["methods"]
        runs.setdefault(point, []).append(dict(run, seed=seed, method=point))
        data["table"] = table(runs)
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(data, indent=1, default=str) + "\n")  # a finished run is never lost
    print(table(runs))


if __name__ == "__main__":
    main()
