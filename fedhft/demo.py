"""`make demo`: export the packaged MiniLM for the shipped ONNX Runtime profiles, train one package torch-free,
then run a small federation (`fedhft simulate`: broker, server and four edge runtimes on BBC News) and print its
report.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TRAIN_SCRIPT = r"""
import json, sys, time
import numpy as np
from fedhft.edge_runtime.torchfree import block_heavy_imports
block_heavy_imports()
from fedhft.datasets import load_bbc_news
from fedhft.edge_runtime.ort_backend import OrtTrainer
from fedhft.edge_runtime.tokenize import TextEncoder

profile_dir, steps = sys.argv[1], int(sys.argv[2])
trainer = OrtTrainer(profile_dir, learning_rate=2e-3)
enc = TextEncoder.for_manifest(trainer.manifest, profile_dir)
data = load_bbc_news(max_chars=600)
rng = np.random.default_rng(0)
order = rng.permutation(len(data.texts))
test, train = order[:64], order[64:]
def accuracy():
    correct = 0
    for i in range(0, len(test), 16):
        idx = test[i:i + 16]
        ids, mask = enc.encode([data.texts[j] for j in idx])
        y = np.array([data.labels[j] for j in idx])
        correct += int((trainer.eval_step(ids, mask, y).logits.argmax(1) == y).sum())
    return correct / len(test)
acc0 = accuracy()
bs = trainer.manifest.profile["batch_size"]
for s in range(steps):
    idx = train[s * bs:(s + 1) * bs]
    ids, mask = enc.encode([data.texts[j] for j in idx])
    y = np.array([data.labels[j] for j in idx])
    t = time.perf_counter()
    r = trainer.train_step(ids, mask, y)
    print(f"  step {s + 1:>3}/{steps}  loss {r.loss:.4f}  ({time.perf_counter() - t:.2f} s)", file=sys.stderr)
print(json.dumps({"acc_before": acc0, "acc_after": accuracy(), "torch_loaded": "torch" in sys.modules}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("demo-out"))
    ap.add_argument("--train-profile", default="laptop-x86-16gb")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--skip-simulation", action="store_true")
    a = ap.parse_args()
    from fedhft.device_profiles.planner import planned_runtime
    from fedhft.device_profiles.profile import load_profile, shipped_profile_names

    shipped = shipped_profile_names()
    names = [n for n in shipped if planned_runtime(load_profile(n)) == "ort"]  # minutes each for ExecuTorch ones
    art = a.out / "artifacts"
    print(f"== 1/3 exporting the packaged MiniLM for the {len(names)} ONNX Runtime profiles into {art}", flush=True)
    others = sorted(set(shipped) - set(names))
    print(f"   ({', '.join(others)} run the ExecuTorch program: `fedhft export --profile NAME`, ~2 min each)")
    t = time.perf_counter()
    cmd = [
        sys.executable,
        "-m",
        "fedhft.cli",
        "export",
        "--profile",
        ",".join(names),
        "--format",
        "auto",
        "--out",
        str(art),
        "--num-labels",
        "5",
    ]
    subprocess.run(cmd, check=True)
    print(f"   done in {time.perf_counter() - t:.0f} s", flush=True)
    pdir = art / a.train_profile
    print(f"== 2/3 training {pdir} for {a.steps} steps on BBC News, torch-free (ONNX Runtime)", flush=True)
    out = subprocess.run(
        [sys.executable, "-c", TRAIN_SCRIPT, str(pdir), str(a.steps)],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"   held-out accuracy {res['acc_before']:.2f} -> {res['acc_after']:.2f} "
        f"(64 articles, 5 topics; torch loaded: {res['torch_loaded']})"
    )
    print(f"== made: {', '.join(sorted(p.name for p in art.iterdir() if not p.name.startswith('.')))} under {art}")
    if a.skip_simulation:
        return
    sim = a.out / "simulation"
    print(
        "== 3/3 fedhft simulate: broker, server and 4 edge runtimes (2 x phone-midrange-6gb, 2 x laptop-x86-16gb) on "
        "BBC News for 30 s of the devices' virtual time: fedhft (asynchronous, masked, 2 clusters) against "
        "fedavg-lora (synchronous rounds), same split and seed",
        flush=True,
    )
    cmd = [sys.executable, "-m", "fedhft.cli", "simulate", "--clients", "4"]
    cmd += ["--profiles", "phone-midrange-6gb:2,laptop-x86-16gb:2", "--dataset", "bbc-news", "--alpha", "0.3"]
    cmd += ["--rounds", "40", "--virtual-budget", "30", "--local-steps", "6", "--method", "fedhft,fedavg-lora"]
    cmd += ["--clusters", "2", "--target-accuracy", "0.5", "--time-budget", "20", "--max-test", "300"]
    cmd += ["--out", str(sim)]
    subprocess.run(cmd, check=True)
    print(f"== report: {sim / 'report.json'} (plots: accuracy.png, traffic.png); `fedhft report {sim}` prints it again")


if __name__ == "__main__":
    main()
