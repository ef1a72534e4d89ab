"""The LEGEND planner: LoRA depth, per-layer ranks, targets and upload mask for one device, from a cost model.

LEGEND puts LoRA on the layers nearest the output, with higher ranks there: backward stops at the lowest
adapted layer, so depth sets the activation memory and the backward compute (memory and step-time targets
bound it); the device's link bounds the adapter's size (:func:`upload_budget`), so ranks follow the link.
FedHFT adds a mask: a device uploads only a share of the rows of each ΔW = B·A, set by its resource level.

All functions here are pure; the numbers come from `ModelShape`, a `DeviceProfile` and `CostModel`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from fedhft.device_profiles import profile as _profile
from fedhft.device_profiles.model_shape import MODULE_KINDS, ModelShape
from fedhft.device_profiles.profile import DeviceProfile
from fedhft.errors import FedHFTError

# Target sets the planner may choose, smallest first (LoRA's classic q/v first).
TARGET_LADDER: tuple[tuple[str, ...], ...] = (
    ("query", "value"),
    ("query", "key", "value", "attn_out"),
    MODULE_KINDS,
)
RANK_CHOICES: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
MASK_RATIO_BY_LEVEL: dict[str, float] = {"low": 0.25, "mid": 0.5, "high": 1.0}
MB = 2**20
# The federation's upload window: a device's adapter must upload whole within this many seconds of its own
# uplink (or its profile's target_upload_seconds, if shorter). A policy, not a physical limit: any shipped link
# carries a MiniLM adapter in well under a second, so without it every device would train the largest plan.
# 50 ms gives 31 kB on a 5 Mbit/s phone, 125 kB on 20 Mbit/s, 250 kB on 40 Mbit/s: for MiniLM at seq 64, q/v
# on six layers with top ranks 2, 8 and 16 (README, planner). 0 or None: the profile's target only.
DEFAULT_UPLOAD_WINDOW = 0.05
# Optional federation-wide cap: an adapter at least this many times smaller than the fp32 full model. Off by
# default: one cap for every device is what gave every device the same plan (issue #12).
DEFAULT_MIN_COMPRESSION: float | None = None
# What plan_lora maximizes: "capacity" (the largest plan that fits, the default) or "memory" (the least peak
# that keeps MEMORY_CAPACITY_FLOOR of the capacity plan's depth and trainable parameters, see capacity_floor).
OBJECTIVES: tuple[str, ...] = ("capacity", "memory")
DEFAULT_OBJECTIVE = "capacity"
# What backward recomputes instead of keeping from the forward pass, least memory saved first: none; selective
# (everything but the linear layers' outputs: cheap ops); full (everything but each adapted layer's input).
RECOMPUTE_MODES: tuple[str, ...] = ("none", "selective", "full")
MEMORY_CAPACITY_FLOOR = 0.5
# The capacity objective's memory ceiling: a plan's estimated peak, on the leanest runtime its profile runs, at most
# this share of fully fine-tuning the same model at the same batch and sequence (full_finetune_trainer_mb). An
# adapter is worth training on a device only if it costs a fraction of full fine-tuning (issue #14's goal: a third
# of ORT's, a fifth of PyTorch's); without it a roomy budget buys depth whose activations cost that much.
DEFAULT_MEMORY_CEILING = 1 / 3


class PlanError(FedHFTError):
    """No plan fits the device."""


@dataclass(frozen=True)
class CostModel:
    """Coefficients of the memory and compute model (calibrated by bench/calibrate_planner.py)."""

    # Resident memory of the device's process besides the model's tensors: interpreter, numpy, tokenizer, MQTT
    # client and the runtime's libraries and sessions (ExecuTorch: the Python wrapper plus the C++ trainer).
    # Calibrated so the estimate is the whole `fedhft edge run` process: bench/edge_memory.py measured 206-229 MB
    # at depth 2 and 375 MB at depth 6 (MiniLM, batch 8, seq 128); estimates within 5% (tests/device_profiles).
    runtime_overhead_mb: dict[str, float] = field(default_factory=lambda: {"ort": 90.0, "executorch": 75.0})
    # fp32 values kept for backward per token per adapted layer, in units of hidden_size and
    # intermediate_size, plus (batch, heads, T, T) attention maps: fitted to ORT's measured peaks
    # (MiniLM-L6, batch 8, seq 128: ~37-45 MB per adapted layer).
    act_hidden_per_token: float = 10.0
    act_intermediate_per_token: float = 2.2
    act_attention_maps: float = 2.0
    # Working set of the forward through one frozen layer (freed after it), as a share of one layer's above.
    transient_factor: float = 0.45
    # Runtimes whose programs recompute activations in backward when a plan asks for it (RECOMPUTE_MODES,
    # fedhft.export.recompute); fitted to bench/edge_memory.py's native peaks and `edge train` step times.
    # full: one layer's activations at a time, plus this much per adapted layer across the passes, in hidden_size
    # fp32 values per token (its input, 1, and what the ExecuTorch memory planner does not pack);
    # selective: this share of every adapted layer's activations (the linear layers' outputs).
    recompute_runtimes: tuple[str, ...] = ("executorch",)
    recompute_full_hidden_per_token: float = 4.5
    recompute_selective_share: float = 0.6
    # Extra compute, in forwards of one adapted layer per adapted layer (full: the layer's forward again; selective:
    # the attention maps, softmax, GELU, layer norms and weight dequantization). Native `edge train` at depth 5-6,
    # interleaved runs (bench/results/recompute_time.json): full +39%, selective -2..+12% (mean +7%).
    recompute_flop: dict[str, float] = field(default_factory=lambda: {"full": 0.7, "selective": 0.15})
    # Full fine-tuning (fedavg-full) on the edge, in fp32 copies of every weight besides the trainer's weights,
    # gradients and AdamW moments (bench/full_ft_memory.py, phases_mb in its JSON). The edge's own copies in a
    # round (edge_runtime/client.py, full_update.py): the exported values Δθ is added to, the received model's Δθ,
    # the round's start values, the trained values and the update's Δθ (+71..101 MB each for MiniLM's 86 MB).
    full_edge_weight_copies: float = 5.0
    # Saving the trainer checkpoint with its AdamW state at the end of the round (ORT save_checkpoint): a
    # transient of 464 MB for MiniLM (5.4 x the weights) at seq 64 and 128, the round's peak.
    full_checkpoint_copies: float = 5.4
    # Fraction of the profile's sustained GFLOP/s a training step reaches.
    efficiency: float = 0.6
    bytes_per_upload_value: int = 2  # fp16 on the wire


@dataclass(frozen=True)
class LayerPlan:
    layer: int
    rank: int
    targets: tuple[str, ...]


@dataclass(frozen=True)
class CostEstimate:
    """What a plan costs on its device; memory in MB, time in seconds, traffic in bytes."""

    memory_mb: float
    base_weights_mb: float
    kept_weights_mb: float
    activations_mb: float
    adapter_state_mb: float
    runtime_mb: float
    step_gflop: float
    step_seconds: float
    upload_bytes: int
    upload_seconds: float
    download_bytes: int
    download_seconds: float
    adapter_params: int
    edge_copies_mb: float = 0.0  # full fine-tuning: the edge's weight copies and checkpoint save (CostModel)


@dataclass(frozen=True)
class LoraPlan:
    """One device's LoRA plan: which top layers carry adapters, their ranks, targets and upload mask."""

    profile: str
    runtime: str
    num_layers: int
    layers: tuple[LayerPlan, ...]  # adapted layers, lowest first
    max_rank: int  # the federation's global maximum rank per module
    mask_ratio: float  # share of ΔW rows uploaded per round
    lora_alpha: float
    batch_size: int
    seq_len: int
    int8_base: bool
    memory_budget_mb: float
    estimate: CostEstimate
    objective: str = DEFAULT_OBJECTIVE  # what the planner optimized (OBJECTIVES); recorded in the manifest
    # What backward recomputes (RECOMPUTE_MODES) in ExecuTorch programs; ORT artifacts ignore it.
    recompute: str = "none"
    # The memory ceiling the plan was held to (MB, leanest_runtime); None: none asked for, or no plan was under it.
    memory_ceiling_mb: float | None = None

    @property
    def depth(self) -> int:
        return len(self.layers)

    @property
    def lowest_layer(self) -> int:
        return self.layers[0].layer

    def rank_of(self, layer: int) -> int:
        for lp in self.layers:
            if lp.layer == layer:
                return lp.rank
        return 0

    def modules(self) -> list[tuple[str, int, str, int]]:
        """(module name, layer, kind, rank) of every adapted module, lowest layer first."""
        return [(f"layers.{lp.layer}.{k}", lp.layer, k, lp.rank) for lp in self.layers for k in lp.targets]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = [{"layer": lp.layer, "rank": lp.rank, "targets": list(lp.targets)} for lp in self.layers]
        d["depth"] = self.depth
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoraPlan:
        layers = tuple(LayerPlan(int(x["layer"]), int(x["rank"]), tuple(x["targets"])) for x in d["layers"])
        est = CostEstimate(**d["estimate"])
        optional = {"objective": DEFAULT_OBJECTIVE, "recompute": "none", "memory_ceiling_mb": None}
        keys = {f for f in cls.__dataclass_fields__} - {"layers", "estimate", *optional}
        kw = {k: d[k] for k in keys}
        kw.update({k: d.get(k, default) for k, default in optional.items()})  # manifests from before each field
        return cls(layers=layers, estimate=est, **kw)


