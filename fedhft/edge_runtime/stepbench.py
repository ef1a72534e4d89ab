"""Measure one backend's training step in a fresh process: peak RSS and step time, as JSON on stdout.

Run as `python -m fedhft.edge_runtime.stepbench PROFILE_DIR --batch 8 --seq 128`. A fresh process per
measurement keeps peaks from different configurations apart (ru_maxrss only grows).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_mb() -> float:
    """This process's peak RSS (VmHWM). Not ru_maxrss: that survives exec and reports the parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(profile_dir: Path, batch: int, seq: int, steps: int, threads: int | None, seed: int = 0) -> dict:
    from fedhft.edge_runtime.torchfree import block_heavy_imports

    block_heavy_imports()  # measure what a device without torch would see
    start_rss = _rss_mb()
    from fedhft.edge_runtime.ort_backend import OrtTrainer, import_training_api

    import_training_api()
    imported_rss = _rss_mb()  # the interpreter, numpy and ONNX Runtime's libraries: the runtime's own footprint
    trainer = OrtTrainer(profile_dir, threads=threads)
    loaded_rss = _rss_mb()
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 20000, size=(batch, seq))
    mask = np.ones((batch, seq), dtype=np.int64)
    labels = rng.integers(0, trainer.manifest.num_labels, size=batch)
    times, losses = [], []
    for _ in range(steps):
        t = time.perf_counter()
        losses.append(trainer.train_step(ids, mask, labels).loss)
        times.append(time.perf_counter() - t)
    warm = times[1:] or times
    return {
        "profile_dir": str(profile_dir),
        "batch": batch,
        "seq": seq,
        "steps": steps,
        "start_rss_mb": round(start_rss, 1),
        "imported_rss_mb": round(imported_rss, 1),
        "loaded_rss_mb": round(loaded_rss, 1),
        "peak_rss_mb": round(_peak_mb(), 1),
        "step_seconds": round(float(np.median(warm)), 4),
        "first_step_seconds": round(times[0], 4),
        "losses": [round(x, 5) for x in losses],
    }


def measure_in_subprocess(
    profile_dir: Path,
    batch: int = 8,
    seq: int = 128,
    steps: int = 3,
    threads: int | None = None,
    timeout: float = 900,
) -> dict:
    """Run `run` in a fresh interpreter and return its JSON."""
    cmd = [
        sys.executable,
        "-m",
        "fedhft.edge_runtime.stepbench",
        str(profile_dir),
        "--batch",
        str(batch),
        "--seq",
        str(seq),
        "--steps",
        str(steps),
    ]
    if threads:
        cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"stepbench failed for {profile_dir}: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("profile_dir", type=Path)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    print(json.dumps(run(a.profile_dir, a.batch, a.seq, a.steps, a.threads)))


if __name__ == "__main__":
    main()
