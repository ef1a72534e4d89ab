"""Plans that differ by device (issue #12): LEGEND per device, the baselines' rank by resource, one shared plan."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedhft.device_profiles.fleet_plans import budget_rank, common_layers, device_shape, every_layer
from fedhft.device_profiles.model_shape import read_model
from fedhft.device_profiles.planner import (
    DEFAULT_UPLOAD_WINDOW,
    LoraPlan,
    PlanError,
    adapter_bytes,
    estimate,
    fits,
    plan_lora,
    planned_runtime,
    size_key,
    upload_budget,
)
from fedhft.device_profiles.profile import list_profiles, load_profile
from fedhft.simulate.packages import method_plans

SHAPE = {seq: read_model(None).shape(5, seq, 8) for seq in (64, 128)}  # the packaged MiniLM, 5 labels
SIM_MIX = ("rpi4-4gb", "phone-lowend-3gb", "phone-midrange-6gb", "laptop-x86-16gb")  # the benchmark's fleet
SEQS = pytest.mark.parametrize("seq", [64, 128])


def legend(seq: int, name: str) -> LoraPlan:
    p = load_profile(name)
    return plan_lora(device_shape(SHAPE[seq], p), p, runtime=planned_runtime(p))


def depth_and_ranks(plan: LoraPlan) -> tuple[int, tuple[int, ...]]:
    return plan.depth, tuple(lp.rank for lp in plan.layers)


@SEQS
def test_the_shipped_mix_gets_at_least_three_distinct_plans(seq: int) -> None:
    plans = {n: depth_and_ranks(legend(seq, n)) for n in SIM_MIX}
    assert len(set(plans.values())) >= 3, plans
    every = {p.name: depth_and_ranks(legend(seq, p.name)) for p in list_profiles()}
    assert len(set(every.values())) >= 3, every


@SEQS
def test_stronger_devices_get_larger_plans(seq: int) -> None:
    key = {n: size_key(SHAPE[seq], legend(seq, n).layers) for n in SIM_MIX}
    assert key["phone-lowend-3gb"] < key["phone-midrange-6gb"] < key["laptop-x86-16gb"], key
    assert key["phone-lowend-3gb"] < key["rpi4-4gb"] < key["laptop-x86-16gb"], key


@SEQS
@pytest.mark.parametrize("profile", list_profiles(), ids=lambda p: p.name)
def test_each_plan_has_legends_shape_and_fits_its_device(seq: int, profile) -> None:  # noqa: ANN001
    plan = legend(seq, profile.name)
    shape = SHAPE[seq]
    ranks = [lp.rank for lp in plan.layers]
    assert ranks == sorted(ranks), "ranks never fall toward the output"
    assert [lp.layer for lp in plan.layers] == list(range(shape.num_layers - plan.depth, shape.num_layers))
    e = plan.estimate
    assert e.memory_mb <= profile.memory_budget_mb
    assert e.step_seconds <= profile.target_step_seconds
    assert e.upload_seconds <= profile.target_upload_seconds
    link_seconds = adapter_bytes(shape, plan.layers) * 8 / (profile.uplink_mbps * 1e6)
    assert link_seconds <= DEFAULT_UPLOAD_WINDOW, "the whole adapter uploads within the federation's window"


def test_seq_128_varies_depth_too() -> None:
    # Over the shipped profiles: the memory ceiling holds the simulation's three small devices at depth 2 there.
    depths = {p.name: legend(128, p.name).depth for p in list_profiles()}
    assert len(set(depths.values())) >= 3, depths


@settings(max_examples=40, deadline=None, derandomize=True)
@given(uplink=st.floats(1, 200), extra=st.floats(0.1, 200), seq=st.sampled_from([64, 128]))
def test_a_faster_link_never_gives_a_smaller_plan(uplink: float, extra: float, seq: int) -> None:
    slow = dataclasses.replace(load_profile("phone-midrange-6gb"), uplink_mbps=uplink)
    fast = dataclasses.replace(slow, uplink_mbps=uplink + extra)
    try:
        small = plan_lora(SHAPE[seq], slow)
    except PlanError:
        return
    assert size_key(SHAPE[seq], plan_lora(SHAPE[seq], fast).layers) >= size_key(SHAPE[seq], small.layers)


def test_upload_budget_is_link_times_window_capped_by_target_and_floor() -> None:
    shape, p = SHAPE[64], load_profile("phone-lowend-3gb")
    assert upload_budget(shape, p, 0.05) == pytest.approx(5e6 / 8 * 0.05)
    assert upload_budget(shape, p, 1000.0) == pytest.approx(5e6 / 8 * p.target_upload_seconds)
    assert upload_budget(shape, p, None) == upload_budget(shape, p, 1000.0)
    assert upload_budget(shape, p, 1000.0, min_compression=500) == pytest.approx(4 * shape.total_params / 500)


@SEQS
def test_no_planner_gives_every_device_the_weakest_devices_plan(seq: int) -> None:
    shape, profiles = SHAPE[seq], [load_profile(n) for n in SIM_MIX]
    layers = common_layers(shape, profiles)
    for p in profiles:
        est = estimate(device_shape(shape, p), p, layers, 1.0, True, planned_runtime(p))
        assert fits(est, p) and adapter_bytes(shape, layers) <= upload_budget(shape, p), p.name
    own = {p.name: legend(seq, p.name) for p in profiles}
    weakest = min(own.values(), key=lambda plan: size_key(shape, plan.layers))
    assert layers == weakest.layers, "the deepest and largest plan the weakest device holds"
    plans = method_plans("common", shape, {p.name: p for p in profiles})
    assert {pl.layers for pl in plans.values()} == {layers}
    assert {pl.mask_ratio for pl in plans.values()} == {0.25, 0.5, 1.0}, "masks stay per device"


@SEQS
def test_baseline_ranks_follow_each_devices_budget(seq: int) -> None:
    """HetLoRA/FlexLoRA: rank by resource, every layer; fedavg-lora: one rank, the weakest device's."""
    shape, profiles = SHAPE[seq], list_profiles()
    by_budget = sorted(profiles, key=lambda p: (upload_budget(shape, p), p.memory_budget_mb))
    ranks = [budget_rank(shape, p) for p in by_budget]
    assert ranks == sorted(ranks), dict(zip([p.name for p in by_budget], ranks, strict=True))
    assert len(set(ranks)) >= 3, ranks
    for p, rank in zip(by_budget, ranks, strict=True):
        assert adapter_bytes(shape, every_layer(shape, rank)) <= upload_budget(shape, p)
        if rank < 16:  # the next rank up would not fit
            assert adapter_bytes(shape, every_layer(shape, 2 * rank)) > upload_budget(shape, p)
    mix = {n: load_profile(n) for n in SIM_MIX}
    het = method_plans("budget-rank", shape, mix)
    assert all(pl.depth == shape.num_layers and pl.mask_ratio == 1.0 for pl in het.values())
    assert het["laptop-x86-16gb"].layers[0].rank > het["phone-lowend-3gb"].layers[0].rank
    uniform = method_plans("uniform", shape, mix)
    assert {pl.layers for pl in uniform.values()} == {
        every_layer(shape, min(budget_rank(shape, p) for p in mix.values()))
    }


def test_budget_rank_refuses_a_device_that_holds_nothing() -> None:
    starved = dataclasses.replace(load_profile("phone-lowend-3gb"), uplink_mbps=0.1)
    with pytest.raises(PlanError, match="cannot hold rank-1 LoRA on all 6 layers"):
        budget_rank(SHAPE[64], starved)
