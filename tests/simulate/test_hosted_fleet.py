"""The devices hosted in two `fedhft edge host` processes (shared loaded runtimes, one thread each) compute what
one `fedhft edge run` process per device computes: the same tiny simulation gives the same report numbers.

Real broker, server and edge processes, as in tests/scenarios/test_virtual_time_determinism.py.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedhft.cli import main
from fedhft.simulate.config import SimConfig, SimulationError, host_count
from fedhft.simulate.methods import method_spec
from tests.scenarios.test_simulate_e2e import _dataset
from tests.scenarios.test_virtual_time_determinism import _comparable


def _run(out: Path, data: Path, model: Path, profile: Path, hosts: int) -> dict:
    args = ["simulate", "--clients", "4", "--profiles", f"{profile}:4", "--dataset", str(data), "--alpha", "1.0"]
    args += ["--rounds", "5", "--local-steps", "6", "--max-seq-len", "16", "--lr", "0.01", "--clusters", "1"]
    args += ["--model", str(model), "--out", str(out), "--minutes", "6", "--target-accuracy", "0.5"]
    r = CliRunner().invoke(main, [*args, "--hosts", str(hosts)])
    assert r.exit_code == 0, r.output
    (res,) = json.loads((out / "report.json").read_text())["methods"]
    return res


@pytest.mark.slow
def test_two_hosts_give_the_report_of_one_process_per_device(
    tmp_path: Path, tiny_model_dir: Path, tiny_profile_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDHFT_CACHE", str(tmp_path / "cache"))
    data = _dataset(tmp_path / "data.jsonl", n=240)
    alone = _run(tmp_path / "alone", data, tiny_model_dir, tiny_profile_path, hosts=0)
    hosted = _run(tmp_path / "hosted", data, tiny_model_dir, tiny_profile_path, hosts=2)
    assert "hosts" not in alone and hosted["hosts"] == 2 and not hosted["edges_failed"]
    assert set(hosted["peak_rss_mb_by_host"]) == {"host0", "host1"} and not hosted["peak_rss_mb_by_profile"]
    shares = [json.loads(p.read_text())["devices"] for p in sorted((tmp_path / "hosted").glob("*/hosts/*.json"))]
    assert [[d["client-id"] for d in share] for share in shares] == [["c000", "c002"], ["c001", "c003"]]
    assert not list((tmp_path / "hosted").glob("*/clients/*/edge.log"))  # no device ran as its own process
    a, b = _comparable(alone), _comparable(hosted)
    assert a["updates"] >= 8 and len(a["curve"]) >= 5, a  # the run went its length, every device trained
    assert len(a["personalized_by_client"]) == 4
    assert b == a


def test_small_fleets_and_chaos_run_one_process_per_device_larger_ones_two_hosts() -> None:
    cfg = SimConfig(4, {"p": 4}, "d", 0.3, 5, method_spec("fedhft"), Path("out"))
    assert [host_count(cfg, n) for n in (1, 8, 9, 50)] == [0, 0, 2, 2]
    assert host_count(replace(cfg, chaos="default"), 50) == 0
    assert host_count(replace(cfg, hosts=3), 2) == 2 and host_count(replace(cfg, hosts=0), 50) == 0
    with pytest.raises(SimulationError, match="--chaos"):
        host_count(replace(cfg, hosts=2, chaos="default"), 50)
