"""The capacity objective's memory ceiling: a share of full fine-tuning's estimated peak, on the leanest runtime."""

from __future__ import annotations

import dataclasses
import json

import pytest
from click.testing import CliRunner

from fedhft.cli import main
from fedhft.device_profiles.model_shape import ModelShape
from fedhft.device_profiles.planner import (
    DEFAULT_MEMORY_CEILING,
    LoraPlan,
    full_finetune_trainer_mb,
    leanest_runtime,
    plan_lora,
    planned_runtime,
    size_key,
)
from fedhft.device_profiles.profile import list_profiles, load_profile
from tests.device_profiles.test_planner import MINILM

SEQS = pytest.mark.parametrize("seq", [64, 128])


def peak(shape: ModelShape, plan: LoraPlan) -> float:
    prof = load_profile(plan.profile)
    return leanest_runtime(shape, prof, plan.layers, plan.mask_ratio, plan.int8_base, plan.recompute)[1]


@SEQS
@pytest.mark.parametrize("profile", list_profiles(), ids=lambda p: p.name)
def test_every_shipped_default_plan_is_within_a_third_of_full_finetuning(seq: int, profile) -> None:  # noqa: ANN001
    shape = dataclasses.replace(MINILM, seq_len=seq)
    plan = plan_lora(shape, profile, runtime=planned_runtime(profile))
    ceiling = full_finetune_trainer_mb(shape, profile) / 3
    assert DEFAULT_MEMORY_CEILING == pytest.approx(1 / 3)
    assert plan.memory_ceiling_mb == pytest.approx(ceiling, abs=0.1)
    assert peak(shape, plan) <= plan.memory_ceiling_mb
    free = plan_lora(shape, profile, runtime=planned_runtime(profile), memory_ceiling=None)
    assert free.memory_ceiling_mb is None
    assert size_key(shape, plan.layers) <= size_key(shape, free.layers)  # the ceiling only ever takes away
    if peak(shape, free) <= ceiling:
        assert plan.layers == free.layers  # and only what it must


def test_the_ceiling_takes_the_roomy_profiles_depth_not_the_small_ones() -> None:
    depth = {}
    for name in ("rpi4-4gb", "rpi5-8gb", "jetson-orin-nano-8gb", "laptop-x86-16gb"):
        prof = load_profile(name)
        held = plan_lora(MINILM, prof, runtime=planned_runtime(prof))
        free = plan_lora(MINILM, prof, runtime=planned_runtime(prof), memory_ceiling=None)
        depth[name] = (free.depth, free.recompute, held.depth, held.recompute)
    assert depth == {  # seq 128: what bench/edge_memory.py measures
        "rpi4-4gb": (2, "selective", 2, "selective"),
        "rpi5-8gb": (5, "none", 4, "selective"),
        "jetson-orin-nano-8gb": (5, "none", 4, "selective"),
        "laptop-x86-16gb": (6, "selective", 5, "full"),  # full: within the laptop's 1.2 s at depth 5, not at 6
    }


def test_the_memory_objective_is_not_held_to_it() -> None:
    prof = load_profile("rpi5-8gb")
    mem = plan_lora(MINILM, prof, objective="memory")
    assert mem.memory_ceiling_mb is None
    assert mem == plan_lora(MINILM, prof, objective="memory", memory_ceiling=None)


def test_a_model_too_small_for_any_plan_under_it_plans_as_without_and_says_so() -> None:
    tiny = ModelShape(2, 32, 64, 2, 100, 64, 2, 16, 4)  # the runtime's own memory is most of full fine-tuning
    prof = load_profile("laptop-x86-16gb")
    plan = plan_lora(tiny, prof)
    assert plan.memory_ceiling_mb is None
    assert plan == plan_lora(tiny, prof, memory_ceiling=None)
    assert leanest_runtime(tiny, prof, plan.layers[:1], 1.0, True, "none")[1] > full_finetune_trainer_mb(tiny, prof) / 3


def test_the_plan_records_the_ceiling_and_older_manifests_read_as_none() -> None:
    plan = plan_lora(MINILM, load_profile("rpi5-8gb"))
    d = plan.to_dict()
    assert d["memory_ceiling_mb"] == plan.memory_ceiling_mb and LoraPlan.from_dict(d) == plan
    del d["memory_ceiling_mb"]
    assert LoraPlan.from_dict(d).memory_ceiling_mb is None


def test_plan_command_takes_the_ceiling() -> None:
    args = ["plan", "--profile", "rpi5-8gb", "--num-labels", "5", "--max-seq-len", "128"]
    held = json.loads(CliRunner().invoke(main, [*args, "--json"]).output)
    free = json.loads(CliRunner().invoke(main, [*args, "--json", "--memory-ceiling", "0"]).output)
    assert (held["depth"], free["depth"]) == (4, 5)
    assert free["memory_ceiling_mb"] is None and held["memory_ceiling_mb"] > held["estimate"]["memory_mb"] - 1
    text = CliRunner().invoke(main, args).output
    assert "memory ceiling 231 MB" in text and "on executorch" in text
    bad = CliRunner().invoke(main, [*args, "--memory-ceiling", "2"])
    assert bad.exit_code == 2 and "2.0 is not in the range 0.0<=x<=1.0" in bad.output
