"""Virtual time makes `fedhft simulate` reproducible: the same tiny run, once on a quiet host and once while
busy-loop processes load every core, gives the same report (accuracy curve, versions, virtual times, bytes).

Needs the server's virtual-time scheduler (`fedhft server run --virtual-time`) and the edges' (`fedhft edge run
--virtual-time`): real broker, server and edge processes, as in test_simulate_e2e.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedhft.cli import main
from tests.scenarios.test_simulate_e2e import _dataset

SAME = (
    "final_global_accuracy final_global_macro_f1 mean_personalized_accuracy personalized_by_client bytes_up updates "
    "simulated_seconds_to_target bytes_up_to_target"
).split()


def _slow_profile(tiny: Path) -> Path:
    """The tiny profile as a device 10x slower to compute and on a 400x slower uplink."""
    slow = tiny.with_name("tiny-slow.toml")
    text = tiny.read_text().replace('name = "tiny-test"', 'name = "tiny-slow"')
    slow.write_text(
        text.replace("fp32_gflops = 50.0", "fp32_gflops = 5.0").replace("uplink_mbps = 20.0", "uplink_mbps = 0.05")
    )
    return slow


def _run(out: Path, data: Path, model: Path, profile: Path, mode: str) -> dict:
    mix = f"{profile}:2,{_slow_profile(profile)}:1"
    args = ["simulate", "--clients", "3", "--profiles", mix, "--dataset", str(data), "--alpha", "1.0"]
    args += ["--rounds", "4", "--local-steps", "6", "--max-seq-len", "16", "--lr", "0.01", "--clusters", "1"]
    args += ["--model", str(model), "--out", str(out), "--minutes", "6", "--target-accuracy", "0.5", "--mode", mode]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    (res,) = json.loads((out / "report.json").read_text())["methods"]
    return res


def _comparable(res: dict) -> dict:
    curve = [(p["version"], p["accuracy"], p["loss"], p["virtual_time"]) for p in res["accuracy_curve"]]
    return {"curve": curve, **{k: res[k] for k in SAME}}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["async", "sync"])
def test_the_same_seed_gives_the_same_report_under_host_load(
    tmp_path: Path, tiny_model_dir: Path, tiny_profile_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    monkeypatch.setenv("FEDHFT_CACHE", str(tmp_path / "cache"))
    data = _dataset(tmp_path / "data.jsonl", n=240)
    quiet = _run(tmp_path / "quiet", data, tiny_model_dir, tiny_profile_path, mode)
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
    try:
        loaded = _run(tmp_path / "loaded", data, tiny_model_dir, tiny_profile_path, mode)
    finally:
        for p in hogs:
            p.kill()
            p.wait(10)
    a, b = _comparable(quiet), _comparable(loaded)
    versions = [v for v, *_ in a["curve"]]
    assert versions and versions[-1] >= 4 and a["updates"] >= 4, a  # the run went its length
    times = [t for *_, t in a["curve"]]
    assert times == sorted(times) and times[-1] > 0, a["curve"]  # stamped on the devices' clock
    assert b == a
    assert loaded["wall_seconds"] > 0 and quiet["wall_seconds"] > 0
