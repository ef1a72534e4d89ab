"""The report: weighted personalized means, per-cluster figures, mean ± std over seeds with every seed, goals,
re-reading with another k or budget, and one clear line for a missing or empty report."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedhft.cli import main
from fedhft.errors import FedHFTError
from fedhft.simulate.report import build_report, cluster_figures, load_report, readings, reread, table, write_report


def run(method: str, seed: int, accs: list[float], personal: dict[str, tuple[float, int]], **extra: object) -> dict:
    """A run entry as method_result writes it: curve (virtual time 40 s a version, 1 kB an update before it)."""
    curve = [
        {"version": v, "clusters": 1, "accuracy": a, "macro_f1": a - 0.1, "loss": 1.0, "virtual_time": 40.0 * v}
        | {"wall_time": 5.0 * v, "bytes_up": 1000 * v}
        for v, a in enumerate(accs, start=1)
    ]
    return {
        "method": method,
        "seed": seed,
        "accuracy_curve": curve,
        "target_accuracy": 0.7,
        "personalized_by_client": {
            cid: {"accuracy": a, "macro_f1": a / 2, "n": n, "cluster": i % 2}
            for i, (cid, (a, n)) in enumerate(sorted(personal.items()))
        },
        "bytes_up_per_client_round": 1000,
        "bytes_down_per_client_round": 2000,
        "updates": len(accs),
        "wall_seconds": 10.0,
        "unable_to_participate": {},
        **extra,
    }


def test_personalized_means_are_weighted_by_test_size_and_the_unweighted_kept() -> None:
    r = readings(run("fedhft", 0, [0.5, 0.6, 0.8], {"c000": (1.0, 6), "c001": (0.5, 2)}))
    assert r["mean_personalized_accuracy"] == pytest.approx(0.875)
    assert r["mean_personalized_accuracy_unweighted"] == pytest.approx(0.75)
    assert r["mean_personalized_macro_f1"] == pytest.approx(0.4375)
    assert r["final_global_accuracy"] == pytest.approx((0.5 + 0.6 + 0.8) / 3, abs=1e-4)
    assert r["final_global_macro_f1"] == pytest.approx((0.4 + 0.5 + 0.7) / 3, abs=1e-4)
    assert r["last_version_global_accuracy"] == 0.8
    assert r["simulated_seconds_to_target"] == 120.0 and r["bytes_up_to_target"] == 3000
    assert r["global_accuracy_at_budget"] is None  # no budget asked
    r = readings(r, last_k=1, time_budget=85.0)
    assert r["final_global_accuracy"] == 0.8 and r["version_at_budget"] == 2 and r["global_accuracy_at_budget"] == 0.6


def test_cluster_figures_weight_members_and_show_each_cluster_model() -> None:
    from fedhft.simulate.evaluator import Score

    by_client = {
        "c000": {"accuracy": 1.0, "macro_f1": 1.0, "n": 3, "cluster": 0},
        "c001": {"accuracy": 0.0, "macro_f1": 0.0, "n": 1, "cluster": 0},
        "c002": {"accuracy": 0.5, "macro_f1": 0.4, "n": 5, "cluster": 1},
    }
    out = cluster_figures(by_client, {0: Score(0.9, 0.8, 4), 1: Score(0.6, 0.5, 5)})
    assert out["0"] == {
        "clients": 2,
        "test_examples": 4,
        "personalized_accuracy": 0.75,
        "personalized_macro_f1": 0.75,
        "model_accuracy": 0.9,
        "model_macro_f1": 0.8,
    }
    assert out["1"]["clients"] == 1 and out["1"]["personalized_accuracy"] == 0.5


def _three_seeds() -> dict:
    runs = [
        run("fedhft", s, [0.6, a, a], {"c000": (p, 4)}) | {"bytes_up_per_client_round": 500}
        for s, a, p in [(0, 0.80, 0.90), (1, 0.90, 0.92), (2, 0.85, 0.94)]
    ]
    runs += [run("fedavg-lora", s, [0.5, 0.6, a], {"c000": (0.85, 4)}) for s, a in [(0, 0.75), (1, 0.8), (2, 0.7)]]
    return build_report(runs, {"seed": 0, "seeds": [0, 1, 2], "last_k": 2, "alpha": 0.3})


def test_summary_gives_mean_std_and_every_seed_per_method_and_figure() -> None:
    rep = _three_seeds()
    fh = next(s for s in rep["summary"] if s["method"] == "fedhft")
    assert fh["seeds"] == [0, 1, 2]
    acc = fh["final_global_accuracy"]
    assert acc["by_seed"] == {"0": 0.8, "1": 0.9, "2": 0.85}  # last 2 versions are equal: their mean
    assert acc["mean"] == pytest.approx(0.85) and acc["std"] == pytest.approx(0.05)
    assert fh["mean_personalized_accuracy"]["mean"] == pytest.approx(0.92)
    lora = next(s for s in rep["summary"] if s["method"] == "fedavg-lora")
    # every fedavg-lora seed first reaches 0.7 in its third version (virtual time 120 s)
    assert lora["simulated_seconds_to_target"]["by_seed"] == {"0": 120.0, "1": 120.0, "2": 120.0}
    text = table(rep)
    assert "0.850±0.050" in text and "final_global_accuracy by seed: 0: 0.800, 1: 0.900, 2: 0.850" in text


def test_a_seed_that_misses_the_target_leaves_the_mean_empty() -> None:
    runs = [run("fedhft", 0, [0.8], {}), run("fedhft", 1, [0.5], {})]
    (s,) = build_report(runs, {"seed": 0})["summary"]
    assert s["simulated_seconds_to_target"] == {"mean": None, "std": None, "by_seed": {"0": 40.0, "1": None}}


def test_goals_compare_fedhft_with_the_best_baseline_over_seeds() -> None:
    goals = {g["goal"]: g for g in _three_seeds()["goals"]}
    acc = goals["global accuracy, fedhft − best baseline (points)"]
    lora_mean = (0.675 + 0.7 + 0.65) / 3  # last-2 means of fedavg-lora's seeds
    assert acc["measured"] == pytest.approx(round(100 * (0.85 - lora_mean), 1)) and acc["met"]
    personal = goals["personalized accuracy, fedhft − best baseline (points)"]
    assert personal["measured"] == pytest.approx(7.0) and personal["met"] and personal["need"] == 2.0
    assert "best baseline fedavg-lora" in personal["note"]


def test_goals_compare_methods_on_the_seeds_both_ran() -> None:
    rep = _three_seeds()
    # the ablation ran seed 0 only: the clustering goal compares fedhft's seed 0 with it, not its 3-seed mean
    flat = build_report(rep["methods"] + [run("fedhft-no-clustering", 0, [0.7], {"c000": (0.95, 4)})], rep["config"])
    goal = next(g for g in flat["goals"] if g["goal"].startswith("personalized accuracy, with clustering"))
    assert goal["measured"] == pytest.approx(-5.0) and not goal["met"]  # 0.90 (seed 0) - 0.95, not 0.92 - 0.95
    assert "1 common seed(s): 0" in goal["note"]


def test_write_report_records_seeds_and_draws_banded_plots(tmp_path: Path) -> None:
    rep = _three_seeds()
    path = write_report(tmp_path, rep["methods"], rep["config"])
    back = load_report(path)
    assert back["config"]["seeds"] == [0, 1, 2] and len(back["methods"]) == 6
    pytest.importorskip("matplotlib")
    assert (tmp_path / "accuracy.png").stat().st_size > 1000 and (tmp_path / "traffic.png").is_file()


def test_reread_changes_k_and_budget_and_reads_old_reports() -> None:
    old = {  # a report from before macro-F1, seeds and bytes on the curve
        "config": {"seed": 4},
        "methods": [
            {
                "method": "fedhft",
                "accuracy_curve": [
                    {"version": v, "accuracy": a, "loss": 1.0, "virtual_time": 10.0 * v, "wall_time": 1.0}
                    for v, a in ((1, 0.5), (2, 0.9))
                ],
                "target_accuracy": 0.8,
                "bytes_up_to_target": 1234,
                "mean_personalized_accuracy": 0.7,
            }
        ],
    }
    rep = reread(old, last_k=1, time_budget=15.0)
    (r,) = rep["methods"]
    assert r["final_global_accuracy"] == 0.9 and r["final_global_macro_f1"] is None
    assert r["global_accuracy_at_budget"] == 0.5 and r["bytes_up_to_target"] == 1234
    assert rep["config"]["seeds"] == [4] and rep["summary"][0]["seeds"] == [4]
    assert "fedhft" in table(rep)


@pytest.mark.parametrize("make", ["missing", "empty", "garbage", "no-runs"])
def test_report_of_a_missing_or_empty_directory_is_one_line(tmp_path: Path, make: str) -> None:
    out = tmp_path / "out"
    if make != "missing":
        out.mkdir()
    if make == "garbage":
        (out / "report.json").write_text("{not json")
    if make == "no-runs":
        (out / "report.json").write_text(json.dumps({"config": {}, "methods": []}))
    with pytest.raises(FedHFTError):
        load_report(out)
    r = CliRunner().invoke(main, ["report", str(out)])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and r.output.startswith("error: "), r.output
    assert "Traceback" not in r.output


def test_report_command_rereads_with_last_k(tmp_path: Path) -> None:
    rep = _three_seeds()
    write_report(tmp_path, rep["methods"], rep["config"])
    out = CliRunner().invoke(main, ["report", str(tmp_path), "--last-k", "1", "--time-budget", "50"])
    assert out.exit_code == 0, out.output
    assert "mean of the last 1 global versions" in out.output and "virtual time 50 s" in out.output


def test_a_run_cut_short_by_the_wall_time_limit_is_named_in_the_table() -> None:
    runs = [run("fedhft", 0, [0.5, 0.8], {"c0": (0.9, 10)}, stopped_at_wall_limit=True, wall_limit_minutes=60.0)]
    runs.append(run("fedhft", 1, [0.5, 0.8, 0.9], {"c0": (0.9, 10)}, stopped_at_wall_limit=False))
    text = table(build_report(runs, {"seed": 0}))
    assert "fedhft seed 0: cut short at the 60-minute wall-time limit at version 2" in text
    assert "fedhft seed 1: cut short" not in text


def test_the_wall_time_limit_guards_a_virtual_run_without_timing_it() -> None:
    from fedhft.simulate.config import SimConfig
    from fedhft.simulate.methods import METHODS
    from fedhft.simulate.runner import wall_limit_minutes

    base = SimConfig(2, {"p": 2}, "d", 1.0, 2, METHODS["fedhft"], out=Path("out"))
    assert wall_limit_minutes(base) == 480.0  # virtual clock: a run ends at its versions or budget
    assert wall_limit_minutes(replace(base, virtual_time=False)) == 60.0
    assert wall_limit_minutes(replace(base, minutes=5.0)) == 5.0
