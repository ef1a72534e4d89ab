"""Planner properties: pure functions, no runtime needed."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedhft.device_profiles.model_shape import ModelShape
from fedhft.device_profiles.planner import (
    MASK_RATIO_BY_LEVEL,
    LoraPlan,
    PlanError,
    adapter_bytes,
    adapter_params,
    estimate,
    make_layers,
    plan_lora,
    rank_schedule,
    size_key,
    upload_budget,
    upload_bytes,
)
from fedhft.device_profiles.profile import list_profiles, load_profile, resource_level

MINILM = ModelShape(
    num_layers=6,
    hidden_size=384,
    intermediate_size=1536,
    num_heads=12,
    vocab_size=30522,
    max_positions=512,
    num_labels=5,
    seq_len=128,
    batch_size=8,
)
BASE = load_profile("rpi4-4gb")


def capacity(plan: LoraPlan) -> tuple[int, int, int]:
    """What the planner maximizes: depth first, then the top rank, then trainable adapter parameters."""
    return size_key(MINILM, plan.layers)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    ram=st.integers(256, 16384),
    extra=st.integers(1, 8192),
    gflops=st.floats(5, 200),
    step=st.floats(2, 20),
    layers=st.integers(2, 12),
)
def test_more_memory_never_gives_a_smaller_plan(ram: int, extra: int, gflops: float, step: float, layers: int) -> None:
    shape = dataclasses.replace(MINILM, num_layers=layers)
    small = dataclasses.replace(BASE, ram_mb=ram, fp32_gflops=gflops, target_step_seconds=step)
    big = dataclasses.replace(small, ram_mb=ram + extra)
    try:
        p_small = plan_lora(shape, small)
    except PlanError:
        return
    p_big = plan_lora(shape, big)
    assert capacity(p_big) >= capacity(p_small)


@pytest.mark.parametrize("profile", list_profiles(), ids=lambda p: p.name)
def test_shipped_plans_fit_and_ranks_grow_toward_the_output(profile) -> None:  # noqa: ANN001
    plan = plan_lora(MINILM, profile)
    ranks = [lp.rank for lp in plan.layers]
    assert ranks == sorted(ranks), ranks
    layers = [lp.layer for lp in plan.layers]
    assert layers == list(range(MINILM.num_layers - plan.depth, MINILM.num_layers)), "LoRA sits on the top layers"
    e = plan.estimate
    assert e.memory_mb <= profile.memory_budget_mb
    assert e.step_seconds <= profile.target_step_seconds
    assert e.upload_seconds <= profile.target_upload_seconds
    assert max(ranks) <= plan.max_rank
    assert 0 < plan.mask_ratio <= 1


def test_slower_devices_get_shallower_plans() -> None:
    depths = {p.name: plan_lora(MINILM, p).depth for p in list_profiles()}
    assert depths["rpi4-4gb"] < depths["laptop-x86-16gb"]
    assert depths["phone-lowend-3gb"] <= depths["rpi5-8gb"]
    assert len(set(depths.values())) >= 3, depths


def test_upload_budget_bounds_every_adapter() -> None:
    """Each device's whole adapter fits what its uplink carries in the upload window; a floor only tightens."""
    for profile in list_profiles():
        plan = plan_lora(MINILM, profile)
        link = profile.uplink_mbps * 1e6 / 8 * min(0.05, profile.target_upload_seconds)
        assert adapter_bytes(MINILM, plan.layers) <= upload_budget(MINILM, profile) == link, profile.name
        assert plan.estimate.upload_bytes <= upload_bytes(MINILM, plan.layers, 1.0, 2)
    full_bytes = 4 * MINILM.total_params
    floored = plan_lora(MINILM, BASE, min_compression=2000)
    assert adapter_bytes(MINILM, floored.layers) * 2000 <= full_bytes
    assert capacity(floored) <= capacity(plan_lora(MINILM, BASE)) <= capacity(plan_lora(MINILM, BASE, upload_window=0))


def test_no_plan_fits_names_the_problem() -> None:
    tiny = dataclasses.replace(BASE, ram_mb=64)
    with pytest.raises(PlanError, match="depth 1, rank 1 needs .* MB \\(budget"):
        plan_lora(MINILM, tiny)


def test_rank_schedule_halves_every_two_layers() -> None:
    assert rank_schedule(5, 16) == [4, 8, 8, 16, 16]
    assert rank_schedule(1, 8) == [8]
    assert rank_schedule(8, 2) == [1, 1, 1, 1, 1, 1, 2, 2]


def test_upload_counts_only_the_masked_slice() -> None:
    plan = plan_lora(MINILM, BASE)
    full = upload_bytes(MINILM, plan.layers, 1.0, 2)
    quarter = upload_bytes(MINILM, plan.layers, 0.25, 2)
    assert quarter < full
    # A (r x in) always goes; B rows scale with the mask; the head is fixed.
    dense = 2 * adapter_params(MINILM, plan.layers)
    assert full >= dense  # row indices come on top of the dense factors
    assert plan.estimate.upload_bytes == upload_bytes(MINILM, plan.layers, plan.mask_ratio, 2)


def test_fixed_depth_and_round_trip() -> None:
    plan = plan_lora(MINILM, BASE, fixed_depth=1)
    assert plan.depth == 1
    again = LoraPlan.from_dict(plan.to_dict())
    assert again == plan
    with pytest.raises(PlanError):
        plan_lora(MINILM, BASE, fixed_depth=7)


def test_int8_plans_use_less_memory_than_fp32() -> None:
    a = plan_lora(MINILM, BASE, fixed_depth=2, int8=True)
    b = plan_lora(MINILM, BASE, fixed_depth=2, int8=False)
    assert a.estimate.base_weights_mb * 3 < b.estimate.base_weights_mb


# Whole-process peaks of one `fedhft edge run` round (MiniLM, batch 8, seq 128, int8 base), recorded by
# bench/edge_memory.py (bench/results/edge_memory.json): (profile, runtime) -> (depth, top rank, peak MB).
# The native backend runs the ExecuTorch program (runtime "executorch"): wrapper + C++ trainer summed.
MEASURED_EDGE_RUN_MB = {
    ("rpi4-4gb", "executorch"): (2, 16, 206.3),
    ("rpi4-4gb", "ort"): (2, 16, 228.0),
    ("phone-lowend-3gb", "executorch"): (2, 4, 202.5),
    ("phone-lowend-3gb", "ort"): (2, 4, 228.6),
}


@pytest.mark.parametrize("key", sorted(MEASURED_EDGE_RUN_MB))
def test_process_estimate_is_within_15_percent_of_the_measured_peak(key: tuple[str, str]) -> None:
    profile, runtime = key
    depth, top, measured = MEASURED_EDGE_RUN_MB[key]
    prof = load_profile(profile)
    layers = make_layers(MINILM, depth, top, ("query", "value"))
    mask = MASK_RATIO_BY_LEVEL[resource_level(prof)]
    est = estimate(MINILM, prof, layers, mask, True, runtime).memory_mb
    assert abs(est - measured) <= 0.15 * measured, (key, est, measured)
