"""The methods `fedhft simulate` compares: how each plans devices, and how its server aggregates."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedhft.errors import FedHFTError


class MethodError(FedHFTError):
    """Unknown method or option."""


@dataclass(frozen=True)
class MethodSpec:
    name: str
    planner: str  # "legend" (per-device plan) | "uniform" (one LoRA plan) | "fixed-depth" | "full" (no LoRA)
    mask: bool  # upload the FedHFT masked slice (else every row)
    synchronous: bool  # wait for every client (a round) instead of buffered async aggregation
    aggregator: str  # server: "fedhft" (ΔW + SVD) | "fedavg" | "hetlora" | "flexlora" | "fedavg-full"
    clustering: bool
    server_args: tuple[str, ...] = field(default_factory=tuple)
    uniform_rank: int = 8
    uniform_targets: tuple[str, ...] = ("query", "value")
    learning_rate: float | None = None  # None: the run's --lr (a LoRA rate); full fine-tuning needs its own


METHODS: dict[str, MethodSpec] = {
    "fedhft": MethodSpec("fedhft", "legend", True, False, "fedhft", True),
    "fedhft-no-clustering": MethodSpec("fedhft-no-clustering", "legend", True, False, "fedhft", False),
    "fedhft-no-planner": MethodSpec("fedhft-no-planner", "fixed-depth", True, False, "fedhft", True),
    "fedavg-lora": MethodSpec("fedavg-lora", "uniform", False, True, "fedavg", False),
    "hetlora": MethodSpec("hetlora", "legend", False, True, "hetlora", False),
    "flexlora": MethodSpec("flexlora", "legend", False, True, "flexlora", False),
    # every weight trains: the usual BERT fine-tuning rate, not the LoRA one (2e-3 diverges, measured: 0.17)
    "fedavg-full": MethodSpec("fedavg-full", "full", False, True, "fedavg-full", False, learning_rate=5e-5),
}


def method_spec(name: str, no_clustering: bool = False, no_planner: bool = False) -> MethodSpec:
    key = name
    if name == "fedhft" and no_clustering:
        key = "fedhft-no-clustering"
    elif name == "fedhft" and no_planner:
        key = "fedhft-no-planner"
    if key not in METHODS:
        raise MethodError(f"unknown method '{name}'; choose from {sorted(METHODS)}")
    return METHODS[key]
