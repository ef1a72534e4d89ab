"""--seeds: parsing, the loop over seeds, methods and encodings (a fake run: no processes), and the report's
config recording the seeds through `fedhft simulate`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedhft.cli import main
from fedhft.simulate import runner
from fedhft.simulate.config import SimConfig, SimulationError
from fedhft.simulate.methods import method_spec
from fedhft.simulate.seeds import parse_encodings, parse_seeds, run_seeds, seed_out


def test_parse_seeds_count_or_list() -> None:
    assert parse_seeds(None, 5) == [5]
    assert parse_seeds("3") == [0, 1, 2]
    assert parse_seeds("3", base=10) == [10, 11, 12]
    assert parse_seeds("0,4,7") == [0, 4, 7]
    assert parse_seeds("7,") == [7]  # a one-seed list
    for bad in ("0", "x", "1,1", "2,b"):
        with pytest.raises(SimulationError):
            parse_seeds(bad)


def test_parse_encodings() -> None:
    assert parse_encodings("fp16, int8") == ["fp16", "int8"]
    for bad in ("", "fp8", "int8,int8"):
        with pytest.raises(SimulationError):
            parse_encodings(bad)


def fake_run(cfg: SimConfig, progress: object = None) -> dict:
    """A run result as method_result shapes it; accuracy depends on the seed."""
    acc = 0.6 + 0.1 * cfg.seed
    return {
        "method": cfg.label,
        "seed": cfg.seed,
        "encoding": cfg.encoding,
        "out": str(cfg.out),
        "accuracy_curve": [
            {"version": 1, "accuracy": acc, "macro_f1": acc, "loss": 1.0, "virtual_time": 30.0, "wall_time": 1.0}
        ],
        "target_accuracy": None,
        "personalized_by_client": {"c000": {"accuracy": acc, "macro_f1": acc, "n": 3, "cluster": 0}},
        "bytes_up_per_client_round": 100,
        "bytes_down_per_client_round": 100,
        "updates": 1,
        "wall_seconds": 1.0,
        "unable_to_participate": {},
        "final_global_accuracy": acc,
    }


def _cfg(out: Path) -> SimConfig:
    return SimConfig(
        clients=1, profiles={"p": 1}, dataset="d", alpha=1.0, rounds=1, method=method_spec("fedhft"), out=out
    )


def test_every_seed_method_and_encoding_runs_once_in_its_own_directory(tmp_path: Path) -> None:
    specs = [method_spec("fedhft"), method_spec("fedavg-lora")]
    res = run_seeds(_cfg(tmp_path), specs, [3, 4], ["fp16", "int8"], run=fake_run)
    assert [(r["seed"], r["method"]) for r in res] == [
        (s, m) for s in (3, 4) for m in ("fedhft", "fedhft+int8", "fedavg-lora", "fedavg-lora+int8")
    ]
    assert {r["out"] for r in res} == {str(tmp_path / "seed-3"), str(tmp_path / "seed-4")}
    assert seed_out(tmp_path, 3, [3]) == tmp_path  # one seed: the old layout


def test_chaos_runs_follow_each_clean_run(tmp_path: Path) -> None:
    res = run_seeds(_cfg(tmp_path), [method_spec("fedhft")], [0, 1], chaos="default", run=fake_run)
    assert [(r["seed"], r["method"]) for r in res] == [
        (0, "fedhft"),
        (0, "fedhft+chaos"),
        (1, "fedhft"),
        (1, "fedhft+chaos"),
    ]
    assert res[1]["chaos"]["clean_final_accuracy"] == res[0]["final_global_accuracy"]


def test_simulate_seeds_records_them_and_reports_every_seed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "run", fake_run)
    out = tmp_path / "out"
    args = "simulate --clients 2 --profiles tiny:2 --method fedhft,fedavg-lora --seeds 3 --seed 1 --last-k 2"
    r = CliRunner().invoke(main, args.split() + ["--out", str(out)])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["seeds"] == [1, 2, 3] and report["config"]["last_k"] == 2
    assert len(report["methods"]) == 6
    fh = next(s for s in report["summary"] if s["method"] == "fedhft")
    assert fh["final_global_accuracy"]["by_seed"] == {"1": 0.7, "2": 0.8, "3": 0.9}
    assert fh["final_global_accuracy"]["mean"] == pytest.approx(0.8)
    assert "0.800±0.100" in r.output


def test_simulate_refuses_a_bad_seeds_value_in_one_line(tmp_path: Path) -> None:
    r = CliRunner().invoke(
        main, ["simulate", "--clients", "1", "--profiles", "p:1", "--seeds", "0", "--out", str(tmp_path)]
    )
    assert r.exit_code == 1 and r.output.startswith("error: --seeds"), r.output


def test_simulate_refuses_a_per_flush_cap_on_the_wall_clock_in_one_line(tmp_path: Path) -> None:
    args = ["simulate", "--clients", "1", "--profiles", "p:1", "--wall-clock", "--max-updates-per-flush", "1"]
    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path)])
    assert r.exit_code == 1 and r.output.startswith("error: --max-updates-per-flush needs virtual time"), r.output
    assert r.output.count("\n") == 1
