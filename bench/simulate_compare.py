"""The end-to-end comparison: fedhft against the baselines on BBC News, same split, model and seeds.

Runs `fedhft simulate` for every method in one go and copies report.json, accuracy.png and traffic.png into
bench/results/simulate/. Usage: `python bench/simulate_compare.py [--quick]` (also `make bench`).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "simulate"
METHODS = "fedhft,fedavg-lora,hetlora,flexlora"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer clients and rounds")
    ap.add_argument("--alpha", type=float, default=0.3)
    a = ap.parse_args()
    clients, profiles, rounds = (
        (6, "rpi4-4gb:2,phone-midrange-6gb:2,laptop-x86-16gb:2", 3)
        if a.quick
        else (10, "rpi4-4gb:3,phone-lowend-3gb:2,phone-midrange-6gb:3,laptop-x86-16gb:2", 6)
    )
    with tempfile.TemporaryDirectory(prefix="fedhft-compare-") as tmp:
        out = Path(tmp)
        cmd = [
            sys.executable,
            "-m",
            "fedhft.cli",
            "simulate",
            "--clients",
            str(clients),
            "--profiles",
            profiles,
            "--dataset",
            "bbc-news",
            "--alpha",
            str(a.alpha),
            "--rounds",
            str(rounds),
            "--local-steps",
            "8",
            "--method",
            METHODS,
            "--out",
            str(out),
            "--target-accuracy",
            "0.5",
            "--time-scale",
            "0.02",
        ]
        subprocess.run(cmd, check=True)
        RESULTS.mkdir(parents=True, exist_ok=True)
        for name in ("report.json", "accuracy.png", "traffic.png"):
            if (out / name).is_file():
                shutil.copyfile(out / name, RESULTS / name)
    print(f"results in {RESULTS}")


if __name__ == "__main__":
    main()
