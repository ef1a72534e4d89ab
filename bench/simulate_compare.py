"""The end-to-end comparison: fedhft, its ablations and the baselines, same split, model and seeds.

Runs `fedhft simulate` and copies report.json, accuracy.png and traffic.png into bench/results/<preset dir>/.
Presets: `bbc` (default: BBC News, Dirichlet alpha 0.3, 8 heterogeneous devices), `clothing` (Women's Clothing
reviews, split by department), `quick` (6 devices, 3 rounds), `chaos` (fedhft clean and under faults).
`--methods a,b` runs only those and merges them into the preset's existing report (same configuration), so a
long comparison can be completed in parts; goals and plots are recomputed from the merged report.

Usage: `python bench/simulate_compare.py [--preset bbc|clothing|quick|chaos] [--methods ...]` (`make bench`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from fedhft.simulate.methods import METHODS
from fedhft.simulate.report import goals, plot

RESULTS = Path(__file__).parent / "results"
ALL = ",".join(METHODS)  # every built-in method, in the report's order
PRESETS: dict[str, dict] = {
    "bbc": {
        "dir": "simulate",
        "args": ["--clients", "8", "--profiles", "rpi4-4gb:2,phone-lowend-3gb:2,phone-midrange-6gb:2,laptop-x86-16gb:2"]
        + ["--dataset", "bbc-news", "--alpha", "0.3", "--rounds", "5", "--local-steps", "8"]
        + ["--target-accuracy", "0.7", "--time-scale", "0.02", "--backend", "ort"],
        "methods": ALL,
    },
    "clothing": {
        "dir": "simulate-clothing",
        "args": ["--clients", "8", "--profiles", "rpi4-4gb:2,phone-lowend-3gb:2,phone-midrange-6gb:2,laptop-x86-16gb:2"]
        + ["--dataset", "womens-clothing", "--split", "natural", "--rounds", "4", "--local-steps", "8"]
        + ["--target-accuracy", "0.8", "--time-scale", "0.02", "--max-test", "600", "--backend", "ort"],
        "methods": "fedhft,fedavg-lora",
    },
    "quick": {
        "dir": "simulate-quick",
        "args": ["--clients", "6", "--profiles", "rpi4-4gb:2,phone-midrange-6gb:2,laptop-x86-16gb:2"]
        + ["--dataset", "bbc-news", "--alpha", "0.3", "--rounds", "3", "--local-steps", "8"]
        + ["--target-accuracy", "0.5", "--time-scale", "0.02"],
        "methods": "fedhft,fedavg-lora,hetlora,flexlora",
    },
    "chaos": {
        "dir": "chaos",
        "args": ["--clients", "4", "--profiles", "rpi4-4gb:2,laptop-x86-16gb:2"]
        + ["--dataset", "bbc-news", "--alpha", "0.3", "--rounds", "6", "--local-steps", "6"]
        + ["--target-accuracy", "0.6", "--time-scale", "0.02", "--clusters", "1", "--chaos", "default,window=120"]
        + ["--backend", "ort"],
        "methods": "fedhft",
    },
}


def _same_run(a: dict, b: dict) -> bool:
    """Same configuration (runs from before `--backend` existed used ORT on every device)."""
    norm = [{**{"backend": "ort"}, **{k: v for k, v in c.items() if k != "command"}} for c in (a, b)]
    return norm[0] == norm[1]


def merge(old: dict | None, new: dict) -> dict:
    """New method results replace old ones of the same name when the configuration is the same."""
    if old is None or not _same_run(old["config"], new["config"]):
        return new
    names = {r["method"] for r in new["methods"]}
    methods = [r for r in old["methods"] if r["method"] not in names] + new["methods"]
    order = {m: i for i, m in enumerate(ALL.split(","))}
    methods.sort(key=lambda r: (order.get(r["method"].split("+")[0], 99), r["method"]))
    return {"config": new["config"], "methods": methods}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=sorted(PRESETS), default="bbc")
    ap.add_argument("--quick", action="store_true", help="same as --preset quick")
    ap.add_argument("--methods", default=None, help="run only these (merged into the preset's report)")
    a = ap.parse_args()
    preset = PRESETS["quick" if a.quick else a.preset]
    methods = a.methods or preset["methods"]
    results = RESULTS / preset["dir"]
    with tempfile.TemporaryDirectory(prefix="fedhft-compare-") as tmp:
        out = Path(tmp)
        cmd = [sys.executable, "-m", "fedhft.cli", "simulate", *preset["args"], "--method", methods, "--out", str(out)]
        subprocess.run(cmd, check=True)
        new = json.loads((out / "report.json").read_text())
    new["config"]["command"] = "python bench/simulate_compare.py" + (
        f" --preset {a.preset}" if a.preset != "bbc" or a.quick else ""
    )
    path = results / "report.json"
    report = merge(json.loads(path.read_text()) if path.is_file() else None, new)
    report["goals"] = goals(report)
    results.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    plot(results, report["methods"])
    print(f"results in {results}")


if __name__ == "__main__":
    main()
