"""Plans for a whole fleet: the baselines' LoRA rank per device, and one plan every device can hold.

HetLoRA (Cho et al., 2024) and FlexLoRA (Bai et al., 2024) give each device a rank by its resources, on every
layer; :func:`budget_rank` is that rank here: the largest the device's memory and upload budget hold.
:func:`common_layers` is the `--no-planner` ablation: the largest LEGEND-shaped layers every device holds.
Pure functions on shapes; the budget is the planner's :func:`~fedhft.device_profiles.planner.upload_budget`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from fedhft.device_profiles import profile as _profile
from fedhft.device_profiles.model_shape import ModelShape
from fedhft.device_profiles.planner import (
    DEFAULT_MIN_COMPRESSION,
    DEFAULT_UPLOAD_WINDOW,
    MASK_RATIO_BY_LEVEL,
    RANK_CHOICES,
    CostModel,
    LayerPlan,
    PlanError,
    adapter_bytes,
    candidates,
    estimate,
    fits,
    plan_lora,
    planned_runtime,
    size_key,
    upload_budget,
)
from fedhft.device_profiles.profile import DeviceProfile

BASELINE_TARGETS: tuple[str, ...] = ("query", "value")  # LoRA's classic targets, what both papers adapt


def device_shape(shape: ModelShape, profile: DeviceProfile) -> ModelShape:
    """`shape` at the profile's own batch size."""
    return replace(shape, batch_size=profile.batch_size)


def every_layer(shape: ModelShape, rank: int, targets: tuple[str, ...] = BASELINE_TARGETS) -> tuple[LayerPlan, ...]:
    return tuple(LayerPlan(i, rank, targets) for i in range(shape.num_layers))


def budget_rank(
    shape: ModelShape,
    profile: DeviceProfile,
    *,
    max_rank: int = 16,
    targets: tuple[str, ...] = BASELINE_TARGETS,
    int8: bool = True,
    upload_window: float | None = DEFAULT_UPLOAD_WINDOW,
    min_compression: float | None = DEFAULT_MIN_COMPRESSION,
    cm: CostModel | None = None,
) -> int:
    """The largest rank (from RANK_CHOICES, at most `max_rank`) whose LoRA on every layer, every row uploaded,
    fits the device's memory budget and upload budget: rank by resource, as HetLoRA and FlexLoRA assign it.
    Step time is not bounded (those methods train every layer whatever it costs). PlanError if rank 1 fails."""
    cm = cm or CostModel()
    shape = device_shape(shape, profile)
    runtime = planned_runtime(profile)
    budget = upload_budget(shape, profile, upload_window, min_compression)
    for rank in sorted((r for r in RANK_CHOICES if r <= max_rank), reverse=True):
        layers = every_layer(shape, rank, targets)
        if adapter_bytes(shape, layers, cm) > budget:
            continue
        if estimate(shape, profile, layers, 1.0, int8, runtime, cm).memory_mb <= profile.memory_budget_mb:
            return rank
    raise PlanError(
        f"profile {profile.name} cannot hold rank-1 LoRA on all {shape.num_layers} layers "
        f"(upload budget {budget / 1e3:.0f} kB, memory budget {profile.memory_budget_mb:.0f} MB)"
    )


def common_layers(
    shape: ModelShape,
    profiles: Sequence[DeviceProfile],
    *,
    max_rank: int = 16,
    int8: bool = True,
    upload_window: float | None = DEFAULT_UPLOAD_WINDOW,
    min_compression: float | None = DEFAULT_MIN_COMPRESSION,
    cm: CostModel | None = None,
) -> tuple[LayerPlan, ...]:
    """The largest LEGEND-shaped layers (by the planner's size_key) that every profile holds as `plan_lora`
    judges it (memory, step time, upload target and budget, each at its own mask): the same depth and ranks for
    every device, the deepest and largest the weakest can hold (the `--no-planner` ablation)."""
    cm = cm or CostModel()
    devices = [
        (
            device_shape(shape, p),
            p,
            MASK_RATIO_BY_LEVEL[_profile.resource_level(p)],
            upload_budget(shape, p, upload_window, min_compression),
        )
        for p in profiles
    ]
    best: tuple[tuple[int, int, int], tuple[LayerPlan, ...]] | None = None
    for layers in candidates(shape, max_rank, range(1, shape.num_layers + 1)):
        dense = adapter_bytes(shape, layers, cm)
        if all(
            dense <= budget and fits(estimate(s, p, layers, mask, int8, planned_runtime(p), cm), p)
            for s, p, mask, budget in devices
        ):
            key = size_key(shape, layers)
            if best is None or key > best[0]:
                best = (key, layers)
    if best is None:
        for s, p, _, _ in devices:  # a device that holds no plan at all says why
            plan_lora(
                s,
                p,
                max_rank=max_rank,
                int8=int8,
                runtime=planned_runtime(p),
                upload_window=upload_window,
                min_compression=min_compression,
            )
        raise PlanError(f"no one LoRA plan fits all of {', '.join(p.name for p in profiles)} at once")
    return best[1]
