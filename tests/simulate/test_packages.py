"""export_packages: each method's packages carry the plans its planner gives the whole fleet (tiny BERT, ORT)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fedhft.device_profiles.profile import load_profile
from fedhft.protocol.manifest import load_manifest
from fedhft.simulate.config import SimConfig
from fedhft.simulate.methods import method_spec
from fedhft.simulate.packages import export_packages


@pytest.fixture(scope="module")
def fleet(tiny_profile_path: Path) -> dict:
    fast = load_profile(tiny_profile_path)
    # 0.25 Mbit/s over the 0.05 s window: ~1.6 kB, a small adapter of the tiny model (2 layers, hidden 32)
    slow = dataclasses.replace(fast, name="tiny-slow", uplink_mbps=0.25)
    return {fast.name: fast, slow.name: slow}


def plans(method: str, fleet: dict, model: Path, tmp_path: Path) -> dict[str, list[tuple[int, int, tuple]]]:
    cfg = SimConfig(
        clients=2,
        profiles=dict.fromkeys(fleet, 1),
        dataset="unused",
        alpha=1.0,
        rounds=1,
        method=method_spec(method),
        out=tmp_path,
        model=str(model),
        max_seq_len=16,
        cache_dir=tmp_path / "cache",
    )
    dirs, evaluator, unable = export_packages(cfg, fleet, num_labels=4)
    assert not unable and (evaluator / "manifest.json").is_file()
    return {
        name: [(lp["layer"], lp["rank"], tuple(lp["targets"])) for lp in load_manifest(d).plan["layers"]]
        for name, d in dirs.items()
    }


def test_each_planner_shapes_the_fleets_packages(fleet: dict, tiny_model_dir: Path, tmp_path: Path) -> None:
    legend = plans("fedhft", fleet, tiny_model_dir, tmp_path)
    assert legend["tiny-slow"] != legend["tiny-test"], "the slow link gets a smaller plan"
    shared = plans("fedhft-no-planner", fleet, tiny_model_dir, tmp_path)
    assert shared["tiny-test"] == shared["tiny-slow"] == legend["tiny-slow"], "the weakest device's plan, for all"
    het = plans("hetlora", fleet, tiny_model_dir, tmp_path)
    assert [layer for layer, _, _ in het["tiny-slow"]] == [0, 1], "every layer"
    assert het["tiny-slow"][0][1] < het["tiny-test"][0][1], "rank by resource"
    homogeneous = plans("fedavg-lora", fleet, tiny_model_dir, tmp_path)
    assert homogeneous["tiny-test"] == homogeneous["tiny-slow"] == het["tiny-slow"], "the weakest device's rank"
    assert plans("fedavg-full", fleet, tiny_model_dir, tmp_path) == {"tiny-test": [], "tiny-slow": []}, "no LoRA"
