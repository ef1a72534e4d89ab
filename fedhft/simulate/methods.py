"""The methods `fedhft simulate` compares: how each plans devices, and which server strategy aggregates.

:data:`METHODS` are the comparison's recipes (planner, masking, rounds, learning rate) over the built-in
strategies; any other registered strategy (:mod:`fedhft.broker_server.strategies`, e.g. one named in
``FEDHFT_STRATEGIES``) is a method too, of the same name, planned and run as its capabilities say.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fedhft.broker_server.strategies import available, get_strategy
from fedhft.errors import FedHFTError

FULL_FINETUNE_LR = 5e-5  # every weight trains: the usual BERT fine-tuning rate, not the LoRA one (2e-3 diverges)


class MethodError(FedHFTError):
    """Unknown method or option."""


# How a method plans its devices (fedhft.device_profiles.planner and .fleet_plans), all on the same budgets:
PLANNERS: dict[str, str] = {
    "legend": "per device: the LEGEND plan (top layers, ranks growing toward the output) its memory, compute "
    "and link hold",
    "common": "one LEGEND plan for every device, the deepest and largest the weakest holds (--no-planner)",
    "uniform": "one plan for every device: every layer, q/v, the rank the weakest device holds",
    "budget-rank": "per device: every layer, q/v, the largest rank its memory and link hold (rank by resource)",
    "full": "no LoRA: every weight trains",
}


@dataclass(frozen=True)
class MethodSpec:
    name: str
    planner: str  # a key of PLANNERS
    mask: bool  # upload the FedHFT masked slice (else every row)
    synchronous: bool  # wait for every client (a round) instead of buffered async aggregation
    aggregator: str  # the server's strategy (a name of fedhft.broker_server.strategies.available())
    clustering: bool
    server_args: tuple[str, ...] = field(default_factory=tuple)
    learning_rate: float | None = None  # None: the run's --lr (a LoRA rate); full fine-tuning needs its own

    @property
    def shared_model(self) -> bool:
        """Every device gets the one global model, published on cluster/0 (the strategy's capability)."""
        return get_strategy(self.aggregator).shared_model


METHODS: dict[str, MethodSpec] = {
    "fedhft": MethodSpec("fedhft", "legend", True, False, "fedhft", True),
    "fedhft-no-clustering": MethodSpec("fedhft-no-clustering", "legend", True, False, "fedhft", False),
    # the planner ablation: same depth and ranks on every device (the largest the weakest holds), masks kept
    "fedhft-no-planner": MethodSpec("fedhft-no-planner", "common", True, False, "fedhft", True),
    # the masking ablation: every row of ΔW uploaded (mask ratio 1), the rest as fedhft
    "fedhft-no-masks": MethodSpec("fedhft-no-masks", "legend", False, False, "fedhft", True),
    # the asynchrony ablation: FedHFT's own synchronous rounds (every active device, then one version)
    "fedhft-sync": MethodSpec("fedhft-sync", "legend", True, True, "fedhft", True),
    # homogeneous LoRA: one rank everywhere, so the weakest device's
    "fedavg-lora": MethodSpec("fedavg-lora", "uniform", False, True, "fedavg", False),
    # HetLoRA (Cho et al. 2024): each device's rank from its capability, every layer; zero-padded aggregation
    "hetlora": MethodSpec("hetlora", "budget-rank", False, True, "hetlora", False),
    # FlexLoRA (Bai et al. 2024): each device's rank from its resource budget; ΔW averaged, SVD to each rank
    "flexlora": MethodSpec("flexlora", "budget-rank", False, True, "flexlora", False),
    # measured: fedavg-full at the LoRA rate 2e-3 diverges (accuracy 0.17)
    "fedavg-full": MethodSpec("fedavg-full", "full", False, True, "fedavg-full", False, learning_rate=FULL_FINETUNE_LR),
}


def strategy_method(name: str) -> MethodSpec:
    """The method of a strategy no recipe uses: per-device plans (full fine-tuning for a ``full`` strategy),
    masked uploads when it accepts them, buffered async aggregation, clustering when it clusters."""
    cls = get_strategy(name)
    full = cls.training == "full"
    return MethodSpec(
        name,
        "full" if full else "legend",
        cls.accepts_masked and not full,
        False,
        name,
        cls.clusters,
        learning_rate=FULL_FINETUNE_LR if full else None,
    )


def methods() -> dict[str, MethodSpec]:
    """Every method: the recipes, then one per registered strategy that no recipe uses."""
    used = {m.aggregator for m in METHODS.values()}
    return METHODS | {name: strategy_method(name) for name in available() if name not in used and name not in METHODS}


def method_spec(name: str, no_clustering: bool = False, no_planner: bool = False) -> MethodSpec:
    key = name
    if name == "fedhft" and no_clustering:
        key = "fedhft-no-clustering"
    elif name == "fedhft" and no_planner:
        key = "fedhft-no-planner"
    known = methods()
    if key not in known:
        raise MethodError(f"unknown method '{name}'; choose from {sorted(known)}")
    return known[key]
