"""What activation recomputation costs in step time: `edge train --backend native` on the same plan exported with
each recompute mode, runs interleaved (none, selective, full, none, ...) so host load falls on all alike.

Packages come from bench/edge_memory.py's --artifacts directory (PROFILE for the planner's mode, PROFILE-capacity-
recompute-MODE for the others). Prints a table, writes bench/results/recompute_time.json. Seconds depend on the
host: the ratios to `none` in the same run are the figure.
Run: `.venv/bin/python bench/recompute_time.py --artifacts DIR --profiles laptop-x86-16gb,rpi5-8gb`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.edge_memory import RESULTS, edge_train, train_seconds, write_data
from fedhft.device_profiles.planner import RECOMPUTE_MODES, LoraPlan
from fedhft.protocol.manifest import load_manifest


def packages(art: Path, profile: str) -> dict[str, Path]:
    """mode -> package of `profile`'s default plan exported with that mode (those present in `art`)."""
    found = {}
    for d in [art / profile, *sorted(art.glob(f"{profile}-capacity-recompute-*"))]:
        if (d / "manifest.json").exists() and "executorch" in load_manifest(d).artifacts:
            found.setdefault(LoraPlan.from_dict(load_manifest(d).plan).recompute, d)
    return {m: found[m] for m in RECOMPUTE_MODES if m in found}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifacts", type=Path, required=True)
    ap.add_argument("--profiles", default="laptop-x86-16gb,rpi5-8gb")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS / "recompute_time.json")
    a = ap.parse_args()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    results = []
    with tempfile.TemporaryDirectory(prefix="fedhft-rctime-") as t:
        train, _, labels = write_data(Path(t), 200, 32)
        for profile in a.profiles.split(","):
            pkgs = packages(a.artifacts, profile)
            if "none" not in pkgs or len(pkgs) < 2:
                sys.exit(f"{profile}: need its package with recompute none and another mode in {a.artifacts}")
            seconds: dict[str, list[float]] = {m: [] for m in pkgs}
            for rep in range(a.repeats):
                for mode, pkg in pkgs.items():
                    cmd = edge_train(pkg, "native", train, labels, a.steps)
                    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
                    s = train_seconds(out)
                    if s is None:
                        sys.exit(f"{pkg}: no training time in the output: {out[-300:]}")
                    seconds[mode].append(s)
                    print(f"  {profile} {mode:9} run {rep + 1}: {s:.2f} s", file=sys.stderr)
            base = statistics.median(seconds["none"])
            plan = LoraPlan.from_dict(load_manifest(pkgs["none"]).plan)
            for mode, values in seconds.items():
                med = statistics.median(values)
                results.append(
                    {
                        "profile": profile,
                        "depth": plan.depth,
                        "mode": mode,
                        "steps": a.steps,
                        "seconds": values,
                        "median_s": round(med, 3),
                        "vs_none": round(med / base, 3),
                    }
                )
    a.out.write_text(json.dumps({"load_avg_1m_at_end": round(os.getloadavg()[0], 2), "rows": results}, indent=2))
    print(f"{'profile':22} {'depth':>5} {'mode':9} {'median s':>8} {'vs none':>7}  runs")
    for r in results:
        runs = ", ".join(f"{s:.2f}" for s in r["seconds"])
        print(f"{r['profile']:22} {r['depth']:>5} {r['mode']:9} {r['median_s']:>8} {r['vs_none']:>7}  {runs}")


if __name__ == "__main__":
    main()
