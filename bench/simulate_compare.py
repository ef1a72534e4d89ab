"""The end-to-end comparison: fedhft, its ablations and the baselines, same splits, model and seeds.

Runs `fedhft simulate` once per (seed, upload encoding) still missing and merges each finished call into
bench/results/<preset dir>/report.json at once, so a long bench resumes where it stopped (per method and seed)
and can span sessions; summary, goals and plots (accuracy.png, traffic.png) are recomputed from the merged
report, and the table is printed. A report of another configuration (other preset arguments) is replaced.
Presets (every method runs the same virtual-time budget): `bbc` (default: BBC News, Dirichlet alpha 0.3, 8
heterogeneous devices, 150 virtual seconds), `bbc50` (the same data on 50 devices at alpha 0.5, 10 server
versions, in two `fedhft edge host` processes), `bbc50-capped` (bbc50's fedhft with every device capped at one
update per server version: `--max-rounds-per-version 1`), `bbc50-flushcap` (the same with at most one update
of each device in any flush: `--max-updates-per-flush 1`), `bbc50-sync-flat` (bbc50 in synchronous rounds
without clustering: `fedhft-no-clustering --mode sync`), `clothing` (Women's Clothing reviews, recommended or
not, split by department), `clothing-rating` (the same reviews' 1-5 star rating, 5 classes), `quick` (6 devices,
60 virtual seconds), `chaos` (fedhft clean and under faults).
`--encoding fp16,int8` adds each method's int8-upload runs (named METHOD+int8) to the same report.

Usage: `python bench/simulate_compare.py [--preset P] [--methods a,b] [--seeds 3|0,1,2] [--encoding fp16,int8]
[--dry-run] [--fresh]` (`make bench`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from fedhft.cli.signals import StopRequested, raise_on_signals
from fedhft.simulate.config import DEFAULT_ENCODING, SimConfig
from fedhft.simulate.data import load_dataset
from fedhft.simulate.methods import METHODS
from fedhft.simulate.plots import plot
from fedhft.simulate.reference import reference
from fedhft.simulate.report import build_report, table
from fedhft.simulate.resume import merge, pending
from fedhft.simulate.runner import make_split
from fedhft.simulate.seeds import parse_encodings, parse_seeds

RESULTS = Path(__file__).parent / "results"
ALL = ",".join(METHODS)  # every built-in method, in the report's order
BBC50_ARGS = (
    ["--clients", "50"]
    + ["--profiles", "rpi4-4gb:13,phone-lowend-3gb:12,phone-midrange-6gb:13,laptop-x86-16gb:12"]
    + ["--dataset", "bbc-news", "--alpha", "0.5", "--rounds", "10", "--local-steps", "8"]  # 0.3: too few texts
    + ["--target-accuracy", "0.7", "--backend", "ort", "--hosts", "2"]  # no --minutes: it stops at the target
    # equal virtual time: 10 async versions take fedhft ~60-80 virtual s, 10 synchronous rounds ~374 s
    + ["--time-budget", "75"]
)

PRESETS: dict[str, dict] = {
    "bbc": {
        "dir": "simulate",
        "args": ["--clients", "8", "--profiles", "rpi4-4gb:2,phone-lowend-3gb:2,phone-midrange-6gb:2,laptop-x86-16gb:2"]
        + ["--dataset", "bbc-news", "--alpha", "0.3", "--rounds", "40", "--virtual-budget", "150", "--local-steps", "8"]
        + ["--target-accuracy", "0.7", "--time-budget", "120", "--backend", "ort"],
        "methods": ALL,
        "seeds": "3",
    },
    "bbc50": {  # paper scale: FedHFT's 50 devices, 10 server versions, one method and seed in < 30 minutes
        "dir": "simulate-bbc50",
        "args": BBC50_ARGS,
        "methods": "fedhft,fedavg-lora",
        "seeds": "3",
    },
    "bbc50-capped": {  # bbc50's fedhft with each device capped at one update per server version
        "dir": "simulate-bbc50-capped",
        "args": [*BBC50_ARGS, "--max-rounds-per-version", "1"],
        "methods": "fedhft",
        "seeds": "3",
    },
    "bbc50-flushcap": {  # bbc50's fedhft with at most one update of each device in any flush
        "dir": "simulate-bbc50-flushcap",
        "args": [*BBC50_ARGS, "--max-updates-per-flush", "1"],
        "methods": "fedhft",
        "seeds": "3",
    },
    "bbc50-sync-flat": {  # bbc50 in FedHFT's synchronous rounds with one cluster: what K=2 costs at 50 devices
        "dir": "simulate-bbc50-sync-flat",
        "args": [*BBC50_ARGS, "--mode", "sync"],
        "methods": "fedhft-no-clustering",
        "seeds": "3",
    },
    "clothing": {
        "dir": "simulate-clothing",
        "args": ["--clients", "8", "--profiles", "rpi4-4gb:2,phone-lowend-3gb:2,phone-midrange-6gb:2,laptop-x86-16gb:2"]
        + ["--dataset", "womens-clothing", "--split", "natural", "--rounds", "40", "--virtual-budget", "150"]
        + ["--local-steps", "8", "--target-accuracy", "0.8", "--time-budget", "120", "--max-test", "600"]
        + ["--backend", "ort"],
        "methods": "fedhft,fedavg-lora",
        "seeds": "3",
    },
    "clothing-rating": {  # the goal data set: the 1-5 star rating (5 classes), split by department
        "dir": "simulate-clothing-rating",
        "args": ["--clients", "8", "--profiles", "rpi4-4gb:2,phone-lowend-3gb:2,phone-midrange-6gb:2,laptop-x86-16gb:2"]
        + ["--dataset", "womens-clothing-rating", "--split", "natural", "--rounds", "40", "--virtual-budget", "150"]
        + ["--local-steps", "8", "--target-accuracy", "0.6", "--time-budget", "120", "--max-test", "600"]
        + ["--backend", "ort"],
        "methods": "fedhft,fedavg-lora,flexlora",
        "seeds": "3",
    },
    "quick": {
        "dir": "simulate-quick",
        "args": ["--clients", "6", "--profiles", "rpi4-4gb:2,phone-midrange-6gb:2,laptop-x86-16gb:2"]
        + ["--dataset", "bbc-news", "--alpha", "0.3", "--rounds", "20", "--virtual-budget", "60", "--local-steps", "8"]
        + ["--target-accuracy", "0.5", "--time-budget", "50"],
        "methods": "fedhft,fedavg-lora,hetlora,flexlora",
        "seeds": "1",
    },
    "chaos": {
        "dir": "chaos",
        "args": ["--clients", "4", "--profiles", "rpi4-4gb:2,laptop-x86-16gb:2"]
        + ["--dataset", "bbc-news", "--alpha", "0.3", "--rounds", "6", "--local-steps", "6"]
        + ["--target-accuracy", "0.6", "--clusters", "1", "--chaos", "default,window=120"]
        + ["--backend", "ort"],
        "methods": "fedhft",
        "seeds": "1",
    },
}


def run_name(method: str, encoding: str, chaos: bool = False) -> str:
    """A run's name in the report (as `fedhft simulate` spells it)."""
    return method + ("" if encoding == DEFAULT_ENCODING else f"+{encoding}") + ("+chaos" if chaos else "")