def rank_schedule(depth: int, top_rank: int) -> list[int]:
    """Ranks of the adapted layers, lowest first: the top rank halves every two layers down (min 1)."""
    ranks = [max(1, top_rank >> (j // 2)) for j in range(depth)]
    return list(reversed(ranks))


def make_layers(shape: ModelShape, depth: int, top_rank: int, targets: tuple[str, ...]) -> tuple[LayerPlan, ...]:
    first = shape.num_layers - depth
    ranks = rank_schedule(depth, top_rank)
    return tuple(LayerPlan(first + j, ranks[j], targets) for j in range(depth))


def adapter_params(shape: ModelShape, layers: tuple[LayerPlan, ...]) -> int:
    """Trainable parameters: LoRA factors plus the classifier head."""
    n = shape.num_labels * (shape.hidden_size + 1)
    for lp in layers:
        for k in lp.targets:
            fin, fout = shape.module_dims(k)
            n += lp.rank * (fin + fout)
    return n


def upload_bytes(shape: ModelShape, layers: tuple[LayerPlan, ...], mask_ratio: float, value_bytes: int) -> int:
    """Bytes of one masked update: A in full, the kept rows of B with their indices, and the head."""
    n = shape.num_labels * (shape.hidden_size + 1) * value_bytes
    for lp in layers:
        for k in lp.targets:
            fin, fout = shape.module_dims(k)
            rows = max(1, math.ceil(mask_ratio * fout))
            n += (lp.rank * fin + rows * lp.rank) * value_bytes + rows * 4
    return n


def adapter_bytes(shape: ModelShape, layers: tuple[LayerPlan, ...], cm: CostModel | None = None) -> int:
    """Bytes of the whole adapter and head on the wire, every value (what :func:`upload_budget` bounds)."""
    return (cm or CostModel()).bytes_per_upload_value * adapter_params(shape, layers)


def download_bytes(shape: ModelShape, layers: tuple[LayerPlan, ...], value_bytes: int = 4) -> int:
    """Bytes of the device's model: dense factors at its own ranks plus the head."""
    n = shape.num_labels * (shape.hidden_size + 1) * value_bytes
    for lp in layers:
        for k in lp.targets:
            fin, fout = shape.module_dims(k)
            n += lp.rank * (fin + fout) * value_bytes
    return n


def base_weight_bytes(shape: ModelShape, int8: bool) -> float:
    """Frozen base: linear weights and the word embedding in int8 (+ fp32 row scales), the rest fp32.

    Layers that share weights (ALBERT) store them once; a factorized embedding's projection is a linear weight.
    """
    linear = shape.weight_layer_count * shape.layer_linear_params + shape.projection_params
    words = shape.vocab_size * shape.embedding_dim
    small = shape.total_params - linear - words
    if not int8:
        return 4.0 * shape.total_params
    layer_rows = sum(o for _, o in (shape.module_dims(k) for k in MODULE_KINDS))
    scales = (
        shape.weight_layer_count * layer_rows + shape.vocab_size + (shape.hidden_size if shape.projection_params else 0)
    )
    return float(linear + words + 4 * scales + 4 * small)


def planned_runtime(profile: DeviceProfile) -> str:
    """The runtime a profile's package is planned for: ORT where the profile runs it (export builds the ORT
    artifacts as the package's reference), else the profile's default. `plan` and `export` both use it."""
    return "ort" if "ort" in profile.runtimes else profile.default_runtime


def export_formats(profile: DeviceProfile) -> tuple[str, ...]:
    """What `fedhft export --format auto` writes for a profile: its planned runtime's artifacts (ORT, else the
    ExecuTorch program the native trainer runs). `fedhft simulate` exports the same."""
    return (planned_runtime(profile),)


def layer_forward_flop(shape: ModelShape) -> float:
    tokens = shape.batch_size * shape.seq_len
    attn = 2 * 2 * shape.batch_size * shape.seq_len * shape.seq_len * shape.hidden_size
    return 2.0 * tokens * shape.layer_linear_params + attn


def activation_bytes_per_layer(shape: ModelShape, cm: CostModel) -> float:
    tokens = shape.batch_size * shape.seq_len
    per_token = cm.act_hidden_per_token * shape.hidden_size + cm.act_intermediate_per_token * shape.intermediate_size
    maps = cm.act_attention_maps * shape.batch_size * shape.num_heads * shape.seq_len**2
    return 4.0 * (tokens * per_token + maps)


def lora_input_bytes(shape: ModelShape, layers: tuple[LayerPlan, ...]) -> float:
    """Inputs that LoRA factors keep for their gradients and the frozen model does not keep already: the
    attention context (attn_out), the FFN's input (ffn_in) and its activated intermediate (ffn_out). q/k/v read
    the layer input, which the fitted per-layer activations count."""
    tokens = shape.batch_size * shape.seq_len
    width = {"attn_out": shape.hidden_size, "ffn_in": shape.hidden_size, "ffn_out": shape.intermediate_size}
    return 4.0 * tokens * sum(width.get(k, 0) for lp in layers for k in lp.targets)


def estimate(
    shape: ModelShape,
    profile: DeviceProfile,
    layers: tuple[LayerPlan, ...],
    mask_ratio: float,
    int8: bool,
    runtime: str,
    cm: CostModel | None = None,
    full_finetune: bool = False,
    recompute: str = "none",
) -> CostEstimate:
    """Memory, compute and traffic of training `layers` on `profile` (full_finetune: every weight trains;
    recompute: what backward recomputes, RECOMPUTE_MODES, on the runtimes that do)."""
    cm = cm or CostModel()
    check_recompute(recompute)
    depth = shape.num_layers if full_finetune else len(layers)
    if runtime not in cm.recompute_runtimes or full_finetune or not depth:
        recompute = "none"
    base = base_weight_bytes(shape, int8 and not full_finetune)
    # Weights of adapted layers are needed again in backward: int8 ones are dequantized then (one layer at
    # a time), fp32 ones are the stored weights already counted in `base`.
    kept = 4.0 * shape.layer_linear_params if int8 and depth else 0.0
    if recompute == "full":  # one layer's activations at a time, and per adapted layer what lives across
        act = activation_bytes_per_layer(shape, cm) + max(lora_input_bytes(shape, (lp,)) for lp in layers)
        act += depth * 4.0 * shape.batch_size * shape.seq_len * shape.hidden_size * cm.recompute_full_hidden_per_token
    elif recompute == "selective":
        act = depth * activation_bytes_per_layer(shape, cm) * cm.recompute_selective_share
        act += lora_input_bytes(shape, layers)
    else:
        act = depth * activation_bytes_per_layer(shape, cm)
        if not full_finetune:
            act += lora_input_bytes(shape, layers)
    transient = cm.transient_factor * activation_bytes_per_layer(shape, cm)
    if full_finetune:
        params = shape.total_params + shape.num_labels * (shape.hidden_size + 1)
    else:
        params = adapter_params(shape, layers)
    state = 4.0 * params * 4  # weights, gradients, AdamW first and second moments
    if full_finetune:
        state -= 4.0 * shape.total_params  # the weights themselves are in `base`
    runtime_mb = cm.runtime_overhead_mb.get(runtime, max(cm.runtime_overhead_mb.values()))
    copies = 0.0
    if full_finetune:
        copies = 4.0 * shape.total_params * (cm.full_edge_weight_copies + cm.full_checkpoint_copies)
    memory_mb = (base + kept + act + transient + state + copies) / MB + runtime_mb
    fwd = shape.num_layers * layer_forward_flop(shape)
    # Backward through an adapted layer costs about one forward (input gradients; frozen weights need no
    # weight gradients), twice that when its weights train; LoRA factors add little.
    bwd = depth * layer_forward_flop(shape) * (2.0 if full_finetune else 1.0)
    bwd += depth * layer_forward_flop(shape) * cm.recompute_flop.get(recompute, 0.0)
    lora = 6.0 * shape.batch_size * shape.seq_len * params if not full_finetune else 0.0
    gflop = (fwd + bwd + lora) / 1e9
    step_s = gflop / (profile.fp32_gflops * cm.efficiency)
    if full_finetune:
        up = int(4 * (shape.total_params + shape.num_labels * (shape.hidden_size + 1)))
        down = up
    else:
        up = upload_bytes(shape, layers, mask_ratio, cm.bytes_per_upload_value)
        down = download_bytes(shape, layers)
    return CostEstimate(
        memory_mb=round(memory_mb, 1),
        base_weights_mb=round(base / MB, 1),
        kept_weights_mb=round(kept / MB, 1),
        activations_mb=round((act + transient) / MB, 1),
        adapter_state_mb=round(state / MB, 2),
        runtime_mb=runtime_mb,
        step_gflop=round(gflop, 2),
        step_seconds=round(step_s, 3),
        upload_bytes=int(up),
        upload_seconds=round(up * 8 / (profile.uplink_mbps * 1e6), 3),
        download_bytes=int(down),
        download_seconds=round(down * 8 / (profile.downlink_mbps * 1e6), 3),
        adapter_params=int(params),
        edge_copies_mb=round(copies / MB, 1),
    )


def full_finetune_trainer_mb(shape: ModelShape, profile: DeviceProfile, cm: CostModel | None = None) -> float:
    """Estimated peak of fully fine-tuning `shape` with ORT, the trainer alone (fp32 weights, gradients, AdamW
    moments, activations, the runtime; not the edge's copies): what a memory ceiling is a share of."""
    e = estimate(shape, profile, (), 1.0, False, "ort", cm, full_finetune=True)
    return e.memory_mb - e.edge_copies_mb


def leanest_runtime(
    shape: ModelShape,
    profile: DeviceProfile,
    layers: tuple[LayerPlan, ...],
    mask_ratio: float,
    int8: bool,
    recompute: str,
    cm: CostModel | None = None,
) -> tuple[str, float]:
    """(runtime, estimated peak MB) of `layers` on the leanest runtime `profile` runs (`recompute` where it
    recomputes): what a memory ceiling holds."""
    peaks = {
        r: estimate(shape, profile, layers, mask_ratio, int8, r, cm, recompute=recompute).memory_mb
        for r in profile.runtimes
    }
    lean = min(peaks, key=peaks.__getitem__)
    return lean, peaks[lean]


def fits(est: CostEstimate, profile: DeviceProfile) -> bool:
    return (
        est.memory_mb <= profile.memory_budget_mb
        and est.step_seconds <= profile.target_step_seconds
        and est.upload_seconds <= profile.target_upload_seconds
    )


def upload_budget(
    shape: ModelShape,
    profile: DeviceProfile,
    upload_window: float | None = DEFAULT_UPLOAD_WINDOW,
    min_compression: float | None = DEFAULT_MIN_COMPRESSION,
) -> float:
    """Bytes a device's whole adapter (:func:`adapter_bytes`) may take on the wire: what its uplink carries in the
    federation's upload window (its own target_upload_seconds if shorter), and, with a `min_compression`
    floor, no more than the fp32 full model / min_compression. The mask then cuts what is actually sent."""
    seconds = profile.target_upload_seconds
    if upload_window:
        seconds = min(seconds, upload_window)
    budget = profile.uplink_mbps * 1e6 / 8 * seconds
    if min_compression:
        budget = min(budget, 4.0 * shape.total_params / min_compression)
    return budget


def candidates(shape: ModelShape, max_rank: int, depths: Iterable[int]) -> Iterator[tuple[LayerPlan, ...]]:
    """Every LEGEND-shaped candidate: top `depth` layers, a TARGET_LADDER set, ranks growing toward the output."""
    for depth in depths:
        for targets in TARGET_LADDER:
            for top in (r for r in RANK_CHOICES if r <= max_rank):
                yield make_layers(shape, depth, top, targets)


def size_key(shape: ModelShape, layers: tuple[LayerPlan, ...]) -> tuple[int, int, int]:
    """What the planner maximizes, in order: depth, the top rank, then trainable parameters (wider targets)."""
    return len(layers), max((lp.rank for lp in layers), default=0), adapter_params(shape, layers)


def _no_plan(shape: ModelShape, profile: DeviceProfile, runtime: str, int8: bool, budget: float) -> PlanError:
    layers = make_layers(shape, 1, 1, TARGET_LADDER[0])
    mask_ratio = MASK_RATIO_BY_LEVEL[_profile.resource_level(profile)]
    smallest = estimate(shape, profile, layers, mask_ratio, int8, runtime)
    return PlanError(
        f"no LoRA plan fits profile {profile.name}: even depth 1, rank 1 needs "
        f"{smallest.memory_mb:.0f} MB (budget {profile.memory_budget_mb:.0f} MB), "
        f"{smallest.step_seconds:.2f} s/step (target {profile.target_step_seconds} s), "
        f"{smallest.upload_seconds:.2f} s upload (target {profile.target_upload_seconds} s), "
        f"{adapter_bytes(shape, layers) / 1e3:.0f} kB adapter (upload budget {budget / 1e3:.0f} kB)"
    )


def check_recompute(mode: str) -> None:
    if mode not in RECOMPUTE_MODES:
        raise PlanError(f"recompute {mode!r} is not one of {', '.join(RECOMPUTE_MODES)}")


def recompute_mode(
    shape: ModelShape,
    profile: DeviceProfile,
    layers: tuple[LayerPlan, ...],
    mask_ratio: float,
    int8: bool,
    cm: CostModel,
) -> str:
    """What an ExecuTorch program of `layers` recomputes by default on `profile`: the mode with the least
    estimated peak (ties to the cheaper in time) whose step time on every recomputing runtime the profile runs
    still meets the profile's targets; none where it runs none."""
    runtimes = [r for r in cm.recompute_runtimes if r in profile.runtimes]
    best, best_mb = "none", math.inf
    for mode in RECOMPUTE_MODES:
        ests = [estimate(shape, profile, layers, mask_ratio, int8, r, cm, recompute=mode) for r in runtimes]
        mb = max((e.memory_mb for e in ests), default=math.inf)
        if ests and all(fits(e, profile) for e in ests) and mb < best_mb:
            best, best_mb = mode, mb
    return best


def check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise PlanError(f"objective {objective!r} is not one of {', '.join(OBJECTIVES)}")


def capacity_floor(shape: ModelShape, layers: tuple[LayerPlan, ...], share: float) -> tuple[int, int]:
    """(depth, trainable parameters) a memory-first plan keeps at least: `share` of those of `layers` (the
    capacity plan), depth rounded up. Depth is what buys LEGEND its accuracy; parameters are the adapter's size."""
    return math.ceil(share * len(layers)), math.ceil(share * adapter_params(shape, layers))


def choose(
    shape: ModelShape,
    feasible: list[tuple[tuple[LayerPlan, ...], CostEstimate]],
    objective: str = DEFAULT_OBJECTIVE,
    floor_share: float = MEMORY_CAPACITY_FLOOR,
) -> tuple[tuple[LayerPlan, ...], CostEstimate]:
    """The plan an objective picks among `feasible` (non-empty) plans that fit the device.

    capacity: the largest by :func:`size_key`, ties to the cheaper in memory. memory: the least estimated peak
    among those that keep the :func:`capacity_floor` of the capacity plan, ties to the larger by size_key.
    """
    check_objective(objective)
    best = max(feasible, key=lambda f: (*size_key(shape, f[0]), -f[1].memory_mb))
    if objective == "capacity":
        return best
    depth, params = capacity_floor(shape, best[0], floor_share)
    kept = [f for f in feasible if len(f[0]) >= depth and adapter_params(shape, f[0]) >= params]
    return min(kept, key=lambda f: (f[1].memory_mb, tuple(-x for x in size_key(shape, f[0]))))


def plan_lora(
    shape: ModelShape,
    profile: DeviceProfile,
    *,
    max_rank: int = 16,
    int8: bool = True,
    runtime: str | None = None,
    lora_alpha: float = 16.0,
    fixed_depth: int | None = None,
    upload_window: float | None = DEFAULT_UPLOAD_WINDOW,
    min_compression: float | None = DEFAULT_MIN_COMPRESSION,
    objective: str = DEFAULT_OBJECTIVE,
    recompute: str | None = None,
    memory_ceiling: float | None = DEFAULT_MEMORY_CEILING,
    cm: CostModel | None = None,
) -> LoraPlan:
    """The LEGEND plan that `objective` picks (:func:`choose`) among those that fit the profile's memory,
    step-time and upload targets and whose whole adapter fits the device's :func:`upload_budget` (its link over
    the federation's upload window, and the optional `min_compression` floor).

    capacity (default): the largest (by :func:`size_key`: deepest, then highest top rank, then most parameters);
    depth buys the most accuracy and sets backward cost; ranks halve every two layers down. memory: the least
    estimated peak that keeps half the capacity plan's depth and trainable parameters (:func:`capacity_floor`).
    `fixed_depth` forces one depth (``fedhft export --depth``). `recompute` (RECOMPUTE_MODES) is what ExecuTorch
    programs of the plan recompute in backward; None: per candidate, :func:`recompute_mode`. `memory_ceiling`
    (capacity only; None or 0: off) keeps the plans whose :func:`leanest_runtime` peak is at most that share of
    :func:`full_finetune_trainer_mb`; where none is (a model so small that the runtime's own memory is most of
    full fine-tuning) it is left out and the plan records no ceiling. Raises PlanError when even depth 1, rank 1,
    q/v does not fit, or for an unknown objective or recompute mode.
    """
    cm = cm or CostModel()
    check_objective(objective)
    runtime = runtime or profile.default_runtime
    mask_ratio = MASK_RATIO_BY_LEVEL[_profile.resource_level(profile)]
    if fixed_depth is not None and not 1 <= fixed_depth <= shape.num_layers:
        raise PlanError(f"depth {fixed_depth} is outside 1..{shape.num_layers}")
    depths = [fixed_depth] if fixed_depth else range(1, shape.num_layers + 1)
    budget = upload_budget(shape, profile, upload_window, min_compression)
    if recompute is not None:
        check_recompute(recompute)
    feasible: list[tuple[tuple[LayerPlan, ...], CostEstimate]] = []
    recomputed: dict[tuple[LayerPlan, ...], str] = {}
    for layers in candidates(shape, max_rank, depths):
        if adapter_bytes(shape, layers, cm) > budget:
            continue
        mode = recompute or recompute_mode(shape, profile, layers, mask_ratio, int8, cm)
        est = estimate(shape, profile, layers, mask_ratio, int8, runtime, cm, recompute=mode)
        if fits(est, profile):
            feasible.append((layers, est))
            recomputed[layers] = mode
    if not feasible:
        raise _no_plan(shape, profile, runtime, int8, budget)
    ceiling_mb = None
    if memory_ceiling and objective == "capacity":
        ceiling_mb = round(memory_ceiling * full_finetune_trainer_mb(shape, profile, cm), 1)
        under = [
            f
            for f in feasible
            if leanest_runtime(shape, profile, f[0], mask_ratio, int8, recomputed[f[0]], cm)[1] <= ceiling_mb
        ]
        feasible, ceiling_mb = (under, ceiling_mb) if under else (feasible, None)
    layers, est = choose(shape, feasible, objective)
    return LoraPlan(
        profile=profile.name,
        runtime=runtime,
        num_layers=shape.num_layers,
        layers=layers,
        max_rank=max_rank,
        mask_ratio=mask_ratio,
        lora_alpha=lora_alpha,
        batch_size=shape.batch_size,
        seq_len=shape.seq_len,
        int8_base=int8,
        memory_budget_mb=profile.memory_budget_mb,
        estimate=est,
        objective=objective,
        recompute=recomputed[layers],
        memory_ceiling_mb=ceiling_mb,
    )


def fixed_plan(
    shape: ModelShape,
    profile: DeviceProfile,
    layers: tuple[LayerPlan, ...],
    *,
    mask_ratio: float = 1.0,
    int8: bool = False,
    runtime: str | None = None,
    lora_alpha: float = 16.0,
    max_rank: int = 16,
    cm: CostModel | None = None,
) -> LoraPlan:
    """A plan of given `layers` on `profile`, with its estimate (baselines, ablations, benchmarks)."""
    runtime = runtime or profile.default_runtime
    est = estimate(shape, profile, layers, mask_ratio, int8, runtime, cm)
    top = max((lp.rank for lp in layers), default=0)
    return LoraPlan(
        profile.name,
        runtime,
        shape.num_layers,
        layers,
        max(max_rank, top),
        mask_ratio,
        lora_alpha,
        shape.batch_size,
        shape.seq_len,
        int8,
        profile.memory_budget_mb,
        est,
    )


def uniform_plan(
    shape: ModelShape,
    profile: DeviceProfile,
    *,
    rank: int,
    depth: int,
    targets: tuple[str, ...] = ("query", "value"),
    int8: bool = False,
    runtime: str | None = None,
    lora_alpha: float = 16.0,
    max_rank: int = 16,
    cm: CostModel | None = None,
) -> LoraPlan:
    """A fixed plan (same rank on the top `depth` layers, every row uploaded), for homogeneous-LoRA baselines."""
    layers = tuple(LayerPlan(shape.num_layers - depth + j, rank, targets) for j in range(depth))
    return fixed_plan(
        shape, profile, layers, int8=int8, runtime=runtime, lora_alpha=lora_alpha, max_rank=max_rank, cm=cm
    )


def full_finetune_plan(
    shape: ModelShape,
    profile: DeviceProfile,
    *,
    runtime: str | None = None,
    max_rank: int = 16,
    lora_alpha: float = 16.0,
    cm: CostModel | None = None,
) -> LoraPlan:
    """Full fine-tuning (the fedavg-full baseline): no adapter layers, every weight trains in fp32 and every
    value is uploaded; the estimate is :func:`estimate`'s full_finetune one, what the edge holds in a round.
    It may not fit the profile's memory budget: :func:`full_finetune_refusal` says so."""
    plan = fixed_plan(shape, profile, (), runtime=runtime, lora_alpha=lora_alpha, max_rank=max_rank, cm=cm)
    return replace(plan, estimate=estimate(shape, profile, (), 1.0, False, plan.runtime, cm, full_finetune=True))


def full_finetune_refusal(plan: LoraPlan, profile: DeviceProfile) -> str | None:
    """Why `profile` cannot hold the full fine-tuning `plan` (one line naming both figures), or None."""
    need, budget = plan.estimate.memory_mb, profile.memory_budget_mb
    if need <= budget:
        return None
    return (
        f"profile {profile.name} cannot hold full fine-tuning: the planner estimates {need:.0f} MB of training "
        f"memory (of which {plan.estimate.edge_copies_mb:.0f} MB the edge's weight copies and checkpoint save), "
        f"over its budget of {budget:.0f} MB ({profile.ram_mb} MB RAM x {profile.train_memory_fraction})"
    )
