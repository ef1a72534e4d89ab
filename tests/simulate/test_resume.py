"""A bench that spans sessions: finished (run, seed) pairs are skipped, partial reports of one configuration
merge, a report of another configuration is replaced; the bench harness plans only what is missing."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from fedhft.simulate.resume import finished, merge, pending, same_config
from tests.support import ROOT

CONFIG = {"clients": 8, "dataset": "bbc-news", "alpha": 0.3, "seed": 0, "seeds": [0], "bench_args": ["--a"]}


def report(config: dict, runs: list[tuple[str, int, float]]) -> dict:
    return {"config": config, "methods": [{"method": m, "seed": s, "final_global_accuracy": a} for m, s, a in runs]}


def test_pending_skips_finished_method_and_seed_pairs() -> None:
    old = report(CONFIG, [("fedhft", 0, 0.9), ("fedavg-lora", 0, 0.8), ("fedhft", 1, 0.85)])
    todo = pending(old, CONFIG, ["fedhft", "fedavg-lora"], [0, 1, 2])
    assert todo == {1: ["fedavg-lora"], 2: ["fedhft", "fedavg-lora"]}
    assert pending(old, CONFIG, ["fedhft"], [0, 1]) == {}
    other = dict(CONFIG, alpha=1.0)  # another configuration: nothing it holds counts
    assert pending(old, other, ["fedhft"], [0]) == {0: ["fedhft"]}
    assert pending(None, CONFIG, ["fedhft"], [0]) == {0: ["fedhft"]}


def test_old_reports_count_their_single_seed_from_the_config() -> None:
    old = {"config": dict(CONFIG, seed=5), "methods": [{"method": "fedhft"}]}
    assert finished(old) == {("fedhft", 5)}


def test_merge_keeps_other_pairs_replaces_the_same_pair_and_lists_every_seed() -> None:
    old = report(CONFIG, [("fedavg-lora", 0, 0.8), ("fedhft", 0, 0.5)])
    new = report(dict(CONFIG, seed=1, seeds=[1], command="x"), [("fedhft", 1, 0.9)])
    merged = merge(old, new, ["fedhft", "fedavg-lora"])
    assert [(r["method"], r["seed"]) for r in merged["methods"]] == [("fedhft", 0), ("fedhft", 1), ("fedavg-lora", 0)]
    assert merged["config"]["seeds"] == [0, 1]
    again = merge(merged, report(CONFIG, [("fedhft", 0, 0.95)]), ["fedhft", "fedavg-lora"])
    assert {(r["method"], r["seed"]): r["final_global_accuracy"] for r in again["methods"]}[("fedhft", 0)] == 0.95
    assert len(again["methods"]) == 3
    fresh = merge(old, report(dict(CONFIG, alpha=1.0), [("fedhft", 0, 0.7)]))
    assert len(fresh["methods"]) == 1  # another configuration replaces the report


def test_same_config_ignores_seeds_reading_options_and_command() -> None:
    assert same_config(CONFIG, dict(CONFIG, seed=3, seeds=[3, 4], last_k=5, time_budget=60.0, command="y"))
    assert not same_config(CONFIG, dict(CONFIG, clients=50))
    # a bench that adds a reading option (or hosts the fleet otherwise) keeps its finished runs
    assert same_config(CONFIG, dict(CONFIG, bench_args=["--a", "--time-budget", "75", "--last-k", "2"]))
    assert same_config(dict(CONFIG, bench_args=["--hosts", "2", "--a"]), CONFIG)
    assert not same_config(CONFIG, dict(CONFIG, bench_args=["--a", "--rounds", "20"]))


def _bench() -> object:
    spec = importlib.util.spec_from_file_location("simulate_compare", ROOT / "bench" / "simulate_compare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_runs_only_what_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # noqa: ANN001
    bench = _bench()
    assert bench.plan_calls(
        {1: ["fedhft+int8"], 2: ["fedhft", "fedavg-lora"]}, ["fedhft", "fedavg-lora"], ["fp16", "int8"], False
    ) == [(1, "int8", "fedhft"), (2, "fp16", "fedhft"), (2, "fp16", "fedavg-lora")]
    assert bench.plan_calls({0: ["fedhft+chaos"]}, ["fedhft"], ["fp16"], True) == [(0, "fp16", "fedhft")]
    preset = bench.PRESETS["clothing"]
    (tmp_path / preset["dir"]).mkdir()
    config = dict(CONFIG, bench_args=preset["args"])
    done = report(config, [("fedhft", 0, 0.9), ("fedavg-lora", 0, 0.9), ("fedhft", 1, 0.9)])
    (tmp_path / preset["dir"] / "report.json").write_text(json.dumps(done))
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    monkeypatch.setattr(sys, "argv", ["simulate_compare.py", "--preset", "clothing", "--seeds", "2", "--dry-run"])
    bench.main()
    out = capsys.readouterr().out
    assert "3 of 4 runs finished; 1 `fedhft simulate` call(s) to go" in out and "seed 1: fedavg-lora" in out


def test_bench_keeps_each_finished_run_and_resumes_after_an_interruption(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:  # noqa: ANN001
    """`fedhft simulate` replaced by a fake that writes a one-run report: the second call fails, as a session
    that ends mid-bench; the next bench runs only what is missing and merges everything."""
    bench = _bench()
    calls: list[tuple[str, int, str]] = []
    fail_at = {2}

    def fake_simulate(cmd: list[str]) -> None:
        arg = {k: cmd[i + 1] for i, k in enumerate(cmd) if k.startswith("--") and i + 1 < len(cmd)}
        calls.append((arg["--method"], int(arg["--seed"]), arg["--encoding"]))
        if len(calls) in fail_at:
            raise RuntimeError("session over")
        name = arg["--method"] + ("" if arg["--encoding"] == "fp16" else "+" + arg["--encoding"])
        curve = [{"version": 1, "accuracy": 0.8, "macro_f1": 0.7, "virtual_time": 10.0, "wall_time": 1.0}]
        run = {"method": name, "seed": int(arg["--seed"]), "encoding": arg["--encoding"], "accuracy_curve": curve}
        run["reference"] = {"global_accuracy": 0.5, "personalized_accuracy": 0.6}  # as `fedhft simulate` gives
        config = {"dataset": "d", "seed": int(arg["--seed"]), "seeds": [int(arg["--seed"])]}
        Path(arg["--out"], "report.json").write_text(json.dumps({"config": config, "methods": [run]}))

    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    monkeypatch.setattr(bench, "run_simulate", fake_simulate)
    argv = ["simulate_compare.py", "--preset", "clothing", "--seeds", "2", "--encoding", "fp16,int8"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(RuntimeError):
        bench.main()
    saved = json.loads((tmp_path / "simulate-clothing" / "report.json").read_text())
    assert [(r["method"], r["seed"]) for r in saved["methods"]] == [("fedhft", 0)]  # the first call is kept
    fail_at.clear()
    calls.clear()
    bench.main()
    assert len(calls) == 7 and ("fedhft", 0, "fp16") not in calls  # 8 runs, one finished before
    report = json.loads((tmp_path / "simulate-clothing" / "report.json").read_text())
    assert report["config"]["seeds"] == [0, 1] and report["config"]["encodings"] == ["fp16", "int8"]
    assert sorted((r["method"], r["seed"]) for r in report["methods"]) == sorted(
        (m + e, s) for m in ("fedhft", "fedavg-lora") for e in ("", "+int8") for s in (0, 1)
    )
    assert {s["method"]: s["seeds"] for s in report["summary"]}["fedhft+int8"] == [0, 1]
    calls.clear()
    bench.main()
    assert calls == [] and "8 of 8 runs finished" in capsys.readouterr().out


def test_bench_gives_older_runs_their_seeds_reference_without_running_them() -> None:
    bench = _bench()
    config = {"dataset": "bbc-news", "clients": 6, "profiles": {"rpi4-4gb": 6}, "alpha": 0.3, "seed": 0}
    runs = [{"method": "fedhft", "seed": 1}, {"method": "fedavg-lora", "seed": 1}, {"method": "fedhft", "seed": 0}]
    report = {"config": config, "methods": runs}
    assert bench.add_references(report, ["--max-test", "300"]) == 3
    assert runs[0]["reference"] == runs[1]["reference"] != runs[2]["reference"]  # a seed's runs share its split
    from fedhft.simulate.config import SimConfig
    from fedhft.simulate.data import load_dataset
    from fedhft.simulate.methods import METHODS
    from fedhft.simulate.reference import reference
    from fedhft.simulate.runner import make_split

    data = load_dataset("bbc-news")
    cfg = SimConfig(6, {"rpi4-4gb": 6}, "bbc-news", 0.3, 0, METHODS["fedhft"], Path("."), seed=1, max_test=300)
    assert runs[0]["reference"] == reference(data.labels, make_split(data, cfg))
    assert bench.add_references(report, []) == 0  # nothing missing: nothing recomputed


def test_bench_keeps_no_run_cut_short_by_the_wall_time_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:  # noqa: ANN001
    """A run the wall-time limit cut short depends on how busy the host was: the bench says so, keeps the rest,
    and runs it again next time."""
    bench = _bench()
    cut_seed = 1

    def fake_simulate(cmd: list[str]) -> None:
        arg = {k: cmd[i + 1] for i, k in enumerate(cmd) if k.startswith("--") and i + 1 < len(cmd)}
        seed = int(arg["--seed"])
        curve = [{"version": v, "accuracy": 0.8, "macro_f1": 0.7, "virtual_time": 10.0 * v} for v in (1, 2, 3)]
        run = {"method": arg["--method"], "seed": seed, "encoding": "fp16", "accuracy_curve": curve}
        run |= {"stopped_at_wall_limit": seed == cut_seed, "wall_limit_minutes": 480.0}
        run["reference"] = {"global_accuracy": 0.5, "personalized_accuracy": 0.6}
        config = {"dataset": "d", "seed": seed, "seeds": [seed]}
        Path(arg["--out"], "report.json").write_text(json.dumps({"config": config, "methods": [run]}))

    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    monkeypatch.setattr(bench, "run_simulate", fake_simulate)
    monkeypatch.setattr(sys, "argv", ["simulate_compare.py", "--preset", "bbc50-capped", "--seeds", "2"])
    bench.main()
    assert "seed 1: fedhft stopped at the wall-time limit at version 3; not kept" in capsys.readouterr().out
    saved = json.loads((tmp_path / "simulate-bbc50-capped" / "report.json").read_text())
    assert [(r["method"], r["seed"]) for r in saved["methods"]] == [("fedhft", 0)]
    monkeypatch.setattr(sys, "argv", ["simulate_compare.py", "--preset", "bbc50-capped", "--seeds", "2", "--dry-run"])
    bench.main()
    assert "1 of 2 runs finished; 1 `fedhft simulate` call(s) to go" in capsys.readouterr().out
