"""export_packages: each method's packages carry the plans its planner gives the whole fleet (tiny BERT, ORT)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fedhft.device_profiles.model_shape import ModelShape
from fedhft.device_profiles.planner import PlanError
from fedhft.device_profiles.profile import load_profile
from fedhft.protocol.manifest import load_manifest
from fedhft.simulate.config import SimConfig
from fedhft.simulate.methods import method_spec
from fedhft.simulate.packages import export_packages, method_plans


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


def test_fedavg_full_leaves_out_a_device_it_would_not_fit_with_the_reason(
    fleet: dict, tiny_model_dir: Path, tmp_path: Path
) -> None:
    small = dataclasses.replace(fleet["tiny-test"], name="tiny-small", ram_mb=100)  # 50 MB: below the runtime alone
    cfg = SimConfig(
        clients=2,
        profiles={"tiny-test": 1, "tiny-small": 1},
        dataset="unused",
        alpha=1.0,
        rounds=1,
        method=method_spec("fedavg-full"),
        out=tmp_path,
        model=str(tiny_model_dir),
        max_seq_len=16,
        cache_dir=tmp_path / "cache",
    )
    dirs, _, unable = export_packages(cfg, {"tiny-test": fleet["tiny-test"], "tiny-small": small}, num_labels=4)
    assert set(dirs) == {"tiny-test"} and set(unable) == {"tiny-small"}
    assert unable["tiny-small"].startswith("profile tiny-small cannot hold full fine-tuning: the planner estimates")
    assert "budget of 50 MB" in unable["tiny-small"]


def test_method_plans_refuse_full_finetuning_on_the_low_end_phone() -> None:
    shape = ModelShape(6, 384, 1536, 12, 30522, 512, 5, 64, 8)  # MiniLM-L6, seq 64
    profiles = {n: load_profile(n) for n in ("laptop-x86-16gb", "phone-lowend-3gb")}
    with pytest.raises(PlanError, match=r"^profile phone-lowend-3gb cannot hold full fine-tuning: .* budget of 768 MB"):
        method_plans("full", shape, profiles)
    assert method_plans("full", shape, {"laptop-x86-16gb": profiles["laptop-x86-16gb"]}) == {"laptop-x86-16gb": None}


def test_the_memory_objective_reaches_the_legend_plans_and_lowers_their_estimated_peak() -> None:
    shape = ModelShape(6, 384, 1536, 12, 30522, 512, 5, 128, 8)  # MiniLM-L6, seq 128
    profiles = {n: load_profile(n) for n in ("laptop-x86-16gb", "jetson-orin-nano-8gb")}
    capacity = method_plans("legend", shape, profiles)
    memory = method_plans("legend", shape, profiles, objective="memory")
    for name in profiles:
        cap, mem = capacity[name], memory[name]
        assert cap is not None and mem is not None
        assert (cap.objective, mem.objective) == ("capacity", "memory")
        assert mem.estimate.memory_mb < cap.estimate.memory_mb and len(mem.layers) < len(cap.layers)
    # the baselines' fixed planners take no objective: the same plans either way
    assert method_plans("uniform", shape, profiles, objective="memory") == method_plans("uniform", shape, profiles)
