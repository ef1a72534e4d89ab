"""Is an ORT training step bit-identical when repeated? Twice with ORT's default threads, twice with one thread,
and through a hosted runtime's state swap (save, another device's step, load into a rebuilt session).

Exports the planned int8 MiniLM package of one profile, trains 4 fixed batches each way, compares the parameters
bit for bit, prints a table and writes bench/results/ort_determinism.json. Usage: `python bench/ort_determinism.py`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from fedhft.device_profiles.model_shape import read_model
from fedhft.device_profiles.planner import plan_lora
from fedhft.device_profiles.profile import load_profile
from fedhft.edge_runtime.ort_backend import OrtTrainer
from fedhft.export.pipeline import ExportOptions, export_profile

RESULTS = Path(__file__).parent / "results"
Batch = tuple[np.ndarray, np.ndarray, np.ndarray]


def _batches(n: int, labels: int) -> list[Batch]:
    rng = np.random.default_rng(0)
    ids = [rng.integers(1000, 20000, size=(8, 64)) for _ in range(n)]
    return [(i, np.ones_like(i), rng.integers(0, labels, size=8)) for i in ids]


def _straight(d: Path, batches: list[Batch], threads: int | None) -> dict[str, np.ndarray]:
    t = OrtTrainer(d, threads=threads)
    for b in batches:
        t.train_step(*b)
    return t.get_parameters()


def _swapped(d: Path, batches: list[Batch], tmp: Path) -> dict[str, np.ndarray]:
    t, other = OrtTrainer(d), OrtTrainer(d)
    half = len(batches) // 2
    for b in batches[:half]:
        t.train_step(*b)
    t.save_state(tmp / "swap.state")
    other.train_step(*batches[-1])
    t.load_state(tmp / "swap.state")
    for b in batches[half:]:
        t.train_step(*b)
    return t.get_parameters()


def _compare(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict:
    diff = max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)
    return {"bit_identical": all(np.array_equal(a[k], b[k]) for k in a), "max_abs_diff": diff}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="rpi4-4gb")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", type=Path, default=RESULTS / "ort_determinism.json")
    a = ap.parse_args()
    profile = load_profile(a.profile)
    plan = plan_lora(read_model(None).shape(5, 64, 8), profile, runtime="ort")
    batches = _batches(a.steps, 5)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedhft-bench-") as tmp:
        res = export_profile(None, profile, Path(tmp), opts=ExportOptions(num_labels=5, int8=True), plan=plan)
        d = res.directory
        for label, threads in (("twice, default threads", None), ("twice, 1 thread", 1)):
            rows.append({"check": label, **_compare(_straight(d, batches, threads), _straight(d, batches, threads))})
        swapped = _swapped(d, batches, Path(tmp))
        rows.append({"check": "straight vs swapped", **_compare(_straight(d, batches, None), swapped)})
    print(f"{'check':<26} {'bit-identical':>13} {'max |diff|':>11}")
    for r in rows:
        print(f"{r['check']:<26} {r['bit_identical']!s:>13} {r['max_abs_diff']:>11.3g}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"profile": a.profile, "steps": a.steps, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
