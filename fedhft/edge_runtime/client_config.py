"""What `fedhft edge run` is told (ClientConfig) and what one run of the edge client reports (ClientSummary)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fedhft.edge_runtime.local_train import TrainReport
from fedhft.edge_runtime.trainer import DEFAULT_TRAINER_TIMEOUT
from fedhft.errors import FedHFTError


class ClientError(FedHFTError):
    """The client cannot start with the given settings."""


@dataclass(frozen=True)
class ClientConfig:
    """Everything `fedhft edge run` is told (see its --help)."""

    artifacts: Path
    data: Path
    broker: str
    task: str
    client_id: str
    state_dir: Path
    server_key: Path
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    local_steps: int = 50
    rounds: int = 0  # 0 = forever
    max_train_seconds: float | None = None
    encoding: str = "fp16"
    outbox_limit: int = 16
    battery_min_percent: float | None = None
    battery_check_seconds: float = 60.0
    batch_size: int | None = None  # default: the plan's batch size
    learning_rate: float = 1e-3
    seed: int = 0
    text_column: str = "text"
    label_column: str = "label"
    label_names: tuple[str, ...] | None = None
    cluster: int | None = None  # initial cluster (else learnt from a model's meta["cluster"])
    backend: str = "auto"
    trainer_timeout: float = DEFAULT_TRAINER_TIMEOUT  # seconds per native trainer call (subprocess backends only)
    ack_timeout: float = 300.0  # republish an update the broker took but the server never acked
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    eval_data: Path | None = None  # local test split: the received model's accuracy goes into update metrics
    mask_ratio: float | None = None  # override the manifest's upload mask (baselines upload every row)
    sim_time_scale: float = 0.0  # simulation: sleep this x the profile's simulated round duration
    virtual_time: bool = False  # simulation: rounds on the server's schedule and the profile's clock, no sleeping
    until_version: int | None = None  # virtual time: decline schedules from this model version on
    until_time: float | None = None  # virtual time: decline schedules starting at this virtual time or later
    max_rounds_per_version: int = 0  # wall clock: rounds on one model version (0: keep training until a newer one)
    reset_state: bool = False  # start over: drop saved state, model, checkpoint and queued updates


@dataclass
class ClientSummary:
    """What one run did (returned by EdgeClient.run)."""

    rounds_trained: int = 0
    acked: dict[int, str] = field(default_factory=dict)  # seq -> ack status
    refused_models: list[str] = field(default_factory=list)  # reasons
    refused_key_chains: list[str] = field(default_factory=list)  # reasons
    adopted_keys: list[str] = field(default_factory=list)  # key ids taken from the server's key chain
    model_version: int | None = None
    last_report: TrainReport | None = None