def plan_calls(
    todo: dict[int, list[str]], methods: list[str], encodings: list[str], chaos: bool
) -> list[tuple[int, str, str]]:
    """(seed, encoding, method) of each `fedhft simulate` call still needed, one method a call so that an
    interrupted bench loses at most the run in progress: a method reruns for a seed and encoding when any of its
    runs (its +chaos twin included) is missing."""
    return [
        (seed, enc, m)
        for seed, names in todo.items()
        for m in methods
        for enc in encodings
        if {run_name(m, enc), run_name(m, enc, chaos)} & set(names)
    ]


def arg_value(args: list[str], name: str) -> str | None:
    """The value that follows option `name` in a preset's arguments (None when it is not there)."""
    return args[args.index(name) + 1] if name in args else None


def reading_options(args: list[str]) -> dict[str, float | int]:
    """The report's reading options (last k, time budget) that the preset's arguments set."""
    budget, last_k = arg_value(args, "--time-budget"), arg_value(args, "--last-k")
    return ({} if budget is None else {"time_budget": float(budget)}) | (
        {} if last_k is None else {"last_k": int(last_k)}
    )


def add_references(report: dict, args: list[str]) -> int:
    """Give runs from before the no-model reference their seed's (from the seed's split; nothing is rerun).
    Returns how many runs got one."""
    c = report["config"]
    missing = [r for r in report["methods"] if "reference" not in r]
    if not missing:
        return 0
    data = load_dataset(c["dataset"])
    max_test = int(arg_value(args, "--max-test") or SimConfig.max_test)
    refs: dict[int, dict] = {}
    for r in missing:
        seed = int(r.get("seed", c.get("seed", 0)))
        if seed not in refs:
            cfg = SimConfig(
                clients=c["clients"],
                profiles=c["profiles"],
                dataset=c["dataset"],
                alpha=c["alpha"],
                rounds=0,
                method=METHODS["fedhft"],
                out=Path("."),
                seed=seed,
                split=c.get("split", "dirichlet"),
                max_test=max_test,
            )
            refs[seed] = reference(data.labels, make_split(data, cfg))
        r["reference"] = refs[seed]
    return len(missing)


