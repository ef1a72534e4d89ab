"""Poisoning bounds with real training: final accuracy per aggregator x attack, dense and masked uploads.

The experiment of tests/scenarios/test_poisoning.py, a bit bigger (tests/support/poisoning.py): 8 honest clients
and 2 attackers train a tiny random BERT (hidden 32, 2 layers, exported for ONNX Runtime here) on a keyword task,
one FedBuff flush per round; attackers multiply their update (ΔW and head change) by -10 (sign-flip) or 50
(scale). Defences: mean (no bound), clip (--clip-multiple 2), trimmed-mean (β 0.2), median, and
trimmed-mean + clip; uploads dense (mask ratio 1.0) or FedHFT-masked (the export's 0.25).

Writes bench/results/poisoning.json and prints a table per mask ratio. Run:
`.venv/bin/python bench/poisoning.py [--quick]` (about 30 runs; a few seconds of CPU each); `--render`
prints the tables of the saved results again.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.support (the shared test helpers) and this checkout's fedhft

from tests.support.poisoning import ATTACKS, DEFENCES, Setup, run  # noqa: E402

OUT = ROOT / "bench" / "results" / "poisoning.json"
PROFILE = """
name = "tiny-bench"
description = "poisoning bench device"
arch = "x86_64"
ram_mb = 2048
train_memory_fraction = 0.5
fp32_gflops = 50.0
uplink_mbps = 20.0
downlink_mbps = 50.0
runtimes = ["ort"]
default_runtime = "ort"
target_step_seconds = 5.0
target_upload_seconds = 10.0
batch_size = 8
sources = ["bench/poisoning.py"]
"""


def tiny_package(root: Path) -> Path:
    """A tiny random BERT (seed 0) exported for ONNX Runtime with 3 labels and sequences of 32 tokens."""
    import torch
    from transformers import BertConfig, BertModel

    from fedhft.device_profiles.model_shape import packaged_model_dir
    from fedhft.device_profiles.profile import load_profile
    from fedhft.export.pipeline import ExportOptions, export_profile

    torch.manual_seed(0)
    model = root / "model"
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(model)
    for name in ("tokenizer.json", "vocab.txt"):
        shutil.copyfile(packaged_model_dir() / name, model / name)
    profile = root / "tiny-bench.toml"
    profile.write_text(PROFILE)
    opts = ExportOptions(num_labels=3, max_seq_len=32, min_compression=None)
    return export_profile(model, load_profile(profile), root / "export", opts=opts).directory


def first_round(accuracy: list[float], target: float = 0.95) -> str:
    """The first round whose accuracy reaches ``target`` ("-" when none does)."""
    return next((f"r{i}" for i, a in enumerate(accuracy) if a >= target), "-")


def table(results: list[dict], mask: str) -> str:
    """Final accuracy per aggregator x attack, with the first round at >= 95% in brackets."""
    attacks = list(ATTACKS)
    lines = [
        f"mask ratio {mask}: final accuracy (first round at >= 0.95)",
        f"{'aggregator':20s}" + "".join(f"{a:>16s}" for a in attacks),
    ]
    for defence in DEFENCES:
        cells = {r["attack"]: r for r in results if r["mask"] == mask and r["defence"] == defence}
        if cells:
            row = [
                f"{cells[a]['final']:.3f} ({first_round(cells[a]['accuracy'])})" if a in cells else "n/a"
                for a in attacks
            ]
            lines.append(f"{defence:20s}" + "".join(f"{c:>16s}" for c in row))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 rounds, dense uploads, mean and trimmed mean only")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--render", action="store_true", help="only print the tables of the saved results")
    args = parser.parse_args()
    if args.render:
        doc = json.loads(OUT.read_text())
        for mask_name in doc["masks"]:
            print(table(doc["results"], mask_name) + "\n")
        return
    rounds = 5 if args.quick else args.rounds
    masks = {"1.0": 1.0} if args.quick else {"1.0": 1.0, "0.25 (export)": None}
    defences = ["mean", "trimmed-mean"] if args.quick else list(DEFENCES)
    base = Setup(rounds=rounds, local_steps=12, samples_per_client=64, test_samples=400)
    results: list[dict] = []
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="fedhft-poisoning-") as tmp:
        package = tiny_package(Path(tmp))
        for mask_name, mask in masks.items():
            setup = replace(base, mask_ratio=mask)
            for defence in defences:
                for attack, factor in ATTACKS.items():
                    out = run(package, setup, DEFENCES[defence], factor)
                    row = {
                        "mask": mask_name,
                        "defence": defence,
                        "config": DEFENCES[defence],
                        "attack": attack,
                        "factor": factor,
                        "accuracy": [round(a, 4) for a in out.accuracy],
                        "final": round(out.final, 4),
                        "clipped": out.clipped,
                        "cpu_seconds": round(out.cpu_seconds, 2),
                    }
                    results.append(row)
                    print(
                        f"{mask_name:14s} {defence:18s} {attack:10s} {row['accuracy']} clipped={out.clipped}",
                        flush=True,
                    )
    doc = {
        "setup": asdict(base),
        "masks": list(masks),
        "attacks": ATTACKS,
        "defences": {d: DEFENCES[d] for d in defences},
        "model": "random BERT, hidden 32, 2 layers, 3 labels, seq 32, int8 base, ORT (tiny-bench profile)",
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "wall_seconds": round(time.time() - t0, 1),
        "results": results,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    print()
    for mask_name in masks:
        print(table(results, mask_name))
        print()
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
