"""A comparison built up over several sessions: which (run, seed) pairs a report already holds, and merging a
new partial report into an older one of the same configuration (pure; the bench harness does the I/O).

Two reports are of the same configuration when their configs agree on everything but the seeds, the encodings
run, the reading options (last k, time budget), the command that made them and how the devices were hosted
(--hosts: the same numbers either way), in the config and in the bench arguments it records.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedhft.simulate.summary import run_seed

NOT_CONFIG = ("seed", "seeds", "encodings", "command", "last_k", "time_budget", "hosts")
NOT_CONFIG_ARGS = ("--last-k", "--time-budget", "--hosts")  # bench arguments of NOT_CONFIG options


def run_args(args: Sequence[str]) -> list[str]:
    """A bench's `fedhft simulate` arguments without NOT_CONFIG_ARGS and their values."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in NOT_CONFIG_ARGS:
            skip = True
        else:
            out.append(a)
    return out


def run_key(run: dict, default_seed: int = 0) -> tuple[str, int]:
    return run["method"], run_seed(run, default_seed)


def same_config(a: dict, b: dict) -> bool:
    """Same configuration (runs from before `--backend` existed used ORT on every device)."""
    norm = [{"backend": "ort", **{k: v for k, v in c.items() if k not in NOT_CONFIG}} for c in (a, b)]
    for c in norm:
        if "bench_args" in c:
            c["bench_args"] = run_args(c["bench_args"])
    return norm[0] == norm[1]


def finished(report: dict | None) -> set[tuple[str, int]]:
    """The (run name, seed) pairs a report holds."""
    if not report:
        return set()
    default = int(report.get("config", {}).get("seed", 0))
    return {run_key(r, default) for r in report.get("methods", [])}


def pending(report: dict | None, config: dict, runs: Sequence[str], seeds: Sequence[int]) -> dict[int, list[str]]:
    """Per seed, the runs (names as the report spells them) still to do; everything when the report's
    configuration differs from ``config`` (its runs would not be comparable)."""
    done = finished(report) if report and same_config(report["config"], config) else set()
    todo = {s: [r for r in runs if (r, s) not in done] for s in seeds}
    return {s: rs for s, rs in todo.items() if rs}


def merge(old: dict | None, new: dict, order: Sequence[str] = ()) -> dict:
    """``new``'s runs replace ``old``'s of the same (run, seed) when the configuration is the same (otherwise
    ``new`` alone); runs sorted by ``order`` of method names, then seed. The config lists every seed held."""
    if old is None or not same_config(old["config"], new["config"]):
        runs = list(new["methods"])
        config = dict(new["config"])
    else:
        d_old, d_new = (int(r["config"].get("seed", 0)) for r in (old, new))
        fresh = {run_key(r, d_new): dict(r, seed=run_seed(r, d_new)) for r in new["methods"]}
        runs = [dict(r, seed=run_seed(r, d_old)) for r in old["methods"] if run_key(r, d_old) not in fresh]
        runs += list(fresh.values())
        config = {**old["config"], **new["config"]}
    rank = {m: i for i, m in enumerate(order)}
    runs.sort(key=lambda r: (rank.get(r["method"].split("+")[0], len(rank)), r["method"], run_seed(r)))
    config["seeds"] = sorted({run_seed(r, int(config.get("seed", 0))) for r in runs})
    encodings = {r.get("encoding", "fp16") for r in runs}
    config["encodings"] = sorted(encodings)
    return {"config": config, "methods": runs}