def run_simulate(cmd: list[str]) -> None:
    """Run one `fedhft simulate` call; a SIGTERM/SIGINT to this bench is passed on to it, so it stops the
    processes it started, and the bench exits after it."""
    child = subprocess.Popen(cmd)
    try:
        with raise_on_signals():
            rc = child.wait()
    except StopRequested as stop:
        child.send_signal(stop.signum)
        child.wait(120)
        sys.exit(128 + stop.signum)
    if rc:
        raise subprocess.CalledProcessError(rc, cmd)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=sorted(PRESETS), default="bbc")
    ap.add_argument("--quick", action="store_true", help="same as --preset quick")
    ap.add_argument("--methods", default=None, help="run only these (merged into the preset's report)")
    ap.add_argument("--seeds", default=None, help="N seeds from 0, or a list 0,1,2 (default: the preset's)")
    ap.add_argument("--encoding", default=DEFAULT_ENCODING, help="upload encodings to run, e.g. fp16,int8")
    ap.add_argument("--dry-run", action="store_true", help="print what is finished and what would run")
    ap.add_argument("--fresh", action="store_true", help="ignore the preset's report (replaced when done)")
    a = ap.parse_args()
    name = "quick" if a.quick else a.preset
    preset = PRESETS[name]
    methods = [m.strip() for m in (a.methods or preset["methods"]).split(",") if m.strip()]
    seeds, encodings = parse_seeds(a.seeds or preset["seeds"]), parse_encodings(a.encoding)
    chaos = "--chaos" in preset["args"]
    results = RESULTS / preset["dir"]
    path = results / "report.json"
    report = None if a.fresh or not path.is_file() else json.loads(path.read_text())
    expected = {**report["config"], "bench_args": preset["args"]} if report else {}
    names = [run_name(m, e, c) for m in methods for e in encodings for c in sorted({False, chaos})]
    calls = plan_calls(pending(report, expected, names, seeds), methods, encodings, chaos)
    done = len(names) * len(seeds) - len(calls) * (1 + chaos)
    print(f"{name}: {done} of {len(names) * len(seeds)} runs finished; {len(calls)} `fedhft simulate` call(s) to go")
    for seed, enc, m in calls:
        print(f"  seed {seed}: {run_name(m, enc)}")
    if a.dry_run:
        return
    readings = reading_options(preset["args"])
    stale = report is not None and any(report["config"].get(k) != v for k, v in readings.items())
    if report is not None and not calls and (add_references(report, preset["args"]) or stale):
        report = build_report(report["methods"], {**report["config"], **readings})
        path.write_text(json.dumps(report, indent=2, default=str) + "\n")
        plot(results, report)
    command = "python bench/simulate_compare.py" + (f" --preset {name}" if name != "bbc" else "")
    for seed, enc, m in calls:
        with tempfile.TemporaryDirectory(prefix="fedhft-compare-") as tmp:
            out = Path(tmp)
            cmd = [sys.executable, "-m", "fedhft.cli", "simulate", *preset["args"], "--method", m]
            cmd += ["--seed", str(seed), "--encoding", enc, "--out", str(out)]
            run_simulate(cmd)
            new = json.loads((out / "report.json").read_text())
        cut = [r for r in new["methods"] if r.get("stopped_at_wall_limit")]
        if cut:  # its figures would depend on how busy the host was: not kept, still to run
            version = max((p["version"] for p in cut[0].get("accuracy_curve", [])), default=0)
            print(f"seed {seed}: {run_name(m, enc)} stopped at the wall-time limit at version {version}; not kept")
            continue
        new["config"].update(command=command, bench_args=preset["args"])
        merged = merge(report, new, ALL.split(","))
        add_references(merged, preset["args"])
        report = build_report(merged["methods"], merged["config"])
        results.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, default=str) + "\n")  # a finished call is never lost
        plot(results, report)
    if report is not None:
        print(table(report))
    print(f"results in {results}")


if __name__ == "__main__":
    main()
